"""A few GRPO steps of a Qwen2.5-1.5B-shaped model (random weights, bf16, one GPU) through the r1train engine
and the r1kernels losses; time per phase (generation, log-probs, backward, optimizer) and peak memory -> JSON.
Defaults: ZeRO-1 and the fused layers (patch_model=true), the fastest one-GPU layout measured on the H200
(2026-12-03, A/B inside three sessions: medians 3.94 / 4.57 / 4.02 s, against 4.29 / 4.26 / 4.17 s with HF's
layers; ZeRO-2 with HF's layers 4.52 and 5.30 s in two of them). Each step's Python GC pauses: gc_s.

    python benchmarks/train_gpu.py results/train_gpu_h100.json            # on the GPU
    python benchmarks/train_gpu.py /tmp/train_tiny.json --tiny            # CPU smoke test
    python benchmarks/train_gpu.py OUT.json --varied-lengths [--padding-free [--max-tokens-per-batch N]]
    python benchmarks/train_gpu.py OUT.json --steps 4 --profile-step 3     # kernels + CPU ops of step 3
    python benchmarks/train_gpu.py OUT.json --zero-stage 2 --no-fused-layers  # the layout of the earlier runs
    python benchmarks/train_gpu.py OUT.json --early-eos 300 --early-eos-steps 4  # one row stops early at step 4
    python benchmarks/train_gpu.py OUT.json --ab down                  # the engine with bench_rollout --ab changes

Completions of a random model almost never stop early, so every step generates max_completion_length
tokens per row (a fixed, comparable amount of work). --varied-lengths instead forces eos at a length drawn
per row, uniform in 32-512 (bench_rollout's "varied" workload, the same lengths every step): the workload
where padding-free micro-batches (--padding-free, --max-tokens-per-batch) pay; packed vs padded is two
runs with the same flags but those. Step 1 is warm-up and is left out of the medians. Under a time limit,
stop with SIGKILL (`timeout -s KILL`): SIGTERM makes the trainer save a checkpoint first (~25 GB here).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                  tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=True)


def random_model(shape: dict, tok, dtype, device=None):
    """A Qwen2-architecture model of `shape` with random weights, built on `device` (default: the GPU when
    there is one; a 1.5B or 7B model inits in seconds there, minutes on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
        return AutoModelForCausalLM.from_config(
            Qwen2Config(**shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.bos_token_id), dtype=dtype)


def prompt_rows(count: int, length: int) -> list[dict]:
    """Prompts of exactly `length` characters (= tokens with the character tokenizer)."""
    return [{"prompt": "".join(chr(48 + (i * 7 + j) % 40) for j in range(length))} for i in range(count)]


def checksum_reward(prompts, completions, completion_ids, **_):
    """A cheap reward that varies inside groups (sum of token ids mod 7), so advantages are non-zero."""
    return [float(sum(completion_ids_i) % 7) for completion_ids_i in completion_ids]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="JSON output path")
    p.add_argument("--tiny", action="store_true", help="tiny model, fp32, CPU-friendly sizes (smoke test)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8, help="completions per micro-batch")
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--completion-length", type=int, default=512)
    p.add_argument("--zero-stage", type=int, default=1,
                   help="1 (default): on one GPU the memory of 2 without its per-parameter gradient hooks")
    p.add_argument("--loss-impl", default="auto", choices=["auto", "linear", "logits"])
    p.add_argument("--beta", type=float, default=0.04, help="> 0 adds the reference log-prob pass")
    p.add_argument("--num-iterations", type=int, default=2, help="> 1: num_iterations passes per batch")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (r1train's and TRL's default; off in these runs and in "
                        "train_trl_gpu.py's)")
    p.add_argument("--varied-lengths", action="store_true",
                   help="completion lengths uniform in completion_length/16..completion_length (eos forced)")
    p.add_argument("--early-eos", type=int, default=None, metavar="L",
                   help="eos forced at length L in one row per step, the others run to completion_length (the "
                        "padded-mask path of a step whose rollout stopped a row early, on every step)")
    p.add_argument("--early-eos-steps", type=int, nargs="+", default=None, metavar="K",
                   help="with --early-eos: only on these steps (1-based), the others run every row to the end")
    p.add_argument("--padding-free", action="store_true", help="padding_free=true: packed micro-batches")
    p.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="max_tokens_per_batch (with --padding-free): token-budget micro-batches")
    p.add_argument("--fused-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="patch_model=true (default): r1kernels' fused RMSNorm / SiLU-MLP / rotary in the training "
                        "forwards and backwards; --no-fused-layers: HF's layers")
    p.add_argument("--profile-step", type=int, default=None,
                   help="run this step (1-based, > 1: warm) under torch.profiler: top kernels and CPU ops in the JSON")
    p.add_argument("--ab", default=None, metavar="VARIANT",
                   help="the rollout engine with bench_rollout's --ab change(s), e.g. down (bench_rollout.AB)")
    a = p.parse_args(argv)
    if a.early_eos_steps and not a.early_eos:
        p.error("--early-eos-steps needs --early-eos L")
    if a.tiny:
        a.prompt_length, a.completion_length = min(a.prompt_length, 16), min(a.completion_length, 16)
        a.steps = min(a.steps, 3)

    import torch

    from r1train.config import load_config
    from r1train.grpo import GRPOTrainer
    from r1train.metrics import STEP_PHASES
    from r1train.tasks import char_tokenizer

    # r1train's PhaseClock: each phase's device time inside train_step; step_time is the host's
    PHASES = tuple(f"time/{k}" for k in STEP_PHASES) + ("step_time",)

    shape = TINY if a.tiny else QWEN25_15B
    tok = char_tokenizer(vocab_size=shape["vocab_size"])
    bf16 = not a.tiny
    model = random_model(shape, tok, torch.bfloat16 if bf16 else torch.float32)
    G = a.num_generations
    n = a.prompts * G
    ga = n // a.micro_batch
    cfg = load_config(overrides=[
        f"output_dir={os.path.splitext(a.out)[0]}_run", f"max_steps={a.steps}", f"num_generations={G}",
        f"per_device_train_batch_size={a.micro_batch}", f"gradient_accumulation_steps={ga}",
        f"max_prompt_length={a.prompt_length}", f"max_completion_length={a.completion_length}",
        f"zero_stage={a.zero_stage}", f"bf16={str(bf16).lower()}", f"loss_impl={a.loss_impl}",
        f"beta={a.beta}", f"num_iterations={a.num_iterations}", "learning_rate=1e-6", "save_steps=0",
        "report_to=none", "logging_steps=1",
        f"gradient_checkpointing={str(a.gradient_checkpointing).lower()}",
        f"padding_free={str(a.padding_free).lower()}",
        *(["patch_model=true"] if a.fused_layers else []),
        *([f"max_tokens_per_batch={a.max_tokens_per_batch}"] if a.max_tokens_per_batch else []),
        "kernel_backend=torch" if a.tiny and not torch.cuda.is_available() else "kernel_backend=auto"])
    rows = prompt_rows(a.prompts * (a.steps + 1), a.prompt_length)
    t0 = time.perf_counter()
    trainer = GRPOTrainer(cfg, model, tok, rows, reward_funcs=[checksum_reward])
    t_init = time.perf_counter() - t0
    from benchmarks.bench_rollout import varied_lengths

    lens = varied_lengths(n, a.completion_length) if a.varied_lengths else None
    if a.early_eos:
        lens = [a.early_eos] + [a.completion_length] * (n - 1)
    if lens:
        force_lengths(trainer, rows, lens, a, steps=a.early_eos_steps if a.early_eos else None)
    profile = profile_step(trainer, a.profile_step - 1) if a.profile_step else None
    gc_s = gc_pauses(trainer)
    compiles = triton_compiles(trainer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from benchmarks.bench_rollout import ab_variant

    with ab_variant(a.ab) if a.ab else contextlib.nullcontext():  # the AB change holds for every rollout
        hist = trainer.train()
    timed = hist[1:] if len(hist) > 1 else hist
    timed = [h for h in timed if h["step"] != a.profile_step] or timed  # the profiler slows its step
    res = {
        "benchmark": "train_gpu", "model": "tiny" if a.tiny else "Qwen2.5-1.5B-shaped (random init)",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(), "torch": torch.__version__, "args": vars(a),
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),  # ZeRO-3: not the shard
        "init_seconds": t_init,
        "workload": "varied" if a.varied_lengths else "early_eos" if a.early_eos else "fixed",
        "completion_lengths": lens,
        "completions_per_step": n, "tokens_generated_per_step": statistics.median(
            h["completions/mean_length"] * n for h in timed),
        "median_seconds": {k: statistics.median(h[k] for h in timed) for k in PHASES},
        # sampling/*: the rollout's bf16 sampling log-probs against the training forward's, and the rollout
        # correction's weights (a sequence-mode weight past clip_max masks the whole completion)
        "steps": [{**{k: v for k, v in h.items() if k in (*PHASES, "loss", "kl", "completions/mean_length")
                      or k.startswith("sampling/")}, "gc_s": g,
                   "triton_compiles": c} for h, g, c in zip(hist, gc_s, compiles)],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        # held between rollouts by the generation engine (part of the peak): KV cache, decode state, q/k/v
        "engine_memory_gib": sum(e.memory_bytes() for e in list(_engines().values())) / 2**30,
        # CUDA-graph captures over the run: one set per bucket unless the parameters move (ZeRO-3 gathers)
        "engine_stats": [dict(e.stats) for e in list(_engines().values())],
    }
    if profile is not None:
        res["profile"] = profile
    # outside train_step: the loop's logging, checkpoint checks and data
    res["median_seconds"]["other"] = res["median_seconds"]["step_time"] - sum(
        res["median_seconds"][k] for k in PHASES[:-1])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res["median_seconds"]), "peak GiB:", res["peak_memory_gib"])
    return res


