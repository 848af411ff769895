"""Triton kernel: the token-level GRPO loss family from logits in one launch, one program per token.

Per token (b, t) with mask m != 0: pass 1 reads the logits row (online log-sum-exp, cache-resident
eviction hint), computes l, the per-token loss, its metrics and the gradient coefficient c = dLoss/dl;
pass 2 re-reads the same row (from L2 when it is still there) and writes dLogits = c/T (onehot - p).
Masked tokens (m == 0) read nothing (not even their label) and write a zero gradient row. A NaN log-prob
(or old log-prob) gives a NaN loss and gradient for its token. Sequence-level importance sampling does not
use this kernel (r1kernels/ops/grpo.py: log-probs, then autograd through the reference).

Loss types and KL estimators enter as constexpr codes: their indices in reference/grpo.py's LOSS_TYPES
and KL_ESTIMATORS (the one table of the family and its constants).
"""
from __future__ import annotations

import math

import triton
import triton.language as tl

from ..reference.grpo import KL_CODE, LOSS_CODE, SAPO_TAU_NEG, SAPO_TAU_POS
from .device import sm_count
from .logprob import INTERPRET, _range_grad, _range_lse, _softcap, block_v, num_warps

CISPO = tl.constexpr(LOSS_CODE["cispo"])
SAPO = tl.constexpr(LOSS_CODE["sapo"])
K1 = tl.constexpr(KL_CODE["k1"])
K2 = tl.constexpr(KL_CODE["k2"])
K3 = tl.constexpr(KL_CODE["k3"])

# Launch configuration (H100 sweeps, benchmarks/NOTES-logprob-grpo.md): 16384-wide vocab blocks (warps
# from num_warps: 16); pass 2 in reverse block order (the most recently read, most likely cached, lines
# first); streaming (".cs") gradient stores, which keep the logits in L2. benchmarks/bench_grpo.py --tune
# passes other configurations through grpo_token(config=...).
CONFIG = dict(BLOCK=16384, REVERSE=True, STORE_CM=".cs", num_warps=None)


@triton.jit
def kl_and_grad(l, lref, KL: tl.constexpr):
    """(KL estimate, d KL / d l) from l and l_ref (low_var_kl: k3 clamped, zero gradient where clamped)."""
    d = lref - l
    if KL == K1:
        kl = l - lref
        dkl = tl.full((), 1.0, tl.float32) + 0.0 * d
    elif KL == K2:
        kl = 0.5 * d * d
        dkl = -d
    elif KL == K3:
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
        kl = tl.where(d != d, d, kl)  # NaN stays NaN (the clamps above return the non-NaN operand)
        dkl = tl.where(d != d, d, dkl)
    return kl, dkl


@triton.jit
def surrogate_and_grad(r, A, eps_low, eps_high, delta, tau_pos, tau_neg, LOSS: tl.constexpr,
                       HAS_DELTA: tl.constexpr):
    """(L, dL/dr) of the clipped / sapo surrogates at ratio r (cispo: (min(r, eps_high), 0), see caller)."""
    if LOSS == CISPO:
        w = tl.minimum(r, eps_high)
        return w, 0.0 * r
    elif LOSS == SAPO:
        tau = tl.where(A > 0, tau_pos, tau_neg)
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
def _token_terms(l, A, old, lref, samp, eps_low, eps_high, delta, beta, tau_pos, tau_neg, is_lo, is_hi,
                 LOSS: tl.constexpr, KL: tl.constexpr, HAS_REF: tl.constexpr, USE_KL: tl.constexpr,
                 HAS_DELTA: tl.constexpr, HAS_IS: tl.constexpr, IS_MASK: tl.constexpr, BIAS_KL: tl.constexpr):
    """Per-token (L, dL/dl, kl, low, high) at log-prob l (ratio r = exp(l - old)); L and dL/dl are NaN
    when r is (tl.minimum / tl.maximum return the non-NaN operand, so the clip would hide it).
    HAS_IS: the policy term times the rollout weight w = exp(old - samp) (NaN difference: w = 1) clipped
    to [is_lo, is_hi] or, IS_MASK, zero outside it. BIAS_KL: the KL term times r (d/dl: r (kl + dkl))."""
    r = tl.exp(l - old)
    L, dLdr = surrogate_and_grad(r, A, eps_low, eps_high, delta, tau_pos, tau_neg, LOSS, HAS_DELTA)
    if LOSS == CISPO:  # -sg(min(r, eps_high)) * A * l
        dL = -L * A
        L = -L * A * l
    else:
        dL = dLdr * r
    if HAS_IS:
        d = old - samp
        w = tl.exp(tl.where(d != d, 0.0, d))
        if IS_MASK:
            w = tl.where((w < is_lo) | (w > is_hi), 0.0, w)
        else:
            w = tl.minimum(tl.maximum(w, is_lo), is_hi)
        L = L * w
        dL = dL * w
    kl = 0.0 * l
    if HAS_REF:
        kl, dkl = kl_and_grad(l, lref, KL)
        if BIAS_KL:
            dkl = (dkl + kl) * r
            kl = kl * r
        if USE_KL:
            L += beta * kl
            dL += beta * dkl
    nan = r != r
    L = tl.where(nan, r, L)
    dL = tl.where(nan, r, dL)
    rm = r  # the clip metrics count on the ratio after the delta clamp (TRL), NaN kept
    if HAS_DELTA:
        if LOSS != CISPO and LOSS != SAPO:
            rm = tl.where(r > delta, delta, r)
    low = ((rm < 1.0 - eps_low) & (A < 0)).to(tl.float32)
    high = ((rm > 1.0 + eps_high) & (A > 0)).to(tl.float32)
    return L, dL, kl, low, high


