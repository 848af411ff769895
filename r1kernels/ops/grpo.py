"""grpo_loss as torch.library custom ops over the Triton kernels.

r1kernels::grpo_loss_fwd returns (stats [5] = loss, kl, clip low, high, region; per-token log-probs
[B, T]; the logits' gradient [B, T, V] for upstream 1). Token level: one kernel, one read of the logits
(a second read of each row from L2) and one write of the gradient. Sequence level: two passes over the
logits, a read (log-probs: the sequence ratio needs every token first) and a read + write (gradient).
Backward only scales the stored gradient by the upstream scalar, in place, and skips even that when it
is 1. r1kernels::grpo_loss_fwd_inplace writes the gradient into the logits' own storage (no [B, T, V]
buffer); it is differentiated through a torch.autograd.Function (custom ops that mutate cannot carry
register_autograd). Masked tokens (mask 0) read nothing; their per-token log-prob is returned as 0.
"""
from __future__ import annotations

import torch

from ..reference import grpo as _ref
from ..triton import grpo as _k
from ..triton import logprob as _lk

STAT_KEYS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def _row_scale(mask_f, B, T, loss_code, max_len, num_items_t, num_items_f, device):
    """s [B] with loss = sum_bt m_bt * s_b * L_bt (the reduction of DESIGN.md section 3)."""
    n_row = mask_f.sum(-1) if mask_f is not None else torch.full((B,), float(T), device=device)
    if loss_code == 0:  # grpo
        return 1.0 / (B * n_row.clamp(min=1.0))
    if loss_code == 1:  # bnpo
        s = 1.0 / n_row.sum().clamp(min=1.0)
    elif loss_code == 2:  # dr_grpo
        s = torch.full((), 1.0 / (B * (max_len if max_len is not None else T)), device=device)
    elif num_items_t is not None:
        s = 1.0 / num_items_t.float().reshape(())
    elif num_items_f is not None:
        s = torch.full((), 1.0 / num_items_f, device=device)
    else:
        s = 1.0 / n_row.sum().clamp(min=1.0)
    return s.float().expand(B).contiguous()


def _seq_coeffs(logp, adv, mask_f, old, ref, s_B, eps_low, eps_high, delta, beta, loss_code, kl_code):
    """dLoss/dl [B, T] for sequence-level importance sampling (the chain rule through log w_b)."""
    m = mask_f if mask_f is not None else torch.ones_like(logp)
    n = m.sum(-1, keepdim=True).clamp(min=1.0)
    old_e = logp if old is None else old
    r = torch.exp((m * (logp - old_e)).sum(-1, keepdim=True) / n)
    A = (adv.unsqueeze(-1) if adv.dim() == 1 else adv).expand_as(logp)
    s = s_B.unsqueeze(-1)
    if loss_code == 4:  # cispo: -sg(min(r, eps_high)) A l, no gradient through r
        c = s * m * (-torch.clamp(r, max=eps_high) * A)
    else:
        if loss_code == 5:
            tau = torch.where(A > 0, 1.0, _ref.SAPO_TAU_NEG)
            sg = torch.sigmoid(tau * (r - 1.0))
            dLdr = -4.0 * A * sg * (1.0 - sg)
        else:
            a = (torch.clamp(r, max=delta) if delta is not None else r) * A
            bb = torch.clamp(r, 1.0 - eps_low, 1.0 + eps_high) * A
            ga = A * (r <= delta) if delta is not None else A
            gb = A * ((r >= 1.0 - eps_low) & (r <= 1.0 + eps_high))
            dLdr = -torch.where(a < bb, ga, torch.where(a > bb, gb, 0.5 * (ga + gb)))
        c = s * r * m / n * (m * dLdr).sum(-1, keepdim=True)
    if ref is not None and beta != 0.0:
        d = ref - logp
        if kl_code == 0:
            dkl = torch.ones_like(d)
        elif kl_code == 1:
            dkl = -d
        elif kl_code == 2:
            dkl = 1.0 - torch.exp(d)
        else:
            dc = d.clamp(-20.0, 20.0)
            v = torch.exp(dc) - dc - 1.0
            dkl = torch.where((d >= -20) & (d <= 20) & (v <= 10), 1.0 - torch.exp(dc), 0.0)
        c = c + s * m * beta * dkl
    return c.contiguous()


