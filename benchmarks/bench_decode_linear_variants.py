"""python -m benchmarks.bench_decode_linear_variants [--out DIR] [--rows 64]: two changes to rk.decode_linear's
kernel, timed beside it (and beside the engine's cuBLAS form) before either goes into r1kernels. Each projection
runs as 28 calls over 28 distinct weights in one CUDA graph (as bench_decode_linear), at the 1.5B decode shapes.

  preload   the epilogue's global operands (bias, the residual tile) loaded before the K loop instead of after
            it: one dependent global round trip fewer at the end of every program
  split S   each program multiplies a K range of its weight tile (grid N / BLOCK_N x S) and stores its fp32
            partial [S, M, N]; no fixup and no reduce launch: the sum is left to the consumer, the next
            RMSNorm (`sum_norm`: residual += sum of the S partials in split order, then the norm of the new
            residual; one launch, the launch the step pays for the norm today). Program count S x N / BLOCK_N
            at BLOCK_N 32-128: the x tile every program reads shrinks to its K range, and each SM's
            shared-memory stages hold more weight bytes (at BLOCK_N 16 the 64-row x tile is 4/5 of every stage).
  ws        the K loop warp-specialized (tl.range(warp_specialize=True): producer warps issue the descriptor
            loads, consumer warps run the dots), with 4 or 8 warps: the H100 ncu of the production o_proj shows
            one 4-warp program per SM issuing one instruction every ~8 cycles, long-scoreboard bound (NOTES)

The residual projections are timed with the RMSNorm that follows them in the step (o_proj -> the post-attention
norm, down_proj -> the next layer's input norm), so every variant pays its consumer: cuBLAS addmm_ + rk.rms_norm,
rk.decode_linear(residual) + rk.rms_norm, split + sum_norm. Each variant is checked against torch (fp32 math)
before it is timed. Writes bench_decode_linear_variants.json."""
from __future__ import annotations

import argparse
import functools
import json
import os

import torch
import triton
import triton.language as tl

from benchmarks.harness import ceilings, environment, graphed, time_ms

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LAYERS, HIDDEN, INTER, QKV = 28, 1536, 8960, 1536 + 2 * 256
# (BLOCK_N, BLOCK_K, STAGES, S); at most 220 KB of stages, S x N / BLOCK_N programs
SPLITS = {"o_proj": [(16, 256, 5, 1), (64, 128, 4, 4), (32, 128, 4, 4), (32, 256, 3, 2), (64, 128, 3, 6),
                     (128, 64, 4, 11)],
          "down": [(16, 256, 5, 1), (64, 128, 6, 5), (64, 128, 5, 5), (32, 128, 6, 2), (128, 128, 4, 11),
                   (128, 64, 6, 11), (64, 256, 3, 5), (32, 128, 4, 4)]}


@triton.jit
def _variant_kernel(x_desc, w_desc, out_ptr, part_ptr, bias_ptr, M, N, CHUNKS, stride_om, EPI: tl.constexpr,
                    HAS_BIAS: tl.constexpr, PRELOAD: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                    WS: tl.constexpr):
    """rk.decode_linear's body (EPI 0: out = acc (+ bias); 1: out += acc in place) with PRELOAD and SPLIT (module
    docstring). SPLIT: program (j, s) takes K chunks [s * CHUNKS // S, (s + 1) * CHUNKS // S) and stores its fp32
    partial at part[s] (no bias, no residual: the consumer's)."""
    n0 = tl.program_id(0) * BLOCK_N
    s = tl.program_id(1)
    S = tl.num_programs(1)
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if PRELOAD and not SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if EPI == 1:
            acc += tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
    c0 = s * CHUNKS // S
    c1 = (s + 1) * CHUNKS // S
    for c in tl.range(c0, c1, num_stages=STAGES, warp_specialize=WS):
        x = x_desc.load([0, c * BLOCK_K])
        w = w_desc.load([n0, c * BLOCK_K])
        if DOT_F32:  # the interpreter's bf16 dot is wrong
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w.T, acc)
    if SPLIT:
        tl.store(part_ptr + s * M * N + rm[:, None] * N + rn[None, :], acc, mask=msk)
    else:
        if not PRELOAD:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            if EPI == 1:
                acc += tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=msk)


