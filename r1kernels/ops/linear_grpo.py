"""linear_grpo_loss: hidden [B, T, H] and the lm_head weight [V, H] -> the GRPO loss without holding the
[B, T, V] logits. Token level, per chunk of whole sequences: cuBLAS logits (hidden dtype) -> the fused
Triton loss kernel writing dLoss/dlogits into the chunk's own logits buffer -> the two gradient matmuls
(dhidden, dweight accumulated in fp32). Gradients are computed in the forward (like the logits kernel);
backward scales them by the upstream scalar in place (skipped when it is 1). Sequence level: the reference
loss on linear_token_logprobs (autograd; its backward recomputes each chunk's logits).
linear_token_logprobs: per chunk, logits -> the log-prob kernel (lse saved); backward recomputes each
chunk's logits, writes their gradient in place and runs the two gradient matmuls."""
from __future__ import annotations

import torch

from ..triton import logprob as _lk
from .grpo import STAT_KEYS, finish_stats, op_options, scale_saved_grads, sequence_level_loss, token_level

CHUNK_ROWS = 8192  # rows of logits per chunk: 8192 x 151936 bf16 = 2.5 GB


def _logits(h, weight, bias):
    z = h @ weight.t()
    return z + bias.to(z.dtype) if bias is not None else z


@torch.library.custom_op("r1kernels::linear_grpo_fwd", mutates_args=())
def linear_grpo_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                    adv: torch.Tensor, mask: torch.Tensor | None, old: torch.Tensor | None, ref: torch.Tensor | None,
                    num_items: torch.Tensor | None, *, num_items_f: float | None, max_completion_length: int | None,
                    temperature: float, epsilon: float, epsilon_high: float, delta: float | None, beta: float,
                    loss_type: str, kl_estimator: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    opts = dict(num_items_f=num_items_f, max_completion_length=max_completion_length, temperature=temperature,
                epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, beta=beta, loss_type=loss_type,
                kl_estimator=kl_estimator)
    dh = torch.empty_like(hidden)
    dw = torch.zeros(V, H, device=dev, dtype=torch.float32)
    db = torch.zeros(V if bias is not None else 0, device=dev, dtype=torch.float32)
    logp = torch.empty(B, T, device=dev, dtype=torch.float32)
    sums = torch.zeros(5, device=dev, dtype=torch.float32)
    bc = max(1, CHUNK_ROWS // max(T, 1))
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        z = _logits(hidden[b0:b1], weight, bias)
        s, logp[b0:b1] = token_level(z, ids, adv, mask, old, ref, num_items, z, (z.stride(0), z.stride(1)),
                                     rows=(b0, b1), **opts)
        sums += s
        z2 = z.view(-1, V)  # now dLoss/dlogits for sequences b0:b1
        dh[b0:b1] = (z2 @ weight).view(b1 - b0, T, H)
        dw.add_(z2.t() @ hidden[b0:b1].reshape(-1, H))
        if bias is not None:
            db.add_(z2.sum(0, dtype=torch.float32))
    return finish_stats(sums, mask, B, T), logp, dh, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else db


@linear_grpo_fwd.register_fake
def _(hidden, weight, bias, ids, adv, mask, old, ref, num_items, **opts):
    B, T, H = hidden.shape
    f = torch.float32
    return (hidden.new_empty(5, dtype=f), hidden.new_empty(B, T, dtype=f), torch.empty_like(hidden),
            torch.empty_like(weight), bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0, dtype=f))


def _setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*output[2:] if inputs[2] is not None else output[2:4])
    ctx.has_bias = inputs[2] is not None
    ctx.set_materialize_grads(False)


# The backward returns a gradient (or None) per positional (Tensor) argument; options are keyword-only.
_N_TENSOR_ARGS = sum(not a.kwarg_only for a in linear_grpo_fwd._opoverload._schema.arguments)


def _backward(ctx, g_stats, g_logp, g_dh, g_dw, g_db):
    grads = scale_saved_grads(ctx, None if g_stats is None else g_stats[0])  # (dh, dw[, db])
    return grads + (None,) * (_N_TENSOR_ARGS - len(grads))


linear_grpo_fwd.register_autograd(_backward, setup_context=_setup)


