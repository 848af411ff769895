"""Triton GEMMs for few rows (a decode step: M <= MAX_M rows against a [N, K] weight), read-bound on the
weight: y [M, N] = x [M, K] @ W^T, with three epilogues (r1kernels.reference.fused is the spec):
- linear: + bias;
- swiglu: two weights (gate, up) read in the same program, silu(x W_g^T) * (x W_u^T), the two products
  rounded to x's dtype first (as the unfused projections are), one output instead of two plus an
  activation kernel;
- linear_residual_: residual += x W^T in place, one rounding (as torch.addmm_).

Grid (N tiles, K splits, M tiles). With SPLIT > 1 each program writes its fp32 partial tile to a
workspace and bumps the tile's counter; the program that sees the count reach SPLIT - 1 sums the SPLIT
partials in split order (so the result does not depend on which program finishes last: bitwise
deterministic), runs the epilogue and puts the counter back to 0. The counters are one int32 buffer per
device, allocated (zeroed) before any CUDA-graph capture and always left at 0 by each launch.
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
def _skinny_kernel(x_ptr, w_ptr, w2_ptr, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, sxm, swn, sw2n, srm,
                   sym, K_SPLIT, SPLIT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_RES: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, FP32_DOT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k0 = pid_s * K_SPLIT
    mm = (rm < M)[:, None]
    # rows past M / columns past N are clamped (their results are never stored): unmasked weight loads
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    xp = x_ptr + rm.to(tl.int64)[:, None] * sxm + (k0 + rk)[None, :]
    wp = w_ptr + rn_c[None, :] * swn + (k0 + rk)[:, None]  # [BK, BN] tile of W^T
    wp2 = w2_ptr + rn_c[None, :] * sw2n + (k0 + rk)[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K_SPLIT, BK):
        if EVEN_K:
            xt = tl.load(xp, mask=mm, other=0.0)
            wt = tl.load(wp)
        else:
            km = (k0 + k + rk) < K
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
    if SPLIT == 1:
        _epilogue(acc, acc2, b_ptr, r_ptr, y_ptr, rm, rn, M, N, srm, sym, GATED, HAS_BIAS, HAS_RES)
    else:
        tiles = tl.num_programs(0) * tl.num_programs(2)
        tile = pid_m * tl.num_programs(0) + pid_n
        offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        tsz = BM * BN
        part = ws_ptr + (pid_s * tiles + tile).to(tl.int64) * tsz
        tl.store(part + offs, acc)
        if GATED:
            tl.store(part + SPLIT * tiles * tsz + offs, acc2)
        tl.debug_barrier()  # every thread's partial is written before the counter moves (release)
        count = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if count == SPLIT - 1:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            acc2 = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(SPLIT):  # fixed order: deterministic
                p = ws_ptr + (s * tiles + tile).to(tl.int64) * tsz
                acc += tl.load(p + offs, cache_modifier=".cg")
                if GATED:
                    acc2 += tl.load(p + SPLIT * tiles * tsz + offs, cache_modifier=".cg")
            _epilogue(acc, acc2, b_ptr, r_ptr, y_ptr, rm, rn, M, N, srm, sym, GATED, HAS_BIAS, HAS_RES)
            tl.atomic_xchg(cnt_ptr + tile, 0)


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
    """Tile shape, K splits, warps and stages for M rows. Aim: about two programs per SM streaming the
    weight, with at least four BK steps per split."""
    if INTERPRET:
        return dict(BM=16, BN=16, BK=32, SPLIT=2 if K > 64 else 1, num_warps=1, num_stages=1)
    BM = max(16, triton.next_power_of_2(M))
    BK = 128
    BN = 64 if triton.cdiv(N, 64) >= _sms(device) else 32
    n_tiles = triton.cdiv(N, BN) * triton.cdiv(M, BM)
    split = max(1, min(triton.cdiv(2 * _sms(device), n_tiles), K // (4 * BK)))
    return dict(BM=BM, BN=BN, BK=BK, SPLIT=split, num_warps=4, num_stages=3 if gated else 4)


def _launch(x2, w, w2, bias, res2, y2, cfg):
    M, K = x2.shape
    N = w.shape[0]
    cfg = dict(cfg or config(M, N, K, w2 is not None, x2.device))
    BM, BN, BK, split = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK"), cfg.pop("SPLIT")
    k_split = triton.cdiv(triton.cdiv(K, split), BK) * BK
    split = triton.cdiv(K, k_split)
    grid = (triton.cdiv(N, BN), split, triton.cdiv(M, BM))
    cnt = counters(x2.device)
    if split > 1 and grid[0] * grid[2] > N_COUNTERS:
        raise ValueError(f"skinny GEMM: {grid[0] * grid[2]} tiles exceed the {N_COUNTERS} counters")
    ws = (torch.empty(split * grid[0] * grid[2] * BM * BN * (2 if w2 is not None else 1), dtype=torch.float32,
                      device=x2.device) if split > 1 else cnt)
    _skinny_kernel[grid](
        x2, w, w if w2 is None else w2, w if bias is None else bias, y2 if res2 is None else res2, y2, ws, cnt,
        M, N, K, x2.stride(0), w.stride(0), w.stride(0) if w2 is None else w2.stride(0),
        y2.stride(0) if res2 is None else res2.stride(0), y2.stride(0), k_split,
        SPLIT=split, GATED=w2 is not None, HAS_BIAS=bias is not None, HAS_RES=res2 is not None,
        EVEN_K=K % k_split == 0, BM=BM, BN=BN, BK=BK, FP32_DOT=INTERPRET, **cfg)


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
