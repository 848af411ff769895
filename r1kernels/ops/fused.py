"""rms_norm, apply_rotary and silu_mul as torch.library custom ops (r1kernels::rms_norm, ::apply_rotary,
::silu_mul) over the Triton kernels of r1kernels.triton.fused, each with one autograd path (register_autograd)
for eager and compiled calls: the backwards are custom ops too (::rms_norm_backward, ::silu_mul_backward;
the rotary's is the forward op with sin's halves swapped and negated). Only x/weight, gate/up and q/k get
gradients: cos and sin are taken as constants (rotary_eligible declines them when they require grad). The
fakes make every op traceable by torch.compile(fullgraph=True); see r1kernels.reference.fused for the spec."""
from __future__ import annotations

import torch

from ..triton import fused as _k

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("r1kernels::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _k.rms_norm(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("r1kernels::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                         need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw = _k.rms_norm_backward(dy, x, weight, eps, need_dw)
    return dx, (dw if dw is not None else weight.new_empty(0))


@rms_norm_backward_op.register_fake
def _(dy, x, weight, eps, need_dw):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if need_dw else (0,))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_bwd(ctx, dy):
    x, weight = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = rms_norm_backward_op(dy, x, weight, ctx.eps, need_w)
    return (dx if need_x else None), (dw if need_w else None), None


rms_norm_op.register_autograd(_rms_norm_bwd, setup_context=_rms_norm_setup)


@torch.library.custom_op("r1kernels::apply_rotary", mutates_args=())
def apply_rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.apply_rotary(q, k, cos, sin)


@apply_rotary_op.register_fake
def _(q, k, cos, sin):
    return _k._out_like(q), _k._out_like(k)


def _rotary_setup(ctx, inputs, output):
    q, k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.meta = [(t.shape, t.dtype, t.device) for t in (q, k)]


def _rotary_bwd(ctx, dq, dk):
    # q_out = [q1 c1 - q2 s1, q2 c2 + q1 s2]  =>  dq = [d1 c1 + d2 s2, d2 c2 - d1 s1]: the forward with cos and
    # sin' = -[s2, s1] (sin's halves swapped; HF's cos/sin have equal halves, any others are accepted too)
    cos, sin = ctx.saved_tensors
    dq, dk = [torch.zeros(s, dtype=dt, device=dev) if d is None else d for d, (s, dt, dev) in zip((dq, dk), ctx.meta)]
    s1, s2 = sin.chunk(2, -1)
    gq, gk = apply_rotary_op(dq, dk, cos, -torch.cat([s2, s1], -1))
    return gq, gk, None, None


apply_rotary_op.register_autograd(_rotary_bwd, setup_context=_rotary_setup)


@torch.library.custom_op("r1kernels::silu_mul", mutates_args=())
def silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _k.silu_mul(gate, up)


@silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("r1kernels::silu_mul_backward", mutates_args=())
def silu_mul_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.silu_mul_backward(dy, gate, up)


@silu_mul_backward_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_bwd(ctx, dy):
    return silu_mul_backward_op(dy, *ctx.saved_tensors)


silu_mul_op.register_autograd(_silu_mul_bwd, setup_context=_silu_mul_setup)


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
    if cos.requires_grad or sin.requires_grad:  # the kernel's backward gives q and k gradients only
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
