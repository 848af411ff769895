"""linear_grpo_loss: hidden [B, T, H] and the lm_head weight [V, H] -> the GRPO loss without holding the
[B, T, V] logits. Token level, per chunk of rows of the B*T tokens: cuBLAS logits (hidden dtype) -> the
fused Triton loss kernel writing dLoss/dlogits into the chunk's own logits buffer -> the two gradient
matmuls (dhidden written in place, dweight accumulated). Gradients are computed in the forward (like the
logits kernel), none when none is wanted; backward scales them by the upstream scalar (grpo.scale_saved_grads:
in place, skipped when it is 1, unless the backward keeps the graph for another). Sequence
level: the reference loss on linear_token_logprobs (autograd; its backward recomputes each chunk's logits).
linear_token_logprobs: per chunk, logits -> the log-prob kernel (lse saved); backward recomputes each
chunk's logits, writes their gradient in place and runs the two gradient matmuls.
softcap (both ops): the kernels read each logit x as softcap * tanh(x / softcap) (Gemma 2's
final_logit_softcapping) and write the gradient w.r.t. x: no extra pass over the chunk.

Chunk sizes come from a memory budget (chunk_plan): the bytes of the temporaries that grow with the chunk
(the logits buffer, which also holds its gradient, and the per-row fp32 vectors) plus, when it fits with
a chunk of at least MIN_CHUNK_ROWS rows, an fp32 accumulator of dweight; otherwise dweight accumulates in
the weight's dtype (fp32 GEMM accumulation within a chunk, one rounding per chunk).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..reference import grpo as _ref
from ..triton import logprob as _lk
from .grpo import KERNEL_OPTS, finish_stats, op_options, per_token_loss, scale_saved_grads, stat_metrics, token_level

# Default budgets: at N=8192, H=3584, V=151936 bf16 they give 3 chunks of 2752 rows (0.78 GiB of logits)
# for linear_grpo_loss and 8 chunks of 1024 rows (0.29 GiB) for linear_token_logprobs.
GRPO_CHUNK_BUDGET = 960 * 2**20
LOGPROB_CHUNK_BUDGET = 300 * 2**20
MIN_CHUNK_ROWS = 1024  # below this the GEMMs lose efficiency; the fp32 dweight accumulator yields to it
ROW_FP32_BYTES = 64    # per row: log-prob, lse, entropy, five loss sums, two coefficients, slack


class ChunkPlan(NamedTuple):
    rows: int             # rows of logits per chunk (the last chunk may be shorter)
    chunks: int
    budget_bytes: int
    fp32_dweight: bool    # dweight accumulated in fp32 (else in the weight's dtype)
    temp_bytes: int       # the planned temporaries: logits chunk + per-row fp32 (+ fp32 dweight)


def _mm_out_fp32(device) -> bool:
    """torch.addmm(acc_fp32, a_bf16, b_bf16, out_dtype=fp32): CUDA and torch >= 2.8."""
    return device.type == "cuda" and "out_dtype" in (torch.addmm.__doc__ or "")


def chunk_plan(N: int, V: int, dtype: torch.dtype, budget_bytes: int, *, weight_numel: int = 0,
               weight_dtype: torch.dtype | None = None, device=None) -> ChunkPlan:
    """Rows per chunk for N rows of V logits in `dtype` under budget_bytes. weight_numel > 0 (a weight
    gradient is accumulated): an fp32 accumulator is planned when the weight is not fp32 and it fits
    beside a chunk of min(N, MIN_CHUNK_ROWS) rows (and fp32-output addmm exists on the device).
    Chunks are balanced (equal sizes, rounded up to a multiple of 64 rows where the budget allows)."""
    row_bytes = V * torch.empty((), dtype=dtype).element_size() + ROW_FP32_BYTES
    acc = weight_numel * 4 if weight_numel and weight_dtype not in (None, torch.float32) else 0
    fp32_dw = bool(acc) and (device is None or _mm_out_fp32(torch.device(device))) and \
        acc + min(max(N, 1), MIN_CHUNK_ROWS) * row_bytes <= budget_bytes
    max_rows = max(1, (budget_bytes - (acc if fp32_dw else 0)) // row_bytes)
    chunks = max(1, math.ceil(N / max_rows))
    rows = max(1, math.ceil(N / chunks))
    if rows < N and -(-rows // 64) * 64 <= max_rows:
        rows = -(-rows // 64) * 64
        chunks = math.ceil(N / rows)
    temp = min(rows, max(N, 1)) * row_bytes + (acc if fp32_dw else 0)
    return ChunkPlan(rows, chunks, int(budget_bytes), fp32_dw, temp)


def _plan(h2, weight, budget, grad_weight):
    return chunk_plan(h2.shape[0], weight.shape[0], h2.dtype, budget,
                      weight_numel=weight.numel() if grad_weight else 0, weight_dtype=weight.dtype,
                      device=h2.device)


def _chunk_buffer(plan, h, weight):
    """One logits buffer of plan.rows rows, reused by every chunk: a new tensor per chunk would hold two
    chunks at once (the last one is freed only when its name is rebound), 2x the planned temporaries
    (measured on the H200: 1.60 GB of temporaries for 0.80 GB planned at N=8192, V=151936)."""
    return torch.empty(min(plan.rows, h.shape[0]), weight.shape[0], dtype=h.dtype, device=h.device)


def _logits(h, weight, bias, buf):
    """h @ weight.T (+ bias) into the first rows of buf."""
    out = buf[:h.shape[0]]
    if bias is not None:
        return torch.addmm(bias.to(h.dtype), h, weight.t(), out=out)
    return torch.mm(h, weight.t(), out=out)


def _dweight(plan, weight):
    return torch.zeros(weight.shape, device=weight.device,
                       dtype=torch.float32 if plan.fp32_dweight else weight.dtype)


def _accumulate(dw, g, h):
    """dw += g.T @ h without a [V, H] temporary (fp32 output straight from bf16/fp16 operands)."""
    if dw.dtype == g.dtype:
        dw.addmm_(g.t(), h)
    else:
        torch.addmm(dw, g.t(), h, out_dtype=torch.float32, out=dw)


@torch.library.custom_op("r1kernels::linear_grpo_fwd", mutates_args=())
def linear_grpo_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor,
                    adv: torch.Tensor, mask: torch.Tensor | None, old: torch.Tensor | None, ref: torch.Tensor | None,
                    samp: torch.Tensor | None, num_items: torch.Tensor | None, *, num_items_f: float | None,
                    max_completion_length: int | None, temperature: float, epsilon: float, epsilon_high: float,
                    delta: float | None, beta: float, loss_type: str, kl_estimator: str, sapo_tau_pos: float,
                    sapo_tau_neg: float, is_mode: str | None, is_clip_min: float | None, is_clip_max: float | None,
                    bias_kl: bool, entropy: bool, chunk_budget_bytes: int, grad_hidden: bool = True,
                    grad_weight: bool = True, softcap: float | None = None, grad_bias: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (stats, logp, dh, dw, db): the gradients of the loss (stats[0]) written in the forward; dh / dw / db
    empty (0 values) when not grad_hidden / grad_weight / grad_bias (a frozen lm_head: no weight-gradient GEMM,
    no [V, H] buffer). None of them: the kernel writes no logits gradient either (the loss and metrics only)."""
    B, T, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    opts = dict(num_items_f=num_items_f, max_completion_length=max_completion_length, temperature=temperature,
                epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, beta=beta, loss_type=loss_type,
                kl_estimator=kl_estimator, **{k: v for k, v in locals().items() if k in KERNEL_OPTS})
    h2 = hidden.reshape(B * T, H)
    plan = _plan(h2, weight, chunk_budget_bytes, grad_weight)
    dh = torch.empty_like(h2) if grad_hidden else h2.new_empty(0)
    dw = _dweight(plan, weight) if grad_weight else weight.new_empty(0)
    grad_bias = grad_bias and bias is not None
    db = torch.zeros(V if grad_bias else 0, device=dev, dtype=torch.float32)
    any_grad = grad_hidden or grad_weight or grad_bias
    logp = torch.empty(B * T, device=dev, dtype=torch.float32)
    sums = torch.zeros(6, device=dev, dtype=torch.float32)
    buf = _chunk_buffer(plan, h2, weight)
    for r0 in range(0, B * T, plan.rows):
        r1 = min(B * T, r0 + plan.rows)
        z = _logits(h2[r0:r1], weight, bias, buf)
        s, logp[r0:r1] = token_level(z, ids, adv, mask, old, ref, samp, num_items, z if any_grad else None,
                                     (0, z.stride(0)), rows=(r0, r1), softcap=softcap, **opts)
        sums += s
        # with any_grad, z now holds dLoss/dlogits of rows r0:r1
        if grad_hidden:
            torch.mm(z, weight, out=dh[r0:r1])
        if grad_weight:
            _accumulate(dw, z, h2[r0:r1])
        if grad_bias:
            db.add_(z.sum(0, dtype=torch.float32))
    return (finish_stats(sums, mask, B, T), logp.view(B, T), dh.view(B, T, H) if grad_hidden else dh,
            dw.to(weight.dtype), db.to(bias.dtype) if grad_bias else db)


