"""Liger-Kernel-compatible GRPO entry points backed by r1kernels (signatures of liger-kernel 0.8.5): code
written for Liger switches by its import line.

    from r1kernels.integrations.liger import LigerFusedLinearGRPOLoss   # was liger_kernel.chunked_loss
    from r1kernels.integrations.liger import triton_grpo_loss           # was liger_kernel.transformers.grpo_loss

Same constructor and call arguments, defaults and outputs: LigerFusedLinearGRPOLoss(...)(_input [B, T, H],
lin_weight [V, H], selected_token_ids, attention_mask, advantages [B], ...) -> (loss, (kl?, clip_ratio));
triton_grpo_loss(logits [B, T + 1, V], ...) -> (loss, [kl?, clip_ratio]) with reduce=True, else the masked
per-token (loss, kl, is_clipped). kl is listed only when beta != 0. Options r1kernels does not implement
(loss_type luspo/vespo, vllm_is_ratio, use_bias_correction_kl with beta != 0, SAPO temperatures other than
1.0/1.05) run Liger's own code when liger-kernel is installed, after one warning; without it they are a
ValueError. compiled and chunk_size are accepted and have no effect (the kernels chunk by themselves).

Deliberate differences from liger-kernel 0.8.5:
- The metrics and triton_grpo_loss(reduce=False)'s kl and is_clipped carry no gradient (requires_grad False);
  Liger's carry a graph whose gradient its backward ignores, so a loss built from them gets the same gradient.
- triton_grpo_loss with delta: the gradient of the clamped formula (Liger's Triton backward leaves out delta's
  clamp); reduce=False never writes the gradient into the logits (Liger's inplace backward does).
- Masked positions are never read (old/ref log-probs and ids may be NaN, -inf or -100 there); Liger's
  sequence-level and chunked paths turn a NaN there into a NaN loss.
- An empty batch with a loss that averages over sequences (Liger: 0 / 0 = NaN) is a ValueError naming the
  input; a NaN or negative beta / epsilon and wrong shapes are ValueErrors naming Liger's argument (Liger
  computes NaN, or asserts); so is an unknown loss_type, before anything else.
NumPy real scalars as options (np.float32(0.04), np.int64(20)) are taken as the Python numbers of their values, as
Liger takes them; bools, arrays and tensors (even of one element) are not numbers here (a ValueError).
"""
from __future__ import annotations

import warnings

import torch

from .. import _check_loss_rows, _checks, grpo_loss, linear_grpo_loss, linear_token_logprobs, token_logprobs
from ..reference.grpo import LOSS_REDUCTION, LOSS_TYPES, SAPO_TAU_NEG, SAPO_TAU_POS, kl_per_token, per_token_objective

__all__ = ["LigerFusedLinearGRPOLoss", "triton_grpo_loss"]

_warned: set[str] = set()


def _unsupported(loss_type, beta, use_bias_correction_kl, vllm_is_ratio, sapo_temperature_pos,
                 sapo_temperature_neg, **extra) -> list[str]:
    out = [] if loss_type in LOSS_TYPES and loss_type not in ("luspo", "vespo") else [f"loss_type={loss_type!r}"]
    if use_bias_correction_kl and beta != 0.0:
        out.append("use_bias_correction_kl=True")
    if vllm_is_ratio is not None:
        out.append("vllm_is_ratio")
    if loss_type == "sapo" and (sapo_temperature_pos, sapo_temperature_neg) != (SAPO_TAU_POS, SAPO_TAU_NEG):
        out.append(f"sapo_temperature_pos/neg={sapo_temperature_pos}/{sapo_temperature_neg}")
    return out + [k for k, v in extra.items() if v]


def _liger(where: str, what: str, todo: list[str]):
    """Liger's own implementation of `what` for options r1kernels does not implement (one warning each)."""
    try:
        module = __import__(where, fromlist=[what])
    except ImportError as e:
        raise ValueError(f"{', '.join(todo)}: not implemented by r1kernels (install liger-kernel to run "
                         "Liger's implementation for it)") from e
    key = f"{what}: {', '.join(todo)}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"r1kernels: Liger's {what} runs for {', '.join(todo)}", stacklevel=3)
    return getattr(module, what)


