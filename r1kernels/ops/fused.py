"""rms_norm, apply_rotary and silu_mul as torch.library custom ops (r1kernels::rms_norm, ::apply_rotary,
::silu_mul) over the Triton kernels of r1kernels.triton.fused, and the few-row GEMMs of a decode step
(::skinny_linear, ::swiglu, ::linear_residual_) over r1kernels.triton.skinny. Inference only: no autograd.
The fakes make them traceable by torch.compile(fullgraph=True); see r1kernels.reference.fused for the spec."""
from __future__ import annotations

import torch

from ..triton import fused as _k
from ..triton import skinny as _sk

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("r1kernels::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _k.rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("r1kernels::apply_rotary", mutates_args=())
def apply_rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.apply_rotary(q, k, cos, sin)


@apply_rotary_op.register_fake
def _(q, k, cos, sin):
    return _k._out_like(q), _k._out_like(k)


@torch.library.custom_op("r1kernels::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _k.silu_mul(gate, up)


@silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


def rms_norm_triton(x, weight, eps=1e-6):
    """HF Qwen2RMSNorm / LlamaRMSNorm over the last dim -> promote_types(weight.dtype, x.dtype)."""
    return rms_norm_op(x, weight, float(eps))


def _rms_norm_eligible(x, weight, *a, **k):
    return (x.dtype in _FLOATS and weight.dtype in _FLOATS and x.dim() >= 1 and weight.dim() == 1
            and weight.shape[0] == x.shape[-1] and x.shape[-1] <= _k.MAX_H)


rms_norm_triton.eligible = _rms_norm_eligible


def apply_rotary_triton(q, k, cos, sin):
    """HF apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1) -> (q_embed, k_embed)."""
    return apply_rotary_op(q, k, cos, sin)


def _apply_rotary_eligible(q, k, cos, sin, *a, **kw):
    if not all(t.dtype in _FLOATS for t in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return False
    B, _, T, D = q.shape
    return (D % 2 == 0 and k.shape[0] == B and k.shape[2] == T and k.shape[3] == D
            and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (T, D) and sin.shape == cos.shape)


apply_rotary_triton.eligible = _apply_rotary_eligible


def silu_mul_triton(gate, up):
    """F.silu(gate) * up, in gate's dtype."""
    return silu_mul_op(gate, up)


def _silu_mul_eligible(gate, up, *a, **k):
    return gate.dtype in _FLOATS and up.dtype in _FLOATS and gate.shape == up.shape


silu_mul_triton.eligible = _silu_mul_eligible


@torch.library.custom_op("r1kernels::skinny_linear", mutates_args=())
def skinny_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _sk.linear(x, weight, bias)


@skinny_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("r1kernels::swiglu", mutates_args=())
def swiglu_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    return _sk.swiglu(x, w_gate, w_up)


@swiglu_op.register_fake
def _(x, w_gate, w_up):
    return x.new_empty(*x.shape[:-1], w_gate.shape[0])


@torch.library.custom_op("r1kernels::linear_residual_", mutates_args=("residual",))
def linear_residual_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> None:
    _sk.linear_residual_(x, weight, residual)


def _few_rows(x, *weights):
    """x [..., K] of at most MAX_M rows against row-major [N, K] weights of x's dtype."""
    K = x.shape[-1]
    return (x.dtype in _FLOATS and x.dim() >= 1 and x.numel() // max(K, 1) <= _sk.MAX_M and K > 0
            and all(w.dim() == 2 and w.shape[1] == K and w.dtype == x.dtype and w.stride(1) == 1
                    for w in weights))


def linear_triton(x, weight, bias=None):
    """F.linear(x, weight, bias) for a decode step's few rows."""
    return skinny_linear_op(x, weight, bias)


linear_triton.eligible = lambda x, weight, bias=None: _few_rows(x, weight) and (
    bias is None or (bias.dtype == x.dtype and bias.shape == (weight.shape[0],) and bias.stride(0) == 1))


def swiglu_triton(x, w_gate, w_up):
    """silu(x W_g^T) * (x W_u^T) for a decode step's few rows."""
    return swiglu_op(x, w_gate, w_up)


swiglu_triton.eligible = lambda x, w_gate, w_up: _few_rows(x, w_gate, w_up) and w_gate.shape == w_up.shape


def linear_residual_triton(x, weight, residual):
    """residual += x W^T in place for a decode step's few rows; returns residual."""
    linear_residual_op(x, weight, residual)
    return residual


linear_residual_triton.eligible = lambda x, weight, residual: (
    _few_rows(x, weight) and residual.is_contiguous() and residual.dtype == x.dtype
    and residual.shape == (*x.shape[:-1], weight.shape[0]))