@linear_grpo_fwd.register_fake
def _(hidden, weight, bias, ids, adv, mask, old, ref, samp, num_items, grad_hidden=True, grad_weight=True, softcap=None,
      grad_bias=True, **opts):
    B, T, H = hidden.shape
    f = torch.float32
    return (hidden.new_empty(6, dtype=f), hidden.new_empty(B, T, dtype=f),
            torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if grad_weight else weight.new_empty(0),
            bias.new_empty(bias.shape) if bias is not None and grad_bias else hidden.new_empty(0, dtype=f))


def _setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*output[2:] if inputs[2] is not None else output[2:4])
    ctx.has_bias = inputs[2] is not None
    ctx.written = tuple(keyword_only_inputs.get(k, True) for k in ("grad_hidden", "grad_weight", "grad_bias"))
    ctx.set_materialize_grads(False)


# The backward returns a gradient (or None) per positional (Tensor) argument; options are keyword-only.
_N_TENSOR_ARGS = sum(not a.kwarg_only for a in linear_grpo_fwd._opoverload._schema.arguments)


def _backward(ctx, g_stats, g_logp, g_dh, g_dw, g_db):
    grads = scale_saved_grads(ctx, None if g_stats is None else g_stats[0])  # (dh, dw[, db])
    grads = tuple(g if w else None for g, w in zip(grads, ctx.written))  # not written: placeholders
    return grads + (None,) * (_N_TENSOR_ARGS - len(grads))


