"""Triton kernel: group-relative advantages in one launch, float64 accumulation (as the reference).

rewards [N, R] (R weighted reward columns, summed first), groups of G consecutive rows. Each program
takes BLOCK_G groups at a time (grid-stride), members in chunks of BLOCK_M, so any group size works.
scale: 0 group (unbiased group std), 1 batch (each program computes the batch std first), 2 none.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .device import sm_count
from .logprob import INTERPRET

SCALE_CODES = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _totals(r_ptr, w_ptr, rows, rmask, R, HAS_W: tl.constexpr):
    acc = tl.zeros(rows.shape, tl.float64)
    for j in range(R):
        v = tl.load(r_ptr + rows * R + j, mask=rmask, other=0.0).to(tl.float64)
        if HAS_W:
            v = v * tl.load(w_ptr + j).to(tl.float64)
        acc += v
    return acc


@triton.jit
def _adv_kernel(r_ptr, w_ptr, out_ptr, n_groups, G, R, eps, SCALE: tl.constexpr, HAS_W: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    N = n_groups * G
    gi = tl.arange(0, BLOCK_G)[:, None]
    mi = tl.arange(0, BLOCK_M)[None, :]
    batch_denom = 1.0
    if SCALE == 1:  # every program computes the batch mean and unbiased std first (from L2; no 2nd launch)
        flat = tl.arange(0, BLOCK_S)
        bsum = tl.zeros((), tl.float64)
        for i0 in range(0, N, BLOCK_S):
            rows = i0 + flat
            bsum += tl.sum(_totals(r_ptr, w_ptr, rows, rows < N, R, HAS_W), 0)
        bmean = bsum / N
        bss = tl.zeros((), tl.float64)
        for i0 in range(0, N, BLOCK_S):
            rows = i0 + flat
            d = tl.where(rows < N, _totals(r_ptr, w_ptr, rows, rows < N, R, HAS_W) - bmean, 0.0)
            bss += tl.sum(d * d, 0)
        batch_denom = tl.sqrt(bss / (N - 1)) + eps
    for g0 in range(pid * BLOCK_G, n_groups, nprog * BLOCK_G):
        groups = g0 + gi
        gmask = groups < n_groups
        gsum = tl.zeros((BLOCK_G,), tl.float64)
        for m0 in range(0, G, BLOCK_M):
            mm = gmask & (m0 + mi < G)
            gsum += tl.sum(_totals(r_ptr, w_ptr, groups * G + m0 + mi, mm, R, HAS_W), 1)
        mean = (gsum / G)[:, None]
        denom = tl.zeros((BLOCK_G, 1), tl.float64) + batch_denom
        if SCALE == 0:
            gss = tl.zeros((BLOCK_G,), tl.float64)
            for m0 in range(0, G, BLOCK_M):
                mm = gmask & (m0 + mi < G)
                dg = tl.where(mm, _totals(r_ptr, w_ptr, groups * G + m0 + mi, mm, R, HAS_W) - mean, 0.0)
                gss += tl.sum(dg * dg, 1)
            denom = (tl.sqrt(gss / (G - 1)) + eps)[:, None]
        for m0 in range(0, G, BLOCK_M):
            mm = gmask & (m0 + mi < G)
            rows = groups * G + m0 + mi
            a = (_totals(r_ptr, w_ptr, rows, mm, R, HAS_W) - mean) / denom
            tl.store(out_ptr + rows, a.to(tl.float32), mask=mm)


def group_advantages(rewards, group_size: int, scale: str, eps: float, weights, out):
    """rewards [N] or [N, R] contiguous, weights fp32 [R] or None -> writes fp32 advantages into out [N]."""
    N = rewards.shape[0]
    R = rewards.shape[1] if rewards.dim() == 2 else 1
    n_groups = N // group_size
    if N == 0:
        return out
    BLOCK_M = min(triton.next_power_of_2(group_size), 64 if INTERPRET else 1024)
    BLOCK_G = max(1, (64 if INTERPRET else 256) // BLOCK_M)
    code = SCALE_CODES[scale]
    grid = (triton.cdiv(n_groups, BLOCK_G),)
    if code == 1:  # each program recomputes the batch statistics: one program per SM at most
        grid = (min(grid[0], sm_count(rewards.device)),)
    _adv_kernel[grid](rewards, weights if weights is not None else out, out, n_groups, group_size, R, float(eps),
                      SCALE=code, HAS_W=weights is not None, BLOCK_G=BLOCK_G, BLOCK_M=BLOCK_M,
                      BLOCK_S=64 if INTERPRET else 4096, num_warps=1 if INTERPRET else 4)
    return out
