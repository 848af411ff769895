#!/usr/bin/env bash
# One device call for the rollout engine (after building the CUDA extension): its gpu tests (engine, sampling, decode attention), bench_rollout
# (+ a per-kernel profile of one decode step), the two kernels' benches, the GRPO step of train_gpu.py (its
# defaults: ZeRO-1, fused layers) and under ZeRO-3, and TRL's GRPOTrainer on the same work, without and with
# use_r1kernels. JSON under $OUT.
# Needs the wheels in .wheels/ (carry=[".wheels"]): deepspeed (+ hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection, typing-extensions) and trl (+ datasets, dill, multiprocess).
# Env: DL, DLV (see below); SKIP (comma list of: tests,rollout,kernels,step,zero3,trl,trlk,trle,varied); KERNELS (benches, default
# sampling,decode_attention); TESTS (gpu test files, default the engine's four); ROLLOUT_ARGS (default
# "--reps 2 --profile"; add --skip-peers to leave out transformers generate); TRL_STEPS (default 4: 3 timed batches, as train_gpu.py); TRL_ORDER;
# TEST_MARK (default gpu; empty: all of $TESTS); AB (see below); TRAIN_ARGS (appended to the default, AB and varied-length train_gpu.py runs, e.g. "--steps 4 --profile-step 3").
# Each trainer run is killed with SIGKILL past 300 s (SIGTERM would make it save a checkpoint).
set -uo pipefail
OUT=${OUT:-/tmp/r1k_out}
mkdir -p "$OUT"
# R1K_COMMIT: pass the local HEAD in the run command (R1K_COMMIT=abc1234 bash ...): the device copy's git HEAD can be stale
export PYTHONUNBUFFERED=1 R1K_COMMIT=${R1K_COMMIT:-unknown}
skip() { [[ ",${SKIP:-}," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .wheels/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site
rc=0
# the CUDA extension of this tree (ninja rebuilds only what changed on a warm machine): the gpu tests and the
# backend="cuda" paths need it, and a .so left by an earlier call would be another commit's
MAX_JOBS=${MAX_JOBS:-16} python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; echo "BUILD FAILED"; rc=1; }
k300() { timeout -s KILL 300 "$@"; }
# DL=1: first rk.decode_linear: its gpu tests, bench_decode_linear (killed past DL_TIMEOUT s, default 420; the kernel beside the engine's cuBLAS form of
# each projection; DL=sweep: + the config sweep), and the fixed rollout beside the same engine with its decode
# projections changed (bench_rollout --ab $ROLLOUT_AB, default
# cublas,nofusions,down,dl_all_rows: see
# bench_rollout.AB), with a per-kernel profile of a decode step (bench_rollout.json)
if [ -n "${DL:-}" ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_linear.py 2>&1 | tail -2
  timeout "${DL_TIMEOUT:-420}" python3 -m benchmarks.bench_decode_linear $([ "$DL" = sweep ] && echo --sweep) --out "$OUT" 2>&1 \
    | grep -v "^   config" | tail -40
  python3 -m benchmarks.bench_rollout --out "$OUT" --only fixed --skip-peers --reps 3 --profile \
    --ab "${ROLLOUT_AB:-cublas,nofusions,down,dl_all_rows}" || rc=$?
  SKIP=${SKIP:-},rollout
fi
# DLV=1: rk.decode_linear's gpu tests and its experiment benches: the x tile's rows (BLOCK_M 64 vs next_pow2(rows),
# --rows-sweep), then the warp-specialized K loop (--ws, its own process: a miscompile cannot take the sweep with it)
if [ -n "${DLV:-}" ]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_linear.py 2>&1 | tail -2
  python3 -m pytest -q -p no:cacheprovider tests/test_bench_decode_linear_variants.py 2>&1 | tail -2  # on cuda there
  timeout 300 python3 -m benchmarks.bench_decode_linear_variants --rows-sweep "${DLV_ROWS:-2,8,16,32,64}" --out "$OUT" \
    2>&1 | tail -20
  timeout 180 python3 -m benchmarks.bench_decode_linear_variants --ws --out "$OUT" 2>&1 | tail -12
fi
skip rollout || python3 -m benchmarks.bench_rollout --out "$OUT" ${ROLLOUT_ARGS:---reps 2 --profile} || rc=$?
skip step || k300 python3 benchmarks/train_gpu.py "$OUT/train_gpu.json" --steps 4 ${TRAIN_ARGS:-} 2>&1 | grep -v Warning | tail -3
skip zero3 || k300 python3 benchmarks/train_gpu.py "$OUT/train_gpu_zero3.json" --steps 3 --zero-stage 3 2>&1 \
  | grep -v Warning | tail -3
trl_run() {  # $1: trl | trlk (use_r1kernels with TRL's generate) | trle (use_r1kernels, its default rollout_engine=r1train)
  local name flags=""       # $2: a suffix for the JSON name
  case $1 in trlk) name=train_trl_r1kernels; flags="--use-r1kernels --rollout-engine transformers" ;;
    trle) name=train_trl_r1kernels_engine; flags="--use-r1kernels --rollout-engine r1train" ;; *) name=train_trl ;; esac
  skip "$1" || k300 python3 benchmarks/train_trl_gpu.py "$OUT/$name$2.json" --steps "${TRL_STEPS:-4}" $flags 2>&1 \
    | tail -2; }
