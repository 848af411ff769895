"""token_logprobs as torch.library custom ops over the Triton kernels: r1kernels::token_logprobs_fwd
returns (logp, lse, entropy); its autograd (every output's gradient, lse's included) calls
r1kernels::token_logprobs_bwd (one read of the logits, one write of their gradient). Fakes make both traceable by
torch.compile(fullgraph=True)."""
from __future__ import annotations

import torch

from ..triton import logprob as _k

FWD = "r1kernels::token_logprobs_fwd"
BWD = "r1kernels::token_logprobs_bwd"


@torch.library.custom_op(FWD, mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                       entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp, lse, ent = _k.logprob_fwd(logits, labels, temperature, entropy)
    lead = labels.shape
    return logp.view(lead), lse.view(lead), ent.view(lead) if entropy else ent


@token_logprobs_fwd.register_fake
def _(logits, labels, temperature, entropy):
    f = labels.new_empty(labels.shape, dtype=torch.float32)
    return f, torch.empty_like(f), torch.empty_like(f) if entropy else f.new_empty(0)


@torch.library.custom_op(BWD, mutates_args=())
def token_logprobs_bwd(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                       grad_logp: torch.Tensor, grad_ent: torch.Tensor | None, temperature: float) -> torch.Tensor:
    return _k.logprob_bwd(logits, labels, lse.reshape(-1), ent.reshape(-1), grad_logp, grad_ent, temperature)


@token_logprobs_bwd.register_fake
def _(logits, labels, lse, ent, grad_logp, grad_ent, temperature):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup(ctx, inputs, output):
    logits, labels, temperature, entropy = inputs
    _, lse, ent = output
    ctx.save_for_backward(logits, labels, lse, ent)
    ctx.temperature, ctx.entropy = temperature, entropy
    ctx.set_materialize_grads(False)


def _backward(ctx, g_logp, g_lse, g_ent):
    """d logp / dz = (onehot - p) / T and d lse / dz = p / T = (onehot - (onehot - p)) / T: the kernel's log-prob
    gradient at weights g_logp - g_lse, then g_lse / T added at each row's label (N elements, in logits' dtype: in
    bf16 that element rounds twice, as the sum of two bf16 gradients would)."""
    logits, labels, lse, ent = ctx.saved_tensors
    if g_ent is not None and not ctx.entropy:
        g_ent = None
    g = torch.zeros_like(lse) if g_logp is None else g_logp
    if g_lse is not None:
        g = g - g_lse
    d = token_logprobs_bwd(logits, labels, lse, ent, g, g_ent, ctx.temperature)
    if g_lse is not None:
        at_label = (g_lse / ctx.temperature).reshape(-1, 1).to(d.dtype)
        d.view(-1, d.shape[-1]).scatter_add_(1, labels.reshape(-1, 1).long(), at_label)
    return d, None, None, None


token_logprobs_fwd.register_autograd(_backward, setup_context=_setup)


def token_logprobs_lse_triton(logits, labels, temperature=1.0, return_entropy=False):
    """reference.token_logprobs_lse's contract: (logp, lse, entropy or None), each differentiable."""
    logp, lse, ent = token_logprobs_fwd(logits, labels, float(temperature), bool(return_entropy))
    return logp, lse, ent if return_entropy else None


def token_logprobs_triton(logits, labels, temperature=1.0, return_entropy=False):
    logp, _, ent = token_logprobs_lse_triton(logits, labels, temperature, return_entropy)
    return (logp, ent) if return_entropy else logp


def _eligible(logits, labels, *a, **k):
    return logits.dtype in (torch.float32, torch.bfloat16, torch.float16)


token_logprobs_triton.eligible = _eligible
token_logprobs_triton.with_lse = token_logprobs_lse_triton  # the same kernels, lse returned (the verl drop-ins)
