#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv, or $PEFTMM_VENV).
# Installs the CPU build of torch where no NVIDIA GPU is present (an unpinned torch would pull
# a multi-GB CUDA build), then peftmm itself with its test extras. Re-running is cheap: the
# install is skipped while pyproject.toml and this script are unchanged, and the torch present
# is the build this machine needs.
#
# Where `nvidia-smi` exists, torch must be a CUDA build: one installed without CUDA (a CPU wheel
# left by an earlier install) is replaced, and the CUDA wheel is named by its local version
# (torch==VERSION+cuXXX) from PyTorch's CUDA index, since a plain torch==VERSION resolves to the
# +cpu wheel wherever pip is configured with a local folder holding one, and training would then
# silently run on the CPU. PEFTMM_TORCH_CUDA (default cu128) picks the CUDA build,
# PEFTMM_TORCH_INDEX the index (default https://download.pytorch.org/whl/$PEFTMM_TORCH_CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PEFTMM_VENV:-.venv}"
python="${PYTHON:-python3}"
torch_version="2.13.0"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# What torch needs doing: "keep", "cpu" (install the CPU build) or "cuda" (install or replace it
# with the CUDA build).
torch_action() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    if "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
      echo keep
    else
      echo cuda
    fi
  elif "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo keep
  else
    echo cpu
  fi
}

action="$(torch_action)"
stamp="$venv/.peftmm-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$action" = keep ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"${pip[@]}" install -q --upgrade pip
case "$action" in
  cuda)
    cuda="${PEFTMM_TORCH_CUDA:-cu128}"
    index="${PEFTMM_TORCH_INDEX:-https://download.pytorch.org/whl/$cuda}"
    echo "setup: nvidia-smi found and torch is not a CUDA build: installing torch==$torch_version+$cuda from $index" >&2
    "${pip[@]}" install -q "torch==$torch_version+$cuda" --index-url "$index"
    if ! "$venv/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
      echo "setup: torch is still not a CUDA build after installing torch==$torch_version+$cuda; set" \
           "PEFTMM_TORCH_CUDA / PEFTMM_TORCH_INDEX to a CUDA build this machine can install" >&2
      exit 1
    fi
    ;;
  cpu)
    if [ -n "${PEFTMM_TORCH_INDEX:-}" ]; then   # e.g. https://download.pytorch.org/whl/cpu
      "${pip[@]}" install -q "torch==$torch_version" --index-url "$PEFTMM_TORCH_INDEX"
    else
      # On these machines the CPU wheel of this version is served from local disk.
      "${pip[@]}" install -q "torch==$torch_version"
    fi
    ;;
esac
"${pip[@]}" install -q -e ".[test]"
echo "$want" > "$stamp"