def _check_options(loss_type, importance_sampling_level, delta, sapo_temperature_pos, sapo_temperature_neg,
                   max_completion_length=None, dr_grpo_needs_length=False, delta_ignored=False):
    """Liger's option checks, loss_type first: an unknown one is an error of its own, not an option to hand to
    Liger's code (with a warning that it runs there) or to call unimplemented. delta_ignored: delta with
    cispo/sapo/vespo is no error and has no effect (Liger's chunked class, like TRL, clamps the ratio by delta only
    for the clipped loss types); Liger's Triton loss refuses it."""
    _checks.choice("loss_type", loss_type, LOSS_TYPES)  # liger-kernel 0.8.5's eight types
    _checks.choice("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    for name, v in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg)):
        _checks.positive(name, v)
    if delta is not None:
        _checks.positive("delta", delta)
        if loss_type in ("cispo", "sapo", "vespo") and not delta_ignored:
            raise ValueError(f"delta (two-sided clipping) is not supported for loss_type={loss_type!r}")
    if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
        raise ValueError(f"importance_sampling_level='sequence' is not supported for loss_type={loss_type!r}")
    if dr_grpo_needs_length and loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length must be provided for loss_type='dr_grpo'")


def _numbers(options: dict) -> dict:
    """NumPy real scalars among the options as the Python numbers of their values (np.float32(0.04) -> the double
    float(np.float32(0.04)); np.int64 -> int), as Liger's own code takes them and as r1kernels takes NumPy numbers
    elsewhere (_checks.as_python). Everything else is left for the checks to name: bools, arrays and tensors (even
    of one element), NaN, negatives."""
    return {k: _checks.as_python(v) for k, v in options.items()}


def _dapo_normalizer(mask, num_items_in_batch, mask_name):
    """Liger's dapo/cispo denominator: num_items_in_batch (else the mask's token count, summed over ranks)
    divided by the world size, at least 1. A NaN / inf mask is an error naming mask_name (the core would name
    num_items_in_batch, which the caller never passed)."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if num_items_in_batch is not None:
        n = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
    else:
        n = mask.float().sum()
        if not torch.compiler.is_compiling():
            _checks.finite(mask_name, n)
        if world > 1:
            dist.all_reduce(n)
    return (n / world).clamp(min=1.0)


def _is_clipped(logp, old, adv, mask, eps_low, eps_high, loss_type, level):
    """Liger's per-token clip indicator (float [B, T]): standard types, either bound against the advantage's
    sign; cispo, r > eps_high with A > 0; sapo, none."""
    if loss_type == "sapo":
        return torch.zeros_like(mask)
    log_r = logp - (logp if old is None else old.float())
    log_r = log_r.masked_fill(mask == 0, 0.0)  # what old holds at masked positions (NaN, -inf) is never read
    if level == "sequence":
        log_r = ((log_r * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    a = adv.float()
    r, a = torch.exp(log_r), a.unsqueeze(-1) if a.ndim == 1 else a  # [B] -> [B, 1] (B may be 0)
    if loss_type == "cispo":
        return ((r > eps_high) & (a > 0)).float().expand_as(mask)
    return (((r < 1 - eps_low) & (a < 0)) | ((r > 1 + eps_high) & (a > 0))).float().expand_as(mask)


def _check_coefficients(beta, eps_low, eps_high, names=("beta", "epsilon_low", "epsilon_high")):
    """The loss coefficients under Liger's names (the core names them beta / epsilon / epsilon_high)."""
    _checks.positive(names[0], beta, allow_zero=True)
    _checks.positive(names[1], eps_low, allow_zero=True, allow_inf=True)
    _checks.positive(names[2], eps_high, allow_zero=True, allow_inf=True)


def _check_linear_inputs(_input, lin_weight, ids, mask, bias, old, ref, ref_input, ref_weight, ref_bias, use_ref):
    """LigerFusedLinearGRPOLoss's tensors, under Liger's argument names (shapes only: no host sync)."""
    _checks.float_tensor("_input", _input, ndim=3)
    B, T, H = _input.shape
    _checks.float_tensor("lin_weight", lin_weight, ndim=2)
    if lin_weight.shape[1] != H:
        raise ValueError(f"lin_weight must have shape [V, {H}] (the hidden size of _input), got "
                         f"{tuple(lin_weight.shape)}")
    _checks.int_tensor("selected_token_ids", ids, ndim=2)
    _checks.shape("selected_token_ids", ids, (B, T), " (the leading dims of _input)")
    _checks.tensor("attention_mask", mask, ndim=2)
    _checks.shape("attention_mask", mask, (B, T), " (the leading dims of _input)")
    if bias is not None:
        _checks.float_tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (lin_weight.shape[0],), " (the rows of lin_weight)")
    for name, t in (("old_per_token_logps", old), ("ref_per_token_logps", ref if use_ref else None)):
        if t is not None:
            _checks.float_tensor(name, t, ndim=2)
            _checks.shape(name, t, (B, T))
    if use_ref and ref is None and ref_input is not None:
        _checks.float_tensor("ref_input", ref_input, ndim=3)
        if tuple(ref_input.shape[:2]) != (B, T):
            raise ValueError(f"ref_input must have shape ({B}, {T}, H) (the leading dims of _input), got "
                             f"{tuple(ref_input.shape)}")
        if ref_weight is not None:
            _checks.float_tensor("ref_weight", ref_weight, ndim=2)
            if ref_weight.shape[1] != ref_input.shape[2]:
                raise ValueError(f"ref_weight must have shape [V, {ref_input.shape[2]}] (the hidden size of "
                                 f"ref_input), got {tuple(ref_weight.shape)}")
            if ref_bias is not None:
                _checks.float_tensor("ref_bias", ref_bias, ndim=1)
                _checks.shape("ref_bias", ref_bias, (ref_weight.shape[0],), " (the rows of ref_weight)")


