"""Decode attention: one new query per row against that row's valid KV-cache positions.

q [B, Hq, Dk], k_cache [B, Hkv, L, Dk], v_cache [B, Hkv, L, Dv], lens [B] (row b attends to cache
positions 0..lens[b]-1); query head h reads KV head h // (Hq // Hkv) (grouped-query attention).
out [B, Hq, Dv] in q's dtype = softmax(scale * q . k) @ v with fp32 math; a row with lens 0 gives 0.
With k_new [B, Hkv, Dk] / v_new [B, Hkv, Dv] (this step's keys/values): each row with lens[b] < L first
stores them at cache position lens[b] (in the cache's dtype, in place) and attends to lens[b] + 1
positions; a row with lens[b] >= L stores nothing and attends to its L positions.
With cos / sin [B, Dk] (and k_new): q and k_new are first rotated by the rotary embedding at each row's
position (reference.fused.apply_rotary: HF's rotate-half form, fp32 math rounded to their dtypes).
"""
from __future__ import annotations

import math

import torch

from .fused import apply_rotary


def decode_attention(q, k_cache, v_cache, lens, scale=None, k_new=None, v_new=None, cos=None, sin=None):
    if cos is not None:
        q, k_new = apply_rotary(q[:, :, None], k_new[:, :, None], cos[:, None], sin[:, None])
        q, k_new = q[:, :, 0], k_new[:, :, 0]
    B, Hq, Dk = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if k_new is not None:
        lens = lens.to(q.device).long()
        rows = (lens < L).nonzero().squeeze(1)
        k_cache[rows, :, lens[rows]] = k_new[rows].to(k_cache.dtype)
        v_cache[rows, :, lens[rows]] = v_new[rows].to(v_cache.dtype)
        lens = torch.where(lens < L, lens + 1, lens)
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    G = Hq // Hkv
    q_BKGD = q.float().view(B, Hkv, G, Dk)  # query head h = kv head h // G, group member h % G
    s_BKGL = torch.einsum("bkgd,bkld->bkgl", q_BKGD, k_cache.float()) * scale
    valid_BL = torch.arange(L, device=q.device)[None, :] < lens.to(q.device).long()[:, None]
    s_BKGL = s_BKGL.masked_fill(~valid_BL[:, None, None, :], float("-inf"))
    p_BKGL = torch.softmax(s_BKGL, -1).nan_to_num(0.0)  # lens 0: all -inf -> NaN -> 0
    v = v_cache.float().masked_fill(~valid_BL[:, None, :, None], 0.0)  # positions >= lens may hold NaN
    return torch.einsum("bkgl,bkld->bkgd", p_BKGL, v).reshape(B, Hq, v_cache.shape[3]).to(q.dtype)
