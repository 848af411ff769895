"""The fused layer ops (rk.patch) inside HF's own generate: what TRL's GRPOTrainer runs for its rollout without
vLLM, with use_r1kernels patching the policy. Its decode steps feed [rows, 1] tokens through 28 layers, one
eager op at a time: bound by host time per op, where a fused op's dispatch (custom op, argument checks, Triton
launch) may cost more than the eager ops it replaces. Measured here, same process, rounds in alternating order
(TRL sessions showed an order effect between back-to-back runs):

- generate (dynamic cache, sampling at T = 1) of the Qwen2.5-1.5B-shaped model, 8 prompts x 8 completions,
  256 prompt tokens: unpatched, rk.patch's fused layers (patch_layers) with the fused ops at every size, and as
  shipped (layers.HOST_BOUND_ROWS: no-grad decode steps of few rows run HF's forward);
- host microseconds per call at the decode shape [64, 1, 1536] of one RMSNorm and one MLP, HF's forward vs the
  fused one (CPU clock over many calls, one sync at the end: the GPU keeps up, so this is host time);
- a training micro-batch as TRL's loss forward runs it (8 x 768 tokens, logits of the last 512, autograd on: the
  fused ops at any size): forward and backward, each as host time to enqueue and wall time to its end (host ~ wall:
  host-bound), unpatched vs fused (TRL + use_r1kernels' loss forwards measured slower than TRL's).

    python -m benchmarks.bench_patch_generate --out DIR [--new-tokens 128] [--rounds 4] [--device cpu --tiny]
        [--train-rows 8 --train-tokens 768]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from r1kernels.patch import layers


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _host_us(fn, device, n=300):
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / n * 1e6


def _train_ms(model, ids, keep, device, n=5) -> dict:
    """Median ms of one forward (autograd on, logits of the last `keep` positions) and its backward: host time to
    enqueue each and wall time to its end."""
    rows = []
    for i in range(n + 1):  # the first warms up
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, logits_to_keep=keep).logits.float().mean()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        _sync(device)
        t4 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if i:
            rows.append((t1 - t0, t2 - t0, t3 - t2, t4 - t2))
    keys = ("forward host", "forward wall", "backward host", "backward wall")
    return {k: statistics.median(r[j] for r in rows) * 1e3 for j, k in enumerate(keys)}


def _generate_s(model, ids, mask, T, device):
    _sync(device)
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                   max_new_tokens=T, min_new_tokens=T, pad_token_id=0, eos_token_id=None)
    _sync(device)
    return time.perf_counter() - t0


def runner_argv(device, out_dir, named):
    """python -m benchmarks: on CPU a smoke run of the tiny model (the 1.5B-shaped one takes minutes there)."""
    small = ["--tiny", "--new-tokens", "3", "--rounds", "2", "--prompts", "1", "--prompt-tokens", "5",
             "--train-rows", "2", "--train-tokens", "6"] if device == "cpu" else []
    return ["--device", device, *small, *(["--out", out_dir] if out_dir else [])]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the 2-layer model of bench_rollout (a CPU smoke run)")
    p.add_argument("--prompts", type=int, default=8, help="prompts (each completed 8 times)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--train-rows", type=int, default=8, help="rows of the training micro-batch")
    p.add_argument("--train-tokens", type=int, default=768, help="tokens a row (the last 2/3 get logits)")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, Qwen2Config

    from .bench_rollout import TINY
    from .train_gpu import QWEN25_15B, _commit

    dev = a.device
    torch.manual_seed(0)
    cfg = Qwen2Config(**(TINY if a.tiny else QWEN25_15B), pad_token_id=0, eos_token_id=1, bos_token_id=2)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if a.tiny else torch.bfloat16).to(dev).eval()
    fused = copy.deepcopy(plain)
    layers.patch_layers(fused)
    rows = a.prompts * 8
    ids = torch.randint(3, cfg.vocab_size, (a.prompts, a.prompt_tokens), device=dev).repeat_interleave(8, 0)
    mask = torch.ones_like(ids)
    shipped = layers.HOST_BOUND_ROWS
    # name: (model, HOST_BOUND_ROWS while it runs)
    variants = {"unpatched": (plain, shipped), "fused ops at every size": (fused, 0),
                f"patched as shipped (HF forward for no-grad decode steps <= {shipped} rows)": (fused, shipped)}
    runs = {k: [] for k in variants}
    for i in range(a.rounds + 1):  # the first round warms up (allocator, Triton compiles) and is dropped
        for k in (list(variants) if i % 2 else list(variants)[::-1]):
            model, layers.HOST_BOUND_ROWS = variants[k]
            runs[k].append(_generate_s(model, ids, mask, a.new_tokens, dev))
    layers.HOST_BOUND_ROWS = shipped
    res = {"benchmark": "bench_patch_generate", "commit": _commit(),
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "model": "tiny" if a.tiny else "Qwen2.5-1.5B-shaped", "rows": rows,
           "prompt_tokens": a.prompt_tokens,
           "new_tokens": a.new_tokens, "generate_s": {k: {"median": statistics.median(v[1:]), "runs": v[1:]}
                                                      for k, v in runs.items()}}
    x = torch.randn(rows, 1, cfg.hidden_size, device=dev, dtype=plain.dtype)
    host = {}
    with torch.no_grad():
        for name, pm, fm in (("rms_norm", plain.model.norm, fused.model.norm),
                             ("mlp", plain.model.layers[0].mlp, fused.model.layers[0].mlp)):
            host[f"{name} HF forward"] = _host_us(lambda m=pm: m(x), dev)
            host[f"{name} patched as shipped"] = _host_us(lambda m=fm: m(x), dev)
            layers.HOST_BOUND_ROWS = 0
            host[f"{name} fused"] = _host_us(lambda m=fm: m(x), dev)
            layers.HOST_BOUND_ROWS = shipped
    res["host_us_per_call_rows_x_1"] = host
    ids_t = torch.randint(3, cfg.vocab_size, (a.train_rows, a.train_tokens), device=dev)
    keep = max(1, a.train_tokens * 2 // 3)
    res["train_micro_batch_ms"] = {"rows": a.train_rows, "tokens": a.train_tokens, "logits_kept": keep}
    for i in range(2):  # two rounds in alternating order
        for k, m in (("unpatched", plain), ("fused", fused))[::1 if i % 2 else -1]:
            res["train_micro_batch_ms"].setdefault(k, []).append(_train_ms(m.train(), ids_t, keep, dev))
    print(json.dumps(res, indent=1))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_patch_generate.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