def _mask_ids(ids, mask, V):
    """Masked positions may hold any id (e.g. -100); the kernels read a valid one there."""
    return ids.masked_fill((mask == 0) & ((ids < 0) | (ids >= V)), 0)


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss on r1kernels.linear_grpo_loss (module docstring).
    backend (keyword only, not Liger's): the r1kernels backend."""

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: int | None = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: float | None = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0, *,
                 backend: str = "auto"):
        super().__init__()
        _checks.choice("loss_type", loss_type, LOSS_TYPES)
        _checks.positive("sapo_temperature_pos", sapo_temperature_pos)  # NumPy scalars judged by value
        _checks.positive("sapo_temperature_neg", sapo_temperature_neg)
        if delta is not None:
            _checks.positive("delta", delta)
        options = dict(
            beta=beta, compiled=compiled, use_ref_model=use_ref_model, chunk_size=chunk_size,
            epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
            max_completion_length=max_completion_length, importance_sampling_level=importance_sampling_level,
            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            temperature=temperature, delta=delta, use_bias_correction_kl=use_bias_correction_kl,
            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg)
        self._option_names = tuple(options)
        self.__dict__.update(options)  # Liger's attribute names; forward reads them, as Liger's does
        self.backend = backend
        self._liger_module = None

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        c = _numbers({k: getattr(self, k) for k in self._option_names})
        _check_options(c["loss_type"], c["importance_sampling_level"], c["delta"], c["sapo_temperature_pos"],
                       c["sapo_temperature_neg"], c["max_completion_length"], dr_grpo_needs_length=True,
                       delta_ignored=True)
        todo = _unsupported(c["loss_type"], c["beta"], c["use_bias_correction_kl"], vllm_is_ratio,
                            c["sapo_temperature_pos"], c["sapo_temperature_neg"])
        if todo:
            if self._liger_module is None or self._liger_module[0] != c:
                self._liger_module = (c, _liger("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss", todo)(**c))
            return self._liger_module[1](_input, lin_weight, selected_token_ids, attention_mask, advantages, bias,
                                      ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias,
                                      vllm_is_ratio, num_items_in_batch)
        _check_coefficients(c["beta"], c["epsilon_low"], c["epsilon_high"])
        _check_linear_inputs(_input, lin_weight, selected_token_ids, attention_mask, bias, old_per_token_logps,
                             ref_per_token_logps, ref_input, ref_weight, ref_bias, c["use_ref_model"])
        advantages = advantages.detach()  # Liger's backward gives the advantages no gradient
        ref = None
        if c["use_ref_model"]:
            if ref_per_token_logps is None and ref_input is None:
                raise ValueError("ref_per_token_logps or ref_input is required when use_ref_model=True")
            ref = ref_per_token_logps
            if ref is None:
                if ref_weight is None:
                    raise ValueError("ref_weight is required with ref_input (the reference model's lm_head weight)")
                ref_ids = _mask_ids(selected_token_ids, attention_mask, ref_weight.shape[0])
                if not torch.compiler.is_compiling():  # the core would name them `labels`
                    _checks.labels_in_range("selected_token_ids", ref_ids.masked_fill(attention_mask == 0, 0),
                                            ref_weight.shape[0], " (the rows of ref_weight) where attention_mask "
                                            "is not 0")
                with torch.no_grad():
                    ref = linear_token_logprobs(ref_input, ref_weight, ref_ids,
                                                bias=ref_bias, temperature=c["temperature"], backend=self.backend)
        if not torch.compiler.is_compiling():  # under Liger's names (the core's: completion_ids, completion_mask)
            V = lin_weight.shape[0]
            _checks.labels_in_range("selected_token_ids", selected_token_ids.masked_fill(attention_mask == 0, 0), V,
                                    " (the rows of lin_weight) where attention_mask is not 0")
        beta = c["beta"] if ref is not None else 0.0  # Liger: no reference -> KL 0
        items = LOSS_REDUCTION[c["loss_type"]] == "items"
        _check_loss_rows("_input", _input.shape[0], c["loss_type"], _LIGER_NAN)
        out = linear_grpo_loss(
            _input, lin_weight, selected_token_ids, advantages, attention_mask, bias=bias,
            old_logprobs=old_per_token_logps, ref_logprobs=ref, beta=beta, epsilon=c["epsilon_low"],
            epsilon_high=c["epsilon_high"], delta=None if c["loss_type"] in ("cispo", "sapo") else c["delta"],
            loss_type=c["loss_type"],
            importance_sampling_level=c["importance_sampling_level"], temperature=c["temperature"],
            max_completion_length=c["max_completion_length"],
            num_items_in_batch=_dapo_normalizer(attention_mask, num_items_in_batch, "attention_mask") if items
            else None,
            use_bias_correction_kl=False, backend=self.backend)
        return out.loss, tuple(_metrics(out, old_per_token_logps, advantages, attention_mask, c["beta"],
                                    c["epsilon_low"], c["epsilon_high"], c["loss_type"],
                                    c["importance_sampling_level"]))


