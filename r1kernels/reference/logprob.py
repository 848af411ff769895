"""Token log-probabilities (and entropy) of labels under softmax(logits / T), fp32 math."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def acc(x):
    """Accumulation dtype: fp32 for fp16/bf16/fp32 inputs; float64 is kept (gradcheck, float64 tests)."""
    return x if x.dtype == torch.float64 else x.float()


# Rows of hidden states per chunk in linear_token_logprobs: the chunk's [rows, V] fp32 logits are the
# only vocab-sized buffer alive at once (4096 x 151936 x 4 B = 2.5 GB).
LINEAR_CHUNK_ROWS = 4096


def token_logprobs(logits, labels, temperature=1.0, return_entropy=False):
    """logits [..., V], labels [...] -> fp32 log p(label) [...] (and fp32 entropy [...])."""
    logp, _, entropy = token_logprobs_lse(logits, labels, temperature, return_entropy)
    return (logp, entropy) if return_entropy else logp


def token_logprobs_lse(logits, labels, temperature=1.0, return_entropy=False):
    """-> (log p(label), lse = logsumexp(logits / T), entropy or None) [...], fp32, each differentiable."""
    z = acc(logits)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) - lse
    if not return_entropy:
        return logp, lse, None
    p = torch.softmax(z, dim=-1)
    # a column with p = 0 (a -inf logit: a masked vocabulary) adds 0 to sum p z (0 log 0 = 0) and 0 to its
    # gradient: its z enters as 0, not as 0 * -inf = NaN (a where on the product would leave NaN in backward)
    return logp, lse, lse - (p * torch.where(p > 0, z, 0.0)).sum(-1)


def _chunk(hidden_NH, weight_VH, bias_V, labels_N, temperature, return_entropy, softcap):
    # float64 with any other dtype computes in float64 (acc keeps float64 alone: the GEMM needs one dtype)
    h, w = acc(hidden_NH), acc(weight_VH)
    dt = torch.promote_types(h.dtype, w.dtype)
    logits_NV = h.to(dt) @ w.to(dt).t()
    if bias_V is not None:
        logits_NV = logits_NV + acc(bias_V)
    if softcap is not None:
        logits_NV = softcap * torch.tanh(logits_NV / softcap)
    out = token_logprobs(logits_NV, labels_N, temperature, return_entropy)
    return out if return_entropy else (out,)


def linear_token_logprobs(hidden, weight, labels, bias=None, temperature=1.0, return_entropy=False,
                          chunk_rows=LINEAR_CHUNK_ROWS, softcap=None):
    """Same as token_logprobs(hidden @ weight.T + bias, labels) without holding the [N, V] logits:
    each chunk of rows is recomputed in backward (activation checkpointing). softcap: the logits are
    softcap * tanh(z / softcap) of z = hidden @ weight.T + bias, before the temperature (Gemma 2)."""
    lead = hidden.shape[:-1]
    hidden_NH = hidden.reshape(-1, hidden.shape[-1])
    labels_N = labels.reshape(-1)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    outs = []
    # no rows: one empty chunk, so the (empty) outputs still come from weight and hidden in the autograd graph
    for s in range(0, max(hidden_NH.shape[0], 1), chunk_rows):
        args = (hidden_NH[s:s + chunk_rows], weight, bias, labels_N[s:s + chunk_rows], temperature, return_entropy,
                softcap)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    logp = torch.cat([o[0] for o in outs]).reshape(lead)
    if not return_entropy:
        return logp
    return logp, torch.cat([o[1] for o in outs]).reshape(lead)
