"""The clipped GRPO loss family (DESIGN.md section 3), from log-probs, logits, or hidden states."""
from __future__ import annotations

import math

import torch

from .logprob import acc, linear_token_logprobs, token_logprobs

# The one table of the loss family. A loss type's code (the Triton kernel's constexpr LOSS) is its index
# in LOSS_TYPES; a KL estimator's code (constexpr KL) its index in KL_ESTIMATORS. LOSS_REDUCTION says how
# sum_bt m*L is normalized (DESIGN.md section 3): "sequence" mean_b(sum_t mL / max(sum_t m, 1)), "tokens"
# sum mL / max(sum m, 1), "length" sum mL / (B * (max_completion_length or T)), "items"
# sum mL / (num_items_in_batch or sum m); only "items" reads num_items_in_batch.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# sapo is averaged per sequence, then over sequences, as TRL 1.16 and Liger 0.8.5 do; luspo sums each
# sequence and averages over sequences ("sequence_sum": mean_b sum_t mL).
LOSS_REDUCTION = {"grpo": "sequence", "bnpo": "tokens", "dr_grpo": "length", "dapo": "items", "cispo": "items",
                  "sapo": "sequence", "luspo": "sequence_sum", "vespo": "items"}
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
IS_LEVELS = ("token", "sequence")
# Rollout correction (TRL's vllm_importance_sampling_mode): w = exp(l_old - l_sampling), per token or
# summed over the sequence, clipped to [clip_min, clip_max] (truncate) or zero outside it (mask).
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
LOSS_CODE = {name: i for i, name in enumerate(LOSS_TYPES)}
KL_CODE = {name: i for i, name in enumerate(KL_ESTIMATORS)}
# SAPO's default gate temperatures (TRL's sapo_temperature_pos / _neg: tau for A > 0, for A <= 0).
SAPO_TAU_POS, SAPO_TAU_NEG = 1.0, 1.05
# The options beyond the clipped core, with TRL 1.16's names and defaults (trl/trainer/grpo_config.py).
EXTRA_DEFAULTS = dict(
    sampling_logprobs=None, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="sequence_mask",
    vllm_importance_sampling_clip_max=3.0, vllm_importance_sampling_clip_min=None, off_policy_mask_threshold=None,
    use_bias_correction_kl=True, sapo_temperature_pos=SAPO_TAU_POS, sapo_temperature_neg=SAPO_TAU_NEG,
    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, top_entropy_quantile=1.0,
    entropy_coef=0.0, compute_entropy=False)


def _number(name, v, lo=None, *, strict=False, none_ok=False):
    if v is None and none_ok:
        return
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (math.inf, -math.inf):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v < lo or (strict and v == lo)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {lo}, got {v}")


def check_extra_options(loss_type, importance_sampling_level, **o):
    """ValueError naming the key for a bad value of an EXTRA_DEFAULTS option (tensors aside); absent: default."""
    o = {**EXTRA_DEFAULTS, **o}
    for name in ("vllm_importance_sampling_correction", "use_bias_correction_kl", "compute_entropy"):
        if not isinstance(o[name], bool):
            raise ValueError(f"{name} must be a bool, got {o[name]!r}")
    mode = o["vllm_importance_sampling_mode"]
    if mode not in IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {IS_MODES}, got {mode!r}")
    lo, hi = o["vllm_importance_sampling_clip_min"], o["vllm_importance_sampling_clip_max"]
    _number("vllm_importance_sampling_clip_min", lo, 0.0, none_ok=True)
    _number("vllm_importance_sampling_clip_max", hi, 0.0, strict=True, none_ok=True)
    if lo is not None and hi is not None and lo >= hi:
        raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be less than "
                         f"vllm_importance_sampling_clip_max ({hi})")
    if mode.endswith("truncate") and lo is None and hi is None:
        raise ValueError("vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max must be set with "
                         f"vllm_importance_sampling_mode={mode!r}")
    _number("off_policy_mask_threshold", o["off_policy_mask_threshold"], 0.0, none_ok=True)
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        _number(name, o[name], 0.0, strict=True)
    for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        _number(name, o[name], 0.0)
    q = o["top_entropy_quantile"]
    _number("top_entropy_quantile", q, 0.0)  # 0: only the highest-entropy token(s), as TRL's [0, 1]
    if q > 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {q}")
    _number("entropy_coef", o["entropy_coef"])
    if loss_type == "luspo" and importance_sampling_level != "sequence":
        raise ValueError("loss_type='luspo' needs importance_sampling_level='sequence' (LUSPO scales GSPO's "
                         f"sequence ratio), got importance_sampling_level={importance_sampling_level!r}")
    if loss_type == "vespo" and o["vllm_importance_sampling_correction"] and mode.startswith("sequence") \
            and o.get("sampling_logprobs") is not None:
        raise ValueError("loss_type='vespo' folds token importance-sampling weights into its sequence weight: "
                         f"vllm_importance_sampling_mode must be token_truncate or token_mask, got {mode!r}")


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