# the drop-ins refuse an empty batch where liger-kernel returns NaN (0 / 0) and return its 0 elsewhere
_LIGER_NAN = " (liger-kernel returns NaN)"


def _metrics(out, old, adv, mask, beta, eps_low, eps_high, loss_type, level):
    mask = mask.float()
    clipped = _is_clipped(out.per_token_logprobs, old, adv, mask, eps_low, eps_high, loss_type, level)
    clip_ratio = (clipped * mask).sum() / mask.sum().clamp(min=1.0)
    return ([out.metrics["kl"]] if beta != 0.0 else []) + [clip_ratio]


def triton_grpo_loss(logits, old_logp, ref_logp, completion_ids, advantages, completion_mask=None, temperature=0.9,
                     beta=0.04, eps_low=0.2, eps_high=0.4, inplace=True, loss_type="dapo", max_completion_length=None,
                     importance_sampling_level="token", reduce=False, sapo_temperature_pos=1.0,
                     sapo_temperature_neg=1.05, vllm_is_ratio=None, delta=None, use_bias_correction_kl=False,
                     num_items_in_batch=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                     vespo_lambda_neg=2.0, *, backend="auto"):
    """liger_kernel.transformers.grpo_loss.triton_grpo_loss on r1kernels (module docstring). logits
    [B, T + 1, V]: logits[:, t] scores completion_ids[:, t] and the last position is unused. reduce=True runs
    the fused loss kernel (inplace: its backward writes the logits' gradient into their storage);
    reduce=False returns per-token (loss * mask, kl * mask or None, is_clipped * mask) through the log-prob
    kernel. backend (keyword only, not Liger's): the r1kernels backend."""
    _checks.float_tensor("logits", logits, ndim=3)
    (temperature, beta, eps_low, eps_high, max_completion_length, sapo_temperature_pos, sapo_temperature_neg, delta,
     vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg) = map(_checks.as_python, (
        temperature, beta, eps_low, eps_high, max_completion_length, sapo_temperature_pos, sapo_temperature_neg, delta,
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg))  # NumPy scalars: _numbers
    _check_options(loss_type, importance_sampling_level, delta, sapo_temperature_pos, sapo_temperature_neg)
    todo = _unsupported(loss_type, beta, use_bias_correction_kl, vllm_is_ratio, sapo_temperature_pos,
                        sapo_temperature_neg)
    if todo:
        fn = _liger("liger_kernel.transformers.grpo_loss", "triton_grpo_loss", todo)
        return fn(logits, old_logp, ref_logp, completion_ids, advantages, completion_mask, temperature, beta, eps_low,
                  eps_high, inplace, loss_type, max_completion_length, importance_sampling_level, reduce,
                  sapo_temperature_pos, sapo_temperature_neg, vllm_is_ratio, delta, use_bias_correction_kl,
                  num_items_in_batch, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    _check_coefficients(beta, eps_low, eps_high, ("beta", "eps_low", "eps_high"))
    B, T1, V = logits.shape
    if T1 < 1:
        raise ValueError(f"logits must have shape [B, T + 1, V], got {tuple(logits.shape)}")
    _checks.int_tensor("completion_ids", completion_ids, ndim=2)
    _checks.shape("completion_ids", completion_ids, (B, T1 - 1), " (logits has T + 1 positions)")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta != 0")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp if beta != 0.0 else None),
                    ("completion_mask", completion_mask)):
        if t is not None:
            (_checks.tensor if name == "completion_mask" else _checks.float_tensor)(name, t)
            _checks.shape(name, t, (B, T1 - 1), " (logits has T + 1 positions)")
    _checks.float_tensor("advantages", advantages)
    if tuple(advantages.shape) not in ((B,), (B, 1)):
        raise ValueError(f"advantages must have shape ({B},) or ({B}, 1), got {tuple(advantages.shape)}")
    advantages = advantages.detach()  # Liger's backward gives the advantages no gradient
    mask = completion_mask if completion_mask is not None else torch.ones(B, T1 - 1, device=logits.device)
    x = logits[:, :-1]
    items = LOSS_REDUCTION[loss_type] == "items"
    if reduce:
        _check_loss_rows("logits", B, loss_type, _LIGER_NAN)
        out = grpo_loss(x, completion_ids, advantages, mask, old_logprobs=old_logp,
                        ref_logprobs=ref_logp if beta != 0.0 else None, beta=beta, epsilon=eps_low,
                        epsilon_high=eps_high, delta=delta, loss_type=loss_type,
                        importance_sampling_level=importance_sampling_level, temperature=temperature,
                        max_completion_length=max_completion_length,
                        num_items_in_batch=_dapo_normalizer(mask, num_items_in_batch, "completion_mask") if items
                        else None,
                        use_bias_correction_kl=False, inplace_backward=bool(inplace), backend=backend)
        return out.loss, _metrics(out, old_logp, advantages, mask, beta, eps_low, eps_high, loss_type,
                              importance_sampling_level)
    if not torch.compiler.is_compiling():  # as reduce=True (the core's check) refuses them
        _checks.finite("advantages", advantages)
    m = mask.float()
    ids = _mask_ids(completion_ids, mask, V)
    _checks.labels_in_range("completion_ids", ids.masked_fill(m == 0, 0), V,
                            " where completion_mask is not 0 (masked positions may hold any value, e.g. -100)")
    logp = token_logprobs(x, ids, temperature=temperature, backend=backend)
    on = m != 0  # masked positions are skipped, as Liger's kernel does: whatever old/ref hold there (NaN, -inf)
    # old/ref log-probs are constants (Liger's kernel returns them no gradient)
    old = logp.detach() if old_logp is None else torch.where(on, old_logp.detach().float(), logp.detach())
    L, _ = per_token_objective(logp, old, advantages.float().reshape(B, 1), m, epsilon=eps_low,
                               epsilon_high=eps_high, delta=delta, loss_type=loss_type,
                               importance_sampling_level=importance_sampling_level)
    kl = None
    if beta != 0.0:
        kl = kl_per_token(logp, torch.where(on, ref_logp.detach().float(), logp.detach()), "k3")
        L = L + beta * kl
    clipped = _is_clipped(logp.detach(), None if old_logp is None else old, advantages, m, eps_low, eps_high,
                          loss_type, importance_sampling_level)
    # kl and is_clipped are reported, not trained on: Liger's backward reads only the per-token loss's gradient
    return L * m, (kl.detach() * m if kl is not None else None), clipped * m