def variant(x_MK, w_NK, *, bias_N=None, residual_MN=None, part_SMN=None, preload=False, block_n=16, block_k=256,
            stages=5, ws=False, num_warps=4):
    """out [M, N] (or residual_MN in place), or with part_SMN [S, M, N] fp32 the S partials (split); ws: the K
    loop warp-specialized."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    interp = x_MK.device.type != "cuda"
    S = part_SMN.shape[0] if part_SMN is not None else 1
    out = residual_MN if residual_MN is not None else part_SMN if part_SMN is not None else x_MK.new_empty(M, N)
    bm = 64 if not interp else max(16, triton.next_power_of_2(M))
    x_desc = TensorDescriptor.from_tensor(x_MK, [bm, block_k])
    w_desc = TensorDescriptor.from_tensor(w_NK, [block_n, block_k])
    _variant_kernel[(triton.cdiv(N, block_n), S)](
        x_desc, w_desc, out, part_SMN if part_SMN is not None else out, bias_N if bias_N is not None else out,
        M, N, triton.cdiv(K, block_k), out.stride(-2), EPI=int(residual_MN is not None), HAS_BIAS=bias_N is not None,
        PRELOAD=preload, SPLIT=part_SMN is not None, DOT_F32=interp, BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k,
        STAGES=stages, WS=ws, num_warps=num_warps)
    return out


@triton.jit
def _sum_norm_kernel(part_ptr, res_ptr, w_ptr, o_ptr, M, N, S, eps, BLOCK: tl.constexpr):
    """Row m: res[m] += part[0, m] + ... + part[S - 1, m] (fp32, in split order; one bf16 rounding), then
    o[m] = rk.rms_norm(res[m]) (the rounding of the normalized row before the weight product, as HF)."""
    m = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cm = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(S):
        acc += tl.load(part_ptr + (s * M + m) * N + cols, mask=cm, other=0.0)
    r = (tl.load(res_ptr + m * N + cols, mask=cm, other=0.0).to(tl.float32) + acc).to(res_ptr.dtype.element_ty)
    tl.store(res_ptr + m * N + cols, r, mask=cm)
    x = r.to(tl.float32)
    h = (x * tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)).to(res_ptr.dtype.element_ty).to(tl.float32)
    y = h * tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    tl.store(o_ptr + m * N + cols, y.to(o_ptr.dtype.element_ty), mask=cm)


def sum_norm(part_SMN, residual_MN, weight_N, eps=1e-6, out_MN=None):
    S, M, N = part_SMN.shape
    out = out_MN if out_MN is not None else torch.empty_like(residual_MN)
    _sum_norm_kernel[(M,)](part_SMN, residual_MN, weight_N, out, M, N, S, eps, BLOCK=triton.next_power_of_2(N),
                           num_warps=4)
    return out


def reference(x_MK, w_NK, bias_N=None, residual_MN=None):
    y = x_MK.float() @ w_NK.float().t()
    if bias_N is not None:
        y = y + bias_N.float()
    if residual_MN is not None:
        y = y + residual_MN.float()
    return y


def _rel(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _graph_us(calls) -> float:
    return time_ms(graphed(lambda: [f() for f in calls]), "cuda") / len(calls) * 1e3


def residual_us(name, M, dev, configs, warp_spec=False) -> dict:
    """o_proj / down_proj + the RMSNorm after it: us per layer of each form (warp_spec: the warp-specialized forms
    beside the production kernel and cuBLAS, no others)."""
    import r1kernels as rk
    from r1kernels.reference.fused import rms_norm as rms_norm_reference
    from r1kernels.triton.decode_linear import decode_linear as production

    n, k = (HIDDEN, HIDDEN) if name == "o_proj" else (HIDDEN, INTER)
    bf = torch.bfloat16
    ws = [torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for _ in range(LAYERS)]
    nw = [1 + 0.1 * torch.randn(n, device=dev, dtype=bf) for _ in range(LAYERS)]
    x = torch.randn(M, k, device=dev, dtype=bf)
    res = torch.randn(M, n, device=dev, dtype=bf)
    normed = torch.empty_like(res)

    def norm(i):
        normed.copy_(rk.rms_norm(res, nw[i]))

    forms = {"cuBLAS addmm_ + rms_norm": lambda i: (res.addmm_(x, ws[i].t()), norm(i)),
             "rk.decode_linear + rms_norm": lambda i: (production(x, ws[i], residual_MN=res), norm(i)),
             "preload + rms_norm": lambda i: (variant(x, ws[i], residual_MN=res, preload=True), norm(i))}
    if warp_spec:
        del forms["preload + rms_norm"]
        configs = ()
        for nw_ in (4, 8):
            forms[f"ws num_warps={nw_} + rms_norm"] = (
                lambda i, n_=nw_: (variant(x, ws[i], residual_MN=res, preload=True, ws=True, num_warps=n_), norm(i)))
    parts = {}
    for bn, bk, st, S in configs:
        part = parts.setdefault(S, torch.empty(S, M, n, device=dev, dtype=torch.float32))
        forms[f"split BLOCK_N={bn},BLOCK_K={bk},STAGES={st},S={S} + sum_norm"] = (
            lambda i, p=part, c=(bn, bk, st): (variant(x, ws[i], part_SMN=p, block_n=c[0], block_k=c[1], stages=c[2]),
                                               sum_norm(p, res, nw[i], out_MN=normed)))
    us = {"projection alone: rms_norm": _graph_us([lambda i=i: norm(i) for i in range(LAYERS)])}
    for key, f in forms.items():
        try:
            base = torch.randn_like(res)
            res.copy_(base)
            f(0)
            want_res = reference(x, ws[0], residual_MN=base)
            want = rms_norm_reference(want_res.to(bf), nw[0])  # the norm of the rounded residual
            err = max(_rel(res, want_res), _rel(normed, want))
            if not err < 2e-2:
                us[key] = f"wrong: relative difference {err:.3g}"
                continue
            res.copy_(base)
            us[key] = _graph_us([lambda i=i, f=f: f(i) for i in range(LAYERS)])
        except Exception as e:  # a config the compiler or the device refuses is reported, not fatal
            us[key] = f"{type(e).__name__}: {e}"[:160]
    return us


def qkv_us(M, dev, warp_spec=False) -> dict:
    import torch.nn.functional as F

    from r1kernels.triton.decode_linear import decode_linear as production
    bf = torch.bfloat16
    ws = [torch.randn(QKV, HIDDEN, device=dev, dtype=bf) / HIDDEN ** 0.5 for _ in range(LAYERS)]
    bs = [torch.randn(QKV, device=dev, dtype=bf) for _ in range(LAYERS)]
    x = torch.randn(M, HIDDEN, device=dev, dtype=bf)
    forms = {"cuBLAS F.linear": lambda i: F.linear(x, ws[i], bs[i]),
             "rk.decode_linear": lambda i: production(x, ws[i], bias_N=bs[i]),
             "preload": lambda i: variant(x, ws[i], bias_N=bs[i], preload=True)}
    if warp_spec:
        del forms["preload"]
        for nw_ in (4, 8):
            forms[f"ws num_warps={nw_}"] = lambda i, n_=nw_: variant(x, ws[i], bias_N=bs[i], preload=True, ws=True,
                                                                      num_warps=n_)
    us = {}
    for key, f in forms.items():
        err = _rel(f(0), reference(x, ws[0], bias_N=bs[0]))
        us[key] = f"wrong: {err:.3g}" if not err < 2e-2 else _graph_us([lambda i=i, f=f: f(i) for i in range(LAYERS)])
    return us


def _row_forms(op, x, ws, w2s, bs, res, gu):
    """(the engine's cuBLAS form, rk.decode_linear with a config, the fp32 reference) of layer i; gu: gate_up's
    stacked [gate; up] weights (the engine's one GEMM), built once per op."""
    import torch.nn.functional as F

    import r1kernels as rk
    from r1kernels.triton.decode_linear import decode_linear as production
    if op == "qkv":
        return (lambda i: F.linear(x, ws[i], bs[i]), lambda i, c: production(x, ws[i], bias_N=bs[i], config=c),
                lambda i: reference(x, ws[i], bias_N=bs[i]))
    if op == "o_proj":
        return (lambda i: res.addmm_(x, ws[i].t()), lambda i, c: production(x, ws[i], residual_MN=res, config=c), None)
    n = ws[0].shape[0]
    return (lambda i: rk.silu_mul(*F.linear(x, gu[i]).split(n, -1)),
            lambda i, c: production(x, ws[i], w2_NK=w2s[i], config=c),
            lambda i: F.silu(reference(x, ws[i])) * reference(x, w2s[i]))


def rows_us(rows_list, dev) -> dict:
    """rk.decode_linear's x tile at BLOCK_M 64 (rows past M zero-filled by the descriptor) against BLOCK_M =
    max(16, next_pow2(M)) at the same config, and at the stages the smaller tile frees (<= 200 KB), beside the
    engine's cuBLAS forms: {op: {rows: {form: us}}}. o_proj's in-place residual is not checked (it grows over
    the timed calls; its configs run the qkv kernel body with another epilogue)."""
    from r1kernels.triton.decode_linear import CONFIGS, _smem
    bf = torch.bfloat16
    shapes = {"qkv": (QKV, HIDDEN, "none"), "o_proj": (HIDDEN, HIDDEN, "residual"),
              "gate_up": (INTER, HIDDEN, "silu_gate")}
    out = {}
    for op, (n, k, epi) in shapes.items():
        ws, w2s = [[torch.randn(n, k, device=dev, dtype=bf) / k ** 0.5 for _ in range(LAYERS)]
                   for _ in range(2 if epi == "silu_gate" else 1)] + [None] * (epi != "silu_gate")
        bs = [torch.randn(n, device=dev, dtype=bf) for _ in range(LAYERS)] if op == "qkv" else None
        gu = [torch.cat([a, b]) for a, b in zip(ws, w2s)] if w2s is not None else None
        for M in rows_list:
            x = torch.randn(M, k, device=dev, dtype=bf)
            res = torch.randn(M, n, device=dev, dtype=bf)
            eng, ours, want = _row_forms(op, x, ws, w2s, bs, res, gu)
            bm = max(16, 1 << (M - 1).bit_length())
            cfg = CONFIGS[epi]
            more = dict(cfg, BLOCK_M=bm, STAGES=max(s for s in range(cfg["STAGES"], 13)
                                                   if _smem(dict(cfg, STAGES=s), epi, bm) <= 200 * 1024))
            forms = {"cuBLAS": None, "BLOCK_M=64": {"BLOCK_M": 64}, f"BLOCK_M={bm}": {"BLOCK_M": bm},
                     f"BLOCK_M={bm},STAGES={more['STAGES']}": more}
            forms[f"BLOCK_M={bm},num_warps=8"] = dict(cfg, BLOCK_M=bm, num_warps=8)  # two warpgroups a program
            if op != "gate_up":  # 8-row weight tiles: twice the programs, two per SM (<= 113 KB of stages each)
                for bk, st in ((256, 3), (128, 6)):
                    forms[f"BLOCK_M={bm},BLOCK_N=8,BLOCK_K={bk},STAGES={st}"] = dict(
                        cfg, BLOCK_M=bm, BLOCK_N=8, BLOCK_K=bk, STAGES=st)
            else:  # 140 programs of 64 weight rows, two per SM (98 KB of stages each): every SM streams
                forms[f"BLOCK_M={bm},BLOCK_N=64,STAGES=4"] = dict(cfg, BLOCK_M=bm, BLOCK_N=64, STAGES=4)
            us = {}
            for key, c in forms.items():
                f = eng if c is None else functools.partial(ours, c=c)
                try:
                    err = _rel(f(1), want(1)) if want is not None else 0.0
                    us[key] = _graph_us([functools.partial(f, i) for i in range(LAYERS)]) if err < 2e-2 \
                        else f"wrong: relative difference {err:.3g}"
                except Exception as e:  # a config the compiler or the device refuses is reported, not fatal
                    us[key] = f"{type(e).__name__}: {e}"[:160]
            out.setdefault(op, {})[M] = us
            print(op, M, {kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in us.items()}, flush=True)
        ws = w2s = bs = gu = None
        torch.cuda.empty_cache()
    return out


def _save(out_dir, name, res) -> int:
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(res, f, indent=1)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--rows-sweep", default=None, help="comma list of row counts: rows_us only")
    p.add_argument("--ws", action="store_true", help="the warp-specialized K loop only (q/k/v, o_proj; its own "
                   "process and JSON: a form the compiler mishandles cannot take the others' results with it)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or TensorDescriptor is None:
        print("bench_decode_linear_variants: needs a CUDA device and Triton tensor descriptors")
        return 0
    bw = ceilings("cuda")["copy_GBps"] * 1e9
    floors = {"qkv": QKV * HIDDEN * 2 / bw * 1e6, "o_proj": HIDDEN * HIDDEN * 2 / bw * 1e6,
              "down": HIDDEN * INTER * 2 / bw * 1e6}
    if a.rows_sweep:
        res = {"benchmark": "decode_linear_rows", **environment("cuda"), "layers": LAYERS, "floor_us": floors,
               "us": rows_us([int(r) for r in a.rows_sweep.split(",")], "cuda")}
        return _save(a.out, "bench_decode_linear_rows.json", res)
    rows = {"qkv": qkv_us(a.rows, "cuda", warp_spec=a.ws)}
    for name in ("o_proj",) if a.ws else ("o_proj", "down"):
        rows[name] = residual_us(name, a.rows, "cuda", SPLITS[name], warp_spec=a.ws)
    for name, us in rows.items():
        print(f"{name} (weight floor {floors[name]:.1f} us)")
        for key, t in sorted(us.items(), key=lambda kv: kv[1] if isinstance(kv[1], float) else 1e9):
            print(f"   {t if isinstance(t, str) else f'{t:7.2f} us'}  {key}")
    res = {"benchmark": "decode_linear_variants", **environment("cuda"), "rows": a.rows, "layers": LAYERS,
           "floor_us": floors, "us": rows}
    return _save(a.out, f"bench_decode_linear_variants{'_ws' if a.ws else ''}.json", res)


if __name__ == "__main__":
    raise SystemExit(main())