def rollout_is_weights(old, sampling, mask, mode, clip_min, clip_max):
    """TRL's vLLM importance-sampling weights (constants): [B, T] for token modes, [B, 1] for sequence
    modes. NaN sampling log-probs (not scored) count as no correction."""
    d = ((old - sampling) * mask).nan_to_num(0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    w = torch.exp(d)
    if mode.endswith("truncate"):
        return torch.clamp(w, min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return w.masked_fill((w < lo) | (w > hi), 0.0)


def off_policy_mask(adv, logp, sampling, mask, threshold):
    """DeepSeek-V3.2 off-policy sequence mask [B, 1]: keep when A >= 0 or the masked mean of
    l_sampling - l (detached; NaN counts 0) is <= threshold."""
    kl = (sampling - logp.detach()).nan_to_num(0.0)
    avg = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((adv >= 0) | (avg <= threshold)).to(mask.dtype)


def vespo_weights(adv, log_ratio, mask, is_w, k_pos, lambda_pos, k_neg, lambda_neg):
    """VESPO's gamma weight phi(w) = exp(lambda + k log w - lambda w) [B, 1] (a constant), w the sequence
    ratio exp(sum_t m clamp(l - l_old, +-20)) times the token IS weights' product (TRL's get_gamma_weights)."""
    with torch.no_grad():
        lo = math.log(1e-8)
        seq = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_w is not None:
            seq = seq + torch.log(is_w).clamp(lo, 20.0).sum(-1, keepdim=True)
        log_w = seq.clamp(lo, 20.0)
        pos = adv >= 0
        k = torch.where(pos, k_pos, k_neg)
        lam = torch.where(pos, lambda_pos, lambda_neg).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def gather_varsize(x, group=None):
    """x [n] of every process of the torch.distributed process group `group`, concatenated in rank order,
    whatever each process's n (sizes all-gathered first, then the values padded to the largest, all-gathered
    and unpadded: TRL's pad_across_processes + gather). x itself when group is None, torch.distributed is not
    initialized, or the group has one process. A collective: every process of the group must call it."""
    if group is None:
        return x
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return x
    world = dist.get_world_size(group)
    if world == 1:
        return x
    n = torch.tensor([x.numel()], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in torch.cat(sizes).tolist()]  # one host read
    if max(sizes) == 0:
        return x
    buf = x.new_zeros(max(sizes))
    buf[:x.numel()] = x
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p[:k] for p, k in zip(parts, sizes)])


def entropy_threshold(entropy, mask, quantile, group=None):
    """The (1 - quantile) quantile of the masked tokens' entropies (detached), over every process of the
    torch.distributed process group `group` (TRL's get_high_entropy_mask gathers all processes' masked
    entropies); group None: this call's tokens only. None when no process has a masked-in token."""
    h = entropy.detach()
    sel = acc(h[mask.bool()])  # fp32 (TRL), float64 kept: the threshold is one of the values or between two
    sel = gather_varsize(sel.contiguous(), group)
    if sel.numel() == 0:
        return None
    return torch.quantile(sel, 1.0 - quantile)


def high_entropy_mask(entropy, mask, quantile, group=None):
    """TRL's get_high_entropy_mask with threshold 1 - quantile: mask & (H >= the (1 - quantile) quantile
    of the masked tokens' entropies); all False when no token is masked in. group: a torch.distributed process
    group whose processes' masked entropies the quantile is taken over (entropy_threshold; every process of
    the group must call it, a collective); None (the default): this call's tokens only."""
    h = entropy.detach()
    thr = entropy_threshold(h, mask, quantile, group)
    if thr is None:
        return torch.zeros_like(mask)
    return ((h * mask >= thr.to(h.dtype)) & mask.bool()).to(mask.dtype)


