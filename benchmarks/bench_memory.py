"""Peak GPU memory and step time of a GRPO step: r1train (full fine-tuning under ZeRO-2 with/without
optimizer offload, activation checkpointing, 8-bit AdamW moments, the pure-bf16 layout; LoRA r=64) and TRL
1.16's GRPOTrainer on the same work, for a Qwen2.5-1.5B and a Qwen2.5-7B shape (random init, bf16).

Each configuration runs in its own subprocess (peaks never mix; an out-of-memory is recorded as "oom", a
host-memory kill as "killed"), under a wall-time budget; results are merged by name into --out, so several
short calls fill one JSON.

    python benchmarks/bench_memory.py --list                                    # the configurations
    python benchmarks/bench_memory.py --out results/memory.json --configs '1.5b-*' --budget-s 540
    python benchmarks/bench_memory.py --out /tmp/mem.json --cpu-smoke --configs '1.5b-full-gc,1.5b-trl-lora64-gc'

Work per step (one generation batch):
- 1.5b: benchmarks/train_gpu.py's defaults: 8 prompts x 8 completions, 256 prompt + 512 new tokens,
  micro-batches of 8, beta 0.04 (a reference model unless LoRA), num_iterations 2.
- 7b: smaller, so a configuration fits one 10-minute call: 4 prompts x 8, 256 prompt + 256 new tokens,
  micro-batches of 8, beta 0.04, num_iterations 1.
Step 1 (CUDA-graph capture, torch.compile of the 8-bit optimizer, allocator warm-up) is untimed; the
peaks cover the whole process, init included (`peak_allocated_gib`), and the steps alone
(`steps_peak_allocated_gib`). Variants (r1train unless `trl-`): full = fp32 master + fp32 AdamW
(16 bytes/param + a transient fp32 gradient partition), 8bit = `optim=adamw_torch_8bit`, bf16 =
r1train/configs/ds_zero2_bf16.json (DeepSpeed's bf16 master partition, gradients and moments: a copy of the
weights more than TRL), bf16params = r1train/configs/ds_zero0_bf16.json (the optimizer steps the bf16
weights themselves, bf16 gradients and moments: TRL's layout without DeepSpeed), offload =
`offload_optimizer=true` (master + moments on the CPU, the step on the CPU; unpinned =
r1train/configs/ds_zero2_offload.json, pin_memory=false: no pinned copies), gc = gradient_checkpointing,
release = `rollout_release_memory=true` (the engine's KV cache and graphs freed for the training step).

With R1K_MEMORY_TRACE=1 (CUDA) the allocator's trace of the steps is recorded and each result gets
`peak_composition`: what is alive at the steps' peak, summed by allocation site and by trainer caller.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import fnmatch
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_gpu import QWEN25_15B, TINY, _commit, checksum_reward, prompt_rows, random_model  # noqa: E402

QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                 tie_word_embeddings=False, rope_theta=1000000.0, rms_norm_eps=1e-6)
SHAPES = {"1.5b": QWEN25_15B, "7b": QWEN25_7B}
WORK = {"1.5b": dict(prompts=8, num_generations=8, prompt_length=256, completion_length=512, micro_batch=8,
                     beta=0.04, num_iterations=2),
        "7b": dict(prompts=4, num_generations=8, prompt_length=256, completion_length=256, micro_batch=8,
                   beta=0.04, num_iterations=1)}
SMOKE_WORK = dict(prompts=2, num_generations=4, prompt_length=16, completion_length=8, micro_batch=4,
                  beta=0.04, num_iterations=2)
LORA = dict(r=64, alpha=128, dropout=0.05)
# variant -> r1train keys (or TRL's GRPOConfig settings for trl-*)
VARIANTS = {
    "full": [], "full-gc": ["gradient_checkpointing=true"],
    "full-offload": ["offload_optimizer=true"],
    "full-offload-gc": ["offload_optimizer=true", "gradient_checkpointing=true"],
    "full-offload-8bit-gc": ["offload_optimizer=true", "optim=adamw_torch_8bit", "gradient_checkpointing=true"],
    "full-offload-unpinned-8bit-gc": ["deepspeed=r1train/configs/ds_zero2_offload.json", "optim=adamw_torch_8bit",
                                      "gradient_checkpointing=true"],
    "full-8bit": ["optim=adamw_torch_8bit"], "full-8bit-gc": ["optim=adamw_torch_8bit", "gradient_checkpointing=true"],
    "full-bf16-gc": ["deepspeed=r1train/configs/ds_zero2_bf16.json", "gradient_checkpointing=true"],
    "full-bf16params-gc-release": ["deepspeed=r1train/configs/ds_zero0_bf16.json", "gradient_checkpointing=true",
                                   "rollout_release_memory=true", "patch_model=true"],
    "lora64": ["use_peft=true"], "lora64-gc": ["use_peft=true", "gradient_checkpointing=true"],
    "lora64-gc-release": ["use_peft=true", "gradient_checkpointing=true", "rollout_release_memory=true"],
    "full-8bit-gc-release": ["optim=adamw_torch_8bit", "gradient_checkpointing=true", "rollout_release_memory=true"],
    "trl-full": [], "trl-full-gc": ["gradient_checkpointing"], "trl-lora64": ["peft"],
    "trl-lora64-gc": ["peft", "gradient_checkpointing"],
}
CONFIGS = [f"{s}-{v}" for s in SHAPES for v in VARIANTS]


def split(name: str):
    shape, variant = name.split("-", 1)
    return shape, variant


# ------------------------------------------------------------------ child: one configuration in this process
def _memory(torch, res: dict, key: str):
    if torch.cuda.is_available():
        res[f"{key}peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res[f"{key}peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30


def run_child(name: str, a) -> dict:
    import torch

    shape_name, variant = split(name)
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    w = dict(SMOKE_WORK if a.cpu_smoke else WORK[shape_name])
    shape = TINY if a.cpu_smoke else SHAPES[shape_name]
    res = {"config": name, "shape": shape_name, "variant": variant, "work": w, "max_steps": a.max_steps,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": _commit(), "env": {k: os.environ[k] for k in ("PYTORCH_CUDA_ALLOC_CONF",) if k in os.environ}}
    from r1train.tasks import char_tokenizer

    tok = char_tokenizer(vocab_size=shape["vocab_size"])
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    model = random_model(shape, tok, dtype, "cuda" if cuda else "cpu")
    res["params"] = sum(p.numel() for p in model.parameters())
    rows = prompt_rows(w["prompts"] * (a.max_steps + 1), w["prompt_length"])
    out_dir = tempfile.mkdtemp(prefix=f"bench_memory_{name}_")
    try:
        runner = _trl if variant.startswith("trl-") else _r1train
        runner(name, variant, model, tok, rows, w, a, cuda, res, out_dir, t0)
        res["status"] = "ok"
    except torch.OutOfMemoryError as e:  # (a CUDA OOM; the host kind kills the process: see the parent)
        res.update(status="oom", error=str(e).splitlines()[0][:400])
    except Exception as e:  # noqa: BLE001 - recorded, not raised: the other configurations go on
        oom = "out of memory" in str(e).lower()
        res.update(status="oom" if oom else "error", error=f"{type(e).__name__}: {str(e)[:400]}",
                   traceback=traceback.format_exc()[-3000:])
    _memory(torch, res, "")
    if cuda:
        _trace_result(torch, res)
    if "init_peak_allocated_gib" in res:  # the process peak: before or after the reset at the first step
        res["peak_allocated_gib"] = max(res["peak_allocated_gib"], res.get("init_peak_allocated_gib", 0))
        res["peak_reserved_gib"] = max(res["peak_reserved_gib"], res.get("init_peak_reserved_gib", 0))
    res["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    return res


def _after_init(torch, res, t0):
    res["init_seconds"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        res["init_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        _memory(torch, res, "init_")
        torch.cuda.reset_peak_memory_stats()
        if os.environ.get("R1K_MEMORY_TRACE") == "1":
            res["_trace_base"] = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=TRACE_ENTRIES)


# ------------------------------------------------------------------ what is alive at the peak (R1K_MEMORY_TRACE=1)
TRACE_ENTRIES = 4_000_000
# frames in these packages name an allocation's site (the innermost one) and its caller in a trainer
SITE_DIRS = ("r1train/", "r1kernels/", "trl/", "peft/", "deepspeed/", "transformers/", "torchao/", "accelerate/",
             "torch/optim/", "torch/utils/checkpoint", "torch/autograd/", "torch/nn/")
CALLER_DIRS = ("r1train/", "trl/")


def _frame(frames, dirs, outermost=False):
    for f in (reversed(frames) if outermost else frames):
        for d in dirs:
            i = f["filename"].rfind(d)
            if i >= 0:
                return f"{f['filename'][i:]}:{f['line']} {f['name']}"
    return "other"


def peak_composition(trace: list[dict], base_bytes: int, top: int = 25, unit: int = 2**20) -> dict:
    """Replay one device's allocator trace (alloc / free_completed; frames innermost first) from base_bytes
    allocated when recording began; sizes in `unit` bytes (MiB). -> peak; untraced: blocks alive at the peak
    that were allocated before recording (their frees are seen, their allocs not); sites / callers: the traced
    blocks alive at the peak summed by allocation site and by trainer caller, largest first; at: the
    allocation that set the peak."""
    cur, peak, peak_i = base_bytes, base_bytes, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            cur += e["size"]
            if cur > peak:
                peak, peak_i = cur, i
        elif e["action"] == "free_completed":
            cur -= e["size"]
    live, untraced = {}, base_bytes
    for e in trace[:peak_i + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            if live.pop(e["addr"], None) is None:
                untraced -= e["size"]
    sites, callers = {}, {}
    for e in live.values():
        fr = e.get("frames", [])
        for table, key in ((sites, _frame(fr, SITE_DIRS)), (callers, _frame(fr, CALLER_DIRS, outermost=True))):
            table[key] = table.get(key, 0) + e["size"]
    largest = lambda t: [[k, round(v / unit, 1)] for k, v in sorted(t.items(), key=lambda kv: -kv[1])[:top]]  # noqa: E731
    at = trace[peak_i] if peak_i >= 0 else {}
    return {"unit": "MiB" if unit == 2**20 else f"{unit} bytes", "peak": peak / unit, "untraced": untraced / unit,
            "traced_live": sum(sites.values()) / unit, "sites": largest(sites), "callers": largest(callers),
            "events": len(trace), "truncated": len(trace) >= TRACE_ENTRIES,
            "at": {"size": at.get("size", 0) / unit, "site": _frame(at.get("frames", []), SITE_DIRS),
                   "caller": _frame(at.get("frames", []), CALLER_DIRS, outermost=True)}}


def _trace_result(torch, res):
    base = res.pop("_trace_base", None)
    if base is None:
        return
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    res["peak_composition"] = peak_composition(snap["device_traces"][torch.cuda.current_device()], base)


def _timed(step_seconds: list[float]) -> dict:
    timed = step_seconds[1:] if len(step_seconds) > 1 else step_seconds
    return {"step_seconds": step_seconds, "median_step_seconds": statistics.median(timed),
            "first_step_seconds": step_seconds[0]}


def _r1train(name, variant, model, tok, rows, w, a, cuda, res, out_dir, t0):
    import torch

    from r1train.config import load_config
    from r1train.grpo import GRPOTrainer
    from r1train.metrics import STEP_PHASES

    n = w["prompts"] * w["num_generations"]
    ov = [f"output_dir={out_dir}", f"max_steps={a.max_steps}", f"num_generations={w['num_generations']}",
          f"per_device_train_batch_size={w['micro_batch']}", f"gradient_accumulation_steps={n // w['micro_batch']}",
          f"max_prompt_length={w['prompt_length']}", f"max_completion_length={w['completion_length']}",
          "zero_stage=2", f"bf16={str(cuda).lower()}", f"beta={w['beta']}", f"num_iterations={w['num_iterations']}",
          "learning_rate=1e-6", "save_steps=0", "report_to=none", "logging_steps=0",
          "disable_tqdm=true", "gradient_checkpointing=false", f"lora_r={LORA['r']}", f"lora_alpha={LORA['alpha']}",
          f"lora_dropout={LORA['dropout']}", "kernel_backend=auto" if cuda else "kernel_backend=torch"]
    for x in VARIANTS[variant]:
        if x.startswith("deepspeed="):  # relative to the repository
            x = "deepspeed=" + os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), x[10:])
            if not cuda:  # the pure-bf16 file turns bf16 on; the CPU smoke test keeps fp32 (ZeRO-2 default file)
                continue
        ov.append(x)
    cfg = load_config(overrides=ov)
    trainer = GRPOTrainer(cfg, model, tok, rows, reward_funcs=[checksum_reward])
    res["trainable_params"] = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
    res["reference_model"] = trainer.ref is not None
    _after_init(torch, res, t0)
    hist = trainer.train()
    res.update(_timed([h["step_time"] for h in hist]))
    phases = tuple(f"time/{k}" for k in STEP_PHASES)
    timed = hist[1:] if len(hist) > 1 else hist
    res["median_phase_seconds"] = {k: statistics.median(h[k] for h in timed) for k in phases if k in timed[0]}
    res["loss"] = [h["loss"] for h in hist]
    _memory(torch, res, "steps_")


def _trl(name, variant, model, tok, rows, w, a, cuda, res, out_dir, t0):
    import torch
    import trl.trainer.grpo_trainer as trl_grpo
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.train_trl_gpu import step_clock

    opts = VARIANTS[variant]
    n = w["prompts"] * w["num_generations"]
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=w["micro_batch"],
        gradient_accumulation_steps=n // w["micro_batch"], num_generations=w["num_generations"],
        max_completion_length=w["completion_length"], beta=w["beta"], num_iterations=w["num_iterations"],
        max_steps=a.max_steps * w["num_iterations"], learning_rate=1e-6, bf16=cuda, logging_steps=1,
        report_to="none", save_strategy="no", temperature=1.0, use_cpu=not cuda, disable_tqdm=True,
        gradient_checkpointing="gradient_checkpointing" in opts)
    peft_config = None
    if "peft" in opts:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    # TRL loads its reference model from the policy's path: hand it a copy of the random policy instead
    # (the same weights and bytes, without writing a 15 GB checkpoint to disk)
    trl_grpo.create_model_from_path = lambda *_, **__: copy.deepcopy(model)
    marks = []
    trainer = GRPOTrainer(model=model, reward_funcs=[checksum_reward], args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[step_clock(marks)], peft_config=peft_config)
    res["trainable_params"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    res["reference_model"] = trainer.ref_model is not None
    _after_init(torch, res, t0)
    start = time.perf_counter()
    trainer.train()
    ends = [start] + marks
    k = w["num_iterations"]  # one generation batch = num_iterations of TRL's optimizer steps
    res.update(_timed([ends[i + k] - ends[i] for i in range(0, len(marks) - k + 1, k)]))
    res["loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    res["trl"] = __import__("trl").__version__
    _memory(torch, res, "steps_")


# ------------------------------------------------------------------ parent: one subprocess per configuration
def select(patterns: str | None) -> list[str]:
    if not patterns:
        return list(CONFIGS)
    out = []
    for pat in patterns.split(","):
        hit = [c for c in CONFIGS if fnmatch.fnmatch(c, pat.strip())]
        if not hit:
            raise SystemExit(f"--configs: {pat!r} matches none of {CONFIGS}")
        out += [c for c in hit if c not in out]
    return out


def run_parent(a) -> dict:
    names = select(a.configs)
    data = {}
    if os.path.exists(a.out):
        with open(a.out) as fh:
            data = json.load(fh)
    data.setdefault("benchmark", "bench_memory")
    data.setdefault("results", {})
    deadline = time.monotonic() + a.budget_s
    for name in names:
        left = deadline - time.monotonic()
        if left < a.min_start_s:
            data["results"].setdefault(name, {"config": name, "status": "skipped (budget)"})
            print(f"{name}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        data["results"][name] = one(name, a, timeout=left)
        r = data["results"][name]
        print(f"{name}: {r['status']}" + "".join(
            f" {k}={r[k]:.3f}" for k in ("peak_allocated_gib", "peak_reserved_gib", "median_step_seconds")
            if isinstance(r.get(k), float)), flush=True)
        _write(a.out, data)
    _write(a.out, data)
    return data


def one(name: str, a, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        child_out = os.path.join(d, "r.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-out", child_out,
               "--max-steps", str(a.max_steps)] + (["--cpu-smoke"] if a.cpu_smoke else [])
        env = dict(os.environ)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)  # each child is its own single-process run (a fresh port)
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-2000:]
            return {"config": name, "status": "timeout", "wall_seconds": time.monotonic() - t0,
                    "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
        wall = time.monotonic() - t0
        if os.path.exists(child_out):
            with open(child_out) as fh:
                r = json.load(fh)
        elif p.returncode < 0 or p.returncode == 137:  # SIGKILL: the host's OOM killer (pinned offload buffers)
            r = {"config": name, "status": "killed", "returncode": p.returncode}
        else:
            err = p.stderr[-3000:]
            r = {"config": name, "status": "oom" if "out of memory" in err.lower() else "error",
                 "returncode": p.returncode, "stderr_tail": err}
        r["wall_seconds"] = wall
        return r


def _write(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
    os.replace(tmp, path)


def runner_argv(device: str, out_dir: str | None, named: bool) -> list[str] | None:
    """`python -m benchmarks`' arguments for this benchmark (None: skipped). On a GPU it trains a GRPO run per
    configuration, up to --budget-s (540 s): only when named (--only memory; or benchmarks/gpu_memory_run.sh).
    On CPU the smoke run of one configuration. The JSON: bench_memory.json in the runner's directory."""
    if device != "cpu" and not named:
        return None
    smoke = ["--cpu-smoke", "--max-steps", "1", "--configs", "1.5b-lora64"] if device == "cpu" else []
    return [*smoke, *(["--out", os.path.join(out_dir, "bench_memory.json")] if out_dir else [])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON (merged by configuration name with what it already holds)")
    p.add_argument("--configs", help=f"comma list of names or globs (default: all): {', '.join(CONFIGS)}")
    p.add_argument("--max-steps", type=int, default=2, help="GRPO steps per configuration (the first untimed)")
    p.add_argument("--budget-s", type=float, default=540, help="wall-time budget of the whole call")
    p.add_argument("--min-start-s", type=float, default=45, help="start no configuration with less time left")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, fp32, on the CPU (tests the code paths)")
    p.add_argument("--list", action="store_true", help="print the configuration names and exit")
    p.add_argument("--merge", nargs="+", help="merge these JSON files' results into --out (no runs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(CONFIGS))
        return None
    if a.child:
        if os.environ.get("R1K_BENCH_FAKE_OOM") == a.child:  # tests: the parent's handling of a dying child
            raise SystemExit("torch.OutOfMemoryError: CUDA out of memory. (simulated)")
        r = run_child(a.child, a)
        with open(a.child_out, "w") as fh:
            json.dump(r, fh, indent=1)
        return r
    if not a.out:
        p.error("--out is required")
    if a.merge:  # several device calls' files -> one (later files win)
        data = {"benchmark": "bench_memory", "results": {}}
        for f in a.merge:
            with open(f) as fh:
                data["results"].update(json.load(fh)["results"])
        _write(a.out, data)
        return data
    return run_parent(a)


if __name__ == "__main__":
    main()
