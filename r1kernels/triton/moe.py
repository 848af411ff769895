"""Triton kernels for DeepSeek-V3 routing: the fused gate (forward, backward) and the permute / unpermute
row copies. Same math as r1kernels/reference/moe.py.

Gate: a program takes BLOCK_T tokens x all E experts (padded to a power of two). s = sigmoid(x) as torch
computes it on CUDA (1 / (1 + expf(-x)), accurate exp, IEEE division) so ids match the reference bit for
bit; group score = top-2 sum per group (value only: max, and the max again if it occurs twice, else the
largest value below it); group rank by pairwise comparison (ties to the lower group); top_k rounds of a
row argmax on order-preserving int keys (ties to the lower expert).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import INTERPRET

try:
    from triton.language.extra import libdevice
except ImportError:  # older layouts
    from triton.language.extra.cuda import libdevice

INT_MIN = tl.constexpr(-2147483648)


@triton.jit
def _sigmoid_exact(x, EXACT: tl.constexpr):
    if EXACT:
        return tl.math.div_rn(1.0 + tl.zeros_like(x), 1.0 + libdevice.exp(-x))
    else:
        return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _route_fwd_kernel(x_ptr, b_ptr, w_ptr, ids_ptr, s_ptr, T, scale, E: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_T: tl.constexpr, N_GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                      TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                      EXACT: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    tmask = t < T
    emask = e < E
    x = tl.load(x_ptr + t[:, None].to(tl.int64) * E + e[None, :], mask=tmask[:, None] & emask[None, :],
                other=0.0).to(tl.float32)
    nan_row = tl.max(tl.where(x != x, 1, 0), axis=1)  # a NaN logit: the row's weights are NaN (as the reference's)
    s = _sigmoid_exact(x, EXACT)
    b = tl.load(b_ptr + e, mask=emask, other=0.0)
    c = s + b[None, :]
    GS: tl.constexpr = E // N_GROUP
    grp = e // GS
    gi = tl.arange(0, BLOCK_G)
    neg_inf = float("-inf")
    gscore = tl.full([BLOCK_T, BLOCK_G], neg_inf, tl.float32)
    for g in tl.static_range(N_GROUP):
        cg = tl.where(((grp == g) & emask)[None, :], c, neg_inf)
        m1 = tl.max(cg, axis=1)
        n1 = tl.sum(tl.where(cg == m1[:, None], 1, 0), axis=1)
        m2 = tl.max(tl.where(cg < m1[:, None], cg, neg_inf), axis=1)
        sc = m1 + tl.where(n1 >= 2, m1, m2)
        gscore = tl.where(gi[None, :] == g, sc[:, None], gscore)
    keep = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
    gvalid = gi < N_GROUP
    for g in tl.static_range(N_GROUP):
        sg = tl.max(tl.where(gi[None, :] == g, gscore, neg_inf), axis=1)
        beats = ((gscore > sg[:, None]) | ((gscore == sg[:, None]) & (gi[None, :] < g))) & gvalid[None, :]
        rank = tl.sum(beats.to(tl.int32), axis=1)
        keep = tl.where((grp == g)[None, :] & (rank < TOPK_GROUP)[:, None], 1, keep)
    cm = tl.where(keep != 0, c, neg_inf)
    bits = cm.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(emask[None, :], key, INT_MIN)
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    sel_s = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for k in tl.static_range(TOP_K):
        m = tl.max(key, axis=1)
        idx = tl.min(tl.where(key == m[:, None], e[None, :], BLOCK_E), axis=1)
        hit = e[None, :] == idx[:, None]
        sv = tl.sum(tl.where(hit, s, 0.0), axis=1)
        key = tl.where(hit, INT_MIN, key)
        ids = tl.where(kk[None, :] == k, idx[:, None], ids)
        sel_s = tl.where(kk[None, :] == k, sv[:, None], sel_s)
    w = sel_s
    if NORM:
        total = tl.sum(sel_s, axis=1)
        w = sel_s / (total[:, None] + 1e-20)
    w = tl.where(nan_row[:, None] != 0, float("nan"), w * scale)
    omask = tmask[:, None] & (kk < TOP_K)[None, :]
    off = t[:, None].to(tl.int64) * TOP_K + kk[None, :]
    tl.store(w_ptr + off, w, mask=omask)
    tl.store(ids_ptr + off, ids.to(tl.int64), mask=omask)
    tl.store(s_ptr + off, sel_s, mask=omask)


@triton.jit
def _route_bwd_kernel(gw_ptr, ids_ptr, s_ptr, out_ptr, T, scale, E: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_T: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    kk = tl.arange(0, BLOCK_K)
    kmask = tmask[:, None] & (kk < TOP_K)[None, :]
    off = t[:, None].to(tl.int64) * TOP_K + kk[None, :]
    g = tl.load(gw_ptr + off, mask=kmask, other=0.0)
    sv = tl.load(s_ptr + off, mask=kmask, other=0.0)
    ids = tl.load(ids_ptr + off, mask=kmask, other=-1).to(tl.int32)
    if NORM:
        S = tl.sum(sv, axis=1)[:, None] + 1e-20
        dot = tl.sum(g * sv, axis=1)[:, None]
        gs = scale * (g / S - dot / (S * S))
    else:
        gs = scale * g
    gx = gs * sv * (1.0 - sv)
    for e0 in tl.static_range(0, E, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        out = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
        for k in tl.static_range(TOP_K):
            idk = tl.sum(tl.where(kk[None, :] == k, ids, 0), axis=1)
            gk = tl.sum(tl.where(kk[None, :] == k, gx, 0.0), axis=1)
            out = tl.where(e[None, :] == idk[:, None], gk[:, None], out)
        tl.store(out_ptr + t[:, None].to(tl.int64) * E + e[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=tmask[:, None] & (e < E)[None, :])


@triton.jit
def _permute_rows_kernel(h_ptr, row_map_ptr, out_ptr, H, K, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    x = tl.load(h_ptr + t * H + h, mask=hmask)
    for k in range(K):
        r = tl.load(row_map_ptr + t * K + k).to(tl.int64)  # an int32 row_map: r * H past 2^31 at T*K*H of 7168
        tl.store(out_ptr + r * H + h, x, mask=hmask)


@triton.jit
def _unpermute_rows_kernel(x_ptr, row_map_ptr, w_ptr, out_ptr, H, K, HAS_W: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = h < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for k in range(K):
        r = tl.load(row_map_ptr + t * K + k).to(tl.int64)
        v = tl.load(x_ptr + r * H + h, mask=hmask, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + k)
        acc += v
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def _unpermute_bwd_kernel(g_ptr, x_ptr, row_map_ptr, w_ptr, gx_ptr, gw_ptr, H, K, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # one program per (t, k)
    t = pid // K
    r = tl.load(row_map_ptr + pid).to(tl.int64)
    wk = tl.load(w_ptr + pid)
    dot = tl.zeros([BLOCK_H], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hmask = h < H
        g = tl.load(g_ptr + t * H + h, mask=hmask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + r * H + h, mask=hmask, other=0.0).to(tl.float32)
        dot += g * x
        tl.store(gx_ptr + r * H + h, (wk * g).to(gx_ptr.dtype.element_ty), mask=hmask)
    tl.store(gw_ptr + pid, tl.sum(dot, axis=0))


def _block_t(E):
    return 1 if INTERPRET else max(1, min(16, 4096 // triton.next_power_of_2(E)))


def route_fwd(logits, bias, top_k, n_group, topk_group, scale, norm):
    T, E = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    w = torch.empty(T, top_k, **f32)
    s = torch.empty(T, top_k, **f32)
    ids = torch.empty(T, top_k, device=logits.device, dtype=torch.int64)
    if T == 0:
        return w, ids, s
    bt = _block_t(E)
    _route_fwd_kernel[(triton.cdiv(T, bt),)](
        logits, bias, w, ids, s, T, float(scale), E=E, BLOCK_E=triton.next_power_of_2(E), BLOCK_T=bt,
        N_GROUP=n_group, BLOCK_G=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group, TOP_K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k), NORM=bool(norm), EXACT=not INTERPRET,
        num_warps=1 if INTERPRET else 4)
    return w, ids, s


def route_bwd(grad_w, ids, s_sel, num_experts, scale, norm, dtype):
    T, K = ids.shape
    out = torch.empty(T, num_experts, device=grad_w.device, dtype=dtype)
    if T == 0:
        return out
    bt = _block_t(num_experts)
    _route_bwd_kernel[(triton.cdiv(T, bt),)](
        grad_w, ids, s_sel, out, T, float(scale), E=num_experts,
        BLOCK_E=min(triton.next_power_of_2(num_experts), 1024), BLOCK_T=bt, TOP_K=K,
        BLOCK_K=triton.next_power_of_2(K), NORM=bool(norm), num_warps=1 if INTERPRET else 4)
    return out


def _block_h(H):
    return min(triton.next_power_of_2(H), 64 if INTERPRET else 2048)


def permute_rows(hidden, row_map, top_k):
    T, H = hidden.shape
    out = torch.empty(T * top_k, H, device=hidden.device, dtype=hidden.dtype)
    if T and H:
        bh = _block_h(H)
        _permute_rows_kernel[(T, triton.cdiv(H, bh))](hidden, row_map, out, H, top_k, BLOCK_H=bh,
                                                      num_warps=1 if INTERPRET else 8)
    return out


def unpermute_rows(x, row_map, w, top_k):
    T, H = x.shape[0] // top_k, x.shape[1]
    out = torch.empty(T, H, device=x.device, dtype=x.dtype)
    if T and H:
        bh = _block_h(H)
        _unpermute_rows_kernel[(T, triton.cdiv(H, bh))](x, row_map, w if w is not None else x, out, H, top_k,
                                                        HAS_W=w is not None, BLOCK_H=bh,
                                                        num_warps=1 if INTERPRET else 8)
    return out


def unpermute_bwd(grad_out, x, row_map, w):
    T, K = w.shape
    H = x.shape[1]
    grad_x = torch.empty_like(x)
    grad_w = torch.empty(T, K, device=x.device, dtype=torch.float32)
    if T * K:
        bh = _block_h(H)
        _unpermute_bwd_kernel[(T * K,)](grad_out, x, row_map, w, grad_x, grad_w, H, K, BLOCK_H=bh,
                                        num_warps=1 if INTERPRET else 8)
    return grad_x, grad_w
