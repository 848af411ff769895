"""decode_attention as the torch.library custom op r1kernels::decode_attention over the Triton
flash-decoding kernels (inference only: no autograd); with k_new / v_new it also writes them into the
caches (declared mutated). The fake makes it traceable by torch.compile."""
from __future__ import annotations

import math

import torch

from ..triton import decode_attention as _k

OP = "r1kernels::decode_attention"


@torch.library.custom_op(OP, mutates_args=("k_cache", "v_cache"))
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor,
                        scale: float, k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None,
                        cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    return _k.decode_attention_fwd(q, k_cache, v_cache, lens, scale, k_new=k_new, v_new=v_new, cos=cos, sin=sin)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, lens, scale, k_new=None, v_new=None, cos=None, sin=None):
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[3]))


def decode_attention_triton(q, k_cache, v_cache, lens, scale=None, k_new=None, v_new=None, cos=None, sin=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return decode_attention_op(q, k_cache, v_cache, lens, float(scale), k_new, v_new, cos, sin)


def _eligible(q, k_cache, v_cache, *a, **k):
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return (q.dtype in dtypes and k_cache.dtype in dtypes and v_cache.dtype in dtypes
            and 1 <= q.shape[-1] <= 256 and 1 <= v_cache.shape[-1] <= 256)


decode_attention_triton.eligible = _eligible
