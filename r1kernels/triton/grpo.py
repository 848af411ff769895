"""Triton kernel: the token-level GRPO loss family from logits in one launch, one program per token.

Per token (b, t) with mask m != 0: pass 1 reads the logits row (online log-sum-exp, cache-resident
eviction hint), computes l, the per-token loss, its metrics and the gradient coefficient c = dLoss/dl;
pass 2 re-reads the same row (from L2 when it is still there) and writes dLogits = c/T (onehot - p).
Masked tokens (m == 0) read nothing and write a zero gradient row. Sequence-level importance sampling
does not use this kernel (see r1kernels/ops/grpo.py: a log-prob pass, then a gradient pass).

Codes: loss grpo 0, bnpo 1, dr_grpo 2, dapo 3, cispo 4, sapo 5; KL k1 0, k2 1, k3 2, low_var_kl 3.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .logprob import INTERPRET, _range_grad, _range_lse, block_v, num_warps

LOSS_CODES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3, "cispo": 4, "sapo": 5}
KL_CODES = {"k1": 0, "k2": 1, "k3": 2, "low_var_kl": 3}


def grpo_block_v(V: int) -> int:
    return block_v(V, "R1K_GRPO_BLOCK", 16384)


def grpo_num_warps(BLOCK: int) -> int:
    return num_warps(BLOCK, "R1K_GRPO_WARPS")


def grpo_flags() -> dict:
    """Pass-2 order (REVERSE: last block first, the most recently cached lines first), the store cache
    modifier of the gradient (".cs": streaming, keeps the logits in L2), and PREFETCH (software
    double-buffering; not yet measured on a GPU, off by default); env R1K_GRPO_REVERSE / _STORE / _PREFETCH."""
    prefetch = os.environ.get("R1K_GRPO_PREFETCH", "0") == "1"  # next block's load before the reductions
    if INTERPRET:
        return dict(REVERSE=True, STORE_CM="", PREFETCH=prefetch)
    return dict(REVERSE=os.environ.get("R1K_GRPO_REVERSE", "1") == "1",
                STORE_CM=os.environ.get("R1K_GRPO_STORE", ".cs"), PREFETCH=prefetch)


@triton.jit
def kl_and_grad(l, lref, KL: tl.constexpr):
    """(KL estimate, d KL / d l) from l and l_ref."""
    d = lref - l
    if KL == 0:
        kl = l - lref
        dkl = tl.full((), 1.0, tl.float32) + 0.0 * d
    elif KL == 1:
        kl = 0.5 * d * d
        dkl = -d
    elif KL == 2:
        e = tl.exp(d)
        kl = e - d - 1.0
        dkl = 1.0 - e
    else:
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
        e = tl.exp(dc)
        v = e - dc - 1.0
        kl = tl.minimum(tl.maximum(v, -10.0), 10.0)
        inside = (d >= -20.0) & (d <= 20.0) & (v >= -10.0) & (v <= 10.0)
        dkl = tl.where(inside, 1.0 - e, 0.0)
    return kl, dkl


@triton.jit
def surrogate_and_grad(r, A, eps_low, eps_high, delta, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr):
    """(L, dL/dr) of the clipped / sapo surrogates at ratio r (cispo: (min(r, eps_high), 0), see caller)."""
    if LOSS == 4:
        w = tl.minimum(r, eps_high)
        return w, 0.0 * r
    elif LOSS == 5:
        tau = tl.where(A > 0, 1.0, 1.05)
        sg = 1.0 / (1.0 + tl.exp(-tau * (r - 1.0)))
        return -A * sg * 4.0 / tau, -4.0 * A * sg * (1.0 - sg)
    else:
        if HAS_DELTA:
            a = tl.minimum(r, delta) * A
            ga = tl.where(r <= delta, A, 0.0)
        else:
            a = r * A
            ga = A
        rc = tl.minimum(tl.maximum(r, 1.0 - eps_low), 1.0 + eps_high)
        bb = rc * A
        gb = tl.where((r >= 1.0 - eps_low) & (r <= 1.0 + eps_high), A, 0.0)
        g = tl.where(a < bb, ga, tl.where(a > bb, gb, 0.5 * (ga + gb)))
        return -tl.minimum(a, bb), -g


@triton.jit
def _token_terms(l, A, old, lref, eps_low, eps_high, delta, beta, LOSS: tl.constexpr, KL: tl.constexpr,
                 HAS_REF: tl.constexpr, USE_KL: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Per-token (L, dL/dl, kl, low, high) at log-prob l (ratio r = exp(l - old))."""
    r = tl.exp(l - old)
    L, dLdr = surrogate_and_grad(r, A, eps_low, eps_high, delta, LOSS, HAS_DELTA)
    if LOSS == 4:  # cispo: -sg(min(r, eps_high)) * A * l
        dL = -L * A
        L = -L * A * l
    else:
        dL = dLdr * r
    kl = 0.0 * l
    if HAS_REF:
        kl, dkl = kl_and_grad(l, lref, KL)
        if USE_KL:
            L += beta * kl
            dL += beta * dkl
    low = ((r < 1.0 - eps_low) & (A < 0)).to(tl.float32)
    high = ((r > 1.0 + eps_high) & (A > 0)).to(tl.float32)
    return L, dL, kl, low, high


