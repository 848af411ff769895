"""linear_grpo_loss: hidden [B, T, H] and the lm_head weight [V, H] -> the GRPO loss without holding the
[B, T, V] logits. Per chunk of whole sequences: cuBLAS logits (hidden dtype) -> the fused Triton loss
kernel writing dLoss/dlogits into the chunk's own logits buffer -> the two gradient matmuls (dhidden,
dweight accumulated in fp32). Gradients are computed in the forward (like the logits kernel); backward
scales them by the upstream scalar in place (skipped when it is 1). Sequence level: one extra logits
matmul per chunk (a log-prob pass first: the sequence ratio needs every token).
linear_token_logprobs: per chunk, logits -> the log-prob kernel (lse saved); backward recomputes each
chunk's logits, writes their gradient in place and runs the two gradient matmuls."""
from __future__ import annotations

import torch

from ..reference import grpo as _ref
from ..triton import grpo as _k
from ..triton import logprob as _lk
from .grpo import STAT_KEYS, _row_scale, _seq_coeffs, grpo_scale_grad_

CHUNK_ROWS = 8192  # rows of logits per chunk: 8192 x 151936 bf16 = 2.5 GB


def _logits(h, weight, bias):
    z = h @ weight.t()
    return z + bias.to(z.dtype) if bias is not None else z


@torch.library.custom_op("r1kernels::linear_grpo_fwd", mutates_args=())
def linear_grpo_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                    adv: torch.Tensor, mask: torch.Tensor | None, old: torch.Tensor | None, ref: torch.Tensor | None,
                    num_items_t: torch.Tensor | None, num_items_f: float | None, max_len: int | None,
                    temperature: float, eps_low: float, eps_high: float, delta: float | None, beta: float,
                    loss_code: int, kl_code: int, seq: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    mask_f = mask.float().contiguous() if mask is not None else None
    s_B = _row_scale(mask_f, B, T, loss_code, max_len, num_items_t, num_items_f, dev)
    ids = ids.contiguous()
    adv = adv.float().contiguous()
    adv_B = adv if adv.dim() == 1 else None
    old = old.float().contiguous() if old is not None else None
    ref = ref.float().contiguous() if ref is not None else None
    dh = torch.empty_like(hidden)
    dw = torch.zeros(V, H, device=dev, dtype=torch.float32)
    db = torch.zeros(V if bias is not None else 0, device=dev, dtype=torch.float32)
    logp = torch.empty(B, T, device=dev, dtype=torch.float32)
    bc = max(1, CHUNK_ROWS // max(T, 1))
    chunks = [(b0, min(B, b0 + bc)) for b0 in range(0, B, bc)]
    sl = lambda t, b0, b1: t[b0:b1] if t is not None else None

    def grads(z, b0, b1):  # z now holds dLoss/dlogits for sequences b0:b1
        z2 = z.view(-1, V)
        dh[b0:b1] = (z2 @ weight).view(b1 - b0, T, H)
        dw.add_(z2.t() @ hidden[b0:b1].reshape(-1, H))
        if bias is not None:
            db.add_(z2.sum(0, dtype=torch.float32))

    if not seq:
        sums = torch.zeros(5, device=dev, dtype=torch.float32)
        for b0, b1 in chunks:
            z = _logits(hidden[b0:b1], weight, bias)
            n = (b1 - b0) * T
            st = torch.empty(5, n, device=dev, dtype=torch.float32)
            a = adv_B[b0:b1] if adv_B is not None else adv[b0:b1]
            _k.grpo_token(z, ids[b0:b1], a, sl(mask_f, b0, b1), sl(old, b0, b1), sl(ref, b0, b1), s_B[b0:b1],
                          logp[b0:b1], st, z, (z.stride(0), z.stride(1)), temperature=temperature, eps_low=eps_low,
                          eps_high=eps_high, delta=delta, beta=beta, loss_code=loss_code, kl_code=kl_code)
            sums += st.sum(1)
            grads(z, b0, b1)
        n_tok = mask_f.sum().clamp(min=1.0) if mask_f is not None else torch.full((), float(max(B * T, 1)),
                                                                                   device=dev)
        stats = torch.cat([sums[:1], sums[1:] / n_tok])
    else:
        lse = torch.empty(B, T, device=dev, dtype=torch.float32)
        for b0, b1 in chunks:
            z = _logits(hidden[b0:b1], weight, bias)
            lp, ls, _ = _lk.logprob_fwd(z, ids[b0:b1], temperature, False,
                                        mask=mask_f[b0:b1].reshape(-1) if mask_f is not None else None)
            logp[b0:b1] = lp.view(b1 - b0, T)
            lse[b0:b1] = ls.view(b1 - b0, T)
        loss, metrics = _ref.grpo_loss_from_logprobs(
            logp, adv, mask_f, old, ref, beta=beta, epsilon=eps_low, epsilon_high=eps_high, delta=delta,
            loss_type=_ref.LOSS_TYPES[loss_code], importance_sampling_level="sequence",
            kl_estimator=_ref.KL_ESTIMATORS[kl_code], max_completion_length=max_len,
            num_items_in_batch=num_items_t if num_items_t is not None else num_items_f)
        c = _seq_coeffs(logp, adv, mask_f, old, ref, s_B, eps_low, eps_high, delta, beta, loss_code, kl_code)
        for b0, b1 in chunks:
            z = _logits(hidden[b0:b1], weight, bias)
            _lk.logprob_bwd(z, ids[b0:b1], lse[b0:b1].reshape(-1), lse, c[b0:b1], None, temperature, out=z,
                            out_strides=(z.stride(0), z.stride(1)))
            grads(z, b0, b1)
        stats = torch.stack([loss.float().reshape(())] + [metrics[k].float().reshape(()) for k in STAT_KEYS])
    return stats, logp, dh, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else db


@linear_grpo_fwd.register_fake
def _(hidden, weight, bias, ids, adv, mask, old, ref, num_items_t, num_items_f, max_len, temperature, eps_low,
      eps_high, delta, beta, loss_code, kl_code, seq):
    B, T, H = hidden.shape
    f = torch.float32
    return (hidden.new_empty(5, dtype=f), hidden.new_empty(B, T, dtype=f), torch.empty_like(hidden),
            torch.empty_like(weight), bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0, dtype=f))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.has_bias = inputs[2] is not None
    ctx.set_materialize_grads(False)


