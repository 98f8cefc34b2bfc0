"""The pickle audit: peftmm never unpickles a file a user hands it.

(a) Static: every module under peftmm/ is parsed and each way of unpickling is looked for:
    importing pickle / _pickle / dill / joblib / cloudpickle / shelve / marshal (directly or
    through ``importlib.import_module`` / ``__import__``), ``torch.load`` (without
    ``weights_only=True`` always; with it only where ALLOWED says why), ``np.load(allow_pickle=...)``,
    ``torch.jit.load``, ``read_pickle``, and ``from_pretrained`` of anything but a config,
    tokenizer or processor class without ``use_safetensors=True``. Known-safe calls are listed in
    ALLOWED by file with the reason, and an entry that no longer matches anything fails too.
(b) Runtime: with pickle.load / pickle.loads / pickle.Unpickler and torch.load made to raise
    (and record the call), tiny backbones go through everything that reads files: training
    through the CLI (checkpoints included), load_bundle, Predictor, `peftmm predict / eval /
    inspect / publish`, the multi-adapter Runtime, `peftmm train --resume`, export-peft and
    import-peft, and the refusals of pickle-only inputs (a backbone folder or hub snapshot with
    only pytorch_model.bin, a peft adapter with only adapter_model.bin). None may call them.
"""

from __future__ import annotations

import ast
import contextlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import tiny
import torch
import yaml
from click.testing import CliRunner

from peftmm.errors import BundleError, PeftmmError

ROOT = Path(__file__).resolve().parent.parent
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
# from_pretrained of these reads JSON / tokenizer files, never weights
SAFE_PRETRAINED = ("Config", "Tokenizer", "TokenizerFast", "Processor", "ImageProcessor", "FeatureExtractor")

# (file, call) -> why it is safe. Each entry must match a call the audit finds.
ALLOWED = {
    ("peftmm/zoo.py", "torch.load"):
        "the zoo's torchvision MobileNetV2 .pth, read with weights_only=True (tensors only) and only after "
        "its sha256 matched zoo.json; never a user's file",
    ("peftmm/zoo.py", "AutoModelForCausalLM.from_pretrained"):
        "the zoo's SmolLM2 GGUF (gguf_file=), checksum-verified first; transformers parses GGUF with the "
        "gguf package, no pickle; the converted folder is written as safetensors",
}


def _dotted(node) -> str:
    """``a.b.c`` for a Name/Attribute chain (calls and subscripts in it become ``?``)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _pickle_allowed(call: ast.Call) -> bool:
    """np.load's allow_pickle set to anything but a literal False."""
    value = _keyword(call, "allow_pickle")
    return value is not None and not (isinstance(value, ast.Constant) and value.value is False)


