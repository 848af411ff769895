#!/usr/bin/env bash
# One device call of benchmarks/bench_memory.py: the configurations matching CONFIGS (comma list of globs,
# `python benchmarks/bench_memory.py --list`) under BUDGET_S seconds, JSON in $OUT/memory.json.
# Needs .wheels/ carried (carry=[".wheels"]): deepspeed (+ hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions, msgpack, ninja, psutil, py-cpuinfo), trl (+ datasets, dill,
# multiprocess), peft, torchao.
set -uo pipefail
OUT=${OUT:-/tmp/r1k_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 R1K_COMMIT=${R1K_COMMIT:-unknown}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .wheels/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
python3 benchmarks/bench_memory.py --out "$OUT/memory.json" --configs "${CONFIGS:?set CONFIGS}" \
  --budget-s "${BUDGET_S:-540}" --max-steps "${MAX_STEPS:-2}"
