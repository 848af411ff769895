"""Projection of a decode step (no autograd needed; the spec of r1kernels.triton.decode_linear and its fallback).

decode_linear(x [M, K], weight [N, K], bias [N] = None, residual [M, N] = None, up_weight [N, K] = None):
  y = x @ weight^T (+ bias);  with up_weight: y = silu(x @ weight^T) * (x @ up_weight^T) (SwiGLU; weight is
  gate_proj's, bias not allowed);  with residual: residual += y in place, and residual is returned.
The math is real-number math; this reference runs it as the engine's cuBLAS forms in x's dtype (F.linear,
addmm_ with the residual, silu_mul over the two products, one GEMM over gate/up when their weights lie back
to back), so it serves prefill-sized inputs too; the kernel
accumulates in fp32 and rounds once. Both are tested against float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import silu_mul


def _back_to_back(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a and b [N, K] as one [2N, K] view when b starts where a ends in one storage (gate_proj / up_proj under
    DeepSpeed ZeRO 1/2's flat layout): one GEMM for both."""
    if torch.compiler.is_compiling():  # storages are not traceable: two GEMMs
        return None
    if a.is_contiguous() and b.is_contiguous() and a.untyped_storage().data_ptr() == \
            b.untyped_storage().data_ptr() and b.storage_offset() == a.storage_offset() + a.numel():
        return a.as_strided((2 * a.shape[0], a.shape[1]), a.stride())
    return None


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, up_weight: torch.Tensor | None = None) -> torch.Tensor:
    if up_weight is not None:
        both = _back_to_back(weight, up_weight)
        if both is not None:
            gu = F.linear(x, both)
            return silu_mul(gu[:, :weight.shape[0]], gu[:, weight.shape[0]:])
        y = silu_mul(F.linear(x, weight), F.linear(x, up_weight))
    elif residual is not None and bias is None:
        return residual.addmm_(x, weight.t())
    else:
        y = F.linear(x, weight, bias)
    return residual.add_(y) if residual is not None else y
