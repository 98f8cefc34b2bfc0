import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Folders of every tiny backbone, built once per test session."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: str(tiny.build(kind, root / kind)) for kind in tiny.VISION + tiny.TEXT}


@pytest.fixture(autouse=True, scope="session")
def _quiet():
    from peftmm.backbones import quiet_libraries

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; fail fast, not after retries
    quiet_libraries()