linear_grpo_fwd.register_autograd(_backward, setup_context=_setup)


def linear_grpo_loss_triton(hidden, weight, completion_ids, advantages, completion_mask=None, *, bias=None,
                            temperature=1.0, old_logprobs=None, ref_logprobs=None, chunk_budget_bytes=None,
                            softcap=None, **opts):
    """Token-local losses (reference/grpo.py token_local): the fused chunked kernel path. Others:
    linear_token_logprobs (+ entropy) and the reference loss (its backward recomputes each chunk)."""
    budget = GRPO_CHUNK_BUDGET if chunk_budget_bytes is None else int(chunk_budget_bytes)
    if not _ref.token_local(opts):
        ent = _ref.reports_entropy(opts)
        out = linear_token_logprobs_triton(hidden, weight, completion_ids, bias=bias, temperature=temperature,
                                           return_entropy=ent, chunk_budget_bytes=budget, softcap=softcap)
        logp, h = out if ent else (out, None)
        return per_token_loss(logp, h, advantages, completion_mask, old_logprobs, ref_logprobs, opts)
    samp = opts.get("sampling_logprobs")
    nt, kopts = op_options(temperature=temperature, **opts)
    grad = torch.is_grad_enabled()
    stats, logp, _, _, _ = linear_grpo_fwd(hidden, weight, bias, completion_ids, advantages, completion_mask,
                                           old_logprobs, ref_logprobs, samp if kopts["is_mode"] else None, nt,
                                           chunk_budget_bytes=budget, grad_hidden=grad and hidden.requires_grad,
                                           grad_weight=grad and weight.requires_grad,
                                           grad_bias=grad and bias is not None and bias.requires_grad,
                                           softcap=softcap, **kopts)
    return stats[0], logp, stat_metrics(stats, kopts["entropy"])


def _eligible(hidden, weight, completion_ids, *a, **k):
    ok = (torch.float32, torch.bfloat16, torch.float16)
    return hidden.dim() == 3 and hidden.dtype in ok and weight.dtype == hidden.dtype


linear_grpo_loss_triton.eligible = _eligible


def _rows2d(hidden, labels):
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)


@torch.library.custom_op("r1kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        temperature: float, entropy: bool, chunk_budget_bytes: int, softcap: float | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, y = _rows2d(hidden, labels)
    N = h.shape[0]
    dev = hidden.device
    logp = torch.empty(N, device=dev, dtype=torch.float32)
    lse = torch.empty(N, device=dev, dtype=torch.float32)
    ent = torch.empty(N if entropy else 0, device=dev, dtype=torch.float32)
    plan = _plan(h, weight, chunk_budget_bytes, False)
    rows, buf = plan.rows, _chunk_buffer(plan, h, weight)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        lp, ls, en = _lk.logprob_fwd(_logits(h[r0:r1], weight, bias, buf), y[r0:r1], temperature, entropy,
                                     softcap=softcap)
        logp[r0:r1], lse[r0:r1] = lp, ls
        if entropy:
            ent[r0:r1] = en
    lead = labels.shape
    return logp.view(lead), lse.view(lead), ent.view(lead) if entropy else ent


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, entropy, chunk_budget_bytes, softcap):
    f = hidden.new_empty(labels.shape, dtype=torch.float32)
    return f, torch.empty_like(f), torch.empty_like(f) if entropy else f.new_empty(0)


