"""python -m benchmarks.bench_decode_gemm [--out DIR]: the decode step's four projections at 64 rows through
cuBLAS, each as 28 calls over 28 distinct weights (the 28 layers of a Qwen2.5 step: the weights do not stay
in L2) replayed in one CUDA graph, so a call's time includes the graph's launch gaps. Variants of the same
product, to find the fastest way to ask cuBLAS for it: the engine's form (F.linear / addmm_ into the
residual), the transposed product W @ x^T (cuBLAS then tiles the other operand), the cuBLASLt vs cuBLAS
backend of torch, and bf16 split-K reduction allowed or not. Floor: the weight's bytes at the measured copy
bandwidth (harness.ceilings). --few-rows: instead, the few-row GEMM experiment benchmarks/few_rows_tma.py
(descriptor loads, fused bias / residual / SiLU-gate epilogues) over a config sweep beside the engine's cuBLAS
form of each projection (for gate/up: one GEMM over the stacked weight + rk.silu_mul).
Writes bench_decode_gemm[_few_rows].json."""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from benchmarks.harness import ceilings, environment, graphed, time_ms

LAYERS = 28
SHAPES = {  # model -> (hidden, intermediate, q/k/v rows)
    "1.5B": (1536, 8960, 1536 + 2 * 256),
    "7B": (3584, 18944, 3584 + 2 * 512),
}


def graph_ms(calls) -> float:
    """ms per call of `calls` (closures) replayed as one CUDA graph (median replay)."""
    return time_ms(graphed(lambda: [f() for f in calls]), "cuda") / len(calls)


def variants(ws, bs, x, residual: bool):
    """name -> list of closures (one per layer)."""
    res = torch.randn(x.shape[0], ws[0].shape[0], device="cuda", dtype=x.dtype)
    xt = x.t().contiguous()
    out = {}
    if residual:
        out["addmm_"] = [lambda w=w: res.addmm_(x, w.t()) for w in ws]
    else:
        out["F.linear"] = [lambda w=w, b=b: F.linear(x, w, b) for w, b in zip(ws, bs)]
    out["mm(x, W^T)"] = [lambda w=w: torch.mm(x, w.t()) for w in ws]
    out["mm(W, x^T view)"] = [lambda w=w: torch.mm(w, x.t()) for w in ws]
    out["mm(W, x^T contiguous)"] = [lambda w=w: torch.mm(w, xt) for w in ws]
    return out


