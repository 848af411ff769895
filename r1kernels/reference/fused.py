"""Small fused inference ops of a Qwen2/Llama decode step (no autograd): the spec of r1kernels.triton.fused.

- rms_norm(x, weight, eps): Hugging Face Qwen2RMSNorm / LlamaRMSNorm. h = x * rsqrt(mean(x^2, -1) + eps) in
  fp32, rounded to x.dtype (as HF does), times weight in fp32, rounded once to
  promote_types(weight.dtype, x.dtype) (HF's product in that dtype rounds the same fp32 product).
- apply_rotary(q, k, cos, sin): HF apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1); q [B, Hq, T, D],
  k [B, Hk, T, D], cos/sin [B or 1, T, D]; x * cos + rotate_half(x) * sin, rotate_half(x) =
  cat(-x[..., D/2:], x[..., :D/2]), in fp32, rounded once to q's / k's dtype.
- silu_mul(gate, up): F.silu(gate) * up (HF MLP act_fn(gate_proj(x)) * up_proj(x)) in fp32, rounded once to
  gate's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    return (weight.float() * h.to(x.dtype).float()).to(out_dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    qf, kf = q.float(), k.float()
    return (qf * c + _rotate_half(qf) * s).to(q.dtype), (kf * c + _rotate_half(kf) * s).to(k.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
