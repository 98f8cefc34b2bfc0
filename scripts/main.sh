#!/usr/bin/env bash
# The main job on the embedded default: train recipes/easy-vqa-lora.yaml, evaluate the bundle
# it produced on the easy-VQA test split, and answer one test question.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
peftmm=.venv/bin/peftmm
run="${PEFTMM_RUN_DIR:-runs/main}"
rm -rf "$run"
"$peftmm" train recipes/easy-vqa-lora.yaml --output "$run" "$@"
"$peftmm" eval "$run" --split test
image="$(.venv/bin/python -c 'import easy_vqa; print(easy_vqa.get_test_image_paths()[0])')"
"$peftmm" predict "$run" --image "$image" --question "what color is the shape?"
