"""The clipped GRPO loss family (DESIGN.md section 3), from log-probs, logits, or hidden states."""
from __future__ import annotations

import torch

from .logprob import acc, linear_token_logprobs, token_logprobs

# The one table of the loss family. A loss type's code (the Triton kernel's constexpr LOSS) is its index
# in LOSS_TYPES; a KL estimator's code (constexpr KL) its index in KL_ESTIMATORS. LOSS_REDUCTION says how
# sum_bt m*L is normalized (DESIGN.md section 3): "sequence" mean_b(sum_t mL / max(sum_t m, 1)), "tokens"
# sum mL / max(sum m, 1), "length" sum mL / (B * (max_completion_length or T)), "items"
# sum mL / (num_items_in_batch or sum m); only "items" reads num_items_in_batch.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
# sapo is averaged per sequence, then over sequences, as TRL 1.16 and Liger 0.8.5 do.
LOSS_REDUCTION = {"grpo": "sequence", "bnpo": "tokens", "dr_grpo": "length", "dapo": "items", "cispo": "items",
                  "sapo": "sequence"}
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
IS_LEVELS = ("token", "sequence")
LOSS_CODE = {name: i for i, name in enumerate(LOSS_TYPES)}
KL_CODE = {name: i for i, name in enumerate(KL_ESTIMATORS)}
# SAPO's gate temperatures (tau for A > 0, tau for A <= 0); the kernels take them as values.
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05


def kl_per_token(logp, ref_logp, estimator):
    """KL(policy || ref) estimate per token from l = logp, l_ref = ref_logp."""
    d = ref_logp - logp  # log(p_ref / p)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    d = d.clamp(-20.0, 20.0)  # low_var_kl
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def per_token_objective(logp, old_logp, adv, mask, *, epsilon, epsilon_high, delta, loss_type,
                        importance_sampling_level):
    """Per-token surrogate loss L [B, T] and the importance ratio r [B, T] (or [B, 1] at sequence level)."""
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    r = torch.exp(log_ratio)
    if loss_type == "cispo":
        return -torch.clamp(r, max=epsilon_high).detach() * adv * logp, r
    if loss_type == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, SAPO_TAU_POS), torch.full_like(adv, SAPO_TAU_NEG))
        return -adv * torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau, r
    r_unclipped = torch.clamp(r, max=delta) if delta is not None else r
    r_clipped = torch.clamp(r, 1.0 - epsilon, 1.0 + epsilon_high)
    return -torch.min(r_unclipped * adv, r_clipped * adv), r


def reduce_loss(L, mask, loss_type, max_completion_length, num_items_in_batch):
    B, T = L.shape
    mL = L * mask
    reduction = LOSS_REDUCTION[loss_type]
    if reduction == "sequence":
        return (mL.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if reduction == "tokens":
        return mL.sum() / mask.sum().clamp(min=1.0)
    if reduction == "length":
        return mL.sum() / (B * (max_completion_length or T))
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1.0)
    return mL.sum() / denom


def grpo_loss_from_logprobs(logp, advantages, completion_mask=None, old_logprobs=None, ref_logprobs=None,
                            beta=0.0, epsilon=0.2, epsilon_high=None, delta=None, loss_type="dapo",
                            importance_sampling_level="token", kl_estimator="k3", max_completion_length=None,
                            num_items_in_batch=None):
    """logp [B, T] fp32 (differentiable) -> (loss, metrics). All other tensors are constants."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = torch.ones_like(logp) if completion_mask is None else completion_mask.to(logp.dtype)
    adv = acc(advantages)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    old = logp.detach() if old_logprobs is None else acc(old_logprobs)
    L, r = per_token_objective(logp, old, adv, mask, epsilon=epsilon, epsilon_high=eps_high, delta=delta,
                               loss_type=loss_type, importance_sampling_level=importance_sampling_level)
    n_tok = mask.sum().clamp(min=1.0)
    kl_mean = logp.new_zeros(())
    if ref_logprobs is not None:
        kl = kl_per_token(logp, acc(ref_logprobs), kl_estimator)
        if beta != 0.0:
            L = L + beta * kl
        kl_mean = (kl.detach() * mask).sum() / n_tok
    loss = reduce_loss(L, mask, loss_type, max_completion_length, num_items_in_batch)
    with torch.no_grad():
        rr = r.expand_as(mask)
        low = ((rr < 1.0 - epsilon) & (adv < 0)).to(mask.dtype)
        high = ((rr > 1.0 + eps_high) & (adv > 0)).to(mask.dtype)
        metrics = {
            "kl": kl_mean,
            "clip_ratio/low_mean": (low * mask).sum() / n_tok,
            "clip_ratio/high_mean": (high * mask).sum() / n_tok,
            "clip_ratio/region_mean": (torch.maximum(low, high) * mask).sum() / n_tok,
        }
    return loss, metrics


def grpo_loss(logits, completion_ids, advantages, completion_mask=None, temperature=1.0, **kw):
    """logits [B, T, V] aligned with completion_ids [B, T] -> (loss, per_token_logprobs [B, T], metrics)."""
    logp = token_logprobs(logits, completion_ids, temperature)
    loss, metrics = grpo_loss_from_logprobs(logp, advantages, completion_mask, **kw)
    return loss, logp, metrics


def linear_grpo_loss(hidden, weight, completion_ids, advantages, completion_mask=None, bias=None,
                     temperature=1.0, **kw):
    """hidden [B, T, H], weight [V, H]: grpo_loss(hidden @ weight.T + bias, ...) without [B, T, V]."""
    logp = linear_token_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature)
    loss, metrics = grpo_loss_from_logprobs(logp, advantages, completion_mask, **kw)
    return loss, logp, metrics