@triton.jit
def _grpo_token_kernel(x_ptr, ids_ptr, adv_ptr, mask_ptr, old_ptr, ref_ptr, samp_ptr, scale_ptr, logp_ptr,
                       stats_ptr, dx_ptr, N, T, V, stride_b, stride_t, dx_sb, dx_st, adv_sb, adv_st, sc_sb, sc_st,
                       inv_t, eps_low, eps_high, delta, beta, tau_pos, tau_neg, is_lo, is_hi, cap,
                       REVERSE: tl.constexpr, STORE_CM: tl.constexpr, BLOCK: tl.constexpr, LOSS: tl.constexpr,
                       KL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
                       USE_KL: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_IS: tl.constexpr, IS_MASK: tl.constexpr,
                       BIAS_KL: tl.constexpr, ENTROPY: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DX: tl.constexpr):
    """One program per row (b, t) of the [B, T] tokens; the loss scale of row (b, t) is
    scale[b * sc_sb + t * sc_st] (per sequence: strides (1, 0); per row: (T, 1)). stats rows: loss, kl,
    clip low, high, region and (ENTROPY: from pass 1's sums, no extra read) the entropy, each times the mask.
    HAS_DX False (no gradient wanted): no pass 2, nothing written to dx (pass 1 and its outputs unchanged)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = x_ptr + b * stride_b + t * stride_t
    dx_row = dx_ptr + b * dx_sb + t * dx_st
    offs = tl.arange(0, BLOCK)
    scale = inv_t * 1.4426950408889634
    m = 1.0
    if HAS_MASK:
        m = tl.load(mask_ptr + row)
    if m == 0.0:
        if HAS_DX:
            for v0 in range(0, V, BLOCK):
                cols = v0 + offs
                tl.store(dx_row + cols, tl.zeros((BLOCK,), tl.float32).to(dx_ptr.dtype.element_ty), mask=cols < V)
        tl.store(logp_ptr + row, 0.0)
        for k in range(6):
            tl.store(stats_ptr + k * N + row, 0.0)
    else:
        mx, sm, tz = _range_lse(x_row, 0, V, scale, cap, BLOCK, ENTROPY, "evict_last", SOFTCAP)
        mx = tl.where(mx == float("-inf"), 0.0, mx * scale)  # base-2 units
        lse2 = mx + tl.log2(sm)
        ent = 0.0
        if ENTROPY:  # lse - E[z], both in base-2 units here
            ent = (lse2 - tz / sm) * 0.6931471805599453
        y = tl.load(ids_ptr + row).to(tl.int64)
        xy = _softcap(tl.load(x_row + y).to(tl.float32), cap, SOFTCAP)
        l = (xy * scale - lse2) * 0.6931471805599453
        A = tl.load(adv_ptr + b * adv_sb + t * adv_st)
        old = l
        if HAS_OLD:
            old = tl.load(old_ptr + row)
        lref = l
        if HAS_REF:
            lref = tl.load(ref_ptr + row)
        samp = old
        if HAS_IS:
            samp = tl.load(samp_ptr + row)
        L, dL, kl, low, high = _token_terms(l, A, old, lref, samp, eps_low, eps_high, delta, beta, tau_pos, tau_neg,
                                            is_lo, is_hi, LOSS, KL, HAS_REF, USE_KL, HAS_DELTA, HAS_IS, IS_MASK,
                                            BIAS_KL)
        sb = tl.load(scale_ptr + b * sc_sb + t * sc_st) * m
        tl.store(logp_ptr + row, l)
        tl.store(stats_ptr + row, sb * L)
        tl.store(stats_ptr + N + row, m * kl)
        tl.store(stats_ptr + 2 * N + row, m * low)
        tl.store(stats_ptr + 3 * N + row, m * high)
        tl.store(stats_ptr + 4 * N + row, m * tl.maximum(low, high))
        tl.store(stats_ptr + 5 * N + row, m * ent)
        if HAS_DX:
            ct = sb * dL * inv_t
            _range_grad(x_row, dx_row, 0, V, y, xy, scale, lse2, ct, inv_t, 0.0, 0.0, cap, BLOCK, REVERSE, False,
                        STORE_CM, SOFTCAP)


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


def grpo_token(x, ids, adv, mask, old, ref, samp, scale, logp, stats, dx, dx_strides, *, temperature, eps_low,
               eps_high, delta, beta, loss_type, kl_estimator, sapo_tau_pos=SAPO_TAU_POS, sapo_tau_neg=SAPO_TAU_NEG,
               is_mode=None, is_clip_min=None, is_clip_max=None, bias_kl=False, entropy=False, softcap=None,
               config=None):
    """Launch the token-level kernel; x is [B, T, V] with a contiguous last dim; dx has strides dx_strides (dx
    None: no gradient, the loss and metrics only);
    adv and scale are [B] (per sequence) or [B, T] (per row); samp (the sampling log-probs) with is_mode
    token_truncate / token_mask; stats is [6, B * T] (entropy: its last row); softcap: the logits are
    softcap * tanh(x / softcap) (logprob.logprob_fwd's). config overrides CONFIG (tuning sweeps only)."""
    B, T, V = x.shape
    N = B * T
    if N == 0:
        return
    cfg = {**CONFIG, **(config or {})}
    BLOCK = block_v(V, cfg["BLOCK"])
    dummy = scale
    adv_sb, adv_st = (T, 1) if adv.dim() == 2 else (1, 0)
    sc_sb, sc_st = (T, 1) if scale.dim() == 2 else (1, 0)
    has_is = samp is not None and is_mode is not None
    _grpo_token_kernel[(N,)](
        x, ids, adv, mask if mask is not None else dummy, old if old is not None else dummy,
        ref if ref is not None else dummy, samp if has_is else dummy, scale, logp, stats,
        dx if dx is not None else dummy, N, T, V, x.stride(0),
        x.stride(1), dx_strides[0], dx_strides[1], adv_sb, adv_st, sc_sb, sc_st, 1.0 / temperature, eps_low, eps_high,
        delta if delta is not None else 0.0, beta, sapo_tau_pos, sapo_tau_neg,
        is_clip_min if is_clip_min is not None else (-math.inf if is_mode == "token_mask" else 0.0),
        is_clip_max if is_clip_max is not None else math.inf, float(softcap or 1.0), REVERSE=cfg["REVERSE"],
        STORE_CM="" if INTERPRET else cfg["STORE_CM"], BLOCK=BLOCK, LOSS=LOSS_CODE[loss_type],
        KL=KL_CODE[kl_estimator], HAS_MASK=mask is not None, HAS_OLD=old is not None, HAS_REF=ref is not None,
        USE_KL=(ref is not None and beta != 0.0), HAS_DELTA=delta is not None, HAS_IS=has_is,
        IS_MASK=is_mode == "token_mask", BIAS_KL=bool(bias_kl), ENTROPY=bool(entropy), SOFTCAP=softcap is not None,
        HAS_DX=dx is not None, num_warps=cfg["num_warps"] or num_warps(BLOCK))


@triton.jit
def _scale_rows_kernel(x_ptr, g_ptr, T, V, sb, st, BLOCK: tl.constexpr):
    """x[b, t, :] *= g over the rows of a [B, T, V] x with a contiguous last dim and any row strides (sb, st),
    skipped when g == 1."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        row = tl.program_id(0).to(tl.int64)
        b = row // T
        x_row = x_ptr + b * sb + (row - b * T) * st
        offs = tl.arange(0, BLOCK)
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            x = tl.load(x_row + cols, mask=cols < V)
            tl.store(x_row + cols, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=cols < V)


def _dense(x) -> bool:
    """x's elements fill x.numel() consecutive slots from its first one, each once (any order of its dims)."""
    expected = 1
    for st, n in sorted((st, n) for st, n in zip(x.stride(), x.shape) if n > 1):
        if st != expected:
            return False
        expected *= n
    return True


def scale_(x, g):
    """x *= g (g: a one-element fp32 device tensor) in place, for any layout of x: the flat kernel reads
    x.numel() elements from x's first one, right only for a dense x; a [B, T, V] view with gaps between
    its rows (the logits[:, :-1] an in-place backward writes into) takes the row kernel."""
    n = x.numel()
    if n == 0:
        return
    if not _dense(x):
        if x.dim() == 3 and x.stride(-1) == 1:
            B, T, V = x.shape
            BLOCK = min(triton.next_power_of_2(V), 64 if INTERPRET else 4096)
            _scale_rows_kernel[(B * T,)](x, g, T, V, x.stride(0), x.stride(1), BLOCK=BLOCK,
                                         num_warps=1 if INTERPRET else 8)
        else:
            x.mul_(g.reshape(()))
        return
    BLOCK = 64 if INTERPRET else 4096
    grid = (max(1, min(triton.cdiv(n, BLOCK), 1 if INTERPRET else sm_count(x.device) * 8)),)
    _scale_kernel[grid](x, g, n, BLOCK=BLOCK, num_warps=1 if INTERPRET else 8)
