#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv, or $PEFTMM_VENV).
# Installs the CPU build of torch where no NVIDIA GPU is present (an unpinned torch would pull
# a multi-GB CUDA build), then peftmm itself with its test extras. Re-running is cheap: the
# install is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PEFTMM_VENV:-.venv}"
python="${PYTHON:-python3}"
torch_version="2.13.0"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.peftmm-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install -q "torch==$torch_version"
  elif [ -n "${PEFTMM_TORCH_INDEX:-}" ]; then   # e.g. https://download.pytorch.org/whl/cpu
    "${pip[@]}" install -q "torch==$torch_version" --index-url "$PEFTMM_TORCH_INDEX"
  else
    # On these machines the CPU wheel of this version is served from local disk.
    "${pip[@]}" install -q "torch==$torch_version"
  fi
fi
"${pip[@]}" install -q -e ".[test]"
echo "$want" > "$stamp"