@triton.jit
def _grpo_token_kernel(x_ptr, ids_ptr, adv_ptr, mask_ptr, old_ptr, ref_ptr, scale_ptr, logp_ptr, stats_ptr,
                       dx_ptr, part_ptr, flag_ptr, N, T, V, stride_b, stride_t, dx_sb, dx_st, adv_sb, adv_st, inv_t,
                       eps_low, eps_high, delta, beta, SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
                       REVERSE: tl.constexpr, STORE_CM: tl.constexpr, BLOCK: tl.constexpr, LOSS: tl.constexpr,
                       KL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                       USE_KL: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Rows round-robin over the grid. SPLIT=2 (GPU only, every program resident): programs 2q and 2q+1
    share a row, each reading half of the vocab (half the L2 working set), and exchange their partial
    log-sum-exp through global memory (flags tagged with row + 1; partials double-buffered)."""
    pid = tl.program_id(0)
    h = pid % SPLIT
    q = pid // SPLIT
    nq = tl.num_programs(0) // SPLIT
    half = tl.cdiv(tl.cdiv(V, SPLIT), 64) * 64  # balanced halves (each with its own partial last block)
    c0 = h * half
    c1 = tl.minimum(V, c0 + half)
    offs = tl.arange(0, BLOCK)
    scale = inv_t * 1.4426950408889634
    it = 0
    for row in range(q.to(tl.int64), N, nq):
        b = row // T
        t = row - b * T
        x_row = x_ptr + b * stride_b + t * stride_t
        dx_row = dx_ptr + b * dx_sb + t * dx_st
        m = 1.0
        if HAS_MASK:
            m = tl.load(mask_ptr + row)
        if m == 0.0:
            for v0 in range(c0, c1, BLOCK):
                cols = v0 + offs
                tl.store(dx_row + cols, tl.zeros((BLOCK,), tl.float32).to(dx_ptr.dtype.element_ty), mask=cols < c1)
            if h == 0:
                tl.store(logp_ptr + row, 0.0)
                for k in range(5):
                    tl.store(stats_ptr + k * N + row, 0.0)
        else:
            mx, sm, _t = _range_lse(x_row, c0, c1, scale, BLOCK, False, "evict_last", PREFETCH)
            mx = tl.where(mx == float("-inf"), mx, mx * scale)  # base-2 units
            if SPLIT == 2:
                slot = (q * 2 + it % 2) * 2
                tl.store(part_ptr + (slot + h) * 2, mx)
                tl.store(part_ptr + (slot + h) * 2 + 1, sm)
                tl.debug_barrier()  # every thread's stores before the (cumulative) release of the flag
                tl.atomic_xchg(flag_ptr + pid, (row + 1).to(tl.int32), sem="release")
                other = pid + 1 - 2 * h
                seen = tl.atomic_add(flag_ptr + other, 0, sem="acquire")
                spins = 0
                while (seen < (row + 1).to(tl.int32)) & (spins < 100_000_000):  # bounded: never hang the GPU
                    seen = tl.atomic_add(flag_ptr + other, 0, sem="acquire")
                    spins += 1
                tl.debug_barrier()
                mo = tl.atomic_add(part_ptr + (slot + 1 - h) * 2, 0.0, sem="relaxed")
                so = tl.atomic_add(part_ptr + (slot + 1 - h) * 2 + 1, 0.0, sem="relaxed")
                mm = tl.maximum(mx, mo)
                mm = tl.where(mm == float("-inf"), 0.0, mm)
                sm = sm * tl.exp2(mx - mm) + so * tl.exp2(mo - mm)
                mx = mm
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            lse2 = mx + tl.log2(sm)
            y = tl.load(ids_ptr + row).to(tl.int64)
            xy = tl.load(x_row + y).to(tl.float32)
            l = (xy * scale - lse2) * 0.6931471805599453
            A = tl.load(adv_ptr + b * adv_sb + t * adv_st)
            old = l
            if HAS_OLD:
                old = tl.load(old_ptr + row)
            lref = l
            if HAS_REF:
                lref = tl.load(ref_ptr + row)
            L, dL, kl, low, high = _token_terms(l, A, old, lref, eps_low, eps_high, delta, beta, LOSS, KL, HAS_REF,
                                                USE_KL, HAS_DELTA)
            sb = tl.load(scale_ptr + b) * m
            if h == 0:
                tl.store(logp_ptr + row, l)
                tl.store(stats_ptr + row, sb * L)
                tl.store(stats_ptr + N + row, m * kl)
                tl.store(stats_ptr + 2 * N + row, m * low)
                tl.store(stats_ptr + 3 * N + row, m * high)
                tl.store(stats_ptr + 4 * N + row, m * tl.maximum(low, high))
            ct = sb * dL * inv_t
            _range_grad(x_row, dx_row, c0, c1, y, xy, scale, lse2, ct, inv_t, 0.0, 0.0, BLOCK, REVERSE, False,
                        STORE_CM, PREFETCH)
        it += 1


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """x *= g (a device scalar), skipped entirely when g == 1 (the usual loss.backward())."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        offs = tl.arange(0, BLOCK)
        for s0 in range(pid * BLOCK, n, step):
            idx = s0 + offs
            x = tl.load(x_ptr + idx, mask=idx < n)
            tl.store(x_ptr + idx, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=idx < n)


def grpo_token(x, ids, adv, mask, old, ref, scale_B, logp, stats, dx, dx_strides, *, temperature, eps_low, eps_high,
               delta, beta, loss_code, kl_code):
    """Launch the token-level kernel; x is [B, T, V] with a contiguous last dim; dx has strides dx_strides."""
    B, T, V = x.shape
    N = B * T
    if N == 0:
        return
    BLOCK = grpo_block_v(V)
    adv_sb, adv_st = (T, 1) if adv.dim() == 2 else (1, 0)
    dummy = scale_B
    split = 1 if INTERPRET else int(os.environ.get("R1K_GRPO_SPLIT", 1))
    grid = int(os.environ.get("R1K_GRPO_GRID", 0)) if not INTERPRET else 0
    if split == 2:  # every program must be resident at once (they wait on each other): one per SM, pairs
        n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count
        # R1K_GRPO_GRID may ask for up to 2 per SM (tuning only: needs 2 resident programs per SM)
        grid = 2 * max(1, min(grid or n_sm, 2 * n_sm) // 2)
    grid = min(N * split, grid) if grid > 0 else N
    part = torch.empty(max(grid, 2) * 4, device=x.device, dtype=torch.float32) if split == 2 else dummy
    flags = torch.zeros(max(grid, 2), device=x.device, dtype=torch.int32) if split == 2 else dummy
    _grpo_token_kernel[(grid,)](
        x, ids, adv, mask if mask is not None else dummy, old if old is not None else dummy,
        ref if ref is not None else dummy, scale_B, logp, stats, dx, part, flags, N, T, V, x.stride(0), x.stride(1),
        dx_strides[0], dx_strides[1], adv_sb, adv_st, 1.0 / temperature, eps_low, eps_high,
        delta if delta is not None else 0.0, beta, SPLIT=split, **grpo_flags(), BLOCK=BLOCK, LOSS=loss_code,
        KL=kl_code, HAS_MASK=mask is not None, HAS_OLD=old is not None, HAS_REF=ref is not None,
        USE_KL=(ref is not None and beta != 0.0), HAS_DELTA=delta is not None, num_warps=grpo_num_warps(BLOCK))


def scale_(x, g):
    n = x.numel()
    if n == 0:
        return
    BLOCK = 64 if INTERPRET else 4096
    grid = (max(1, min(triton.cdiv(n, BLOCK), 1 if INTERPRET else 132 * 8)),)
    _scale_kernel[grid](x, g, n, BLOCK=BLOCK, num_warps=1 if INTERPRET else 8)
