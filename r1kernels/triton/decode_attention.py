"""Triton flash-decoding: one query per (row, head) against that row's valid KV-cache positions.

Split kernel, grid (B * Hkv * NUM_GT, S): a program takes one KV head of one row, a tile of BLOCK_G of
its G = Hq // Hkv query heads (all of them when G <= BLOCK_G: each K/V tile is read once for the group)
and one split [s * chunk, (s + 1) * chunk) of the cache, clipped to lens[b]: it loads only positions
< lens[b], BLOCK_N at a time, with an online softmax in base 2. A split starting at or past lens[b] runs
no iteration and leaves an empty partial (lse = -inf, its o not written). The combine kernel merges the
S partials of each (row, query head) by log-sum-exp; with S == 1 the split kernel writes `out` itself.

With this step's keys/values (HAS_NEW), the program of the split that holds position lens[b] (lens[b] < L)
loads the new token before its cache loop (so the load latency overlaps the loop), folds it into its online
softmax after the loop from registers, and the head tile gt == 0 stores it into the cache there; no program
reads position lens[b] from the cache, so the store races with no load.
With cos/sin (ROPE) q and the new key are rotated on load (HF's rotate-half form, fp32 math
rounded once to their dtype, as rk.apply_rotary): the decode step launches no rotary kernel.

S and chunk depend only on shapes and the device (never on lens), so a CUDA graph captured once replays
for any lens. No host sync: the launcher only allocates and launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import INTERPRET, sm_count

LOG2E = 1.4426950408889634
MAX_SPLITS = 256


@triton.jit
def _rotated(x_ptrs, mask, dk, half, sd, c, sn):
    """x * cos + rotate_half(x) * sin in fp32 for x at x_ptrs (last axis dk, stride sd; rotate_half(x)[d] =
    -x[d + half] for d < half, x[d - half] after); c / sn [BLOCK_DK] fp32."""
    lo = dk < half
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(x_ptrs + tl.where(lo, half, -half) * sd, mask=mask, other=0.0).to(tl.float32)
    return tl.where(lo, x * c - xr * sn, x * c + xr * sn)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, out_ptr, lse_ptr, part_ptr, kn_ptr, vn_ptr, cos_ptr, sin_ptr,
                  sq_b, sq_h, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, so_b, so_h, so_d, s_lens,
                  skn_b, skn_h, skn_d, svn_b, svn_h, svn_d, sc_b, sc_d, ss_b, ss_d,
                  Hq, Hkv, G, L, Dk, Dv, chunk, S, qk_scale,
                  NUM_GT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, DIRECT: tl.constexpr,
                  DOT_F32: tl.constexpr, HAS_NEW: tl.constexpr, ROPE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    gt = pid % NUM_GT
    h = (pid // NUM_GT) % Hkv
    b = pid // (NUM_GT * Hkv)
    b64, h64 = b.to(tl.int64), h.to(tl.int64)  # row offsets of a big cache overflow int32

    n_cache = tl.load(lens_ptr + b * s_lens).to(tl.int32)
    n_valid = tl.minimum(n_cache, L)  # lens > L reads L positions
    start = split * chunk
    end = tl.minimum(start + chunk, n_valid)  # this split covers [start, end): empty when start >= end

    g = gt * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = g < G
    heads = h * G + g  # query heads of this tile; padded rows (g >= G) load zeros and are never stored
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    dk_mask = dk < Dk
    dv_mask = dv < Dv

    if ROPE:
        half = Dk // 2
        c = tl.load(cos_ptr + b64 * sc_b + dk * sc_d, mask=dk_mask, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + b64 * ss_b + dk * ss_d, mask=dk_mask, other=0.0).to(tl.float32)
        q = _rotated(q_ptr + b64 * sq_b + heads[:, None] * sq_h + dk[None, :] * sq_d,
                     g_mask[:, None] & dk_mask[None, :], dk, half, sq_d, c, sn).to(q_ptr.dtype.element_ty)
    else:
        q = tl.load(q_ptr + b64 * sq_b + heads[:, None] * sq_h + dk[None, :] * sq_d,
                    mask=g_mask[:, None] & dk_mask[None, :], other=0.0)
    k_row = k_ptr + b64 * sk_b + h64 * sk_h
    v_row = v_ptr + b64 * sv_b + h64 * sv_h
    if DOT_F32:
        q = q.to(tl.float32)

    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max of the base-2 scores
    l = tl.zeros((BLOCK_G,), tl.float32)                 # running sum of 2^(score - m)
    acc = tl.zeros((BLOCK_G, BLOCK_DV), tl.float32)      # running sum of 2^(score - m) * v
    if HAS_NEW:  # this step's key/value: loaded before the cache loop (predicated, no branch), so their
        # latency overlaps the loop; folded in and stored after it
        here = (n_cache < L) & (n_cache >= start) & (n_cache < start + chunk)
        # the masks as blocks (the interpreter rejects a bool scalar inside a load mask)
        kn_mask = dk_mask & (dk * 0 + here.to(tl.int32) > 0)
        vn_mask = dv_mask & (dv * 0 + here.to(tl.int32) > 0)
        if ROPE:
            kn = _rotated(kn_ptr + b64 * skn_b + h64 * skn_h + dk * skn_d, kn_mask, dk, half, skn_d, c,
                          sn).to(kn_ptr.dtype.element_ty)
        else:
            kn = tl.load(kn_ptr + b64 * skn_b + h64 * skn_h + dk * skn_d, mask=kn_mask, other=0.0)
        vn = tl.load(vn_ptr + b64 * svn_b + h64 * svn_h + dv * svn_d, mask=vn_mask, other=0.0)
        kn = kn.to(k_ptr.dtype.element_ty)  # the value the cache will hold
        vn = vn.to(v_ptr.dtype.element_ty)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end  # n0 < end: every iteration has >= 1 valid position, so m stays finite
        n64 = n.to(tl.int64)
        k = tl.load(k_row + n64[:, None] * sk_n + dk[None, :] * sk_d,
                    mask=n_mask[:, None] & dk_mask[None, :], other=0.0)
        v = tl.load(v_row + n64[:, None] * sv_n + dv[None, :] * sv_d,
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # [BLOCK_G, BLOCK_N], base-2 units
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)  # first iteration: 2^-inf = 0
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    if HAS_NEW:
        if here:
            s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * qk_scale  # [BLOCK_G]
            m_new = tl.maximum(m, s_new)
            alpha = tl.exp2(m - m_new)
            p_new = tl.exp2(s_new - m_new)
            l = l * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)[None, :]
            m = m_new
            if gt == 0:
                pos = n_cache.to(tl.int64)
                tl.store(k_row + pos * sk_n + dk * sk_d, kn, mask=dk_mask)
                tl.store(v_row + pos * sv_n + dv * sv_d, vn, mask=dv_mask)

    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]  # l == 0 (empty split): acc is 0, o is 0
    if DIRECT:  # S == 1: this split is the whole row
        tl.store(out_ptr + b64 * so_b + heads[:, None] * so_h + dv[None, :] * so_d,
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & dv_mask[None, :])
    else:
        part = (b64 * Hq + heads) * S + split  # partial index of (row, query head, split)
        tl.store(lse_ptr + part, tl.where(l > 0, m + tl.log2(l_safe), float("-inf")), mask=g_mask)
        tl.store(part_ptr + part[:, None] * Dv + dv[None, :], o,
                 mask=(g_mask & (l > 0))[:, None] & dv_mask[None, :])


@triton.jit
def _combine_kernel(lse_ptr, part_ptr, out_ptr, so_b, so_h, so_d, Hq, S, Dv,
                    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out[b, h] = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M) over the S partials; reads o only of
    non-empty splits (lse > -inf); all empty (lens 0) gives 0."""
    row = tl.program_id(0).to(tl.int64)  # b * Hq + h
    b = row // Hq
    h = row % Hq
    dv = tl.arange(0, BLOCK_DV)
    dv_mask = dv < Dv
    M = tl.full((), float("-inf"), tl.float32)
    den = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_DV,), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_ptr + row * S + s, mask=s < S, other=float("-inf"))
        M_new = tl.maximum(M, tl.max(lse, 0))
        Ms = tl.where(M_new == float("-inf"), 0.0, M_new)
        alpha = tl.exp2(M - Ms)
        w = tl.exp2(lse - Ms)  # empty splits: 0
        o = tl.load(part_ptr + (row * S + s)[:, None] * Dv + dv[None, :],
                    mask=(lse > float("-inf"))[:, None] & dv_mask[None, :], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        den = den * alpha + tl.sum(w, 0)
        M = M_new
    out = acc / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + b * so_b + h * so_h + dv * so_d, out.to(out_ptr.dtype.element_ty), mask=dv_mask)