# TRL_ORDER: the TRL runs in this order (default "trl trle trlk"); e.g. "trlk trl trlk" checks an order effect, "trl trle"
# times TRL's rollout on r1train's engine
seen=" "; i=0  # a run whose name came before gets the suffix _<position>
for r in ${TRL_ORDER:-trl trle trlk}; do i=$((i + 1)); trl_run "$r" "$([[ $seen == *" $r "* ]] && echo _$i)"; seen+="$r "
done
# AB: the default step (ZeRO-1, fused layers) again in this session with one change each (space list):
# nofused = --no-fused-layers (HF's layers); zero0 / zero2 / zero3 = that ZeRO stage (0 and 1: no per-parameter
# gradient hooks; on one GPU stages 1 and 2 hold the same memory); zero2nofused = both (the earlier default)
for v in ${AB:-}; do
  case $v in nofused) f=--no-fused-layers ;; zero[0-3]) f="--zero-stage ${v#zero}" ;;
    zero[0-3]nofused) f="--zero-stage ${v:4:1} --no-fused-layers" ;; *) echo "AB: unknown $v"; continue ;; esac
  k300 python3 benchmarks/train_gpu.py "$OUT/train_gpu_ab_$v.json" --steps 4 $f ${TRAIN_ARGS:-} 2>&1 | grep -v Warning \
    | tail -1; done
# the varied-length workload (completions uniform in 32-512): padded, packed, packed with a token budget
skip varied || for v in "padded:" "packed:--padding-free" "budget:--padding-free --max-tokens-per-batch 16384"; do
  k300 python3 benchmarks/train_gpu.py "$OUT/train_gpu_varied_${v%%:*}.json" --varied-lengths --steps 3 ${v#*:} \
    ${TRAIN_ARGS:-} 2>&1 \
    | grep -v Warning | tail -2; done
skip kernels || python3 -m benchmarks --out "$OUT/k" --only "${KERNELS:-sampling,decode_attention}" || rc=$?
TESTS=${TESTS:-tests/test_generation.py tests/test_sampling.py tests/test_decode_attention.py tests/test_fused_decode.py}
MARK=${TEST_MARK-gpu}  # TEST_MARK= (empty) runs every test of $TESTS on the GPU (the device fixture is cuda)
skip tests || { python3 -m pytest -q --durations=20 ${MARK:+-m $MARK} -p no:cacheprovider $TESTS >"$OUT/gpu_tests.log" 2>&1 || rc=$?
  tail -4 "$OUT/gpu_tests.log"; }
rm -rf "$OUT"/*_run "$OUT"/*_trl_model
exit $rc
