"""Triton kernels: token log-probs (+ entropy) and their backward, one program per row of the logits.

Rows are addressed as [B, T] with strides (stride_b, stride_t) so sliced logits (logits[:, :-1]) need
no copy; the vocab dimension must be contiguous. fp32 math, online log-sum-exp over blocks of V.
SOFTCAP (the fused head of Gemma 2's final_logit_softcapping): every logit x read is taken as
cap * tanh(x / cap) before the temperature, and the gradients written are w.r.t. x (times 1 - tanh^2).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import INTERPRET

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# Launch configs (vocab block, warps) on the GPU, from benchmarks/bench_logprob.tune on one H200 (b7681f2,
# N=8192 V=151936 bf16, kernel alone): forward 8192/4 0.550 ms (8192/8 0.571; one read of the logits 0.587 at
# the copy rate); backward 32768/32 1.255 ms (8192/8 1.310; torch's copy of the same bytes 1.170): the
# backward reads a block, then writes it, so the bytes in flight per program set its rate.
LP_BLOCK = 8192
FWD_WARPS = 4
BWD_BLOCK = 32768


def block_v(V: int, block: int = LP_BLOCK) -> int:
    """Vocab block: large on the GPU (16 KB+ of loads in flight per program), small under the interpreter."""
    return min(triton.next_power_of_2(V), 64 if INTERPRET else block)


def num_warps(BLOCK: int) -> int:
    if INTERPRET:
        return 1
    return max(4, min(32, BLOCK // 1024))  # one warp per 1024 columns of the block


@triton.jit
def _softcap(x, cap, SOFTCAP: tl.constexpr):
    """cap * tanh(x / cap) when SOFTCAP (else x), tanh from one exp2: 1 - 2 / (e^(2u) + 1) (libdevice's tanh
    does not run under the interpreter); x = -inf gives -cap."""
    if SOFTCAP:
        e = tl.exp2(x * (2.8853900817779268 / cap))  # 2 * log2(e) / cap
        x = cap - (2.0 * cap) / (e + 1.0)
    return x


@triton.jit
def _softcap_grad(d, xc, cap, SOFTCAP: tl.constexpr):
    """d (a gradient w.r.t. the capped logit xc) times d xc / d x = 1 - (xc / cap)^2 when SOFTCAP."""
    if SOFTCAP:
        u = xc / cap
        d = d * (1.0 - u * u)
    return d


@triton.jit
def _lse_block(x_row, cols, c1, m, acc, t, scale, cap, MASKED: tl.constexpr, EVICT: tl.constexpr,
               ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr):
    """One block of the online log-sum-exp: max m in raw logit units, sum acc of 2^(x*scale - m*scale),
    t the same weighted by x*scale (entropy). Full blocks carry no bounds mask (fewer instructions)."""
    if MASKED:
        x = tl.load(x_row + cols, mask=cols < c1, other=float("-inf"), eviction_policy=EVICT).to(tl.float32)
        if SOFTCAP:  # the padding stays -inf (capped it would be -cap)
            x = tl.where(cols < c1, _softcap(x, cap, SOFTCAP), float("-inf"))
    else:
        x = _softcap(tl.load(x_row + cols, eviction_policy=EVICT).to(tl.float32), cap, SOFTCAP)
    m_new = tl.maximum(m, tl.max(x, 0))
    ms = tl.where(m_new == float("-inf"), 0.0, m_new) * scale
    alpha = tl.exp2(m * scale - ms)
    e = tl.exp2(x * scale - ms)
    acc = acc * alpha + tl.sum(e, 0)
    if ENTROPY:  # columns with e = 0 (-inf logits, the padding) add 0 to t: 0 log 0 = 0, not 0 * -inf = NaN
        x = tl.where(e > 0.0, x, 0.0)
        t = t * alpha + tl.sum(e * (x * scale), 0)
    return m_new, acc, t


@triton.jit
def _range_lse(x_row, c0, c1, scale, cap, BLOCK: tl.constexpr, ENTROPY: tl.constexpr, EVICT: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """Online log-sum-exp over columns [c0, c1): (m raw max, acc, t); see _lse_block."""
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    acc = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    nfull = (c1 - c0) // BLOCK
    for i in range(0, nfull):
        m, acc, t = _lse_block(x_row, c0 + i * BLOCK + offs, c1, m, acc, t, scale, cap, False, EVICT, ENTROPY,
                               SOFTCAP)
    if c0 + nfull * BLOCK < c1:
        m, acc, t = _lse_block(x_row, c0 + nfull * BLOCK + offs, c1, m, acc, t, scale, cap, True, EVICT, ENTROPY,
                               SOFTCAP)
    return m, acc, t


@triton.jit
def _row_lse(x_row, V, inv_t, cap, BLOCK: tl.constexpr, ENTROPY: tl.constexpr, EVICT: tl.constexpr,
             SOFTCAP: tl.constexpr):
    """(lse, E[z]) of z = x * inv_t over one row (base-2 internally)."""
    scale = inv_t * 1.4426950408889634
    m, s, t = _range_lse(x_row, 0, V, scale, cap, BLOCK, ENTROPY, EVICT, SOFTCAP)
    ms = tl.where(m == float("-inf"), 0.0, m) * scale
    lse = (ms + tl.log2(s)) * 0.6931471805599453
    ez = t / s * 0.6931471805599453
    return lse, ez


@triton.jit
def _grad_block(x_row, dx_row, cols, c1, scale, lse2, neg_c, inv_t, k_ent, neg_gh, cap, MASKED: tl.constexpr,
                ENTROPY: tl.constexpr, STORE_CM: tl.constexpr, SOFTCAP: tl.constexpr):
    """dx = p * (neg_c [+ neg_gh * (x * inv_t - k_ent)]) over one block; the label's +c is added after
    the loop (no per-element compare)."""
    if MASKED:
        x = tl.load(x_row + cols, mask=cols < c1, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        x = tl.load(x_row + cols, eviction_policy="evict_first").to(tl.float32)
    x = _softcap(x, cap, SOFTCAP)
    p = tl.exp2(x * scale - lse2)
    if ENTROPY:  # p = 0 (a -inf logit): d = 0, not 0 * -inf = NaN
        d = tl.where(p > 0.0, p * (neg_c + neg_gh * (x * inv_t - k_ent)), 0.0)
    else:
        d = p * neg_c
    d = _softcap_grad(d, x, cap, SOFTCAP)
    if MASKED:
        tl.store(dx_row + cols, d.to(dx_row.dtype.element_ty), mask=cols < c1, cache_modifier=STORE_CM)
    else:
        tl.store(dx_row + cols, d.to(dx_row.dtype.element_ty), cache_modifier=STORE_CM)


@triton.jit
def _range_grad(x_row, dx_row, c0, c1, y, xy, scale, lse2, c, inv_t, k_ent, neg_gh, cap, BLOCK: tl.constexpr,
                REVERSE: tl.constexpr, ENTROPY: tl.constexpr, STORE_CM: tl.constexpr, SOFTCAP: tl.constexpr):
    """Writes dx = c (onehot(y) - p) [- g_H terms] over columns [c0, c1); xy = the label's logit (capped when
    SOFTCAP), read before (the logits may be overwritten in place: each block is read before it is written)."""
    offs = tl.arange(0, BLOCK)
    nfull = (c1 - c0) // BLOCK
    has_tail = c0 + nfull * BLOCK < c1
    if REVERSE:  # the most recently read (most likely cached) blocks first
        if has_tail:
            _grad_block(x_row, dx_row, c0 + nfull * BLOCK + offs, c1, scale, lse2, -c, inv_t, k_ent, neg_gh, cap, True,
                        ENTROPY, STORE_CM, SOFTCAP)
        for i in range(0, nfull):
            _grad_block(x_row, dx_row, c0 + (nfull - 1 - i) * BLOCK + offs, c1, scale, lse2, -c, inv_t, k_ent, neg_gh,
                        cap, False, ENTROPY, STORE_CM, SOFTCAP)
    else:
        for i in range(0, nfull):
            _grad_block(x_row, dx_row, c0 + i * BLOCK + offs, c1, scale, lse2, -c, inv_t, k_ent, neg_gh, cap, False,
                        ENTROPY, STORE_CM, SOFTCAP)
        if has_tail:
            _grad_block(x_row, dx_row, c0 + nfull * BLOCK + offs, c1, scale, lse2, -c, inv_t, k_ent, neg_gh, cap, True,
                        ENTROPY, STORE_CM, SOFTCAP)
    if (y >= c0) & (y < c1):
        tl.debug_barrier()  # the block store of column y (any thread) before this fix-up
        py = tl.exp2(xy * scale - lse2)
        if ENTROPY:  # py = 0 (the label on a -inf logit): dy = c, not 0 * -inf = NaN
            dy = tl.where(py > 0.0, py * (neg_gh * (xy * inv_t - k_ent) - c), 0.0) + c
        else:
            dy = c - c * py
        dy = _softcap_grad(dy, xy, cap, SOFTCAP)
        tl.store(dx_row + y, dy.to(dx_row.dtype.element_ty))


@triton.jit
def _logprob_fwd_kernel(x_ptr, lab_ptr, logp_ptr, lse_ptr, ent_ptr, mask_ptr, T, V, stride_b, stride_t, inv_t, cap,
                        BLOCK: tl.constexpr, ENTROPY: tl.constexpr, SKIP_MASKED: tl.constexpr,
                        SOFTCAP: tl.constexpr):
    """Rows whose mask is 0 (SKIP_MASKED) read nothing and get logp = lse = 0."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    x_row = x_ptr + b * stride_b + (row - b * T) * stride_t
    m = 1.0
    if SKIP_MASKED:
        m = tl.load(mask_ptr + row)
    if m == 0.0:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
    else:
        lse, ez = _row_lse(x_row, V, inv_t, cap, BLOCK, ENTROPY, "evict_first", SOFTCAP)
        y = tl.load(lab_ptr + row).to(tl.int64)
        zy = _softcap(tl.load(x_row + y).to(tl.float32), cap, SOFTCAP) * inv_t
        tl.store(logp_ptr + row, zy - lse)
        tl.store(lse_ptr + row, lse)
        if ENTROPY:
            tl.store(ent_ptr + row, lse - ez)