# Launch settings. H200 sweep (bf16, CUDA-graph replay;
# Qwen2.5-1.5B heads B=64 L=1024 lens 256..768 and B=8 L=4096, MLA 192/128 B=32): BLOCK_N=64, 4 warps,
# 3 stages and about one program per SM (WAVES=1) were best or within 1% of the best.
BLOCK_N, WARPS, WAVES = 64, 4, 1
STAGES = 0  # 0: _pipeline decides


def _config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, target programs, num_warps); small blocks and few programs under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return 16, 16, 1
    return BLOCK_N, sm_count(device) * WAVES, WARPS


def _pipeline(block_n: int, block_dk: int, block_dv: int, esize: int) -> tuple[int, int]:
    """(BLOCK_N, num_stages): 3 stages while the K and V tiles in flight fit in 160 KB of shared memory
    (A100-safe), else 2, halving BLOCK_N until 2 fit (fp32 with D = 256)."""
    if INTERPRET:
        return block_n, 1
    tile = lambda bn: bn * (block_dk + block_dv) * esize
    while block_n > 16 and 2 * tile(block_n) > 160 * 1024:
        block_n //= 2
    return block_n, STAGES or (3 if 3 * tile(block_n) <= 160 * 1024 else 2)


def num_splits(L: int, programs: int, block_n: int, target: int) -> tuple[int, int]:
    """(S, chunk): split the L cache positions of each of `programs` (row, head-tile) pairs into S chunks
    of `chunk` positions (a multiple of block_n) so that about `target` programs run. Shapes only."""
    cdiv = triton.cdiv
    # rounded, not ceil'd: 128 programs on 132 SMs run as one wave (S = 1: no combine, measured faster)
    want = max(1, min((target + programs // 2) // max(programs, 1), cdiv(L, block_n), MAX_SPLITS))
    chunk = cdiv(cdiv(L, want), block_n) * block_n
    return cdiv(L, chunk), chunk


def decode_attention_fwd(q, k_cache, v_cache, lens, scale: float, splits: int | None = None, k_new=None,
                         v_new=None, cos=None, sin=None):
    """out [B, Hq, Dv] in q's dtype; any strides. `splits` forces S (tests); None picks it from shapes.
    k_new / v_new [B, Hkv, D] (both or neither): stored at position lens[b] and attended (module doc);
    cos / sin [B, Dk] (with k_new): q and k_new rotated first."""
    B, Hq, Dk = q.shape
    Hkv, L, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    out = torch.empty((B, Hq, Dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if L == 0:
        return out.zero_()
    has_new = k_new is not None
    kn, vn = (k_new, v_new) if has_new else (q, q)  # unused without HAS_NEW
    kn_s, vn_s = (k_new.stride(), v_new.stride()) if has_new else ((0, 0, 0), (0, 0, 0))
    rope = cos is not None
    cs, ss = (cos.stride(), sin.stride()) if rope else ((0, 0), (0, 0))
    cos, sin = (cos, sin) if rope else (q, q)  # unused without ROPE
    G = Hq // Hkv
    block_n, target, warps = _config(q.device)
    dot_f32 = INTERPRET or q.dtype != k_cache.dtype or k_cache.dtype not in (torch.float16, torch.bfloat16)
    BLOCK_DK, BLOCK_DV = max(16, triton.next_power_of_2(Dk)), max(16, triton.next_power_of_2(Dv))
    block_n, stages = _pipeline(block_n, BLOCK_DK, BLOCK_DV, 4 if dot_f32 else k_cache.element_size())
    BLOCK_G = max(16, min(triton.next_power_of_2(G), 64 if Dv <= 128 else 32))
    NUM_GT = triton.cdiv(G, BLOCK_G)
    programs = B * Hkv * NUM_GT
    if splits is None:
        S, chunk = num_splits(L, programs, block_n, target)
    else:
        chunk = triton.cdiv(L, splits)
        S = triton.cdiv(L, chunk)
    if S > 1:
        lse = torch.empty((B, Hq, S), dtype=torch.float32, device=q.device)
        part = torch.empty((B, Hq, S, Dv), dtype=torch.float32, device=q.device)
    else:
        lse = part = out  # unused
    _split_kernel[(programs, S)](
        q, k_cache, v_cache, lens, out, lse, part, kn, vn, cos, sin, *q.stride(), *k_cache.stride(),
        *v_cache.stride(), *out.stride(), lens.stride(0), *kn_s, *vn_s, *cs, *ss, Hq, Hkv, G, L, Dk, Dv, chunk, S,
        float(scale) * LOG2E, NUM_GT=NUM_GT, BLOCK_G=BLOCK_G, BLOCK_N=block_n, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV,
        DIRECT=S == 1, DOT_F32=dot_f32, HAS_NEW=has_new, ROPE=rope, num_warps=warps, num_stages=stages)
    if S > 1:
        _combine_kernel[(B * Hq,)](lse, part, out, *out.stride(), Hq, S, Dv,
                                   BLOCK_S=min(triton.next_power_of_2(S), 16), BLOCK_DV=BLOCK_DV,
                                   num_warps=1 if INTERPRET else 4)
    return out