def _forward(logits, ids, adv, mask, old, ref, num_items_t, num_items_f, max_len, temperature, eps_low, eps_high,
             delta, beta, loss_code, kl_code, seq, dx, dx_strides):
    B, T, V = logits.shape
    dev = logits.device
    mask_f = mask.float().contiguous() if mask is not None else None
    s_B = _row_scale(mask_f, B, T, loss_code, max_len, num_items_t, num_items_f, dev)
    ids = ids.contiguous()
    adv = adv.float().contiguous()
    old = old.float().contiguous() if old is not None else None
    ref = ref.float().contiguous() if ref is not None else None
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    if not seq:
        logp = torch.empty(B, T, device=dev, dtype=torch.float32)
        stats = torch.empty(5, B * T, device=dev, dtype=torch.float32)
        _k.grpo_token(x, ids, adv, mask_f, old, ref, s_B, logp, stats, dx, dx_strides, temperature=temperature,
                      eps_low=eps_low, eps_high=eps_high, delta=delta, beta=beta, loss_code=loss_code,
                      kl_code=kl_code)
        sums = stats.sum(1)
        n_tok = mask_f.sum().clamp(min=1.0) if mask_f is not None else torch.full((), float(max(B * T, 1)),
                                                                                   device=dev)
        return torch.cat([sums[:1], sums[1:] / n_tok]), logp
    logp, lse, _ = _lk.logprob_fwd(x, ids, temperature, False, mask=mask_f.reshape(-1) if mask_f is not None
                                   else None)
    logp = logp.view(B, T)
    loss_type = _ref.LOSS_TYPES[loss_code]
    loss, metrics = _ref.grpo_loss_from_logprobs(
        logp, adv, mask_f, old, ref, beta=beta, epsilon=eps_low, epsilon_high=eps_high, delta=delta,
        loss_type=loss_type, importance_sampling_level="sequence", kl_estimator=_ref.KL_ESTIMATORS[kl_code],
        max_completion_length=max_len, num_items_in_batch=num_items_t if num_items_t is not None else num_items_f)
    c = _seq_coeffs(logp, adv, mask_f, old, ref, s_B, eps_low, eps_high, delta, beta, loss_code, kl_code)
    _lk.logprob_bwd(x, ids, lse, lse, c, None, temperature, out=dx, out_strides=dx_strides)
    stats = torch.stack([loss.float().reshape(())] + [metrics[k].float().reshape(()) for k in STAT_KEYS])
    return stats, logp


_SCHEMA_ARGS = ("ids", "adv", "mask", "old", "ref", "num_items_t", "num_items_f", "max_len", "temperature",
                "eps_low", "eps_high", "delta", "beta", "loss_code", "kl_code", "seq")


@torch.library.custom_op("r1kernels::grpo_loss_fwd", mutates_args=())
def grpo_loss_fwd(logits: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor | None,
                  old: torch.Tensor | None, ref: torch.Tensor | None, num_items_t: torch.Tensor | None,
                  num_items_f: float | None, max_len: int | None, temperature: float, eps_low: float,
                  eps_high: float, delta: float | None, beta: float, loss_code: int, kl_code: int,
                  seq: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)
    B, T, V = logits.shape
    stats, logp = _forward(logits, ids, adv, mask, old, ref, num_items_t, num_items_f, max_len, temperature,
                           eps_low, eps_high, delta, beta, loss_code, kl_code, seq, dx, (T * V, V))
    return stats, logp, dx


@grpo_loss_fwd.register_fake
def _(logits, ids, adv, mask, old, ref, num_items_t, num_items_f, max_len, temperature, eps_low, eps_high, delta,
      beta, loss_code, kl_code, seq):
    B, T, V = logits.shape
    return (logits.new_empty(5, dtype=torch.float32), logits.new_empty(B, T, dtype=torch.float32),
            torch.empty(logits.shape, device=logits.device, dtype=logits.dtype))


