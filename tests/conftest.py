import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402
from helpers import torch_rng_kept  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Folders of every tiny backbone, built once per test session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: str(tiny.build(kind, root / kind)) for kind in tiny.VISION + tiny.TEXT}


@pytest.fixture
def keep_torch_rng():
    """Each test leaves torch's global random state as it found it (for modules whose tests seed
    torch: `pytestmark = pytest.mark.usefixtures("keep_torch_rng")`)."""
    with torch_rng_kept():
        yield


@pytest.fixture(scope="module")
def keep_torch_rng_module():
    """The module as a whole leaves torch's global random state as it found it (its tests share
    seeded module fixtures, so the state may run on between them)."""
    with torch_rng_kept():
        yield


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    from peftmm.backbones import quiet_libraries

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; fail fast, not after retries
    quiet_libraries()


@pytest.fixture(scope="session")
def cli_run(tiny_models, tmp_path_factory):
    """A tiny run directory trained through the CLI (LoRA on the text tower), shared read-only:
    (recipe file, run directory, the summary JSON that `peftmm train` printed)."""
    import json

    import yaml
    from click.testing import CliRunner

    from peftmm.cli import main

    root = tmp_path_factory.mktemp("cli-run")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny.recipe(tiny_models["mobilenet_v2"], tiny_models["bert"],
                                                 text_methods=[{"type": "lora", "r": 2}])))
    result = CliRunner().invoke(main, ["train", str(recipe), "--output", str(root / "run"), "--no-progress",
                                       "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    return recipe, root / "run", json.loads(result.output[result.output.index("{"):])