@torch.library.custom_op("r1kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                        lse: torch.Tensor, ent: torch.Tensor, g_logp: torch.Tensor, g_ent: torch.Tensor | None,
                        temperature: float, chunk_budget_bytes: int, softcap: float | None, grad_weight: bool = True,
                        g_lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dh, dw, db); dw empty (0 values) when not grad_weight (no weight-gradient GEMM). g_lse: the lse
    output's gradient: d lse / dz = p c'(z) / T = the log-prob's gradient at weight -1 plus c'(z_y) / T at the
    label (c the soft-cap, c' = 1 - (c(z) / cap)^2; 1 without one): the kernel runs at g_logp - g_lse and each
    row's label logit gets g_lse c'(z_y) / T (N elements)."""
    h, y = _rows2d(hidden, labels)
    N, H = h.shape
    lse, g = lse.reshape(-1), g_logp.reshape(-1).float()
    if g_lse is not None:
        g_lse = g_lse.reshape(-1).float()
        g = g - g_lse
    ent = ent.reshape(-1) if g_ent is not None else lse
    ge = g_ent.reshape(-1).float() if g_ent is not None else None
    plan = _plan(h, weight, chunk_budget_bytes, grad_weight)
    dh = torch.empty_like(h)
    dw = _dweight(plan, weight) if grad_weight else weight.new_empty(0)
    db = torch.zeros(weight.shape[0] if bias is not None else 0, device=h.device, dtype=torch.float32)
    buf = _chunk_buffer(plan, h, weight)
    for r0 in range(0, N, plan.rows):
        r1 = min(N, r0 + plan.rows)
        z = _logits(h[r0:r1], weight, bias, buf)
        at = y[r0:r1, None].long()
        if g_lse is not None:  # d lse / d z_y's factor, read before the kernel overwrites z with its gradient
            zy = z.gather(1, at).float()
            fix = g_lse[r0:r1, None] / temperature * (1.0 - torch.tanh(zy / softcap) ** 2 if softcap else 1.0)
        _lk.logprob_bwd(z, y[r0:r1], lse[r0:r1], ent[r0:r1], g[r0:r1], ge[r0:r1] if ge is not None else None,
                        temperature, out=z, out_strides=(0, z.stride(0)), softcap=softcap)
        if g_lse is not None:
            z.scatter_add_(1, at, fix.to(z.dtype))
        torch.mm(z, weight, out=dh[r0:r1])
        if grad_weight:
            _accumulate(dw, z, h[r0:r1])
        if bias is not None:
            db.add_(z.sum(0, dtype=torch.float32))
    return dh.view(hidden.shape), dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else db


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, lse, ent, g_logp, g_ent, temperature, chunk_budget_bytes, softcap,
      grad_weight=True, g_lse=None):
    return (torch.empty_like(hidden), torch.empty_like(weight) if grad_weight else weight.new_empty(0),
            bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0, dtype=torch.float32))


def _lp_setup(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, entropy, budget, softcap = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1], output[2])
    ctx.temperature, ctx.entropy, ctx.budget, ctx.softcap = temperature, entropy, budget, softcap
    ctx.set_materialize_grads(False)


def _lp_backward(ctx, g_logp, g_lse, g_ent):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    if g_logp is None and g_ent is None and g_lse is None:
        return (None,) * 8
    if g_logp is None:
        g_logp = torch.zeros_like(lse)
    grad_weight = ctx.needs_input_grad[1]
    dh, dw, db = linear_logprobs_bwd(hidden, weight, bias, labels, lse, ent, g_logp,
                                     g_ent if ctx.entropy else None, ctx.temperature, ctx.budget, ctx.softcap,
                                     grad_weight, g_lse)
    return dh, dw if grad_weight else None, db if bias is not None else None, None, None, None, None, None


linear_logprobs_fwd.register_autograd(_lp_backward, setup_context=_lp_setup)


def linear_token_logprobs_triton(hidden, weight, labels, bias=None, temperature=1.0, return_entropy=False,
                                 chunk_budget_bytes=LOGPROB_CHUNK_BUDGET, softcap=None):
    logp, _, ent = linear_logprobs_fwd(hidden, weight, bias, labels, float(temperature), bool(return_entropy),
                                       int(chunk_budget_bytes), None if softcap is None else float(softcap))
    return (logp, ent) if return_entropy else logp


def _lp_eligible(hidden, weight, labels, *a, **k):
    return hidden.dtype in (torch.float32, torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype


linear_token_logprobs_triton.eligible = _lp_eligible
