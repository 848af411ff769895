"""r1kernels: token log-probs, the fused GRPO loss family, group advantages and DeepSeek-V3 MoE routing.

Every op validates its inputs (ValueError naming the argument), then runs the fastest eligible backend
(`backend="auto"`) or the one named; `backend="torch"` is the pure-PyTorch reference in r1kernels.reference.
Scalar options take Python numbers or NumPy real scalars (np.float32(0.04): its exact value, as a Python float for
the kernels); bools, arrays and tensors are errors naming the option.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import _backend, _checks
from . import reference as _ref
from ._checks import AdvantageOverflowError
from .reference.grpo import EXTRA_DEFAULTS, IS_LEVELS, KL_ESTIMATORS, LOSS_REDUCTION, LOSS_TYPES, check_extra_options

__all__ = ["token_logprobs", "linear_token_logprobs", "group_advantages", "grpo_loss", "linear_grpo_loss",
           "GRPOLossOutput", "sample_tokens", "decode_attention", "decode_linear", "rms_norm", "apply_rotary",
           "silu_mul", "moe", "patch", "AdvantageOverflowError"]
__version__ = "0.1.0"


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor                # fp32 scalar
    per_token_logprobs: torch.Tensor  # fp32 [B, T], detached
    metrics: dict                     # kl, clip_ratio/{low,high,region}_mean (+ entropy)


def _eager() -> bool:
    """Data-dependent checks (label range, NaN) run eagerly only; torch.compile traces without them."""
    return not torch.compiler.is_compiling()


def _scalars(*values):
    """The public ops' scalar options as Python numbers (_checks.as_python; anything else unchanged, for the checks
    to name): converted once at entry, so the checks, the kernels and torch.compile see Python numbers."""
    return tuple(_checks.as_python(v) for v in values)


def _check_logits_labels(logits_name, logits, labels_name, labels, temperature, check_values=True):
    _checks.float_tensor(logits_name, logits, min_ndim=1)
    _checks.int_tensor(labels_name, labels)
    _checks.shape(labels_name, labels, logits.shape[:-1], f" (the leading dims of {logits_name})")
    _checks.same_device(**{logits_name: logits, labels_name: labels})
    _checks.temperature(temperature)
    if logits.shape[-1] == 0:
        raise ValueError(f"{logits_name} must have a non-empty vocabulary dimension")
    if check_values and _eager():
        _checks.labels_in_range(labels_name, labels, logits.shape[-1])


def _check_linear(hidden, weight, bias, labels, temperature, labels_name="labels", check_values=True):
    _checks.float_tensor("hidden", hidden, min_ndim=1)
    _checks.float_tensor("weight", weight, ndim=2)
    _checks.int_tensor(labels_name, labels)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, {hidden.shape[-1]}] (hidden size last), "
                         f"got {tuple(weight.shape)}")
    _checks.shape(labels_name, labels, hidden.shape[:-1], " (the leading dims of hidden)")
    if bias is not None:
        _checks.float_tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (weight.shape[0],))
    _checks.same_device(hidden=hidden, weight=weight, bias=bias, **{labels_name: labels})
    _checks.temperature(temperature)
    if check_values and _eager():
        _checks.labels_in_range(labels_name, labels, weight.shape[0])


def token_logprobs(logits, labels, *, temperature=1.0, return_entropy=False, backend="auto"):
    """logits [..., V] (any float dtype), labels [...] -> fp32 log softmax(logits / T)[label] [...],
    and the fp32 entropy [...] of that distribution when return_entropy."""
    temperature = _checks.as_python(temperature)
    _check_logits_labels("logits", logits, "labels", labels, temperature)
    fn = _backend.pick("token_logprobs", backend, logits.device, logits, labels)
    return (fn or _ref.token_logprobs)(logits, labels, temperature, return_entropy)


def linear_token_logprobs(hidden, weight, labels, *, bias=None, temperature=1.0, return_entropy=False,
                          softcap=None, chunk_budget_bytes=None, backend="auto"):
    """token_logprobs(hidden @ weight.T + bias, labels) without materializing the [N, V] logits.
    softcap: the logits are softcap * tanh(z / softcap) of z = hidden @ weight.T + bias (Gemma 2's
    final_logit_softcapping; Liger's softcap), before the temperature; None: z.
    chunk_budget_bytes: the kernels' memory budget for the logits chunk and its per-row temporaries
    (None: 300 MiB; r1kernels.ops.linear_grpo.chunk_plan gives the chunks it yields)."""
    temperature, chunk_budget_bytes = _checks.as_python(temperature), _checks.as_python(chunk_budget_bytes)
    _check_linear(hidden, weight, bias, labels, temperature)
    softcap = _checks.softcap(softcap)
    _check_budget(chunk_budget_bytes)
    fn = _backend.pick("linear_token_logprobs", backend, hidden.device, hidden, weight, labels)
    if fn is None:
        return _ref.linear_token_logprobs(hidden, weight, labels, bias, temperature, return_entropy, softcap=softcap)
    budget = {} if chunk_budget_bytes is None else {"chunk_budget_bytes": chunk_budget_bytes}
    return fn(hidden, weight, labels, bias, temperature, return_entropy, softcap=softcap, **budget)


def _check_budget(chunk_budget_bytes):
    if chunk_budget_bytes is not None and (not isinstance(chunk_budget_bytes, int)
                                           or isinstance(chunk_budget_bytes, bool) or chunk_budget_bytes < 1):
        raise ValueError(f"chunk_budget_bytes must be a positive int (bytes) or None, got {chunk_budget_bytes!r}")


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4, reward_weights=None, backend="auto"):
    """rewards [B*G] or [B*G, R] (consecutive rows form a group; R reward columns are summed with
    reward_weights first) -> fp32 advantages [B*G]: (R - group mean) / (std + eps) for scale="group"
    (unbiased std), the whole batch's std for "batch", no division for "none". rewards and reward_weights
    must be finite (NaN or inf: ValueError, a device assert for CUDA tensors), and so must the advantages in float32:
    scale="none" with rewards whose spread passes float32's range, or float64 rewards past F64_REWARD_MAX, is a
    AdvantageOverflowError (a ValueError) naming rewards (eager calls; see _ADV_OVERFLOW). Not differentiable: the
    advantages never require grad, on every backend (constants of the loss; TRL computes them under no_grad)."""
    group_size, eps = _checks.as_python(group_size), _checks.as_python(eps)
    _checks.float_tensor("rewards", rewards, ndim=(1, 2))
    rewards = rewards.detach()
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch of {n} rewards")
    _checks.choice("scale", scale, ("group", "batch", "none"))
    if scale == "group" and group_size < 2:
        raise ValueError("group_size must be >= 2 with scale='group' (the std of one sample is undefined)")
    if scale == "batch" and n < 2:
        raise ValueError("rewards needs >= 2 rows with scale='batch'")
    if scale == "none":
        _checks.positive("eps", eps, allow_zero=True)
    elif not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < float("inf"):  # also NaN
        raise ValueError(f"eps must be a finite number > 0 with scale={scale!r} (a group of equal rewards has std 0: "
                         f"0 / 0; TRL adds 1e-4), got {eps!r}")
    if reward_weights is not None:
        if rewards.dim() != 2:
            raise ValueError("reward_weights needs rewards of shape [B*G, R]")
        try:
            reward_weights = torch.as_tensor(reward_weights, dtype=torch.float32).detach()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"reward_weights must be numbers, one per reward column, got {reward_weights!r}") from e
        _checks.shape("reward_weights", reward_weights, (rewards.shape[1],), " (one per reward column)")
        if _eager():  # before the copy to rewards' device: a list of weights is checked on the host
            _checks.finite("reward_weights", reward_weights)
        reward_weights = reward_weights.to(rewards.device)
    fn = _backend.pick("group_advantages", backend, rewards.device, rewards, group_size)
    if _eager() and (_checks.SYNC_CHECKS or not getattr(fn, "checks_finite", False)):  # the extension checks
        _checks.finite("rewards", rewards, " (map 'not applicable' rewards to a finite value before this call)")
    if _eager() and rewards.dtype == torch.float64 and scale != "none" and rewards.numel():
        _check_f64_reward_range(rewards, reward_weights)
    out = (fn or _ref.group_advantages)(rewards, group_size, scale, eps, reward_weights)
    if _eager() and scale == "none":
        _checks._value_check(torch.isfinite(out).all(), _ADV_OVERFLOW, AdvantageOverflowError)
    return out


# Finite rewards whose advantages leave float32 (every backend computes in float64, then rounds to float32): a
# ValueError naming rewards, checked eagerly (as the finite check; torch.compile traces without it), on the host on
# CPU, a device assert on a GPU (a ValueError there under R1K_SYNC_CHECKS=1), one reduction where it can happen:
# - scale="none": R - group mean reaches 2 max|R| (x the weights), past float32's 3.4e38 an inf advantage. Checked on
#   the output (exact for every backend, any dtype).
# - "group" / "batch": |R - mean| <= (n - 1) / sqrt(n) std over n members, so |A| < (n - 1) / sqrt(n): never past
#   float32, and weighted float32 / bf16 / fp16 rewards (|R| < 3.4e38 * R cols * 3.4e38) square and sum far within
#   float64. float64 rewards can overflow that sum: the std is inf and the advantages 0 -- finite and wrong,
#   invisible in the output -- so their weighted magnitude is bounded on the input instead.
_ADV_OVERFLOW = ("rewards: the advantages (rewards - group mean, scale='none') overflow float32 (|A| > 3.4e38); "
                 "rescale the rewards")
# |weighted reward| <= F64_REWARD_MAX: squares <= 4e290 each, a sum of up to 4e17 of them stays finite in float64
F64_REWARD_MAX = 1e145


def _check_f64_reward_range(rewards, reward_weights):
    """float64 rewards, scale group / batch: max|R| (times sum|w| with reward columns) <= F64_REWARD_MAX (one
    reduction)."""
    mag = rewards.abs().amax()
    if rewards.dim() == 2:
        mag = mag * (reward_weights.double().abs().sum() if reward_weights is not None else rewards.shape[1])
    _checks._value_check(~(mag > F64_REWARD_MAX),  # NaN passes here: the finite check names it
                         f"rewards: float64 rewards of magnitude > {F64_REWARD_MAX:g} (weighted) overflow the "
                         "float64 std of group_advantages (it would give advantages of 0); rescale the rewards",
                         AdvantageOverflowError)


def _check_loss_rows(name: str, rows: int, loss_type: str, note: str = ""):
    """No rows and a loss that averages over sequences or divides by their count (0 / 0): a ValueError naming
    `name` (the reference would return NaN)."""
    if rows == 0 and LOSS_REDUCTION[loss_type] in ("sequence", "sequence_sum", "length"):
        raise ValueError(f"{name} has no rows: loss_type={loss_type!r} averages over sequences (or divides by their "
                         f"count), undefined for an empty batch{note}")


def _check_grpo(ids, advantages, mask, *, old_logprobs, ref_logprobs, beta, epsilon, epsilon_high, delta,
                loss_type, importance_sampling_level, kl_estimator, max_completion_length, num_items_in_batch):
    """The loss options shared by grpo_loss and linear_grpo_loss (temperature is checked with the logits)."""
    old, ref = old_logprobs, ref_logprobs
    _checks.int_tensor("completion_ids", ids, ndim=2)
    B, T = ids.shape
    _checks.float_tensor("advantages", advantages, ndim=(1, 2))
    if tuple(advantages.shape) not in ((B,), (B, 1), (B, T)):
        raise ValueError(f"advantages must have shape ({B},), ({B}, 1) or ({B}, {T}), got {tuple(advantages.shape)}")
    if _eager():  # a NaN / inf advantage makes the loss and every gradient NaN
        _checks.finite("advantages", advantages)
    if mask is not None:
        _checks.tensor("completion_mask", mask, ndim=2)
        _checks.shape("completion_mask", mask, (B, T))
    for name, t in (("old_logprobs", old), ("ref_logprobs", ref)):
        if t is not None:
            _checks.float_tensor(name, t, ndim=2)
            _checks.shape(name, t, (B, T))
    _checks.same_device(completion_ids=ids, advantages=advantages, completion_mask=mask, old_logprobs=old,
                        ref_logprobs=ref)
    _checks.choice("loss_type", loss_type, LOSS_TYPES)
    _check_loss_rows("completion_ids", B, loss_type)
    _checks.choice("importance_sampling_level", importance_sampling_level, IS_LEVELS)
    _checks.choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _checks.positive("beta", beta, allow_zero=True)
    # inf clip bounds are exact on every backend (min/max/compare only): epsilon = inf does not clip
    _checks.positive("epsilon", epsilon, allow_zero=True, allow_inf=True)
    if epsilon_high is not None:
        _checks.positive("epsilon_high", epsilon_high, allow_zero=True, allow_inf=True)
    if delta is not None:
        _checks.positive("delta", delta, allow_inf=True)
    if beta != 0.0 and ref is None:
        raise ValueError("ref_logprobs is required when beta != 0")
    if max_completion_length is not None and (not isinstance(max_completion_length, int)
                                              or isinstance(max_completion_length, bool)
                                              or max_completion_length < 1):
        raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        # on another device the kernels read it through a pointer of the wrong device (garbage or a crash)
        _checks.same_device(completion_ids=ids, num_items_in_batch=num_items_in_batch)
        if _eager():
            _checks._value_check(((num_items_in_batch > 0) & torch.isfinite(num_items_in_batch)).all(),
                                 "num_items_in_batch must be finite and > 0")
    elif num_items_in_batch is not None:
        _checks.positive("num_items_in_batch", num_items_in_batch)
    if num_items_in_batch is not None and LOSS_REDUCTION[loss_type] != "items" and _eager():
        users = ", ".join(k for k, v in LOSS_REDUCTION.items() if v == "items")
        warnings.warn(f"num_items_in_batch is ignored by loss_type={loss_type!r} (only {users} divide by it)",
                      stacklevel=3)


def _check_grpo_extra(ids, extra, loss_type, importance_sampling_level):
    """The rollout-correction, loss-family and entropy options (reference/grpo.py EXTRA_DEFAULTS)."""
    samp = extra["sampling_logprobs"]
    if samp is not None:
        _checks.float_tensor("sampling_logprobs", samp, ndim=2)
        _checks.shape("sampling_logprobs", samp, tuple(ids.shape))
        _checks.same_device(completion_ids=ids, sampling_logprobs=samp)
    check_extra_options(loss_type, importance_sampling_level, **extra)


def _grpo_inputs(completion_ids, advantages, completion_mask, V):
    """completion_ids with masked positions (mask 0) set to 0 wherever they lie outside [0, V) (e.g. -100,
    Hugging Face's ignore index: no kernel reads a masked label); [B, 1] advantages as [B], detached: the
    advantages are constants of the loss on every backend (the kernels return no gradient for them; TRL, Liger)."""
    advantages = advantages.detach()
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    ids = completion_ids
    if completion_mask is not None:
        ids = ids.masked_fill((completion_mask == 0) & ((ids < 0) | (ids >= V)), 0)
    if _eager():
        hint = (" where completion_mask is not 0 (masked positions may hold any value, e.g. -100)"
                if completion_mask is not None else " (positions holding -100 need a completion_mask of 0 there)")
        _checks.labels_in_range("completion_ids", ids, V, hint=hint)
        if completion_mask is not None and completion_mask.is_floating_point():  # a NaN weight: a NaN loss
            _checks.finite("completion_mask", completion_mask)
    return ids, advantages


def grpo_loss(logits, completion_ids, advantages, completion_mask=None, *, old_logprobs=None,
              ref_logprobs=None, beta=0.0, epsilon=0.2, epsilon_high=None, delta=None, loss_type="dapo",
              importance_sampling_level="token", kl_estimator="k3", temperature=1.0,
              max_completion_length=None, num_items_in_batch=None, inplace_backward=False,
              sampling_logprobs=None, vllm_importance_sampling_correction=True,
              vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=3.0,
              vllm_importance_sampling_clip_min=None, off_policy_mask_threshold=None,
              use_bias_correction_kl=True, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
              vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, top_entropy_quantile=1.0, entropy_coef=0.0,
              compute_entropy=False, backend="auto") -> GRPOLossOutput:
    """The clipped GRPO/KL loss family from logits [B, T, V]; logits[:, t] scores completion_ids[:, t].
    advantages [B] (one per sequence) or [B, T]. inplace_backward=True lets a kernel write the logits'
    gradient into the logits' own storage (their values are then gone): no extra [B, T, V] buffer.
    The options after inplace_backward are TRL 1.16's (names and defaults; r1kernels.reference.grpo
    EXTRA_DEFAULTS and grpo_loss_from_logprobs): rollout correction from sampling_logprobs [B, T] (the
    rollout engine's log-probs), the off-policy sequence mask, the bias-corrected KL, the sapo / vespo
    parameters, the high-entropy token mask and the entropy term (then metrics also hold "entropy").
    compute_entropy=True puts the masked mean entropy in metrics["entropy"] (detached) in any case, computed
    in the loss kernel's own pass over the logits."""
    extra = {k: v for k, v in locals().items() if k in EXTRA_DEFAULTS}  # (evaluated in this frame)
    extra = dict(zip(extra, _scalars(*extra.values())))
    beta, epsilon, epsilon_high, delta, temperature, max_completion_length, num_items_in_batch = _scalars(
        beta, epsilon, epsilon_high, delta, temperature, max_completion_length, num_items_in_batch)
    _check_logits_labels("logits", logits, "completion_ids", completion_ids, temperature, check_values=False)
    opts = dict(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=beta, epsilon=epsilon,
                epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
                importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator,
                max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch)
    _check_grpo(completion_ids, advantages, completion_mask, **opts)
    _check_grpo_extra(completion_ids, extra, loss_type, importance_sampling_level)
    opts.update(extra)
    completion_ids, advantages = _grpo_inputs(completion_ids, advantages, completion_mask, logits.shape[-1])
    fn = _backend.pick("grpo_loss", backend, logits.device, logits, completion_ids)
    if fn is None:
        loss, logp, metrics = _ref.grpo_loss(logits, completion_ids, advantages, completion_mask,
                                             temperature=temperature, **opts)
    else:
        loss, logp, metrics = fn(logits, completion_ids, advantages, completion_mask, temperature=temperature,
                                 inplace_backward=inplace_backward, **opts)
    return GRPOLossOutput(loss, logp.detach(), metrics)


def linear_grpo_loss(hidden, weight, completion_ids, advantages, completion_mask=None, *, bias=None,
                     old_logprobs=None, ref_logprobs=None, beta=0.0, epsilon=0.2, epsilon_high=None,
                     delta=None, loss_type="dapo", importance_sampling_level="token", kl_estimator="k3",
                     temperature=1.0, max_completion_length=None, num_items_in_batch=None,
                     sampling_logprobs=None, vllm_importance_sampling_correction=True,
                     vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=3.0,
                     vllm_importance_sampling_clip_min=None, off_policy_mask_threshold=None,
                     use_bias_correction_kl=True,
                     sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                     vespo_k_neg=3.0, vespo_lambda_neg=2.0, top_entropy_quantile=1.0, entropy_coef=0.0,
                     compute_entropy=False, softcap=None, chunk_budget_bytes=None, backend="auto") -> GRPOLossOutput:
    """grpo_loss(hidden @ weight.T + bias, ...) from hidden [B, T, H] and the lm_head weight [V, H],
    never holding the [B, T, V] logits. softcap: linear_token_logprobs's (the logits soft-capped before the
    temperature). chunk_budget_bytes: the kernels' memory budget for the logits
    chunk, its per-row temporaries and (when it fits) an fp32 weight-gradient accumulator (None: 960 MiB;
    r1kernels.ops.linear_grpo.chunk_plan gives the chunks it yields). The loss options are grpo_loss's."""
    extra = {k: v for k, v in locals().items() if k in EXTRA_DEFAULTS}  # (evaluated in this frame)
    extra = dict(zip(extra, _scalars(*extra.values())))
    beta, epsilon, epsilon_high, delta, temperature, max_completion_length, num_items_in_batch = _scalars(
        beta, epsilon, epsilon_high, delta, temperature, max_completion_length, num_items_in_batch)
    chunk_budget_bytes = _checks.as_python(chunk_budget_bytes)
    _check_linear(hidden, weight, bias, completion_ids, temperature, "completion_ids", check_values=False)
    softcap = _checks.softcap(softcap)
    _check_budget(chunk_budget_bytes)
    opts = dict(old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, beta=beta, epsilon=epsilon,
                epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
                importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator,
                max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch)
    _check_grpo(completion_ids, advantages, completion_mask, **opts)
    _check_grpo_extra(completion_ids, extra, loss_type, importance_sampling_level)
    opts.update(extra)
    completion_ids, advantages = _grpo_inputs(completion_ids, advantages, completion_mask, weight.shape[0])
    fn = _backend.pick("linear_grpo_loss", backend, hidden.device, hidden, weight, completion_ids)
    if fn is not None and chunk_budget_bytes is not None:
        opts["chunk_budget_bytes"] = chunk_budget_bytes
    impl = fn or _ref.linear_grpo_loss
    loss, logp, metrics = impl(hidden, weight, completion_ids, advantages, completion_mask, bias=bias,
                               temperature=temperature, softcap=softcap, **opts)
    return GRPOLossOutput(loss, logp.detach(), metrics)


def sample_tokens(logits, seeds, positions, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy=False,
                  backend="auto"):
    """Draw one token per row of logits [B, V] -> (tokens int64 [B], fp32 log-prob [B] of each token under
    the distribution sampled from). seeds [B] and positions [B] (int tensors) key the counter-based noise:
    a row's token depends only on (logits row, seed, position), never on the batch it sits in.
    top_k 0 and top_p 1.0 and min_p 0.0 disable those truncations; greedy takes the argmax. No host sync
    (CUDA-graph safe). A row whose logits hold NaN or +inf (or a logit that overflows at this temperature), or are
    all -inf, draws token 0 with log-prob NaN on every backend (found on the device, no host sync; the caller
    checks the log-probs, as r1train's generate(check_finite=True) does once per rollout). Not
    differentiable: the log-probs never require grad, on every backend. The exact semantics are
    r1kernels.reference.sampling's docstring."""
    _checks.float_tensor("logits", logits, ndim=2)
    logits = logits.detach()
    B, V = logits.shape
    _checks.int_tensor("seeds", seeds, ndim=1)
    _checks.shape("seeds", seeds, (B,), " (one per logits row)")
    _checks.int_tensor("positions", positions, ndim=1)
    _checks.shape("positions", positions, (B,), " (one per logits row)")
    _checks.same_device(logits=logits, seeds=seeds, positions=positions)
    if V == 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, greedy=greedy)
    fn = _backend.pick("sample_tokens", backend, logits.device, logits)
    # top_k >= V keeps every token: passed as V (an int64 in the custom op's schema, whatever the caller's int)
    return (fn or _ref.sample_tokens)(logits, seeds, positions, float(temperature), min(int(top_k), V),
                                      float(top_p), float(min_p), bool(greedy))


def check_sampling_options(*, temperature, top_k, top_p, min_p, greedy, max_new_tokens=None):
    """ValueError naming the first bad sampling option (shared with the generation engine). The numbers may be
    numpy scalars (np.float32(0.9), np.int64(5): numbers.Real / numbers.Integral); bools are not numbers here."""
    real, integral = _checks.is_real, _checks.is_integral  # numpy scalars too; bools and arrays not
    if not isinstance(greedy, bool):
        raise ValueError(f"greedy must be a bool, got {greedy!r}")
    # also with greedy: it scales the returned log-probs. _checks.temperature takes Python numbers: a numpy one as
    # its value (exact; a Python int stays itself: float() of a huge one overflows)
    _checks.temperature(_checks.as_python(temperature))
    if not integral(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {top_k!r}")
    if not real(top_p) or not _checks.MIN_TOP_P <= top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] and >= float32's smallest normal number {_checks.MIN_TOP_P}, "
                         f"got {top_p!r}")
    # [0, 1] as transformers' MinPLogitsWarper and TRL's GRPOConfig: min_p 1.0 keeps the tokens as likely as the top
    if not real(min_p) or not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    if max_new_tokens is not None and (not integral(max_new_tokens) or max_new_tokens < 1):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")