FEW_ROWS_SWEEP = [{"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "num_warps": 4, "SPLIT_K": 1}
                  for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for st in (3, 5)] + \
                 [{"BLOCK_N": bn, "BLOCK_K": 128, "STAGES": 4, "num_warps": 4, "SPLIT_K": sk}
                  for bn in (16, 32, 64) for sk in (2, 4, 8)]


def few_rows_rows(name, ws, bs, x, M):
    """{'engine (cuBLAS)': us, 'few_rows <cfg>': us, ...} for one projection."""
    import r1kernels as rk
    from benchmarks.few_rows_tma import few_rows_linear
    n, k = ws[0].shape
    us = {}
    if name == "gate_up":
        half = n // 2
        eng = [lambda w=w: rk.silu_mul(*F.linear(x, w).split(half, -1)) for w in ws]
        ours = lambda cfg: [lambda w=w: few_rows_linear(x, w[:half], w2_NK=w[half:], epilogue="silu_gate", config=cfg)
                            for w in ws]
        per_stage = lambda c: (64 + 2 * c["BLOCK_N"]) * c["BLOCK_K"] * 2
    elif name in ("o_proj", "down"):
        res = torch.randn(M, n, device=x.device, dtype=x.dtype)
        eng = [lambda w=w: res.addmm_(x, w.t()) for w in ws]
        ours = lambda cfg: [lambda w=w: few_rows_linear(x, w, epilogue="residual", out_MN=res, config=cfg) for w in ws]
        per_stage = lambda c: (64 + c["BLOCK_N"]) * c["BLOCK_K"] * 2
    else:
        eng = [lambda w=w, b=b: F.linear(x, w, b) for w, b in zip(ws, bs)]
        ours = lambda cfg: [lambda w=w, b=b: few_rows_linear(x, w, bias_N=b, config=cfg) for w, b in zip(ws, bs)]
        per_stage = lambda c: (64 + c["BLOCK_N"]) * c["BLOCK_K"] * 2
    us["engine (cuBLAS)"] = graph_ms(eng) * 1e3
    for cfg in FEW_ROWS_SWEEP:
        if per_stage(cfg) * cfg["STAGES"] > 220 * 1024:
            continue
        key = "few_rows " + ",".join(f"{kk}={v}" for kk, v in cfg.items())
        try:
            if name in ("o_proj", "down"):  # in place: one call's increment onto a zero residual (`res` has
                got = torch.zeros_like(res)  # grown over the timed calls; a difference from it would lose bits)
                few_rows_linear(x, ws[0], epilogue="residual", out_MN=got, config=cfg)
                want = x @ ws[0].t()
            else:
                got, want = ours(cfg)[0](), eng[0]()
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            if not err < 2e-2:  # bf16 roundings of two orders; a wrong config is reported, not timed
                us[key] = f"wrong: relative difference {err:.3g} from the engine's form"
                continue
            us[key] = graph_ms(ours(cfg)) * 1e3
        except Exception as e:  # a config the compiler or the device refuses is reported, not fatal
            us[key] = f"{type(e).__name__}: {e}"[:160]
    return us


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--few-rows", action="store_true")
    p.add_argument("--models", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    a = p.parse_args(argv)
    if a.device != "cuda" or not torch.cuda.is_available():
        print("bench_decode_gemm: needs a CUDA device")
        return 0
    bw = ceilings("cuda")["copy_GBps"] * 1e9  # bytes/s read + written (also in environment())
    M, dev, bf = a.rows, "cuda", torch.bfloat16
    rows, lib0 = [], torch.backends.cuda.preferred_blas_library()
    for model, (H, inter, nqkv) in ((m, SHAPES[m]) for m in a.models.split(",")):
        for name, (n, k, bias, residual) in {"qkv": (nqkv, H, True, False), "o_proj": (H, H, False, True),
                                             "gate_up": (2 * inter, H, False, False),
                                             "down": (H, inter, False, True)}.items():
            ws = [torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for _ in range(LAYERS)]
            bs = [torch.randn(n, device=dev, dtype=bf) if bias else None for _ in range(LAYERS)]
            x = torch.randn(M, k, device=dev, dtype=bf)
            row = {"model": model, "op": name, "M": M, "N": n, "K": k,
                   "floor_us": n * k * 2 / bw * 1e6, "us": {}}
            if a.few_rows:
                row["us"] = few_rows_rows(name, ws, bs, x, M)
            for lib in ("cublas", "cublaslt") if not a.few_rows else ():
                for reduced in (True, False):
                    torch.backends.cuda.preferred_blas_library(lib)
                    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
                    for v, calls in variants(ws, bs, x, residual).items():
                        key = f"{v} [{lib}{'' if reduced else ', fp32 split-K reduction'}]"
                        try:
                            row["us"][key] = graph_ms(calls) * 1e3
                        except Exception as e:  # a variant the backend refuses is reported, not fatal
                            row["us"][key] = f"{type(e).__name__}: {e}"[:160]
            torch.backends.cuda.preferred_blas_library(lib0)
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
            rows.append(row)
            print(f"{model} {name} floor {row['floor_us']:.1f} us", flush=True)
            for key, t in sorted(row["us"].items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 1e9):
                print(f"   {t if isinstance(t, str) else f'{t:7.1f} us'}  {key}")
            del ws, bs, x
            torch.cuda.empty_cache()
    res = {"benchmark": "decode_gemm", **environment("cuda"), "copy_bandwidth": bw, "layers": LAYERS, "results": rows}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"bench_decode_gemm{'_few_rows' if a.few_rows else ''}.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
