"""MultimodalModel: two frozen towers with injected methods, a fusion adapter and a task head.

It knows which parameters train (those the methods own, plus fusion and head) and names them
in one flat state dict with ``vision.`` / ``text.`` / ``fusion.`` / ``head.`` prefixes: that
dict, and nothing else, is what a bundle stores.
"""

from __future__ import annotations

import torch
from torch import nn

from . import schema
from .augment import AugmentSpec, augment_pixels
from .backbones import TOWERS, Tower, load_tower
from .errors import BundleError, PeftmmError, RecipeError
from .fusion import build_fusion
from .methods import build_method
from .methods.base import DEFAULT_SLOT
from .tasks import TASKS, build_task
from .tasks.base import MEMORY


class MultimodalModel(nn.Module):
    def __init__(self, towers: dict[str, Tower], methods: dict[str, list], fusion: nn.Module, task,
                 slot: str = DEFAULT_SLOT):
        super().__init__()
        self.towers = nn.ModuleDict(towers)
        self.methods = methods
        self.fusion = fusion
        self.task = task
        self.head = task.build_head(fusion.out_dim)
        self.slot = slot
        self.augment = AugmentSpec()   # build() sets the recipe's

    @classmethod
    def build(cls, recipe, labels: list[str], device="cpu", towers: dict[str, Tower] | None = None,
              slot: str = DEFAULT_SLOT) -> MultimodalModel:
        """Load both backbones frozen, inject the recipe's methods, add fusion and head.

        ``towers`` passes backbones that are already loaded (and possibly shared with other
        models, see runtime.py): the methods go into them under ``slot``. If an injection fails,
        whatever this call injected is taken out again.
        """
        towers, methods = dict(towers or {}), {name: [] for name in TOWERS}
        try:
            for name in TOWERS:
                spec = getattr(recipe, name)
                if name not in towers:
                    towers[name] = load_tower(name, spec.backbone, spec.precision, device=device,
                                              image_size=spec.image_size if name == "vision" else None,
                                              background=spec.background,
                                              causal_lm=name == "text" and _task_needs_lm(recipe))
                for config in spec.methods:
                    method = build_method(config, slot)
                    try:
                        method.inject(towers[name])
                    except PeftmmError as e:
                        raise PeftmmError(e.message, e.where or recipe.source) from None
                    methods[name].append(method)
                if spec.gradient_checkpointing and spec.methods:  # nothing to train: no activations kept
                    try:
                        towers[name].enable_checkpointing()
                    except PeftmmError as e:
                        raise RecipeError(e.message, e.where or recipe.source) from None
            fusion = build_fusion(recipe.fusion, towers["vision"].info.hidden_size, towers["text"].info.hidden_size)
            model = cls(towers, methods, fusion, build_task(recipe.task, labels), slot)
            model.max_length = recipe.text.max_length
            model.task.attach(model)
        except BaseException:  # a fusion, head or task that cannot be built takes the injected methods out too
            for name, injected in methods.items():
                for method in reversed(injected):
                    method.remove(towers[name])
            raise
        model.augment = recipe.vision.augment
        model.fusion.to(device)
        model.head.to(device)
        model._mark_trainable()
        return model

    def _apply(self, fn, recurse=True):
        # .to(device) and friends: the task's memory (plain tensors, not buffers: bundles keep it
        # under memory.*, not in the state dict) follows the head
        super()._apply(fn, recurse)
        for p in self.head.parameters():
            self.task.memory_to(p.device)
            break
        return self

    def remove_methods(self) -> None:
        """Take this model's injected modules out of its (shared) towers."""
        for name, tower in self.towers.items():
            for method in reversed(self.methods[name]):
                method.remove(tower)
            self.methods[name] = []

    # -- which parameters train ------------------------------------------------------------
    def _mark_trainable(self) -> None:
        for name, tower in self.towers.items():
            for pname, param in tower.model.named_parameters():
                param.requires_grad_(self._owner(name, pname) is not None)

    def _owner(self, tower: str, parameter_name: str):
        return next((m for m in self.methods[tower] if m.owns(parameter_name)), None)

    def _method_parameters(self):
        """(tower, owning method, name as a bundle stores it, live parameter) of every tower
        parameter this model's methods own (their slot only)."""
        for name, tower in self.towers.items():
            for pname, param in tower.model.named_parameters():
                owner = self._owner(name, pname)
                if owner is not None:
                    yield name, owner, owner.canonical_name(pname), param

    def has_trainable(self, tower: str) -> bool:
        return bool(self.methods[tower])

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: each method says the rate of each of its parameters (full fine-tuning
        its own ``lr``, LoRA+ a multiple for lora_B); fusion and head train at ``lr``."""
        groups: dict[float, list] = {}
        for name, tower in self.towers.items():
            for pname, param in tower.model.named_parameters():
                owner = self._owner(name, pname)
                if owner is not None:
                    groups.setdefault(owner.learning_rate(pname, lr), []).append(param)
        for module in (self.fusion, self.head):
            groups.setdefault(lr, []).extend(p for p in module.parameters() if p.requires_grad)
        return [{"params": params, "lr": rate} for rate, params in groups.items() if params]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{tower}.{key}": param.detach() for tower, _, key, param in self._method_parameters()}
        for prefix, module in (("fusion", self.fusion), ("head", self.head)):
            state.update({f"{prefix}.{k}": v.detach() for k, v in module.state_dict().items()})
        return state

    def export(self, recipe) -> tuple[dict[str, torch.Tensor], dict]:
        """What a bundle stores: the trainable tensors and the recipe (as data) that rebuilds them.

        Each method may fold training-only structure away first (see Method.export), so its
        tensors and settings in the saved recipe can differ from those it trained with.
        """
        if getattr(self, "merged", False):
            raise PeftmmError("this model's LoRA weights were merged into its backbones for inference; "
                              "save the bundle before merging")
        state = {f"{prefix}.{k}": v.detach() for prefix, module in (("fusion", self.fusion), ("head", self.head))
                 for k, v in module.state_dict().items()}
        parameters = list(self._method_parameters())
        data = recipe.to_dict()
        for name, tower in self.towers.items():
            for index, method in enumerate(self.methods[name]):
                mine = {key: param.detach() for t, owner, key, param in parameters if t == name and owner is method}
                tensors, config = method.export(tower, mine)
                state.update({f"{name}.{k}": v for k, v in tensors.items()})
                data[name]["methods"][index] = {"type": method.registry_name, **schema.to_dict(config)}
        state.update({f"{MEMORY}.{k}": v for k, v in self.task.memory_tensors().items()})
        return state, data

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], where: str | None = None) -> None:
        """Load exactly the tensors :meth:`trainable_state_dict` names; anything else is an error."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise BundleError(f"adapter tensors do not match its config: missing {_few(missing)}, "
                              f"unexpected {_few(unexpected)}", where)
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise BundleError(f"tensor {key} has shape {tuple(tensor.shape)}, the config builds "
                                  f"{tuple(expected[key].shape)}", where)
            if tensor.dtype.is_floating_point != expected[key].dtype.is_floating_point:  # bits reinterpreted
                raise BundleError(f"tensor {key} has dtype {tensor.dtype}, the config builds "
                                  f"{expected[key].dtype}", where)
        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(state[key].to(target.device, target.dtype))

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total): the total counts each backbone's parameters once, quantised or not."""
        trainable = sum(t.numel() for t in self.trainable_state_dict().values())
        total = sum(_numel(p) for p in self.parameters())
        return trainable, total

    def merge_methods(self) -> list[str]:
        """Merge every mergeable method into its backbone for inference; returns what merged.

        A merged model predicts as before but can no longer be trained or saved as a bundle.
        """
        merged = []
        for name, tower in self.towers.items():
            for method in self.methods[name]:
                if method.mergeable:
                    method.merge(tower)
                    merged.append(f"{name}.{method.registry_name}")
        self.merged = bool(merged)
        return merged

    # -- forward ---------------------------------------------------------------------------
    def activate(self, tower: str) -> None:
        """Make this model's slot the one that acts in a (possibly shared) tower: O(1)."""
        self.towers[tower].slots.activate(self.slot if self.methods[tower] else None)

    def encode(self, tower: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens for each distinct input of one tower (cached ones arrive precomputed)."""
        if f"{tower}_tokens" in batch:
            return batch[f"{tower}_tokens"], batch[f"{tower}_mask"]
        self.activate(tower)
        if tower == "vision":
            pixels = batch["pixel_values"]
            if self.training and self.augment.active:
                pixels = augment_pixels(pixels, self.augment)
            return self.towers["vision"](pixel_values=pixels)
        return self.towers["text"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def forward(self, batch: dict) -> torch.Tensor:
        return self.task.forward(self, batch)  # most tasks: encode, fuse, head (tasks/base.py)


def _task_needs_lm(recipe) -> bool:
    """Whether the recipe's task decodes text with the text tower (captioning): it then loads as a
    causal LM, output layer included."""
    return TASKS.get(recipe.task.type).text_tower_causal_lm


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs 4-bit weights two to a byte; count the parameters they stand for.
    shape = getattr(param, "quant_state", None)
    return int(torch.Size(shape.shape).numel()) if shape is not None else param.numel()


def _few(keys: list[str]) -> str:
    return "none" if not keys else ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
