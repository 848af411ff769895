"""sample_tokens as the torch.library custom op r1kernels::sample_tokens over the Triton kernels (no autograd:
sampling is not differentiable). The fake makes it traceable by torch.compile(fullgraph=True)."""
from __future__ import annotations

import torch

from ..triton import sampling as _k

OP = "r1kernels::sample_tokens"


@torch.library.custom_op(OP, mutates_args=())
def sample_tokens_op(logits: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, temperature: float,
                     top_k: int, top_p: float, min_p: float, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _k.sample(logits, seeds, positions, temperature, top_k, top_p, min_p, greedy)


@sample_tokens_op.register_fake
def _(logits, seeds, positions, temperature, top_k, top_p, min_p, greedy):
    B = logits.shape[0]
    return logits.new_empty(B, dtype=torch.int64), logits.new_empty(B, dtype=torch.float32)


def sample_tokens_triton(logits, seeds, positions, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy=False):
    """-> (tokens int64 [B], fp32 log-prob [B]); see r1kernels.reference.sampling."""
    return sample_tokens_op(logits, seeds, positions, float(temperature), int(top_k), float(top_p), float(min_p),
                            bool(greedy))


def _eligible(logits, *a, **k):
    return logits.dtype in (torch.float32, torch.bfloat16, torch.float16)


sample_tokens_triton.eligible = _eligible
