#!/usr/bin/env bash
# One call on the GPU machine: build r1kernels._C with CUDA, run the `gpu` tests, run the benchmarks.
# Writes $OUT/results.json (every bench's JSON merged), $OUT/gpu_tests.log, $OUT/artifacts.tar.gz (PNGs,
# build log). Usage (device tool, repo root):  R1K_COMMIT=<sha> bash benchmarks/gpu_run.sh [bench,names]
# Env: PYTEST_K (pytest -k filter), TEST_FILES (see below), SKIP_TESTS=1, SKIP_BENCH=1, BENCH_ARGS (extra
# args, e.g. --quick).
set -uo pipefail
OUT=${OUT:-/tmp/r1k_out}
mkdir -p "$OUT/art"
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export R1K_COMMIT=${R1K_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# Peers and the trainer's deps travel as wheels in .wheels/ (carry=[".wheels"]); the machine has no network.
# Make them here with: pip download --no-deps -d .wheels liger-kernel; pip wheel --no-deps
# --no-build-isolation deepspeed -w .wheels; plus its deps for Python 3.12 (hjson msgpack py-cpuinfo ...).
if ls .wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --find-links .wheels liger-kernel deepspeed 2>&1 | tail -3
fi
t0=$(date +%s)
if ! python3 setup.py build_ext --inplace >"$OUT/art/build.log" 2>&1; then
  tail -40 "$OUT/art/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # TEST_FILES: run these files whole instead of the `gpu`-marked tests of every file; for files whose tests
  # take their device from torch.cuda.is_available() (test_moe.py, test_advantage.py). The Triton
  # files' CPU cases (test_logprob.py, test_grpo.py) need TRITON_INTERPRET=1 and fail on a GPU machine.
  if [ -n "${TEST_FILES:-}" ]; then sel=($TEST_FILES); else sel=(-m gpu tests); fi
  python3 -m pytest -q -p no:cacheprovider --durations=20 ${PYTEST_K:+-k "$PYTEST_K"} "${sel[@]}" >"$OUT/gpu_tests.log" 2>&1 || rc=$?
  tail -25 "$OUT/gpu_tests.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m benchmarks --out "$OUT/art" ${1:+--only "$1"} ${BENCH_ARGS:-} || rc=$?
  python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
merged = {}
for f in sorted(glob.glob(os.path.join(out, "art", "bench_*.json"))):
    merged[os.path.basename(f)[6:-5]] = json.load(open(f))
json.dump(merged, open(os.path.join(out, "results.json"), "w"), indent=1)
PY
fi
tar -czf "$OUT/artifacts.tar.gz" -C "$OUT/art" . && rm -rf "$OUT/art"
exit $rc