def _backward(ctx, g_stats, g_logp, g_dh, g_dw, g_db):
    n_rest = 16
    if g_stats is None:
        return (None,) * (3 + n_rest)
    dh, dw, db = ctx.saved_tensors
    for t in (dh, dw, db) if ctx.has_bias else (dh, dw):
        grpo_scale_grad_(t, g_stats[0])
    return (dh, dw, db if ctx.has_bias else None) + (None,) * n_rest


linear_grpo_fwd.register_autograd(_backward, setup_context=_setup)


def linear_grpo_loss_triton(hidden, weight, completion_ids, advantages, completion_mask=None, *, bias=None,
                            temperature=1.0, old_logprobs=None, ref_logprobs=None, beta=0.0, epsilon=0.2,
                            epsilon_high=None, delta=None, loss_type="dapo", importance_sampling_level="token",
                            kl_estimator="k3", max_completion_length=None, num_items_in_batch=None):
    nt = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else None
    nf = float(num_items_in_batch) if num_items_in_batch is not None and nt is None else None
    stats, logp, _, _, _ = linear_grpo_fwd(
        hidden, weight, bias, completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs, nt, nf,
        max_completion_length, float(temperature), float(epsilon),
        float(epsilon if epsilon_high is None else epsilon_high), None if delta is None else float(delta),
        float(beta), _k.LOSS_CODES[loss_type], _k.KL_CODES[kl_estimator], importance_sampling_level == "sequence")
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
