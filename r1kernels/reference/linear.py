"""Few-row linear layers of the decode step (no autograd): the spec of r1kernels.ops.linear's CUDA kernel.

decode_linear(x [M, K], weight, bias=None, residual=None, gated=False), fp32 accumulation, one rounding:
- plain:    x @ weight.T + bias                        -> [M, N], x's dtype (F.linear)
- residual: residual += x @ weight.T, in place         -> residual (addmm_ with beta = 1: one rounding of
            residual + the fp32 product)
- gated:    weight is [2I, K], gate_proj's rows then up_proj's: silu_mul(g, u) of the two halves of
            x @ weight.T, each rounded to x's dtype first (the unfused MLP's rounding) -> [M, I]
The reference runs the same torch ops as the unfused model, so it is also the path for any row count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fused import silu_mul


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  residual: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    if residual is not None:
        return residual.addmm_(x, weight.t())
    y = F.linear(x, weight, bias)
    if gated:
        n = weight.shape[0] // 2
        return silu_mul(y[:, :n], y[:, n:])
    return y