def audit_source(source: str, filename: str = "<snippet>") -> list[tuple[int, str, str]]:
    """Findings (line, call, rule) in one module's source."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    found.append((node.lineno, f"import {alias.name}", "imports a pickle module"))
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLE_MODULES:
                found.append((node.lineno, f"from {node.module} import ...", "imports a pickle module"))
            if module == "torch" and any(a.name == "load" for a in node.names):
                found.append((node.lineno, "from torch import load", "torch.load under another name"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if last in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).split(".")[0] in PICKLE_MODULES:
                found.append((node.lineno, f"{name}({node.args[0].value!r})", "imports a pickle module"))
            elif name.split(".")[0] in PICKLE_MODULES and last in ("load", "loads", "Unpickler", "open"):
                found.append((node.lineno, name, "unpickles"))
            elif name in ("torch.load", "torch.serialization.load"):
                if _is_true(_keyword(node, "weights_only")):
                    found.append((node.lineno, "torch.load", "torch.load(weights_only=True): needs a reason"))
                else:
                    found.append((node.lineno, "torch.load", "torch.load without weights_only=True"))
            elif name.startswith("torch.jit.") and last == "load" or name.startswith("torch.package"):
                found.append((node.lineno, name, "TorchScript/torch.package archives hold pickles"))
            elif last == "load" and name.split(".")[0] in ("np", "numpy") and _pickle_allowed(node):
                found.append((node.lineno, name, "np.load with allow_pickle"))
            elif last == "read_pickle":
                found.append((node.lineno, name, "read_pickle"))
            elif last == "from_pretrained":
                owner = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
                if not owner.endswith(SAFE_PRETRAINED) and not _is_true(_keyword(node, "use_safetensors")):
                    found.append((node.lineno, name, "from_pretrained of a model without use_safetensors=True"))
    return found


def audit_package() -> list[tuple[str, int, str, str]]:
    findings = []
    for path in sorted((ROOT / "peftmm").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        findings += [(rel, *f) for f in audit_source(path.read_text(), rel)]
    return findings


# -- (a) the static audit ---------------------------------------------------------------------

def test_no_module_of_peftmm_unpickles():
    findings = audit_package()
    assert len({path for path in (ROOT / "peftmm").rglob("*.py")}) > 30  # the walk found the package
    bad = [f"{path}:{line}: {call}: {rule}" for path, line, call, rule in findings if (path, call) not in ALLOWED]
    assert not bad, "pickle-capable calls (fix them, or add a reviewed entry to ALLOWED):\n" + "\n".join(bad)
    used = {(path, call) for path, _, call, _ in findings}
    assert not set(ALLOWED) - used, f"ALLOWED entries that match nothing any more: {sorted(set(ALLOWED) - used)}"


def test_backbone_weights_are_loaded_with_use_safetensors():
    source = (ROOT / "peftmm/backbones.py").read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and _dotted(n.func).endswith("from_pretrained") and _dotted(n.func).startswith("cls.")]
    assert calls and all(_is_true(_keyword(c, "use_safetensors")) for c in calls)


@pytest.mark.parametrize("snippet, rule", [
    ("import pickle", "imports a pickle module"),
    ("import pickle as p", "imports a pickle module"),
    ("from pickle import loads", "imports a pickle module"),
    ("import _pickle", "imports a pickle module"),
    ("import dill", "imports a pickle module"),
    ("import joblib", "imports a pickle module"),
    ("import cloudpickle", "imports a pickle module"),
    ("import shelve", "imports a pickle module"),
    ("import marshal", "imports a pickle module"),
    ("importlib.import_module('pickle')", "imports a pickle module"),
    ("__import__('dill')", "imports a pickle module"),
    ("pickle.loads(data)", "unpickles"),
    ("pickle.Unpickler(f).load()", "unpickles"),
    ("marshal.load(f)", "unpickles"),
    ("shelve.open(path)", "unpickles"),
    ("joblib.load(path)", "unpickles"),
    ("torch.load(path)", "torch.load without weights_only=True"),
    ("torch.load(path, weights_only=False)", "torch.load without weights_only=True"),
    ("torch.load(path, map_location='cpu', weights_only=True)", "torch.load(weights_only=True): needs a reason"),
    ("torch.serialization.load(path)", "torch.load without weights_only=True"),
    ("from torch import load", "torch.load under another name"),
    ("torch.jit.load(path)", "TorchScript/torch.package archives hold pickles"),
    ("np.load(path, allow_pickle=True)", "np.load with allow_pickle"),
    ("numpy.load(path, allow_pickle=flag)", "np.load with allow_pickle"),
    ("pd.read_pickle(path)", "read_pickle"),
    ("AutoModel.from_pretrained(path)", "from_pretrained of a model without use_safetensors=True"),
    ("cls.from_pretrained(path, use_safetensors=False)", "from_pretrained of a model without use_safetensors=True"),
    ("PeftModel.from_pretrained(model, path)", "from_pretrained of a model without use_safetensors=True"),
    ("transformers.BertModel.from_pretrained(\n    path,\n    dtype=x)",
     "from_pretrained of a model without use_safetensors=True"),
])
def test_the_audit_finds_each_way_to_unpickle(snippet, rule):
    assert [f[2] for f in audit_source(snippet)] == [rule]


@pytest.mark.parametrize("snippet", [
    "np.load(path)", "np.load(path, allow_pickle=False)", "AutoConfig.from_pretrained(path)",
    "AutoTokenizer.from_pretrained(path, gguf_file=name)", "LoraConfig.from_pretrained(path)",
    "BertTokenizerFast.from_pretrained(path)", "cls.from_pretrained(path, config=c, use_safetensors=True)",
    "json.loads(text)", "yaml.safe_load(text)", "safetensors.torch.load_file(path)", "'pickle.loads(x)'",
    "# torch.load(path)",
])
def test_the_audit_passes_what_reads_no_pickle(snippet):
    assert audit_source(snippet) == []


# -- (b) the runtime check --------------------------------------------------------------------

class Unpickled(BaseException):
    """Not an Exception: no ``except Exception`` on the way can swallow it."""


@pytest.fixture
def no_unpickling():
    """While active, pickle.load/loads/Unpickler and torch.load raise Unpickled; every call is
    recorded in the list the fixture returns (asserted empty at the end as well)."""
    calls: list[str] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise Unpickled(f"{name} was called")
        return call

    class RefusingUnpickler(pickle.Unpickler):  # a class, so modules subclassing it still import
        def __init__(self, *args, **kwargs):
            calls.append("pickle.Unpickler")
            raise Unpickled("pickle.Unpickler was used")

    @contextlib.contextmanager
    def guard():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pickle, "load", refuse("pickle.load"))
            patch.setattr(pickle, "loads", refuse("pickle.loads"))
            patch.setattr(pickle, "Unpickler", RefusingUnpickler)
            patch.setattr(torch, "load", refuse("torch.load"))
            patch.setattr(torch.serialization, "load", refuse("torch.load"))
            yield calls

    yield guard
    assert calls == [], f"unpickling was attempted: {calls}"


def invoke(*args):
    from peftmm.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(tiny.build(kind, root / kind)) for kind in ("mobilenet_v2", "bert")}


def pickle_only_copy(folder: str, target: Path) -> Path:
    """``folder`` with its weights as pytorch_model.bin only (what transformers 4's
    save_pretrained(safe_serialization=False) wrote; transformers 5 writes safetensors only)."""
    from safetensors.torch import load_file

    shutil.copytree(folder, target)
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def test_the_guard_catches_what_plain_transformers_would_unpickle(backbones, tmp_path, no_unpickling):
    from transformers import BertModel

    folder = pickle_only_copy(backbones["bert"], tmp_path / "bin-only")
    with no_unpickling() as calls:
        with pytest.raises(Unpickled):
            BertModel.from_pretrained(folder)  # without use_safetensors: torch.load on the .bin
        assert calls == ["torch.load"]
    calls.clear()  # the guard works; what follows must not trip it


BIN_ONLY = "only safetensors weights are loaded"


def test_a_backbone_folder_with_only_pytorch_model_bin_is_refused(backbones, tmp_path, no_unpickling):
    from peftmm.backbones import load_tower

    folder = pickle_only_copy(backbones["bert"], tmp_path / "bin-only")
    with no_unpickling():
        with pytest.raises(PeftmmError) as error:
            load_tower("text", str(folder))
        message = str(error.value)
        assert f"cannot load the text backbone {folder}: {BIN_ONLY}" in message
        assert "this folder has pytorch_model.bin and no model.safetensors" in message

        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tiny.recipe(backbones["mobilenet_v2"], str(folder))))
        result = invoke("train", recipe, "--output", tmp_path / "run", "--no-progress")
        one_error_line(result, BIN_ONLY)
        assert not (tmp_path / "run").exists()


def test_configs_and_indexes_pointing_at_pickles_are_refused(backbones, tmp_path, no_unpickling):
    """use_safetensors=True alone would not stop these: transformers follows a config's
    transformers_weights, and loads whatever shards a safetensors index names."""
    from peftmm.backbones import load_tower

    named = shutil.copytree(backbones["bert"], tmp_path / "named")
    torch.save({}, named / "adapter_model.bin")
    config = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    index = pickle_only_copy(backbones["bert"], tmp_path / "index")
    (index / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "pytorch_model.bin"}}))
    with no_unpickling():
        for folder, why in ((named, "its config names the weights file 'adapter_model.bin'"),
                            (index, "model.safetensors.index.json names the shards pytorch_model.bin")):
            with pytest.raises(PeftmmError, match=BIN_ONLY) as error:
                load_tower("text", str(folder))
            assert why in str(error.value)


def test_a_hub_snapshot_with_only_pytorch_model_bin_is_refused(backbones, tmp_path, monkeypatch, no_unpickling):
    """A hub id: transformers' own refusal under use_safetensors=True, turned into peftmm's."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--someone--pickled"
    pickle_only_copy(backbones["bert"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    from peftmm.backbones import load_tower

    with no_unpickling():
        with pytest.raises(PeftmmError) as error:
            load_tower("text", "someone/pickled")
    assert str(error.value).startswith(f"cannot load the text backbone someone/pickled: {BIN_ONLY}")
    assert "the repository has no model.safetensors" in str(error.value)


def test_everything_that_reads_files_unpickles_nothing(backbones, tmp_path, no_unpickling):
    from peftmm.bundle import bundle_summary, load_bundle
    from peftmm.data import load_splits
    from peftmm.predict import Predictor
    from peftmm.recipe import from_dict
    from peftmm.runtime import Runtime

    recipe = tmp_path / "tiny.yaml"
    data = tiny.recipe(backbones["mobilenet_v2"], backbones["bert"],
                       vision_methods=[{"type": "adapter", "reduction_factor": 4}],
                       text_methods=[{"type": "lora", "r": 2}],
                       data={"max_train_samples": 32, "max_eval_samples": 16})
    recipe.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    example = load_splits(from_dict(data).data).test[0]
    with no_unpickling():
        # train through the CLI: backbones, data, checkpoints at both epoch ends, the bundle
        result = invoke("train", recipe, "--output", run, "--no-progress", "--set", "train.epochs=2")
        assert result.exit_code == 0, result.output
        assert len(list((run / "checkpoints").glob("step-*"))) == 2

        model, _, _ = load_bundle(run / "bundle")
        predictor = Predictor.load(run, device="cpu")
        answer = predictor.predict(example["image"], example["text"])
        assert answer["answer"] == model.task.decode(model(predictor.batcher([example])))[0]["answer"]
        assert bundle_summary(run / "bundle")["trainable_params"] > 0
        for args in (("predict", run, "--image", example["image"], "--question", example["text"]),
                     ("eval", run, "--max-samples", 8), ("inspect", run), ("list", run),
                     ("publish", run, "tiny-pub", "--to", tmp_path / "adapters")):
            result = invoke(*args)
            assert result.exit_code == 0, (args, result.output)

        runtime = Runtime(device="cpu", root=tmp_path / "adapters")
        runtime.register("tiny-pub")
        served = runtime.predict([{"adapter": "tiny-pub", **example}])
        assert served[0]["answer"] == answer["answer"]
        runtime.unregister("tiny-pub")

        # resume: the run as if killed after its first epoch's checkpoint
        resumed = shutil.copytree(run, tmp_path / "resumed")
        shutil.rmtree(resumed / "bundle")
        newest = max((resumed / "checkpoints").glob("step-*"))
        shutil.rmtree(newest)
        result = invoke("train", "--resume", resumed, "--no-progress")
        assert result.exit_code == 0, result.output
        assert "resuming from" in result.output and (resumed / "bundle" / "adapter_model.safetensors").is_file()

        # LoRA out to vanilla peft and back in
        result = invoke("export-peft", run, tmp_path / "peft-text", "--tower", "text")
        assert result.exit_code == 0, result.output
        result = invoke("import-peft", tmp_path / "peft-text", run, tmp_path / "imported", "--tower", "text")
        assert result.exit_code == 0, result.output
        load_bundle(tmp_path / "imported")

    # a peft adapter that is a pickle: refused by name, never read
    pickled = shutil.copytree(tmp_path / "peft-text", tmp_path / "peft-pickled")
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with no_unpickling():
        result = invoke("import-peft", pickled, run, tmp_path / "never", "--tower", "text")
        one_error_line(result, "adapter_model.bin exists, but only safetensors is read")
        assert not (tmp_path / "never").exists()
        with pytest.raises(BundleError, match="only safetensors is read"):
            from peftmm.peft_interop import import_peft

            import_peft(pickled, run / "bundle", "text", tmp_path / "never")

