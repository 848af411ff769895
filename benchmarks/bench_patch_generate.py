"""The fused layer ops (rk.patch) inside HF's own generate: what TRL's GRPOTrainer runs for its rollout without
vLLM, with use_r1kernels patching the policy. Its decode steps feed [rows, 1] tokens through 28 layers, one
eager op at a time: bound by host time per op, where a fused op's dispatch (custom op, argument checks, Triton
launch) may cost more than the eager ops it replaces. Measured here, same process, rounds in alternating order
(TRL sessions showed an order effect between back-to-back runs):

- generate (dynamic cache, sampling at T = 1) of the Qwen2.5-1.5B-shaped model, 8 prompts x 8 completions,
  256 prompt tokens: unpatched vs rk.patch's fused layers (patch_layers);
- host microseconds per call at the decode shape [64, 1, 1536] of one RMSNorm and one MLP, HF's forward vs the
  fused one (CPU clock over many calls, one sync at the end: the GPU keeps up, so this is host time).

    python -m benchmarks.bench_patch_generate --out DIR [--new-tokens 128] [--rounds 2]
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


def _host_us(fn, n=300):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def _generate_s(model, ids, mask, T):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                   max_new_tokens=T, min_new_tokens=T, pad_token_id=0, eos_token_id=None)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, Qwen2Config

    from .train_gpu import QWEN25_15B, _commit

    torch.manual_seed(0)
    cfg = Qwen2Config(**QWEN25_15B, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    fused = copy.deepcopy(plain)
    layers.patch_layers(fused)
    ids = torch.randint(3, cfg.vocab_size, (8, 256), device="cuda").repeat_interleave(8, 0)
    mask = torch.ones_like(ids)
    variants = {"unpatched": plain, "patched (fused RMSNorm, SiLU-mul, rotary)": fused}
    runs = {k: [] for k in variants}
    for i in range(a.rounds + 1):  # the first round warms up (allocator, Triton compiles) and is dropped
        for k in (list(variants) if i % 2 else list(variants)[::-1]):
            runs[k].append(_generate_s(variants[k], ids, mask, a.new_tokens))
    res = {"benchmark": "bench_patch_generate", "commit": _commit(), "device": torch.cuda.get_device_name(),
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": 64, "prompt_tokens": 256,
           "new_tokens": a.new_tokens, "generate_s": {k: {"median": statistics.median(v[1:]), "runs": v[1:]}
                                                      for k, v in runs.items()}}
    x = torch.randn(64, 1, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    host = {}
    with torch.no_grad():
        for name, pm, fm in (("rms_norm", plain.model.norm, fused.model.norm),
                             ("mlp", plain.model.layers[0].mlp, fused.model.layers[0].mlp)):
            host[f"{name} HF forward"] = _host_us(lambda m=pm: m(x))
            host[f"{name} fused"] = _host_us(lambda m=fm: m(x))
    res["host_us_per_call_64x1"] = host
    print(json.dumps(res, indent=1))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_patch_generate.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