@torch.library.custom_op("r1kernels::grpo_loss_fwd_inplace", mutates_args=("logits",))
def grpo_loss_fwd_inplace(logits: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor | None,
                          old: torch.Tensor | None, ref: torch.Tensor | None, num_items_t: torch.Tensor | None,
                          num_items_f: float | None, max_len: int | None, temperature: float, eps_low: float,
                          eps_high: float, delta: float | None, beta: float, loss_code: int, kl_code: int,
                          seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.stride(-1) != 1:
        raise ValueError("inplace_backward needs logits with a contiguous last dimension")
    return _forward(logits, ids, adv, mask, old, ref, num_items_t, num_items_f, max_len, temperature, eps_low,
                    eps_high, delta, beta, loss_code, kl_code, seq, logits, (logits.stride(0), logits.stride(1)))


@grpo_loss_fwd_inplace.register_fake
def _(logits, ids, adv, mask, old, ref, num_items_t, num_items_f, max_len, temperature, eps_low, eps_high, delta,
      beta, loss_code, kl_code, seq):
    B, T, V = logits.shape
    return logits.new_empty(5, dtype=torch.float32), logits.new_empty(B, T, dtype=torch.float32)


@torch.library.custom_op("r1kernels::grpo_scale_grad_", mutates_args=("grad",))
def grpo_scale_grad_(grad: torch.Tensor, g: torch.Tensor) -> None:
    """grad *= g in place; a no-op kernel when g == 1 (no host sync)."""
    _k.scale_(grad, g.reshape(1).float())


@grpo_scale_grad_.register_fake
def _(grad, g):
    return None


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.set_materialize_grads(False)  # else autograd fills a zero [B, T, V] gradient for the dx output


def _backward(ctx, g_stats, g_logp, g_dx):
    if g_stats is None:  # only the (non-differentiable) metrics / log-probs were used
        return (None,) * (1 + len(_SCHEMA_ARGS))
    (dx,) = ctx.saved_tensors
    grpo_scale_grad_(dx, g_stats[0])
    return (dx,) + (None,) * len(_SCHEMA_ARGS)


grpo_loss_fwd.register_autograd(_backward, setup_context=_setup)


class _GRPOInplace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, *args):
        stats, logp = grpo_loss_fwd_inplace(logits, *args)
        ctx.save_for_backward(logits)
        ctx.mark_non_differentiable(logp)
        ctx.set_materialize_grads(False)
        return stats, logp

    @staticmethod
    def backward(ctx, g_stats, g_logp):
        if g_stats is None:
            return (None,) * (1 + len(_SCHEMA_ARGS))
        (dx,) = ctx.saved_tensors
        grpo_scale_grad_(dx, g_stats[0])
        return (dx,) + (None,) * len(_SCHEMA_ARGS)


def grpo_loss_triton(logits, completion_ids, advantages, completion_mask=None, *, temperature=1.0,
                     inplace_backward=False, old_logprobs=None, ref_logprobs=None, beta=0.0, epsilon=0.2,
                     epsilon_high=None, delta=None, loss_type="dapo", importance_sampling_level="token",
                     kl_estimator="k3", max_completion_length=None, num_items_in_batch=None):
    nt = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else None
    nf = float(num_items_in_batch) if num_items_in_batch is not None and nt is None else None
    args = (completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs, nt, nf, max_completion_length,
            float(temperature), float(epsilon), float(epsilon if epsilon_high is None else epsilon_high),
            None if delta is None else float(delta), float(beta), _k.LOSS_CODES[loss_type],
            _k.KL_CODES[kl_estimator], importance_sampling_level == "sequence")
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        stats, logp = _GRPOInplace.apply(logits, *args)
    else:
        stats, logp, _ = grpo_loss_fwd(logits, *args)
    metrics = {k: stats[i + 1].detach() for i, k in enumerate(STAT_KEYS)}
    return stats[0], logp, metrics


def _eligible(logits, completion_ids, *a, **k):
    return logits.dim() == 3 and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)


grpo_loss_triton.eligible = _eligible
