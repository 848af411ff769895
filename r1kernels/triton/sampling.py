"""Triton kernels: token sampling (r1kernels.reference.sampling is the spec), no host synchronization.

Every row is split into ranges of blocks, one program each (grid (rows, splits)).
- Truncation (top-k / top-p / min-p) only: _bmax_kernel writes each block's largest z; the top-k and top-p
  thresholds are then found exactly by bisection over the order-preserving uint32 image of fp32 z, BITS bits
  per _pass_kernel launch (blocks whose maximum is below every candidate are not read); _threshold_kernel
  combines them with min-p into one thr per row: every truncation keeps z >= its threshold, so the kept set
  is z >= the largest of them.
- _partial_kernel: over its blocks, the online log-sum-exp of the kept z and the running argmax of z + Gumbel
  noise (of z when greedy), ties to the lower index; _combine_kernel merges the splits -> token, log-prob.
- A row with no distribution (z holds NaN or +inf, or is -inf everywhere: the reference's no_distribution) gets
  token 0 and log-prob NaN: _partial_kernel flags NaN / +inf in the blocks it reads (with truncation, _bmax_kernel
  gives a block holding NaN the maximum +inf, so it is read), _combine_kernel the rest; no extra pass.
z = logits / temperature is an IEEE division (div_rn) so every kernel and the reference see the same z.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import INTERPRET

# Upper bound of the Gumbel noise: u <= 1 - 2^-24 gives -log(-log(u)) <= 16.64.
G_MAX = tl.constexpr(17.0)
BITS = 4  # bits of a threshold fixed per bisection pass (2^BITS candidates tried at once)


# Nested @triton.jit calls are kept out of the per-block loops: the interpreter pays ~1 ms per call.

@triton.jit
def _from_ukey(k):
    """fp32 from its order-preserving uint32 image ukey(z): negatives with all bits flipped, others with the
    sign bit set (computed inline where needed)."""
    b = tl.where((k >> 31) != 0, k & 0x7FFFFFFF, ~k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _gumbel_key(zk, blk, c1, k0, k1, BLOCK: tl.constexpr):
    """zk + g for the BLOCK tokens of block blk, g = -log(-log(u)), u = ((x >> 9) + 0.5) * 2^-23, x = word
    v % 4 of Philox4x32-10 for the counter (v // 4, c1, 0, 0) and key (k0, k1), all uint32: one Philox call
    per 4 tokens (H200, 64 random-init rows of 151936: the partial kernel 75 -> 58 us against one call per
    token; the rest is the two logs, the loads and the argmax reductions)."""
    c0 = (blk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    c1 = c1 + tl.zeros_like(c0)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    x = tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))  # [x0, x1, x2, x3] of each counter in turn
    u = ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    # -log(u) keeping a small relative error near u = 1, where a hardware log2 (absolute error ~2^-22) would
    # not: there 1 - u is exact and -log(u) = 2 atanh(s), s = (1 - u) / (1 + u) <= 1/3.
    w = 1.0 - u
    s = w / (2.0 - w)
    s2 = s * s
    p = 1.0 + s2 * (1 / 3 + s2 * (1 / 5 + s2 * (1 / 7 + s2 * (1 / 9 + s2 * (1 / 11 + s2 * (1 / 13))))))
    neg_log_u = tl.where(u >= 0.5, 2.0 * s * p, -tl.log(u))
    return zk - tl.log(neg_log_u)


@triton.jit
def _bmax_kernel(x_ptr, bmax_ptr, V, stride_x, nblk, per, temperature, BLOCK: tl.constexpr):
    """bmax[row, blk] = the largest z of each block; +inf for a block holding NaN (so _partial_kernel reads it)."""
    row = tl.program_id(0).to(tl.int64)
    b0 = tl.program_id(1) * per
    offs = tl.arange(0, BLOCK)
    for blk in range(b0, tl.minimum(b0 + per, nblk)):
        cols = blk * BLOCK + offs
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        z = tl.math.div_rn(x, temperature)
        tl.store(bmax_ptr + row * nblk + blk, tl.where(tl.max((z != z).to(tl.int32), 0) > 0, float("inf"),
                                                       tl.max(z, 0)))


@triton.jit
def _row_max(bmax_ptr, row, nblk, NBP: tl.constexpr):
    b = tl.arange(0, NBP)
    return tl.max(tl.load(bmax_ptr + row * nblk + b, mask=b < nblk, other=float("-inf")), 0)


@triton.jit
def _next_ans(h, a, q, nsplit, target, BITS: tl.constexpr, NSP: tl.constexpr):
    """The bisection's answer after pass q: ans before it (a[q]) plus, at pass q's bit position, the largest
    candidate digit whose F (summed over the splits' h[q, split, :]) reaches target."""
    NC: tl.constexpr = 1 << BITS
    s = tl.arange(0, NSP)[:, None]
    j = tl.arange(0, NC)[None, :]
    acc = tl.sum(tl.load(h + (q * nsplit + s) * NC + j, mask=s < nsplit, other=0.0), 0)
    digit = tl.max(tl.where(acc >= target, tl.arange(0, NC), 0), 0).to(tl.uint32)
    return tl.load(a + q).to(tl.uint32, bitcast=True) + (digit << (32 - BITS * (q + 1)))


@triton.jit
def _pass_kernel(x_ptr, bmax_ptr, hist_ptr, ans_ptr, tot_ptr, V, stride_x, nblk, per, temperature, top_k, top_p,
                 p, BLOCK: tl.constexpr, NSP: tl.constexpr, NBP: tl.constexpr, MASS: tl.constexpr,
                 TOP_K: tl.constexpr, BITS: tl.constexpr, SUB: tl.constexpr):
    """Pass p of the bisection for the top-k (count) or top-p (MASS) threshold: the largest uint32 key t
    with F(t) >= target, F(t) over the tokens with z >= kth and key >= t, F the count (target top_k) or the
    sum of exp(z - max z) (target top_p * F(0), the mass kept by top-k); F is nonincreasing in t. Pass p
    tries the candidates ans + d << (32 - BITS (p + 1)), d < 2^BITS, and writes this split's F for each to
    hist[row, MASS, p, split]; ans itself (ans[row, MASS, p]) follows from pass p - 1's sums. A key of 0
    (no candidate qualifies) means all tokens."""
    NC: tl.constexpr = 1 << BITS
    NPASS: tl.constexpr = 32 // BITS
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    nsplit = tl.num_programs(1)
    hk = hist_ptr + row * (2 * NPASS * nsplit * NC)
    ak = ans_ptr + row * (2 * NPASS)
    kth = float("-inf")
    m = 0.0
    if MASS:
        h = hk + NPASS * nsplit * NC
        a = ak + NPASS
        m = _row_max(bmax_ptr, row, nblk, NBP)
        m = tl.where(m == float("-inf"), 0.0, m)
        if TOP_K:
            kth = _from_ukey(_next_ans(hk, ak, NPASS - 1, nsplit, top_k, BITS, NSP))
    else:
        h = hk
        a = ak
    ans = tl.zeros((), tl.uint32)
    if p > 0:
        if MASS:
            if p == 1:  # pass 0's F at its candidate 0: the whole mass
                s = tl.arange(0, NSP)
                total = tl.sum(tl.load(h + s * NC, mask=s < nsplit, other=0.0), 0)
                tl.store(tot_ptr + row, total, mask=sp == 0)
            else:
                total = tl.load(tot_ptr + row)
            ans = _next_ans(h, a, p - 1, nsplit, top_p * total, BITS, NSP)
        else:
            ans = _next_ans(h, a, p - 1, nsplit, top_k, BITS, NSP)
    tl.store(a + p, ans.to(tl.int32, bitcast=True), mask=sp == 0)
    j = tl.arange(0, NC).to(tl.uint32)
    cand = ans + (j << (32 - BITS * (p + 1)))
    # [NC, SUB]: an element's NC candidates in one thread's registers, summed over the blocks there and reduced
    # across threads once after the loop (H100, B=64 V=151936, top-p 0.9 + top-k 50: 1.71 -> 0.50 ms a step against
    # [SUB, NC] tiles, whose layout spread a row's candidates over threads: ~330 thread instructions an element)
    acc_NS = tl.zeros((NC, SUB), tl.float32)
    offs = tl.arange(0, SUB)
    b0 = sp * per
    for blk in range(b0, tl.minimum(b0 + per, nblk)):
        bm = tl.load(bmax_ptr + row * nblk + blk)
        bb = bm.to(tl.uint32, bitcast=True)  # ukey(bm)
        if (bm >= kth) & (tl.where((bb >> 31) != 0, ~bb, bb | 0x80000000) >= ans):  # else below every candidate
            # SUB columns at a time (same case: 0.49 ms a step at SUB 256, 0.59 at 1024, 0.66 at 64)
            for c in tl.static_range(BLOCK // SUB):
                cols = blk * BLOCK + c * SUB + offs
                x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                z = tl.math.div_rn(x, temperature)
                b = z.to(tl.uint32, bitcast=True)  # ukey(z)
                ge = tl.where((b >> 31) != 0, ~b, b | 0x80000000)[None, :] >= cand[:, None]
                if MASS:
                    w = tl.where(z >= kth, tl.exp(z - m), 0.0)
                else:
                    w = tl.where(cols < V, 1.0, 0.0)
                acc_NS += tl.where(ge, w[None, :], 0.0)
    tl.store(h + (p * nsplit + sp) * NC + j, tl.sum(acc_NS, 1))


@triton.jit
def _threshold_kernel(bmax_ptr, hist_ptr, ans_ptr, tot_ptr, thr_ptr, nblk, nsplit, top_k, top_p, log_min_p,
                      NSP: tl.constexpr, NBP: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                      MIN_P: tl.constexpr, BITS: tl.constexpr):
    """thr[row] = max(k-th largest z, top-p edge z, max z + log(min_p)) over the enabled truncations."""
    NC: tl.constexpr = 1 << BITS
    NPASS: tl.constexpr = 32 // BITS
    row = tl.program_id(0).to(tl.int64)
    hk = hist_ptr + row * (2 * NPASS * nsplit * NC)
    ak = ans_ptr + row * (2 * NPASS)
    thr = tl.full((), float("-inf"), tl.float32)
    if TOP_K:
        thr = _from_ukey(_next_ans(hk, ak, NPASS - 1, nsplit, top_k, BITS, NSP))
    if TOP_P:
        total = tl.load(tot_ptr + row)
        t = _next_ans(hk + NPASS * nsplit * NC, ak + NPASS, NPASS - 1, nsplit, top_p * total, BITS, NSP)
        thr = tl.maximum(thr, tl.where(t == 0, float("-inf"), _from_ukey(t)))  # 0: mass short of top_p, keep all
    if MIN_P:
        thr = tl.maximum(thr, _row_max(bmax_ptr, row, nblk, NBP) + log_min_p)
    tl.store(thr_ptr + row, thr)


@triton.jit
def _partial_kernel(x_ptr, seed_ptr, pos_ptr, thr_ptr, bmax_ptr, part_ptr, pidx_ptr, V, stride_x, nblk,
                    blocks_per_split, temperature, BLOCK: tl.constexpr, TRUNC: tl.constexpr,
                    GREEDY: tl.constexpr):
    """part[row, split] = (max kept z, sum exp(kept z - max), best key, z of the best, 1.0 if a block read holds NaN
    or +inf z else 0.0), pidx = its index."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    nsplit = tl.num_programs(1)
    x_row = x_ptr + row * stride_x
    seed = tl.load(seed_ptr + row).to(tl.int64)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    pos = tl.load(pos_ptr + row).to(tl.int64).to(tl.uint32)
    thr = tl.full((), float("-inf"), tl.float32)
    if TRUNC:
        thr = tl.load(thr_ptr + row)
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_z = tl.full((), float("-inf"), tl.float32)
    best_i = tl.zeros((), tl.int32)
    bad = tl.zeros((), tl.int32)
    b0 = sp * blocks_per_split
    b1 = tl.minimum(b0 + blocks_per_split, nblk)
    for blk in range(b0, b1):
        live = True
        if TRUNC:
            live = tl.load(bmax_ptr + row * nblk + blk) >= thr  # else no kept token in the block
        if live:
            cols = blk * BLOCK + offs
            x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            z = tl.math.div_rn(x, temperature)
            bad = tl.maximum(bad, tl.max(((z != z) | (z == float("inf"))).to(tl.int32), 0))
            zk = tl.where(z >= thr, z, float("-inf"))
            bm = tl.max(zk, 0)
            m_new = tl.maximum(m, bm)
            ms = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - ms) + tl.sum(tl.exp(zk - ms), 0)
            m = m_new
            # a block whose keys are all below the best so far (z + g < bm + G_MAX) cannot win: no noise
            go = bm > float("-inf")
            if not GREEDY:
                go = go & (bm + G_MAX >= best)
            if go:
                if GREEDY:
                    key = zk
                else:
                    key = _gumbel_key(zk, blk, pos, k0, k1, BLOCK)
                kb = tl.max(key, 0)
                ib = tl.min(tl.where(key == kb, cols, 2147483647), 0)
                upd = kb > best  # strictly: an earlier block wins ties
                best_z = tl.where(upd, tl.max(tl.where(cols == ib, zk, float("-inf")), 0), best_z)
                best_i = tl.where(upd, ib, best_i)
                best = tl.where(upd, kb, best)
    out = (row * nsplit + sp) * 5
    tl.store(part_ptr + out, m)
    tl.store(part_ptr + out + 1, s)
    tl.store(part_ptr + out + 2, best)
    tl.store(part_ptr + out + 3, best_z)
    tl.store(part_ptr + out + 4, bad.to(tl.float32))
    tl.store(pidx_ptr + row * nsplit + sp, best_i)


@triton.jit
def _combine_kernel(part_ptr, pidx_ptr, tok_ptr, logp_ptr, nsplit, NSP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, NSP)
    ok = j < nsplit
    base = (row * nsplit + j) * 5
    m = tl.load(part_ptr + base, mask=ok, other=float("-inf"))
    s = tl.load(part_ptr + base + 1, mask=ok, other=0.0)
    key = tl.load(part_ptr + base + 2, mask=ok, other=float("-inf"))
    zb = tl.load(part_ptr + base + 3, mask=ok, other=float("-inf"))
    idx = tl.load(pidx_ptr + row * nsplit + j, mask=ok, other=2147483647)
    mx = tl.max(m, 0)
    ms = tl.where(mx == float("-inf"), 0.0, mx)
    log_s = tl.log(tl.sum(s * tl.exp(m - ms), 0))  # (z - max) - log(sum): no rounding of a large max + log(sum)
    kb = tl.max(key, 0)
    win = tl.min(tl.where(key == kb, idx, 2147483647), 0)  # splits are in index order: lowest index on ties
    z = tl.max(tl.where((key == kb) & (idx == win), zb, float("-inf")), 0)
    # no distribution: NaN / +inf read by a split, or no finite z kept (the row is -inf everywhere: a kept set is
    # never empty otherwise)
    none = (tl.max(tl.load(part_ptr + base + 4, mask=ok, other=0.0), 0) > 0) | (mx == float("-inf"))
    tl.store(tok_ptr + row, tl.where(none, 0, win).to(tl.int64))
    tl.store(logp_ptr + row, tl.where(none, float("nan"), (z - ms) - log_s))


# Blocks of one row per program of _partial_kernel: a function of nothing but the build, so a row's log-prob
# is bitwise the same in any batch (8 x 1024 on a GPU: 19 programs per row of 151936; under the interpreter
# 6 x 64, so V = 1000 gives 3 splits and the combine is exercised).
SPLIT_BLOCKS = 6 if INTERPRET else 8
# Columns of a block _pass_kernel compares at once (under the interpreter 32 of 64, so the sub-loop runs).
PASS_SUB = 32 if INTERPRET else 256


def sample(logits, seeds, positions, temperature: float, top_k: int, top_p: float, min_p: float, greedy: bool):
    """-> (tokens int64 [B], logp fp32 [B]) for logits [B, V]; enqueues kernels only (no host sync)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    dev = logits.device
    tok = torch.empty(B, device=dev, dtype=torch.int64)
    logp = torch.empty(B, device=dev, dtype=torch.float32)
    if B == 0:
        return tok, logp
    seeds, positions = seeds.contiguous(), positions.contiguous()
    BLOCK = min(64 if INTERPRET else 1024, max(16, triton.next_power_of_2(V)))
    nblk = triton.cdiv(V, BLOCK)
    use_k, use_p, use_min_p = 0 < top_k < V, top_p < 1.0, min_p > 0.0
    trunc = use_k or use_p or use_min_p
    per = SPLIT_BLOCKS
    nsplit = triton.cdiv(nblk, per)
    T = float(temperature)
    thr = bmax = logp  # placeholders: never read without TRUNC
    if trunc:
        thr = torch.empty(B, device=dev, dtype=torch.float32)
        bmax = torch.empty(B, nblk, device=dev, dtype=torch.float32)
        hist = ans = tot = thr  # placeholders without top-k / top-p
        warps = 1 if INTERPRET else 4
        _bmax_kernel[(B, nsplit)](logits, bmax, V, logits.stride(0), nblk, per, T, BLOCK=BLOCK, num_warps=warps)
        NSP, NBP = triton.next_power_of_2(nsplit), triton.next_power_of_2(nblk)
        npass = 32 // BITS
        if use_k or use_p:
            hist = torch.empty(B, 2, npass, nsplit, 1 << BITS, device=dev, dtype=torch.float32)
            ans = torch.empty(B, 2, npass, device=dev, dtype=torch.int32)
            tot = torch.empty(B, device=dev, dtype=torch.float32)
        for mass in [False] * use_k + [True] * use_p:
            for p in range(npass):
                _pass_kernel[(B, nsplit)](logits, bmax, hist, ans, tot, V, logits.stride(0), nblk, per, T, int(top_k),
                                          float(top_p), p, BLOCK=BLOCK, NSP=NSP, NBP=NBP, MASS=mass, TOP_K=use_k,
                                          BITS=BITS, SUB=min(BLOCK, PASS_SUB), num_warps=warps)
        # log(min_p) in fp32 as the reference computes it (a CPU tensor: no device sync)
        log_min_p = float(torch.log(torch.tensor(min_p, dtype=torch.float32))) if use_min_p else 0.0
        _threshold_kernel[(B,)](bmax, hist, ans, tot, thr, nblk, nsplit, int(top_k), float(top_p), log_min_p,
                                NSP=NSP, NBP=NBP, TOP_K=use_k, TOP_P=use_p, MIN_P=use_min_p, BITS=BITS,
                                num_warps=1 if INTERPRET else 4)
    part = torch.empty(B, nsplit, 5, device=dev, dtype=torch.float32)
    pidx = torch.empty(B, nsplit, device=dev, dtype=torch.int32)
    _partial_kernel[(B, nsplit)](logits, seeds, positions, thr, bmax, part, pidx, V, logits.stride(0), nblk, per,
                                 T, BLOCK=BLOCK, TRUNC=trunc, GREEDY=bool(greedy),
                                 num_warps=1 if INTERPRET else 4)
    _combine_kernel[(B,)](part, pidx, tok, logp, nsplit, NSP=triton.next_power_of_2(nsplit), num_warps=1)
    return tok, logp