def linear_grpo_loss_triton(hidden, weight, completion_ids, advantages, completion_mask=None, *, bias=None,
                            temperature=1.0, old_logprobs=None, ref_logprobs=None, beta=0.0, epsilon=0.2,
                            epsilon_high=None, delta=None, loss_type="dapo", importance_sampling_level="token",
                            kl_estimator="k3", max_completion_length=None, num_items_in_batch=None):
    loss_opts = dict(beta=beta, epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
                     kl_estimator=kl_estimator, max_completion_length=max_completion_length,
                     num_items_in_batch=num_items_in_batch)
    if importance_sampling_level == "sequence":
        logp = linear_token_logprobs_triton(hidden, weight, completion_ids, bias=bias, temperature=temperature)
        return sequence_level_loss(logp, advantages, completion_mask, old_logprobs, ref_logprobs, loss_opts)
    nt, opts = op_options(temperature=temperature, **loss_opts)
    stats, logp, _, _, _ = linear_grpo_fwd(hidden, weight, bias, completion_ids, advantages, completion_mask,
                                           old_logprobs, ref_logprobs, nt, **opts)
    metrics = {k: stats[i + 1].detach() for i, k in enumerate(STAT_KEYS)}
    return stats[0], logp, metrics


def _eligible(hidden, weight, completion_ids, *a, **k):
    ok = (torch.float32, torch.bfloat16, torch.float16)
    return hidden.dim() == 3 and hidden.dtype in ok and weight.dtype == hidden.dtype


linear_grpo_loss_triton.eligible = _eligible


def _rows2d(hidden, labels):
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


@torch.library.custom_op("r1kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        temperature: float, entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, y = _rows2d(hidden, labels)
    N = h.shape[0]
    dev = hidden.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    ent = torch.empty(N if entropy else 0, device=dev, dtype=torch.float32)
    for r0 in range(0, N, CHUNK_ROWS):
        r1 = min(N, r0 + CHUNK_ROWS)
        lp, ls, en = _lk.logprob_fwd(_logits(h[r0:r1], weight, bias), y[r0:r1], temperature, entropy)
        logp[r0:r1], lse[r0:r1] = lp, ls
        if entropy:
            ent[r0:r1] = en
    lead = labels.shape
    return logp.view(lead), lse.view(lead), ent.view(lead) if entropy else ent


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, entropy):
    f = hidden.new_empty(labels.shape, dtype=torch.float32)
    return f, torch.empty_like(f), torch.empty_like(f) if entropy else f.new_empty(0)


@torch.library.custom_op("r1kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        lse: torch.Tensor, ent: torch.Tensor, g_logp: torch.Tensor, g_ent: torch.Tensor | None,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, y = _rows2d(hidden, labels)
    N, H = h.shape
    lse, g = lse.reshape(-1), g_logp.reshape(-1).float()
    ent = ent.reshape(-1) if g_ent is not None else lse
    ge = g_ent.reshape(-1).float() if g_ent is not None else None
    dh = torch.empty_like(h)
    dw = torch.zeros(weight.shape, device=h.device, dtype=torch.float32)
    db = torch.zeros(weight.shape[0] if bias is not None else 0, device=h.device, dtype=torch.float32)
    for r0 in range(0, N, CHUNK_ROWS):
        r1 = min(N, r0 + CHUNK_ROWS)
        z = _logits(h[r0:r1], weight, bias)
        _lk.logprob_bwd(z, y[r0:r1], lse[r0:r1], ent[r0:r1], g[r0:r1], ge[r0:r1] if ge is not None else None,
                        temperature, out=z, out_strides=(0, z.stride(0)))
        dh[r0:r1] = z @ weight
        dw.add_(z.t() @ h[r0:r1])
        if bias is not None:
            db.add_(z.sum(0, dtype=torch.float32))
    return dh.view(hidden.shape), dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else db


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, temperature):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0, dtype=torch.float32))


def _lp_setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, entropy = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1], output[2])
    ctx.temperature, ctx.entropy = temperature, entropy
    ctx.set_materialize_grads(False)


def _lp_backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    if g_logp is None and g_ent is None:
        return None, None, None, None, None, None
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    dh, dw, db = linear_logprobs_bwd(hidden, weight, bias, labels, lse, ent, g_logp,
                                     g_ent if ctx.entropy else None, ctx.temperature)
    return dh, dw, db if bias is not None else None, None, None, None


linear_logprobs_fwd.register_autograd(_lp_backward, setup_context=_lp_setup)


def linear_token_logprobs_triton(hidden, weight, labels, bias=None, temperature=1.0, return_entropy=False):
    logp, _, ent = linear_logprobs_fwd(hidden, weight, bias, labels, float(temperature), bool(return_entropy))
    return (logp, ent) if return_entropy else logp


def _lp_eligible(hidden, weight, labels, *a, **k):
    return hidden.dtype in (torch.float32, torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype


linear_token_logprobs_triton.eligible = _lp_eligible
