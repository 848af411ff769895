"""python -m benchmarks.bench_decode_linear [--sweep] [--out DIR]: the decode step's four projections at M rows
(Qwen2.5-1.5B and -7B shapes: q/k/v + bias, o_proj + residual, gate/up + SiLU, down_proj + residual), each
as 28 calls over 28 distinct weights (as the 28 layers of a step: the weights do not stay in L2) replayed in
one CUDA graph, so a call's time includes the graph's launch gaps. Providers: the engine's torch path
(cuBLAS F.linear / addmm_, + rk.silu_mul for the gated MLP) and rk.decode_linear (r1kernels.ops.linear's
config, and with --sweep every (warp_rows, k_groups, stages, splits)). Floor: the weight's bytes at the measured copy
bandwidth. Writes bench_decode_linear.json (with each config's max error against the fp32 product)."""
from __future__ import annotations

import argparse
import json
import os

import torch

import r1kernels as rk
from benchmarks.harness import environment

LAYERS = 28
SHAPES = {  # model -> (hidden, intermediate, q/k/v rows)
    "1.5B": (1536, 8960, 1536 + 2 * 256),
    "7B": (3584, 18944, 3584 + 2 * 512),
}


def copy_bandwidth() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (e0.elapsed_time(e1) / 1e3)


def graph_ms(calls, reps: int = 20) -> float:
    """ms per call of `calls` (a list of closures) replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    for _ in range(3):
        g.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / (reps * len(calls))


def ops(model: str, M: int):
    """name -> (weights, biases or None, x, mode, n_out)"""
    H, inter, nqkv = SHAPES[model]
    dev, bf = "cuda", torch.bfloat16

    def w(n, k):
        return [torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for _ in range(LAYERS)]
    return {
        "qkv": (w(nqkv, H), [torch.randn(nqkv, device=dev, dtype=bf) for _ in range(LAYERS)],
                torch.randn(M, H, device=dev, dtype=bf), "store"),
        "o_proj": (w(H, H), None, torch.randn(M, H, device=dev, dtype=bf), "residual"),
        "gate_up": (w(2 * inter, H), None, torch.randn(M, H, device=dev, dtype=bf), "gated"),
        "down": (w(H, inter), None, torch.randn(M, inter, device=dev, dtype=bf), "residual"),
    }


def closures(ws, bs, x, mode, provider, cfg=None):
    res = torch.randn(x.shape[0], ws[0].shape[0], device="cuda", dtype=x.dtype) if mode == "residual" else None
    out = []
    for i, w in enumerate(ws):
        b = bs[i] if bs is not None else None
        if provider == "torch":
            if mode == "store":
                out.append(lambda w=w, b=b: torch.nn.functional.linear(x, w, b))
            elif mode == "residual":
                out.append(lambda w=w: res.addmm_(x, w.t()))
            else:
                n = w.shape[0] // 2
                out.append(lambda w=w, n=n: rk.silu_mul(*torch.nn.functional.linear(x, w).split(n, -1)))
        else:
            out.append(lambda w=w, b=b: rk.decode_linear(x, w, b, residual=res, gated=mode == "gated",
                                                         config=cfg, backend="cuda"))
    return out


def max_err(ws, bs, x, mode, cfg) -> float:
    """max |ours - fp32 product| / max |fp32 product| on layer 0 (residual: zeros + product)."""
    w, b = ws[0], bs[0] if bs is not None else None
    y = x.float() @ w.float().t() + (b.float() if b is not None else 0)
    if mode == "gated":
        n = w.shape[0] // 2
        g, u = y[:, :n].bfloat16().float(), y[:, n:].bfloat16().float()
        y = torch.nn.functional.silu(g) * u
    res = torch.zeros(x.shape[0], w.shape[0], device="cuda", dtype=x.dtype) if mode == "residual" else None
    got = rk.decode_linear(x, w, b, residual=res, gated=mode == "gated", config=cfg, backend="cuda").float()
    return ((got - y).abs().max() / y.abs().max()).item()


def sweep_configs(K: int):
    for wr in (16, 32):
        for kg in (1, 2, 4):
            for stages in (4, 6):
                for splits in (1, 2, 3, 4, 6, 8, 12):
                    if splits <= K // 64:
                        yield (wr, kg, stages, splits)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sweep", action="store_true", help="time every (warp_rows, k_groups, stages, splits)")
    p.add_argument("--rows", default="64", help="comma list of M")
    p.add_argument("--models", default="1.5B,7B")
    a = p.parse_args(argv)
    if a.device != "cuda" or not torch.cuda.is_available():
        print("bench_decode_linear: needs a CUDA device")
        return 0
    bw = copy_bandwidth()
    rows = []
    for model in a.models.split(","):
        for M in (int(m) for m in a.rows.split(",")):
            for name, (ws, bs, x, mode) in ops(model, M).items():
                K = ws[0].shape[1]
                floor_ms = ws[0].numel() * 2 / bw * 1e3
                t_torch = graph_ms(closures(ws, bs, x, mode, "torch"))
                from r1kernels.ops.linear import _sms
                from r1kernels.ops.linear import config as default_config
                N = ws[0].shape[0] // 2 if mode == "gated" else ws[0].shape[0]
                cfg0 = default_config(M, N, K, {"store": 0, "residual": 1, "gated": 2}[mode], _sms(0))
                t_ours = graph_ms(closures(ws, bs, x, mode, "ours", cfg0))
                row = {"model": model, "op": name, "M": M, "N": ws[0].shape[0], "K": K, "floor_ms": floor_ms,
                       "torch_ms": t_torch, "ours_ms": t_ours, "ours_config": cfg0,
                       "ours_err": max_err(ws, bs, x, mode, cfg0)}
                if a.sweep:
                    sw = []
                    for cfg in sweep_configs(K):
                        try:
                            sw.append({"config": cfg, "ms": graph_ms(closures(ws, bs, x, mode, "ours", cfg), 10),
                                       "err": max_err(ws, bs, x, mode, cfg)})
                        except Exception as e:  # a config that cannot launch (shared memory) is reported
                            sw.append({"config": cfg, "error": f"{type(e).__name__}: {e}"[:200]})
                    ok = [s for s in sw if "ms" in s]
                    row["sweep"] = sw
                    row["best"] = min(ok, key=lambda s: s["ms"]) if ok else None
                rows.append(row)
                best = row.get("best")
                print(f"{model:5s} {name:8s} M={M:3d} floor {floor_ms * 1e3:6.1f} us  torch {t_torch * 1e3:6.1f} us"
                      f"  ours {t_ours * 1e3:6.1f} us {cfg0} err {row['ours_err']:.1e}"
                      + (f"  best {best['ms'] * 1e3:6.1f} us {best['config']} err {best['err']:.1e}" if best else ""),
                      flush=True)
                del ws, bs, x
                torch.cuda.empty_cache()
    res = {"benchmark": "decode_linear", **environment("cuda"), "copy_bandwidth": bw, "layers": LAYERS, "results": rows}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_decode_linear.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
