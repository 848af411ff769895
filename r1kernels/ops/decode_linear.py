"""decode_linear as torch.library custom ops over r1kernels.triton.decode_linear (inference only: no autograd):
r1kernels::decode_linear (out = x @ W^T + bias, or silu(x @ W^T) * (x @ W_up^T)) and
r1kernels::decode_linear_residual_ (residual += x @ W^T + bias, in place; declared mutated). The fakes make them
traceable by torch.compile."""
from __future__ import annotations

import torch

from ..reference import decode_linear as _ref
from ..triton import decode_linear as _k


@torch.library.custom_op("r1kernels::decode_linear", mutates_args=())
def decode_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     up_weight: torch.Tensor | None = None) -> torch.Tensor:
    if not _k.aligned(x, weight, up_weight):  # a view at an odd offset: no tensor descriptor over it
        return _ref(x, weight, bias, None, up_weight)
    return _k.decode_linear(x, weight, bias_N=bias, w2_NK=up_weight)


@decode_linear_op.register_fake
def _(x, weight, bias=None, up_weight=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("r1kernels::decode_linear_residual_", mutates_args=("residual",))
def decode_linear_residual_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                              bias: torch.Tensor | None = None) -> None:
    if not _k.aligned(x, weight):
        _ref(x, weight, bias, residual)
    else:
        _k.decode_linear(x, weight, bias_N=bias, residual_MN=residual)


@decode_linear_residual_op.register_fake
def _(x, weight, residual, bias=None):
    return None


def decode_linear_triton(x, weight, bias=None, residual=None, up_weight=None):
    if residual is not None:
        decode_linear_residual_op(x, weight, residual, bias)
        return residual
    return decode_linear_op(x, weight, bias, up_weight)


decode_linear_triton.eligible = lambda x, weight, bias=None, residual=None, up_weight=None: \
    _k.eligible(x, weight, bias, residual, up_weight)