def profile_step(trainer, step_index: int, top: int = 40) -> dict:
    """Wrap trainer.train_step so that step `step_index` (0-based) runs under torch.profiler; the returned
    dict is filled then: the step's wall seconds, device kernel time (sum and top kernels by total time, with
    launch counts) and the top CPU ops by self time (host overhead, syncs: cudaStreamSynchronize etc.)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    out, orig, cuda = {}, trainer.train_step, torch.cuda.is_available()

    def run(step, rows):
        if step != step_index:
            return orig(step, rows)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            m = orig(step, rows)
            if cuda:
                torch.cuda.synchronize()
        evs = list(prof.key_averages())
        dev = [e for e in evs if getattr(e, "self_device_time_total", 0) > 0]
        out.update({
            "step": step + 1, "wall_s": time.perf_counter() - t0,
            "kernel_s_total": sum(e.self_device_time_total for e in dev) / 1e6,
            "kernel_launches": sum(e.count for e in dev),
            "kernels": [{"name": e.key[:100], "count": e.count, "ms": e.self_device_time_total / 1e3}
                        for e in sorted(dev, key=lambda e: -e.self_device_time_total)[:top]],
            "cpu_ops": [{"name": e.key[:100], "count": e.count, "self_ms": e.self_cpu_time_total / 1e3}
                        for e in sorted(evs, key=lambda e: -e.self_cpu_time_total)[:top]]})
        return m

    trainer.train_step = run
    return out


def gc_pauses(trainer) -> list[dict]:
    """Per step (a list filled as the trainer runs): seconds the Python garbage collector paused it, by
    generation ("0", "1", "2": a full collection), from gc.callbacks."""
    import gc

    out, t0 = [], [0.0]

    def on_gc(phase, info):
        if not out:
            return
        if phase == "start":
            t0[0] = time.perf_counter()
        else:
            g = str(info["generation"])
            out[-1][g] = out[-1].get(g, 0.0) + time.perf_counter() - t0[0]

    gc.callbacks.append(on_gc)
    before_each_step(trainer, lambda _: out.append({}))
    return out


def before_each_step(trainer, fn):
    """Wrap trainer.train_step so that fn(step) (0-based) runs before each step."""
    orig = trainer.train_step

    def run(step, rows):
        fn(step)
        return orig(step, rows)

    trainer.train_step = run


def triton_compiles(trainer) -> list[list]:
    """Per step (a list filled as the trainer runs): the Triton kernels compiled (or loaded from Triton's disk
    cache) during it, each [kernel name, seconds, specialization key]; the key shows which argument's
    specialization (dtype, divisibility by 16, == 1) was new. Empty where triton is absent."""
    out = []
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return out
    compile_ = getattr(JITFunction, "_do_compile", None)
    if compile_ is None:
        return out

    def do_compile(self, key, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return compile_(self, key, *args, **kwargs)
        finally:
            if out:
                out[-1].append([getattr(self, "__name__", repr(self)), time.perf_counter() - t0, str(key)[:600]])

    JITFunction._do_compile = do_compile
    before_each_step(trainer, lambda _: out.append([]))
    return out


def force_lengths(trainer, rows, lens: list, a, steps=None):
    """eos forced at lens[b] in each of a step's rollout rows b (bench_rollout's hook, active only
    while the generation engine runs: the trainer's own forwards pass through), on every step or on
    `steps` (1-based) only."""
    import torch

    from benchmarks.bench_rollout import ForcedLengths
    from r1train.data import encode_prompts
    from r1train.generation import attention, engine_for

    model = trainer.model
    P = encode_prompts(trainer.tok, [rows[0]["prompt"]], a.prompt_length)[0].shape[1]
    len_B = torch.tensor(lens, device=trainer.dev)
    if steps is not None:  # the lengths are read by the captured decode graphs: updated in place
        forced_B, free_B = len_B.clone(), torch.full_like(len_B, a.completion_length + 1)
        before_each_step(trainer, lambda k: len_B.copy_(forced_B if k + 1 in steps else free_B))
    ForcedLengths(model, P, len_B, trainer.tok.eos_token_id, rows=lambda b: engine_for(model).st.rid[:b],
                  active=lambda: model.config._attn_implementation == attention.ATTN_NAME)


def _engines():
    from r1train.generation.engine import _ENGINES

    return _ENGINES


def _commit():
    if os.environ.get("R1K_COMMIT"):  # the device machine gets the tree without .git
        return os.environ["R1K_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    main()