@triton.jit
def _logprob_bwd_kernel(x_ptr, lab_ptr, lse_ptr, ent_ptr, g_ptr, gent_ptr, dx_ptr, T, V, stride_b, stride_t,
                        dx_sb, dx_st, inv_t, cap, BLOCK: tl.constexpr, ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr):
    """dx = inv_t * (g * (onehot - p) - g_H * p * (z - lse + H)); rows with g == 0 (and g_H == 0) only
    write zeros (no read of the logits)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    x_row = x_ptr + b * stride_b + (row - b * T) * stride_t
    dx_row = dx_ptr + b * dx_sb + (row - b * T) * dx_st
    g = tl.load(g_ptr + row)
    y = tl.load(lab_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    gh = 0.0
    h = 0.0
    if ENTROPY:
        gh = tl.load(gent_ptr + row)
        h = tl.load(ent_ptr + row)
    offs = tl.arange(0, BLOCK)
    if (g == 0.0) & (gh == 0.0):
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            tl.store(dx_row + cols, tl.zeros((BLOCK,), tl.float32).to(dx_ptr.dtype.element_ty), mask=cols < V)
    else:
        xy = _softcap(tl.load(x_row + y).to(tl.float32), cap, SOFTCAP)
        _range_grad(x_row, dx_row, 0, V, y, xy, inv_t * 1.4426950408889634, lse * 1.4426950408889634, g * inv_t,
                    inv_t, lse - h, -gh * inv_t, cap, BLOCK, False, ENTROPY, "", SOFTCAP)


def _rows(logits):
    """(x, B, T, stride_b, stride_t) viewing logits [..., V] as [B, T, V] rows without copying if possible."""
    V = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 3:
        return logits, logits.shape[0], logits.shape[1], logits.stride(0), logits.stride(1)
    if logits.dim() == 2:
        return logits, 1, logits.shape[0], 0, logits.stride(0)
    try:
        x = logits.view(-1, V)
    except RuntimeError:
        x = logits.reshape(-1, V)
    if x.dim() == 2 and x.shape[0] > 0 and x.stride(0) < V:
        x = x.contiguous()
    return x, 1, x.shape[0], 0, x.stride(0) if x.shape[0] else V


def logprob_fwd(logits, labels, temperature: float, entropy: bool, mask=None, block: int = LP_BLOCK,
                warps: int | None = FWD_WARPS, softcap: float | None = None):
    """-> (logp [N], lse [N], entropy [N] or empty) fp32, N = numel(labels); rows where the fp32 `mask`
    is 0 are skipped (logp = lse = 0). block / warps: launch configuration (tuning sweeps only). softcap:
    the logits are softcap * tanh(logits / softcap) (before the temperature)."""
    x, B, T, sb, st = _rows(logits)
    V = logits.shape[-1]
    N = B * T
    dev = logits.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    ent = torch.empty(N if entropy else 0, device=dev, dtype=torch.float32)
    if N:
        BLOCK = block_v(V, block)
        _logprob_fwd_kernel[(N,)](x, labels.reshape(-1).contiguous(), logp, lse, ent if entropy else lse,
                                  mask if mask is not None else lse, T, V, sb, st, 1.0 / temperature,
                                  float(softcap or 1.0), BLOCK=BLOCK, ENTROPY=entropy, SKIP_MASKED=mask is not None,
                                  SOFTCAP=softcap is not None,
                                  num_warps=1 if INTERPRET else warps or num_warps(BLOCK))
    return logp, lse, ent


def logprob_bwd(logits, labels, lse, ent, grad_logp, grad_ent, temperature: float, out=None, out_strides=None,
                block: int = BWD_BLOCK, warps: int | None = None, softcap: float | None = None):
    """-> d logits [*logits.shape] in logits.dtype; written into `out` (row strides out_strides = (per b,
    per t) over the [B, T] rows of logits) when given: out may be the logits themselves (in place). softcap:
    logprob_fwd's (the gradient is w.r.t. the logits before the cap)."""
    x, B, T, sb, st = _rows(logits)
    V = logits.shape[-1]
    N = B * T
    dx = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype) if out is None else out
    dsb, dst = out_strides if out is not None else (T * V, V)
    entropy = grad_ent is not None
    if N:
        BLOCK = block_v(V, block)
        _logprob_bwd_kernel[(N,)](x, labels.reshape(-1).contiguous(), lse, ent if entropy else lse,
                                  grad_logp.reshape(-1).float().contiguous(),
                                  grad_ent.reshape(-1).float().contiguous() if entropy else lse, dx, T, V, sb, st,
                                  dsb, dst, 1.0 / temperature, float(softcap or 1.0), BLOCK=BLOCK, ENTROPY=entropy,
                                  SOFTCAP=softcap is not None, num_warps=warps or num_warps(BLOCK))
    return dx
