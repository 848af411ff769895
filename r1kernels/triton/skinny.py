"""Triton GEMMs for few rows (a decode step: M <= MAX_M rows against a [N, K] weight), read-bound on the
weight: y [M, N] = x [M, K] @ W^T, with three epilogues (r1kernels.reference.fused is the spec):
- linear: + bias;
- swiglu: two weights (gate, up) read in the same program, silu(x W_g^T) * (x W_u^T), the two products
  rounded to x's dtype first (as the unfused projections are), one output instead of two plus an
  activation kernel;
- linear_residual_: residual += x W^T in place, one rounding (as torch.addmm_).

Stream-K over a fixed number of programs (about one per SM): the (column tile, K step) units are cut
into equal contiguous ranges, so no program waits for a last partial wave (measured on H200 at M = 64,
gate/up: 280 tiles of 32 columns on 132 SMs ran at 2.5 TB/s with one tile per program). Tiles cut between
programs are summed from fp32 partials in program order by the program that completes them (bitwise
deterministic). The tile counters are one int32 buffer per device, allocated (zeroed) before any
CUDA-graph capture and always left at 0 by each launch.
No host synchronization: grids and configs depend on shapes only.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_M = 64
N_COUNTERS = 1 << 16
_COUNTERS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _epilogue(acc, acc2, b_ptr, r_ptr, y_ptr, rm, rn, M, N, srm, sym,
              GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    m = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if GATED:
        g = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        u = acc2.to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = g / (1.0 + tl.exp(-g)) * u
    if HAS_RES:
        acc += tl.load(r_ptr + rm64 * srm + rn[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm64 * sym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _tile_part(x_ptr, w_ptr, w2_ptr, M, K, sxm, swn, sw2n, tile, ks, ke, N, GATED: tl.constexpr,
               EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FP32_DOT: tl.constexpr):
    """fp32 sums over k-steps [ks, ke) of x [BM rows] against columns tile * BN + [0, BN) of W (and W2)."""
    rm = tl.arange(0, BM)
    rk = tl.arange(0, BK)
    mm = (rm < M)[:, None]
    # columns past N are clamped (their results are never stored): unmasked weight loads
    rn_c = tl.minimum(tile * BN + tl.arange(0, BN), N - 1).to(tl.int64)
    k0 = ks.to(tl.int64) * BK
    xp = x_ptr + rm.to(tl.int64)[:, None] * sxm + (k0 + rk)[None, :]
    wp = w_ptr + rn_c[None, :] * swn + (k0 + rk)[:, None]  # [BK, BN] tile of W^T
    wp2 = w2_ptr + rn_c[None, :] * sw2n + (k0 + rk)[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(ks, ke):
        if EVEN_K:
            xt = tl.load(xp, mask=mm, other=0.0)
            wt = tl.load(wp)
        else:
            km = (k * BK + rk) < K
            xt = tl.load(xp, mask=mm & km[None, :], other=0.0)
            wt = tl.load(wp, mask=km[:, None], other=0.0)
        if FP32_DOT:
            acc += tl.dot(xt.to(tl.float32), wt.to(tl.float32))
        else:
            acc = tl.dot(xt, wt, acc)
        if GATED:
            if EVEN_K:
                wt2 = tl.load(wp2)
            else:
                wt2 = tl.load(wp2, mask=km[:, None], other=0.0)
            if FP32_DOT:
                acc2 += tl.dot(xt.to(tl.float32), wt2.to(tl.float32))
            else:
                acc2 = tl.dot(xt, wt2, acc2)
        xp += BK
        wp += BK
        wp2 += BK
    return acc, acc2


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, w2_ptr, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, sxm, swn, sw2n, srm,
                   sym, KT, TOTAL, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   FP32_DOT: tl.constexpr):
    """Stream-K: the TOTAL = tiles * KT units (a BN-column tile, one BK step) are cut into P equal contiguous
    ranges, one per program. A tile that one program covers whole is finished by it; a tile cut between
    programs gets each one's fp32 partial in workspace slot (program, 0 if it is the program's first tile
    else 1) and is finished by the program whose units complete its count, summing the partials in program
    order (deterministic)."""
    pid = tl.program_id(0).to(tl.int64)
    P = tl.num_programs(0)
    start = pid * TOTAL // P
    end = (pid + 1) * TOTAL // P
    rm = tl.arange(0, BM)
    offs = rm[:, None] * BN + tl.arange(0, BN)[None, :]
    TSZ: tl.constexpr = BM * BN
    gate_half = P * 2 * TSZ
    u = start
    while u < end:
        tile = u // KT
        ks = u - tile * KT
        ke = tl.minimum(KT, ks + (end - u))
        acc, acc2 = _tile_part(x_ptr, w_ptr, w2_ptr, M, K, sxm, swn, sw2n, tile, ks, ke, N, GATED, EVEN_K, BM,
                               BN, BK, FP32_DOT)
        rn = tile * BN + tl.arange(0, BN)
        if (ks == 0) & (ke == KT):
            _epilogue(acc, acc2, b_ptr, r_ptr, y_ptr, rm, rn, M, N, srm, sym, GATED, HAS_BIAS, HAS_RES)
        else:
            part = ws_ptr + (pid * 2 + (u != start).to(tl.int64)) * TSZ
            tl.store(part + offs, acc)
            if GATED:
                tl.store(part + gate_half + offs, acc2)
            tl.debug_barrier()  # every thread's partial is written before the count moves (release)
            done = tl.atomic_add(cnt_ptr + tile, (ke - ks).to(tl.int32), sem="acq_rel") + (ke - ks)
            if done == KT:
                acc = tl.zeros((BM, BN), dtype=tl.float32)
                acc2 = tl.zeros((BM, BN), dtype=tl.float32)
                t0 = tile * KT
                p_lo = tl.maximum(t0 * P // TOTAL - 1, 0)
                p_hi = tl.minimum((t0 + KT) * P // TOTAL + 1, P - 1)
                for p in range(p_lo, p_hi + 1):
                    sp = p * TOTAL // P
                    ep = (p + 1) * TOTAL // P
                    if tl.maximum(sp, t0) < tl.minimum(ep, t0 + KT):  # p worked on this tile
                        pp = ws_ptr + (p * 2 + (sp < t0).to(tl.int64)) * TSZ
                        acc += tl.load(pp + offs, cache_modifier=".cg")
                        if GATED:
                            acc2 += tl.load(pp + gate_half + offs, cache_modifier=".cg")
                _epilogue(acc, acc2, b_ptr, r_ptr, y_ptr, rm, rn, M, N, srm, sym, GATED, HAS_BIAS, HAS_RES)
                tl.atomic_xchg(cnt_ptr + tile, 0)
        u += ke - ks


def counters(device: torch.device) -> torch.Tensor:
    """The device's tile counters (zeros between launches). Allocated on first use, which must not be
    inside a CUDA-graph capture (the engine's warm-up step runs first)."""
    c = _COUNTERS.get(device)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("r1kernels skinny GEMM: first call inside a CUDA-graph capture; run one step "
                               "eagerly first")
        c = _COUNTERS[device] = torch.zeros(N_COUNTERS, dtype=torch.int32, device=device)
    return c


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def config(M: int, N: int, K: int, gated: bool, device: torch.device) -> dict:
    """Tile width and depth, programs, warps and stages for M <= MAX_M rows (one row tile)."""
    if INTERPRET:
        return dict(BN=16, BK=32, PROGRAMS=3, num_warps=1, num_stages=1)
    return dict(BN=64, BK=128, PROGRAMS=_sms(device), num_warps=4, num_stages=3 if gated else 4)


def _launch(x2, w, w2, bias, res2, y2, cfg):
    M, K = x2.shape
    N = w.shape[0]
    if M > MAX_M:
        raise ValueError(f"skinny GEMM: {M} rows > MAX_M = {MAX_M}")
    cfg = dict(cfg or config(M, N, K, w2 is not None, x2.device))
    BN, BK, programs = cfg.pop("BN"), cfg.pop("BK"), cfg.pop("PROGRAMS")
    BM = max(16, triton.next_power_of_2(M))
    tiles, KT = triton.cdiv(N, BN), triton.cdiv(K, BK)
    if tiles > N_COUNTERS:
        raise ValueError(f"skinny GEMM: {tiles} column tiles exceed the {N_COUNTERS} counters")
    programs = max(1, min(programs, tiles * KT))
    cnt = counters(x2.device)
    ws = torch.empty(programs * 2 * BM * BN * (2 if w2 is not None else 1), dtype=torch.float32, device=x2.device)
    _skinny_kernel[(programs,)](
        x2, w, w if w2 is None else w2, w if bias is None else bias, y2 if res2 is None else res2, y2, ws, cnt,
        M, N, K, x2.stride(0), w.stride(0), w.stride(0) if w2 is None else w2.stride(0),
        y2.stride(0) if res2 is None else res2.stride(0), y2.stride(0), KT, tiles * KT,
        GATED=w2 is not None, HAS_BIAS=bias is not None, HAS_RES=res2 is not None, EVEN_K=K % BK == 0,
        BM=BM, BN=BN, BK=BK, FP32_DOT=INTERPRET, **cfg)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _new_out(x, w, w2, bias, cfg):
    x2 = _rows(x)
    y = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype, device=x.device)
    if y.numel():
        _launch(x2, w, w2, bias, None, y.view(-1, w.shape[0]), cfg)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, cfg: dict | None = None):
    """F.linear(x, weight, bias) for x [..., K] with at most MAX_M rows -> [..., N] in x's dtype."""
    return _new_out(x, weight, None, bias, cfg)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, cfg: dict | None = None):
    """silu(x W_g^T) * (x W_u^T) -> [..., N] in x's dtype."""
    return _new_out(x, w_gate, w_up, None, cfg)


def linear_residual_(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, cfg: dict | None = None):
    """residual += x W^T in place (residual contiguous [..., N]); returns residual."""
    x2 = _rows(x)
    r2 = residual.view(-1, residual.shape[-1])
    if r2.numel():
        _launch(x2, weight, None, None, r2, r2, cfg)
    return residual
