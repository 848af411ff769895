#!/usr/bin/env bash
# One device call for the rollout engine: its gpu tests (engine, sampling, decode attention), bench_rollout
# (+ a per-kernel profile of one decode step), the two kernels' benches, the GRPO step of train_gpu.py under
# ZeRO-2 and ZeRO-3, and TRL's GRPOTrainer on the same work. JSON under $OUT.
# Needs the wheels in .wheels/ (carry=[".wheels"]): deepspeed (+ hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions) and trl (+ datasets, dill, multiprocess).
# Env: SKIP (comma list of: tests,rollout,kernels,zero2,zero3,trl).
set -uo pipefail
OUT=${OUT:-/tmp/r1k_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 R1K_COMMIT=${R1K_COMMIT:-unknown}
skip() { [[ ",${SKIP:-}," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .wheels/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
rc=0
skip tests || { python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_generation.py tests/test_sampling.py \
  tests/test_decode_attention.py tests/test_fused_decode.py >"$OUT/gpu_tests.log" 2>&1 || rc=$?; tail -4 "$OUT/gpu_tests.log"; }
skip rollout || python3 -m benchmarks.bench_rollout --out "$OUT" --reps 2 --profile || rc=$?
skip kernels || python3 -m benchmarks --out "$OUT/k" --only sampling,decode_attention || rc=$?
skip zero2 || python3 benchmarks/train_gpu.py "$OUT/train_gpu_zero2.json" --steps 4 2>&1 | grep -v Warning | tail -3
skip zero3 || python3 benchmarks/train_gpu.py "$OUT/train_gpu_zero3.json" --steps 3 --zero-stage 3 2>&1 \
  | grep -v Warning | tail -3
skip trl || python3 benchmarks/train_trl_gpu.py "$OUT/train_trl.json" --steps 3 2>&1 | tail -2
rm -rf "$OUT"/*_run "$OUT"/*_trl_model
exit $rc
