"""The decode step's few-row GEMMs (rk.linear, rk.swiglu, rk.linear_residual_) against cuBLAS on the
Qwen2.5-1.5B decode shapes, and a sweep of the Triton kernel's configs (tuning lives here, not in the
kernel: the best config per shape is printed and saved; r1kernels.triton.skinny.config is the default).

Each timing replays a CUDA graph of `calls` back-to-back calls over rotated weight sets that together
exceed the L2 cache (as in the engine: every layer has its own weights, no launch overhead), divided by
`calls`. Floor: the weight bytes (plus x and y) at the copy bandwidth measured in the same run.
python -m benchmarks.bench_skinny [--out DIR] [--sweep] [--rows 64,32,8]"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F

from r1kernels.triton import skinny

from .harness import ceilings, environment

H, I, NQKV = 1536, 8960, 2048  # Qwen2.5-1.5B: hidden, MLP, q+k+v outputs (12 + 2 + 2 heads of 128)
SHAPES = {"qkv": (NQKV, H, "linear"), "o_proj": (H, H, "residual"), "gate_up": (I, H, "swiglu"),
          "down_proj": (H, I, "residual")}  # qkv + bias; gate/up + SiLU; o / down + residual


def _graph_time(fn_list, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fn_list:
            f()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        t0.record()
        g.replay()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) / len(fn_list))
    times.sort()
    return times[len(times) // 2] * 1e-3


def _sets(M, N, K, kind, dev, dtype=torch.bfloat16):
    w_bytes = N * K * 2 * (2 if kind == "swiglu" else 1)
    n = max(3, -(-400 * 2**20 // w_bytes))  # > 400 MB of weights per graph: L2 (50 MB) never holds them
    out = []
    for _ in range(n):
        x = torch.randn(M, K, device=dev, dtype=dtype)
        w = torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5
        w2 = torch.randn(N, K, device=dev, dtype=dtype) * K ** -0.5 if kind == "swiglu" else None
        b = torch.randn(N, device=dev, dtype=dtype) if kind == "linear" else None
        r = torch.randn(M, N, device=dev, dtype=dtype) if kind == "residual" else None
        out.append((x, w, w2, b, r))
    return out


def _ours(kind, cfg):
    def make(x, w, w2, b, r):
        if kind == "linear":
            return lambda: skinny.linear(x, w, b, cfg=cfg)
        if kind == "swiglu":
            return lambda: skinny.swiglu(x, w, w2, cfg=cfg)
        return lambda: skinny.linear_residual_(x, w, r, cfg=cfg)
    return make


def _cublas(kind):
    from r1kernels.triton.fused import silu_mul

    def make(x, w, w2, b, r):
        if kind == "linear":
            return lambda: F.linear(x, w, b)
        if kind == "swiglu":
            return lambda: silu_mul(F.linear(x, w), F.linear(x, w2))
        return lambda: r.addmm_(x, w.t())
    return make


def sweep_configs(M, N, K, kind, sms=132):
    """Tiles of 32-256 columns and 64-256 deep on one or two programs per SM (stream-K), the deepest
    pipeline within 220 KB of shared memory (at most 5 stages; per program when two share an SM) and one
    less, 8 warps for tiles of 128+ columns."""
    BM = max(16, 1 << (M - 1).bit_length())
    for BN, BK, per_sm, warps in itertools.product((32, 64, 128, 256), (64, 128, 256), (1, 2), (4, 8)):
        stage_bytes = BK * (BM + BN * (2 if kind == "swiglu" else 1)) * 2
        most = min(5, 220 * 1024 // per_sm // stage_bytes)
        if BK > K or most < 2 or (warps == 8) != (BN >= 128):
            continue
        for stages in (most, most - 1) if most > 2 else (2,):
            yield dict(BN=BN, BK=BK, PROGRAMS=per_sm * sms, num_warps=warps, num_stages=stages)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sweep", action="store_true", help="time every config of sweep_configs at the first --rows")
    p.add_argument("--rows", default="64,32,8")
    p.add_argument("--ops", default=",".join(SHAPES), help="comma list of SHAPES keys to run")
    a = p.parse_args(argv)
    if a.device != "cuda" or not torch.cuda.is_available():
        print("bench_skinny: needs CUDA (CUDA graphs); skipped")
        return
    dev = torch.device("cuda")
    bw = ceilings("cuda")["copy_GBps"] * 1e9
    rows = [int(r) for r in a.rows.split(",")]
    results = []
    for name, (N, K, kind) in SHAPES.items():
        if name not in a.ops.split(","):
            continue
        for M in rows:
            sets = _sets(M, N, K, kind, dev)
            floor = (N * K * (2 if kind == "swiglu" else 1) + M * K + M * N) * 2 / bw
            row = dict(op=name, M=M, N=N, K=K, floor_s=floor,
                       default_cfg=skinny.config(M, N, K, kind == "swiglu", dev))
            row["cublas_s"] = _graph_time([_cublas(kind)(*s) for s in sets])
            row["ours_s"] = _graph_time([_ours(kind, None)(*s) for s in sets])
            if a.sweep and M == rows[0]:
                best = None
                for cfg in sweep_configs(M, N, K, kind, torch.cuda.get_device_properties(dev).multi_processor_count):
                    try:
                        t = _graph_time([_ours(kind, cfg)(*s) for s in sets], reps=5)
                    except Exception as e:  # out of shared memory etc.
                        print(f"  {name} {cfg}: {type(e).__name__}")
                        continue
                    if best is None or t < best[0]:
                        best = (t, cfg)
                row["best_s"], row["best_cfg"] = best
            print(f"{name:24s} M={M:3d}: cuBLAS {row['cublas_s'] * 1e6:7.1f} us  ours {row['ours_s'] * 1e6:7.1f} us"
                  f"  floor {floor * 1e6:6.1f} us  ({row['ours_s'] / floor:.2f}x)"
                  + (f"  best {row['best_s'] * 1e6:.1f} us {row['best_cfg']}" if "best_s" in row else ""))
            results.append(row)
            del sets
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_skinny.json"), "w") as f:
            json.dump(dict(benchmark="skinny", **environment("cuda"), copy_bandwidth=bw, results=results), f, indent=1)


if __name__ == "__main__":
    main()