def decode_attention(q, k_cache, v_cache, lens, *, scale=None, k_new=None, v_new=None, cos=None, sin=None,
                     check_lens=True, backend="auto"):
    """One decode step of attention: q [B, Hq, Dk] against the first lens[b] positions of row b of
    k_cache [B, Hkv, L, Dk] / v_cache [B, Hkv, L, Dv] (grouped-query: Hq a multiple of Hkv) -> [B, Hq, Dv]
    in q's dtype, fp32 math; scale defaults to Dk ** -0.5. Reads only the valid positions; no host sync.
    k_new [B, Hkv, Dk] / v_new [B, Hkv, Dv] (this step's keys/values, both or neither): written in place
    at position lens[b] of each row with lens[b] < L, which then attends to lens[b] + 1 positions.
    cos / sin [B, Dk] (with k_new; both or neither): the rotary embedding at each row's position, applied to q
    and k_new first as rk.apply_rotary does (in the same kernel). check_lens=False skips the data check of
    lens (>= 0; three kernels on a GPU, a host sync on a CPU), for callers that count lens themselves. Inference only
    (no autograd: an input that requires grad with grad mode on is a ValueError)."""
    _checks.float_tensor("q", q, ndim=3)
    _checks.float_tensor("k_cache", k_cache, ndim=4)
    _checks.float_tensor("v_cache", v_cache, ndim=4)
    _checks.int_tensor("lens", lens, ndim=1)
    B, Hq, Dk = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != Dk:
        raise ValueError(f"k_cache must have shape [{B}, Hkv, L, {Dk}], got {tuple(k_cache.shape)}")
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the {Hq} query heads of q must be a multiple of the {Hkv} heads of k_cache")
    if tuple(v_cache.shape[:3]) != (B, Hkv, L):
        raise ValueError(f"v_cache must have shape [{B}, {Hkv}, {L}, Dv], got {tuple(v_cache.shape)}")
    _checks.shape("lens", lens, (B,), " (one per row)")
    _checks.same_device(q=q, k_cache=k_cache, v_cache=v_cache, lens=lens)
    # Skipped under CUDA-graph capture: the graph would repeat it in every layer at every replay, and the
    # generation engine, which captures its decode step, counts lens itself from the prompt lengths.
    if check_lens and _eager() and not _checks.capturing(lens):
        _checks._value_check((lens >= 0).all(), "lens must be >= 0 (each row's number of valid cache positions)")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}")
    if scale is not None:
        scale = _checks.positive("scale", scale)
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (this step's keys and values) or not at all")
    if k_new is not None:
        _checks.float_tensor("k_new", k_new, ndim=3)
        _checks.float_tensor("v_new", v_new, ndim=3)
        _checks.shape("k_new", k_new, (B, Hkv, Dk), " ([B, Hkv, Dk])")
        _checks.shape("v_new", v_new, (B, Hkv, v_cache.shape[3]), " ([B, Hkv, Dv])")
        _checks.same_device(q=q, k_new=k_new, v_new=v_new)
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin must be given together (the rotary embedding) or not at all")
    if cos is not None:
        if k_new is None:
            raise ValueError("cos/sin rotate this step's query and key: they need k_new and v_new")
        if Dk % 2:
            raise ValueError(f"the rotary embedding needs an even head size, got Dk={Dk}")
        _checks.float_tensor("cos", cos, ndim=2)
        _checks.float_tensor("sin", sin, ndim=2)
        _checks.shape("cos", cos, (B, Dk), " ([B, Dk])")
        _checks.shape("sin", sin, (B, Dk), " ([B, Dk])")
        _checks.same_device(q=q, cos=cos, sin=sin)
    _checks.no_autograd("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new,
                        cos=cos, sin=sin)
    fn = _backend.pick("decode_attention", backend, q.device, q, k_cache, v_cache)
    return (fn or _ref.decode_attention)(q, k_cache, v_cache, lens, scale, k_new, v_new, cos, sin)


def decode_linear(x, weight, *, bias=None, residual=None, up_weight=None, backend="auto"):
    """A projection of the decode step: x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype.
    up_weight [N, K]: silu(x @ weight^T) * (x @ up_weight^T) instead (a SwiGLU MLP's gate/up, weight being
    gate_proj's; no bias). residual [M, N]: residual += the result, in place, and residual is returned (the
    layer's residual add). All tensors share x's dtype and device. Inference only (no autograd: an input that
    requires grad with grad mode on is a ValueError). The kernel (a
    Hopper GPU, bf16/fp16, M <= 64: the decode step's rows) reads each weight once with fp32 accumulation and
    fuses the epilogue; other inputs run the reference's cuBLAS forms."""
    _checks.float_tensor("x", x, ndim=2)
    _checks.float_tensor("weight", weight, ndim=2)
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must have shape [N, {K}] (x's last dim last), got {tuple(weight.shape)}")
    named = {"weight": weight, "bias": bias, "residual": residual, "up_weight": up_weight}
    if up_weight is not None:
        if bias is not None or residual is not None:
            raise ValueError("up_weight (the SwiGLU gate/up product) takes no bias and no residual")
        _checks.float_tensor("up_weight", up_weight, ndim=2)
        _checks.shape("up_weight", up_weight, (N, K), " (the shape of weight)")
    if bias is not None:
        _checks.float_tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (N,), " (one per row of weight)")
    if residual is not None:
        _checks.float_tensor("residual", residual, ndim=2)
        _checks.shape("residual", residual, (M, N), " ([M, N]: updated in place)")
        if _eager():
            _checks.writable("residual", residual, x=x, weight=weight, bias=bias)
    for name, t in named.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    _checks.same_device(x=x, **named)
    _checks.no_autograd("decode_linear", x=x, **named)
    fn = _backend.pick("decode_linear", backend, x.device, x, weight, bias, residual, up_weight)
    return (fn or _ref.decode_linear)(x, weight, bias, residual, up_weight)


def rms_norm(x, weight, eps=1e-6, *, backend="auto"):
    """Hugging Face RMSNorm (Qwen2/Llama): weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), fp32 math;
    x [..., H], weight [H]; eps a finite number > 0. Differentiable in x and weight (the Triton kernel has a fused
    backward)."""
    _checks.float_tensor("x", x, min_ndim=1)
    _checks.float_tensor("weight", weight, ndim=1)
    _checks.shape("weight", weight, (x.shape[-1],), " (the last dim of x)")
    _checks.same_device(x=x, weight=weight)
    eps = _checks.positive("eps", eps)  # eps = 0: an all-zero row is 0 * rsqrt(0) = 0 * inf = NaN
    fn = _backend.pick("rms_norm", backend, x.device, x, weight)
    return (fn or _ref.rms_norm)(x, weight, float(eps))


def apply_rotary(q, k, cos, sin, *, backend="auto"):
    """Hugging Face apply_rotary_pos_emb (rotate_half form): q [B, Hq, T, D], k [B, Hk, T, D], cos/sin
    [B or 1, T, D] -> (q * cos + rotate_half(q) * sin, the same for k), fp32 math. Differentiable in q and k (the
    Triton kernel's backward is its transpose: the forward op with sin's halves swapped and negated; cos/sin
    that require grad take the reference).
    The Triton path returns both outputs from one autograd node: backpropagate them in one backward (e.g.
    through a loss that uses both, or torch.autograd.backward([q_out, k_out], [dq, dk])); two separate
    .backward() calls need retain_graph=True on the first (the reference has no such restriction)."""
    for name, t in (("q", q), ("k", k)):
        _checks.float_tensor(name, t, ndim=4)
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.float_tensor(name, t, ndim=3)
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"k must have shape [{B}, Hk, {T}, {D}], got {tuple(k.shape)}")
    if cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (T, D):
        raise ValueError(f"cos must have shape ({B}, {T}, {D}) or (1, {T}, {D}), got {tuple(cos.shape)}")
    _checks.shape("sin", sin, cos.shape, " (the shape of cos)")
    if D % 2:
        raise ValueError(f"the head dim of q must be even, got {D}")
    _checks.same_device(q=q, k=k, cos=cos, sin=sin)
    fn = _backend.pick("apply_rotary", backend, q.device, q, k, cos, sin)
    return (fn or _ref.apply_rotary)(q, k, cos, sin)


def silu_mul(gate, up, *, backend="auto"):
    """silu(gate) * up (the SwiGLU MLP's activation), fp32 math, gate's dtype. Differentiable (the Triton
    kernel has a fused backward)."""
    _checks.float_tensor("gate", gate, min_ndim=1)
    _checks.float_tensor("up", up, min_ndim=1)
    _checks.shape("up", up, gate.shape, " (the shape of gate)")
    _checks.same_device(gate=gate, up=up)
    fn = _backend.pick("silu_mul", backend, gate.device, gate, up)
    return (fn or _ref.silu_mul)(gate, up)


from . import moe  # noqa: E402
from .patch import patch  # noqa: E402
