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


def stacked(ws: list[torch.Tensor]) -> torch.Tensor | None:
    """2-D tensors of one dtype, device and column count that lie back to back in one storage, each contiguous
    (gate_proj then up_proj, or q/k/v, under DeepSpeed ZeRO 1/2's flat layout), as one [sum of rows, K] view
    (sharing their autograd state); None otherwise."""
    w0 = ws[0]
    if any(w.dtype != w0.dtype or w.device != w0.device or w.dim() != 2 or w.shape[1] != w0.shape[1]
           or not w.is_contiguous() or w.untyped_storage().data_ptr() != w0.untyped_storage().data_ptr()
           for w in ws):
        return None
    off = w0.storage_offset()
    for w in ws:
        if w.storage_offset() != off:
            return None
        off += w.numel()
    return w0.as_strided((sum(w.shape[0] for w in ws), w0.shape[1]), (w0.shape[1], 1))


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, up_weight: torch.Tensor | None = None) -> torch.Tensor:
    if up_weight is not None:
        # one GEMM over both where they lie back to back (storages are not traceable: two GEMMs while compiling)
        both = None if torch.compiler.is_compiling() else stacked([weight, up_weight])
        if both is not None:
            gu = F.linear(x, both)
            return silu_mul(gu[:, :weight.shape[0]], gu[:, weight.shape[0]:])
        y = silu_mul(F.linear(x, weight), F.linear(x, up_weight))
    elif residual is not None and bias is None:
        return residual.addmm_(x, weight.t())
    else:
        y = F.linear(x, weight, bias)
    return residual.add_(y) if residual is not None else y
