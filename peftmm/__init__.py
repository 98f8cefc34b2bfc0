"""peftmm: parameter-efficient fine-tuning for multimodal (image + text) models.

The public API::

    import peftmm
    recipe = peftmm.load_recipe("recipes/easy-vqa-lora.yaml", overrides=["train.epochs=1"])
    result = peftmm.train(recipe)                       # -> TrainResult(run_dir, bundle_dir, metrics)
    predictor = peftmm.Predictor.load(result.bundle_dir)
    predictor.predict(image="shape.png", question="what color is the shape?")

    runtime = peftmm.Runtime()                          # many bundles on backbones loaded once
    runtime.register("adapters/easy-vqa-lora")
    runtime.predict([{"adapter": "easy-vqa-lora", "image": "shape.png", "text": "what shape is it?"}])
"""

__version__ = "0.1.0"   # the one place it is written: pyproject.toml reads it, bundles record it

import logging  # noqa: E402

# bitsandbytes warns at import, on CPU, that an optional 4-bit kernel package is missing; it is
# not needed (nf4 works without it), and the line would otherwise end up in every command's output.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from .errors import BundleError, DataError, MergeError, PeftmmError, RecipeError  # noqa: E402
from .recipe import from_dict as recipe_from_dict  # noqa: E402
from .recipe import load as load_recipe  # noqa: E402


def __getattr__(name):
    # Heavy modules (torch, transformers) load on first use, so `peftmm --help` stays fast.
    lazy = {"train": ("trainer", "train"), "Predictor": ("predict", "Predictor"),
            "load_bundle": ("bundle", "load_bundle"), "save_bundle": ("bundle", "save_bundle"),
            "MultimodalModel": ("model", "MultimodalModel"), "evaluate_bundle": ("predict", "evaluate_bundle"),
            "Runtime": ("runtime", "Runtime"), "bundle_summary": ("bundle", "bundle_summary"),
            "export_peft": ("peft_interop", "export_peft"), "import_peft": ("peft_interop", "import_peft"),
            "merge": ("merging", "merge")}
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'peftmm' has no attribute {name!r}")


__all__ = ["BundleError", "DataError", "MergeError", "MultimodalModel", "PeftmmError", "Predictor", "RecipeError",
           "Runtime", "bundle_summary", "evaluate_bundle", "export_peft", "import_peft", "load_bundle", "load_recipe",
           "merge", "recipe_from_dict", "save_bundle", "train"]