def per_token_objective(logp, old_logp, adv, mask, *, epsilon, epsilon_high, delta, loss_type,
                        importance_sampling_level, sapo_temperature_pos=SAPO_TAU_POS,
                        sapo_temperature_neg=SAPO_TAU_NEG, is_w=None, vespo=None):
    """Per-token surrogate loss L [B, T] and the importance ratio r [B, T] (or [B, 1] at sequence level).
    vespo: (k_pos, lambda_pos, k_neg, lambda_neg); is_w: token rollout-IS weights VESPO folds into w."""
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    r = torch.exp(log_ratio)
    if loss_type == "cispo":
        return -torch.clamp(r, max=epsilon_high).detach() * adv * logp, r
    if loss_type == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, sapo_temperature_pos),
                          torch.full_like(adv, sapo_temperature_neg))
        return -adv * torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau, r
    if loss_type == "vespo":
        return -vespo_weights(adv, logp - old_logp, mask, is_w, *vespo) * adv * logp, r
    r_unclipped = torch.clamp(r, max=delta) if delta is not None else r
    r_clipped = torch.clamp(r, 1.0 - epsilon, 1.0 + epsilon_high)
    return -torch.min(r_unclipped * adv, r_clipped * adv), r


def reduce_loss(L, mask, loss_type, max_completion_length, num_items_in_batch):
    B, T = mask.shape  # not L's: a sequence-level L without a KL term is [B, 1]
    mL = L * mask
    reduction = LOSS_REDUCTION[loss_type]
    if reduction == "sequence":
        return (mL.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if reduction == "sequence_sum":
        return mL.sum(-1).mean()
    if reduction == "tokens":
        return mL.sum() / mask.sum().clamp(min=1.0)
    if reduction == "length":
        return mL.sum() / max(B * (max_completion_length or T), 1)  # T = 0: 0, as the kernels' row_scale
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1.0)
    if isinstance(denom, torch.Tensor):
        denom = denom.reshape(())  # a [1] tensor (TRL's num_items_in_batch) gives a scalar loss, as the kernels
    return mL.sum() / denom


def token_local(opts) -> bool:
    """Whether every token's loss and gradient follow from that token alone (the fused token kernel's
    domain): no sequence ratio or sequence weight, no batch entropy quantile, no entropy term."""
    o = {**EXTRA_DEFAULTS, **opts}
    seq_is = (o["sampling_logprobs"] is not None and o["vllm_importance_sampling_correction"]
              and o["vllm_importance_sampling_mode"].startswith("sequence"))
    return (o.get("importance_sampling_level", "token") == "token"
            and o.get("loss_type", "dapo") not in ("luspo", "vespo")
            and o["off_policy_mask_threshold"] is None and o["top_entropy_quantile"] >= 1.0
            and o["entropy_coef"] == 0.0 and not seq_is)


