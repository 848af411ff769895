"""python -m benchmarks.bench_decode_linear [--out DIR] [--sweep]: rk.decode_linear against the engine's cuBLAS
form of each of the decode step's four projections at 64 rows, each as 28 calls over 28 distinct weights (the
28 layers of a Qwen2.5 step: the weights do not stay in L2) replayed in one CUDA graph, so a call's time
includes the graph's launch gaps. cuBLAS forms: F.linear (+ bias) for q/k/v, addmm_ into the residual for
o_proj / down_proj, one GEMM over the stacked gate/up weight + rk.silu_mul. Floor: the weight's bytes at the
measured copy bandwidth (harness.ceilings). "read only" rows: the same 28 weights only read (a streaming-sum
kernel, and torch's sum), each a launch in the same graph: what one kernel launch per projection can reach on
these bytes, whatever its math. --sweep: also each
config of SWEEP through the kernel, to choose r1kernels.triton.decode_linear.CONFIGS. Writes
bench_decode_linear.json."""
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
SWEEP = [{"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "num_warps": 4}
         for bn in (16, 32, 64, 128) for bk in (64, 128, 256) for st in (3, 5)]


def graph_ms(calls) -> float:
    """ms per call of `calls` (closures) replayed as one CUDA graph (median replay)."""
    return time_ms(graphed(lambda: [f() for f in calls]), "cuda") / len(calls)


READ = [(g, b) for g in (1, 2, 4) for b in (4096, 16384)]  # (programs per SM, elements per program a step)


def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_sum(w_ptr, out_ptr, n, BLOCK: tl.constexpr):
        # program p sums the BLOCK-element chunks p, p + G, p + 2G, ... of w (a pure streaming read)
        pid, G = tl.program_id(0), tl.num_programs(0)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(pid * BLOCK, n, G * BLOCK):
            acc += tl.load(w_ptr + start + offs, mask=start + offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, 0))

    return read_sum


def read_us(ws) -> dict:
    """{'read only: ...': us}: the weights' bytes read by a streaming-sum kernel (each READ config) and torch's sum."""
    from r1kernels.triton.device import sm_count

    kern, sms = _read_kernel(), sm_count(ws[0].device)
    out = torch.empty(4 * sms, device=ws[0].device, dtype=torch.float32)
    us = {"read only: torch sum": graph_ms([lambda w=w: w.sum(dtype=torch.float32) for w in ws]) * 1e3}
    for g, b in READ:
        us[f"read only: streaming sum, {g} program(s) an SM, BLOCK {b}"] = graph_ms(
            [lambda w=w, g=g, b=b: kern[(g * sms,)](w, out, w.numel(), BLOCK=b, num_warps=8) for w in ws]) * 1e3
    return us


def projection_us(name, ws, bs, x, sweep: bool) -> dict:
    """{'engine (cuBLAS)': us, 'rk.decode_linear': us, 'config <cfg>': us, ...} for one projection."""
    import r1kernels as rk
    from r1kernels.triton.decode_linear import decode_linear as kernel

    n, k = ws[0].shape
    M = x.shape[0]
    if name == "gate_up":
        half = n // 2
        eng = [lambda w=w: rk.silu_mul(*F.linear(x, w).split(half, -1)) for w in ws]
        ours = lambda cfg: [lambda w=w: kernel(x, w[:half], w2_NK=w[half:], config=cfg) for w in ws]
        per_stage = lambda c: (64 + 2 * c["BLOCK_N"]) * c["BLOCK_K"] * 2
    elif name in ("o_proj", "down"):
        res = torch.randn(M, n, device=x.device, dtype=x.dtype)
        eng = [lambda w=w: res.addmm_(x, w.t()) for w in ws]
        ours = lambda cfg: [lambda w=w: kernel(x, w, residual_MN=res, config=cfg) for w in ws]
        per_stage = lambda c: (64 + c["BLOCK_N"]) * c["BLOCK_K"] * 2
    else:
        eng = [lambda w=w, b=b: F.linear(x, w, b) for w, b in zip(ws, bs)]
        ours = lambda cfg: [lambda w=w, b=b: kernel(x, w, bias_N=b, config=cfg) for w, b in zip(ws, bs)]
        per_stage = lambda c: (64 + c["BLOCK_N"]) * c["BLOCK_K"] * 2
    us = {"engine (cuBLAS)": graph_ms(eng) * 1e3, "rk.decode_linear": graph_ms(ours(None)) * 1e3, **read_us(ws)}
    for cfg in SWEEP if sweep else ():
        if per_stage(cfg) * cfg["STAGES"] > 220 * 1024:
            continue
        key = "config " + ",".join(f"{kk}={v}" for kk, v in cfg.items())
        try:
            if name in ("o_proj", "down"):  # in place: one call's increment onto a zero residual (`res` has
                got = torch.zeros_like(res)  # grown over the timed calls; a difference from it would lose bits)
                kernel(x, ws[0], residual_MN=got, config=cfg)
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
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--models", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    a = p.parse_args(argv)
    if a.device != "cuda" or not torch.cuda.is_available():
        print("bench_decode_linear: needs a CUDA device")
        return 0
    bw = ceilings("cuda")["copy_GBps"] * 1e9  # bytes/s read + written (also in environment())
    M, dev, bf = a.rows, "cuda", torch.bfloat16
    rows = []
    for model, (H, inter, nqkv) in ((m, SHAPES[m]) for m in a.models.split(",")):
        for name, (n, k, bias) in {"qkv": (nqkv, H, True), "o_proj": (H, H, False),
                                   "gate_up": (2 * inter, H, False), "down": (H, inter, False)}.items():
            ws = [torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for _ in range(LAYERS)]
            bs = [torch.randn(n, device=dev, dtype=bf) if bias else None for _ in range(LAYERS)]
            x = torch.randn(M, k, device=dev, dtype=bf)
            row = {"model": model, "op": name, "M": M, "N": n, "K": k, "floor_us": n * k * 2 / bw * 1e6,
                   "us": projection_us(name, ws, bs, x, a.sweep)}
            rows.append(row)
            print(f"{model} {name} floor {row['floor_us']:.1f} us", flush=True)
            for key, t in sorted(row["us"].items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 1e9):
                print(f"   {t if isinstance(t, str) else f'{t:7.1f} us'}  {key}")
            del ws, bs, x
            torch.cuda.empty_cache()
    res = {"benchmark": "decode_linear", **environment("cuda"), "copy_bandwidth": bw, "layers": LAYERS,
           "results": rows}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_decode_linear.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
