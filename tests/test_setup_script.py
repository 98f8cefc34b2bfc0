"""scripts/setup.sh's torch choice, run for real against a stubbed machine: a fake ``python``
(the venv's) that logs every call and says whether torch imports and is a CUDA build, and a
fake ``nvidia-smi`` on PATH or none."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-c" ]; then
  case "$2" in
    *torch.version.cuda*) [ "$(cat "$FAKE_STATE")" = cuda ] ;;
    *"import torch"*) [ "$(cat "$FAKE_STATE")" != none ] ;;
    *) exit 0 ;;
  esac
  exit $?
fi
case "$*" in   # an install of a CUDA wheel makes torch a CUDA build, of another one a CPU build
  *"install -q torch=="*+cu*) echo cuda > "$FAKE_STATE" ;;
  *"install -q torch=="*) echo cpu > "$FAKE_STATE" ;;
esac
exit 0
"""


def _run(tmp_path: Path, torch_state: str, gpu: bool, **env) -> tuple[list[str], str]:
    """Run a copy of setup.sh; returns the fake python's calls and the torch state after."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", project / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", project / "pyproject.toml")
    venv_bin, tools = project / ".venv" / "bin", tmp_path / "tools"
    venv_bin.mkdir(parents=True, exist_ok=True)
    tools.mkdir(exist_ok=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    for tool in ("bash", "cat", "sha256sum", "cut", "dirname"):   # the script's own needs, nothing else
        if not (tools / tool).exists():
            (tools / tool).symlink_to(shutil.which(tool))
    smi = tools / "nvidia-smi"
    smi.unlink(missing_ok=True)
    if gpu:
        smi.write_text("#!/bin/sh\nexit 0\n")
        smi.chmod(0o755)
    log, state = tmp_path / "calls.log", tmp_path / "torch-state"
    log.write_text("")
    state.write_text(torch_state + "\n")
    result = subprocess.run([str(tools / "bash"), str(project / "scripts" / "setup.sh")], capture_output=True,
                            text=True, env={"PATH": str(tools), "FAKE_LOG": str(log), "FAKE_STATE": str(state),
                                            "HOME": str(tmp_path), **env})
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines(), state.read_text().strip()


def _torch_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if "install -q torch==" in c]


@pytest.mark.parametrize("before", ["none", "cpu"])
def test_a_gpu_machine_gets_a_cuda_wheel_named_by_its_local_version(tmp_path, before):
    calls, after = _run(tmp_path, before, gpu=True)
    assert _torch_installs(calls) == ["-m pip --disable-pip-version-check install -q torch==2.13.0+cu128 "
                                      "--index-url https://download.pytorch.org/whl/cu128"]
    assert after == "cuda"


def test_the_cuda_build_and_index_can_be_chosen(tmp_path):
    calls, _ = _run(tmp_path, "cpu", gpu=True, PEFTMM_TORCH_CUDA="cu126", PEFTMM_TORCH_INDEX="https://mirror/cu126")
    assert _torch_installs(calls) == ["-m pip --disable-pip-version-check install -q torch==2.13.0+cu126 "
                                      "--index-url https://mirror/cu126"]


def test_a_cuda_build_stays_and_a_rerun_is_cheap(tmp_path):
    calls, after = _run(tmp_path, "cuda", gpu=True)
    assert not _torch_installs(calls) and any("install -q -e .[test]" in c for c in calls) and after == "cuda"
    calls, _ = _run(tmp_path, "cuda", gpu=True)     # stamp written: nothing installs
    assert not any("install" in c for c in calls)


def test_a_stamped_gpu_machine_with_cpu_torch_is_not_skipped(tmp_path):
    _run(tmp_path, "cpu", gpu=False)                 # stamped while torch was the CPU build
    calls, after = _run(tmp_path, "cpu", gpu=True)   # then a GPU appears: the stamp does not hide it
    assert len(_torch_installs(calls)) == 1 and after == "cuda"


def test_a_cpu_machine_keeps_the_plain_pin(tmp_path):
    calls, after = _run(tmp_path, "none", gpu=False)
    assert _torch_installs(calls) == ["-m pip --disable-pip-version-check install -q torch==2.13.0"]
    assert after == "cpu"
    calls, _ = _run(tmp_path, "cpu", gpu=False)
    assert not _torch_installs(calls)