def grpo_token_loss(logp, advantages, completion_mask=None, old_logprobs=None, ref_logprobs=None, beta=0.0,
                    epsilon=0.2, epsilon_high=None, delta=None, loss_type="dapo", importance_sampling_level="token",
                    kl_estimator="k3", entropy=None, entropy_group=None, **extra):
    """The loss before its reduction: (L [B, T], ent_mask [B, T] or None, metrics). L is the policy term
    times the off-policy mask, the entropy mask and the rollout-IS weight, plus beta * KL (times the ratio
    when use_bias_correction_kl); reduce_loss(L, mask, ...) gives the loss. A caller that weights rows
    itself (r1train's packed micro-batches) reduces L with its own weights. extra: the EXTRA_DEFAULTS
    options (max_completion_length / num_items_in_batch, reduction only, are ignored). entropy_group: the
    torch.distributed process group the top_entropy_quantile threshold is taken over (high_entropy_mask;
    TRL gathers every data-parallel process's entropies; then every process of the group must make the
    call); None: this call's tokens only.
    Metrics: kl a masked token mean; clip_ratio/{low,high,region}_mean the share of masked tokens clipped, or
    at importance_sampling_level="sequence" with one advantage per sequence the share of the B sequences
    (TRL 1.16's global_masked_mean of a [B, 1] indicator: every row counts, one without masked tokens as
    not clipped)."""
    o = {**EXTRA_DEFAULTS, **{k: v for k, v in extra.items() if k in EXTRA_DEFAULTS}}
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = torch.ones_like(logp) if completion_mask is None else completion_mask.to(logp.dtype)
    adv = acc(advantages).detach()  # constants, as on every kernel path: no gradient flows into them
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    # masked positions take the policy's log-prob as old/ref/sampling log-prob (ratio 1, KL 0): whatever a
    # caller pads them with (0, NaN) stays out of exp(), whose inf times a 0 mask would be NaN in the loss
    # and its gradient (the kernels skip masked tokens). Detached: old/ref/sampling log-probs are constants
    # of the loss (TRL computes them without grad; the kernels return them no gradient)
    valid = mask.bool()
    # and the policy's own log-prob there is 0 (the kernels' value at a skipped token): a label on a -inf logit
    # (a masked vocabulary entry) at a masked position gave exp(-inf - -inf) = NaN
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    pad = lambda x: None if x is None else torch.where(valid, acc(x).detach(), logp.detach())  # noqa: E731
    old = logp.detach() if old_logprobs is None else pad(old_logprobs)
    samp, ref_logprobs = pad(o["sampling_logprobs"]), pad(ref_logprobs)
    is_w = None
    if samp is not None and o["vllm_importance_sampling_correction"]:
        is_w = rollout_is_weights(old, samp, mask, o["vllm_importance_sampling_mode"],
                                  o["vllm_importance_sampling_clip_min"], o["vllm_importance_sampling_clip_max"])
    vespo = tuple(o[k] for k in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"))
    L, r = per_token_objective(logp, old, adv, mask, epsilon=epsilon, epsilon_high=eps_high, delta=delta,
                               loss_type=loss_type, importance_sampling_level=importance_sampling_level,
                               sapo_temperature_pos=o["sapo_temperature_pos"],
                               sapo_temperature_neg=o["sapo_temperature_neg"], is_w=is_w, vespo=vespo)
    if o["off_policy_mask_threshold"] is not None:
        L = L * off_policy_mask(adv, logp, samp if samp is not None else old, mask, o["off_policy_mask_threshold"])
    ent_mask = high_entropy_mask(entropy, mask, o["top_entropy_quantile"], entropy_group) \
        if o["top_entropy_quantile"] < 1.0 else None
    if ent_mask is not None:
        L = L * ent_mask
    if is_w is not None and loss_type != "vespo":
        L = L * is_w
    n_tok = mask.sum().clamp(min=1.0)
    kl_mean = logp.new_zeros(())
    if ref_logprobs is not None:
        kl = kl_per_token(logp, ref_logprobs, kl_estimator)
        if o["use_bias_correction_kl"]:
            kl = kl * r
        if beta != 0.0:
            L = L + beta * kl
        kl_mean = (kl.detach() * mask).sum() / n_tok
    with torch.no_grad():
        rr = r
        if delta is not None and loss_type not in ("cispo", "sapo", "vespo"):
            rr = torch.where(rr > delta, delta, rr)  # TRL counts clipping on the ratio after the delta clamp
        low = ((rr < 1.0 - epsilon) & (adv < 0)).to(mask.dtype)
        high = ((rr > 1.0 + eps_high) & (adv > 0)).to(mask.dtype)
        # sequence level, one advantage per sequence: [B, 1] indicators, TRL counts sequences, not tokens
        per_seq = importance_sampling_level == "sequence" and low.shape[-1] == 1
        w = mask.new_ones(low.shape) if per_seq else mask
        low, high = (x if per_seq else x.expand_as(mask) for x in (low, high))
        n = w.sum().clamp(min=1.0)
        metrics = {
            "kl": kl_mean,
            "clip_ratio/low_mean": (low * w).sum() / n,
            "clip_ratio/high_mean": (high * w).sum() / n,
            "clip_ratio/region_mean": (torch.maximum(low, high) * w).sum() / n,
        }
    return L, ent_mask, metrics


def grpo_loss_from_logprobs(logp, advantages, completion_mask=None, old_logprobs=None, ref_logprobs=None,
                            beta=0.0, epsilon=0.2, epsilon_high=None, delta=None, loss_type="dapo",
                            importance_sampling_level="token", kl_estimator="k3", max_completion_length=None,
                            num_items_in_batch=None, entropy=None, entropy_group=None, return_entropy_mask=False,
                            **extra):
    """logp [B, T] fp32 (differentiable) -> (loss, metrics), in TRL 1.16's order: the policy term times the
    off-policy mask, the entropy mask and the rollout-IS weight, plus beta * KL (times the ratio when
    use_bias_correction_kl), reduced per loss type, minus entropy_coef * the masked mean entropy.
    entropy [B, T] (differentiable) is needed by top_entropy_quantile < 1 and entropy_coef != 0; extra:
    the options of EXTRA_DEFAULTS. All other tensors are constants. entropy_group: grpo_token_loss's (the
    process group of the top_entropy_quantile threshold; None: this call's tokens). return_entropy_mask:
    return (loss, metrics, the high-entropy mask [B, T] or None when top_entropy_quantile is 1)."""
    o = {**EXTRA_DEFAULTS, **extra}
    L, ent_mask, token_metrics = grpo_token_loss(
        logp, advantages, completion_mask, old_logprobs, ref_logprobs, beta=beta, epsilon=epsilon,
        epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator, entropy=entropy,
        entropy_group=entropy_group, **extra)
    mask = torch.ones_like(logp) if completion_mask is None else completion_mask.to(logp.dtype)
    loss = reduce_loss(L, mask, loss_type, max_completion_length, num_items_in_batch)
    metrics = {}
    if entropy is not None:
        eff = mask if ent_mask is None else mask * ent_mask
        if o["entropy_coef"] != 0.0:
            loss = loss - o["entropy_coef"] * (entropy * eff).sum() / eff.sum().clamp(min=1.0)
        metrics["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1.0)
        if ent_mask is not None:  # over the tokens the loss trains on (TRL's adaptive-entropy measure)
            metrics["entropy/selected_mean"] = (entropy.detach() * eff).sum() / eff.sum().clamp(min=1.0)
    metrics.update(token_metrics)
    return (loss, metrics, ent_mask) if return_entropy_mask else (loss, metrics)


def needs_entropy(opts) -> bool:
    """The loss reads the entropy (top_entropy_quantile < 1 or an entropy term)."""
    return opts.get("top_entropy_quantile", 1.0) < 1.0 or opts.get("entropy_coef", 0.0) != 0.0


def reports_entropy(opts) -> bool:
    """The entropy is computed: the loss reads it, or compute_entropy asks for its metric."""
    return needs_entropy(opts) or bool(opts.get("compute_entropy", False))


def masked_logprobs(logp, completion_mask):
    """The per_token_logprobs output: logp with 0 where completion_mask is 0 (every backend: the kernels read
    nothing there, and a masked label may be a placeholder such as -100 mapped to 0)."""
    return logp if completion_mask is None else logp.masked_fill(completion_mask == 0, 0.0)


def grpo_loss(logits, completion_ids, advantages, completion_mask=None, temperature=1.0, **kw):
    """logits [B, T, V] aligned with completion_ids [B, T] -> (loss, per_token_logprobs [B, T] (0 where masked),
    metrics)."""
    if reports_entropy(kw):
        logp, ent = token_logprobs(logits, completion_ids, temperature, return_entropy=True)
    else:
        logp, ent = token_logprobs(logits, completion_ids, temperature), None
    loss, metrics = grpo_loss_from_logprobs(logp, advantages, completion_mask, entropy=ent, **kw)
    return loss, masked_logprobs(logp, completion_mask), metrics


def linear_grpo_loss(hidden, weight, completion_ids, advantages, completion_mask=None, bias=None,
                     temperature=1.0, softcap=None, **kw):
    """hidden [B, T, H], weight [V, H]: grpo_loss(hidden @ weight.T + bias, ...) without [B, T, V]; softcap:
    linear_token_logprobs's."""
    ent_on = reports_entropy(kw)
    out = linear_token_logprobs(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                                return_entropy=ent_on, softcap=softcap)
    logp, ent = out if ent_on else (out, None)
    loss, metrics = grpo_loss_from_logprobs(logp, advantages, completion_mask, entropy=ent, **kw)
    return loss, masked_logprobs(logp, completion_mask), metrics
