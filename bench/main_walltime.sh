#!/usr/bin/env bash
# Wall time of the README's main-job command (`make main`) from a fresh clone: no virtual
# environment, empty model cache, set-up included. Writes bench/results/main_walltime.json.
#   bench/main_walltime.sh            (takes ~10 minutes on a 2-core CPU)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$root" "$work/peftmm"
export PEFTMM_CACHE="$work/cache"
start=$(date +%s.%N)
(cd "$work/peftmm" && make main) > "$work/main.log" 2>&1 || { tail -40 "$work/main.log"; exit 1; }
end=$(date +%s.%N)
mkdir -p "$root/bench/results"
"$work/peftmm/.venv/bin/python" - "$start" "$end" "$work/main.log" "$root/bench/results/main_walltime.json" <<'PY'
import json, platform, os, sys, re
start, end, log, out = float(sys.argv[1]), float(sys.argv[2]), open(sys.argv[3]).read(), sys.argv[4]
evals = re.findall(r'"accuracy": ([0-9.]+)', log)
answer = re.search(r"image: (.*)\nquestion: (.*)\nanswer: (.*)", log)
result = {"command": "make main (fresh clone, fresh .venv, empty PEFTMM_CACHE)", "wall_seconds": round(end - start, 1),
          "cpus": os.cpu_count(), "machine": platform.machine(), "eval_test_accuracy": float(evals[-1]) if evals else None,
          "prediction": dict(zip(["image", "question", "answer"], answer.groups())) if answer else None}
json.dump(result, open(out, "w"), indent=2)
print(json.dumps(result, indent=2))
PY
