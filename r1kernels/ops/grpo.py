"""grpo_loss over the Triton kernels (and, for the token-level loss on sm_90+, the CUDA cluster kernel of
csrc/cuda/grpo.cu, which holds each row on chip: one read of the logits): one autograd path per
importance-sampling level, for eager and torch.compile calls alike.

Token level: r1kernels::grpo_loss_fwd returns (stats [6] = loss, kl, clip low, high, region, entropy (0
unless entropy=True: from the same pass); per-token
log-probs [B, T]; the logits' gradient [B, T, V] for upstream 1): one kernel, one read of the logits (a
second read of each row from L2) and one write of the gradient. r1kernels::grpo_loss_fwd_inplace writes
that gradient into the logits' own storage instead (no [B, T, V] buffer). _GRPOLoss, the autograd.Function
over both, saves the gradient and its backward scales it by the upstream scalar (scale_saved_grads: in place,
a no-op kernel when it is 1, unless the backward keeps the graph for another). With no gradient wanted (no_grad,
or logits that do not require it) grpo_loss_fwd(grad=False) writes none: the loss and metrics only.
Sequence level: the sequence ratio needs every token's log-prob before any gradient, so the loss is the
reference (reference/grpo.py) on masked log-probs, differentiated by autograd; _LogProbs computes those
log-probs (r1kernels::grpo_logprobs, masked tokens skipped) and, in backward, the logits' gradient for the
[B, T] upstream gradient (into a new buffer, or into the logits' storage when in place).
Masked tokens (mask 0) read nothing, not even their label; their per-token log-prob is returned as 0.
The loss options are keyword-only arguments of the custom ops, named as in the public API; loss types and
KL estimators travel as names (codes exist only inside the kernel launch).
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from ..reference import grpo as _ref
from ..triton import grpo as _k
from ..triton import logprob as _lk

STAT_KEYS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy")


def row_scale(mask_f, B, T, loss_type, max_completion_length, num_items_t, num_items_f, device):
    """s [B] with loss = sum_bt m_bt * s_b * L_bt (the reduction of LOSS_REDUCTION, DESIGN.md section 3)."""
    n_row = mask_f.sum(-1) if mask_f is not None else torch.full((B,), float(T), device=device)
    reduction = _ref.LOSS_REDUCTION[loss_type]
    if reduction == "sequence":
        return 1.0 / (B * n_row.clamp(min=1.0))
    if reduction == "tokens":
        s = 1.0 / n_row.sum().clamp(min=1.0)
    elif reduction == "length":
        # max(.., 1): with no rows (or no tokens) s scales nothing; 1 / 0 was a ZeroDivisionError
        s = torch.full((), 1.0 / max(B * (max_completion_length or T), 1), device=device)
    elif num_items_t is not None:
        s = 1.0 / num_items_t.float().reshape(())
    elif num_items_f is not None:
        s = torch.full((), 1.0 / num_items_f, device=device)
    else:
        s = 1.0 / n_row.sum().clamp(min=1.0)
    return s.float().expand(B).contiguous()


# The CUDA token kernel (csrc/cuda/grpo.cu): each row split over a cluster of CUDA_CONFIG["cluster"] CTAs
# (more when a slice would not fit one CTA's shared memory). H200, V=151936 bf16, kernel alone: 8 CTAs
# (38 KB of shared memory each, 5 per SM) 1.43-1.47 ms in two sessions; 4 CTAs 1.45-1.68 ms; 2 CTAs 2.2 ms
# (benchmarks/NOTES-logprob-grpo.md). benchmarks/bench_grpo.py sweeps the others.
CUDA_CONFIG = dict(cluster=8)
HAS_CUDA_TOKEN = _backend.HAS_EXTENSION and _backend.extension_has("grpo_token", "CUDA")
_SMEM_LIMIT: dict[int, int] = {}


def cuda_cluster(V: int, elem_bytes: int, device: torch.device, want: int) -> int:
    """The smallest cluster size >= want (of 1, 2, 4, 8) whose row slice fits one CTA's shared memory."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM_LIMIT:
        props = torch.cuda.get_device_properties(idx)
        if props.major < 9:
            raise ValueError(f"backend='cuda' for grpo_loss needs an sm_90+ GPU (thread-block clusters), got "
                             f"sm_{props.major}{props.minor}; use backend='triton'")
        _SMEM_LIMIT[idx] = props.shared_memory_per_block_optin - 1024  # the kernel's static part < 1 KB
    for cl in (1, 2, 4, 8):
        chunk = (V + cl - 1) // cl
        chunk = (chunk + 7) // 8 * 8  # grpo.cu chunk_of: slices on 16-byte boundaries
        if cl >= want and chunk * elem_bytes <= _SMEM_LIMIT[idx]:
            return cl
    raise ValueError(f"backend='cuda' for grpo_loss: a vocabulary of {V} does not fit 8 CTAs' shared memory; "
                     "use backend='triton'")


def grpo_token_cuda(x, ids, adv, mask, old, ref, samp, scale, logp, stats, dx, dx_strides, *, temperature, eps_low,
                    eps_high, delta, beta, loss_type, kl_estimator, sapo_tau_pos=_ref.SAPO_TAU_POS,
                    sapo_tau_neg=_ref.SAPO_TAU_NEG, is_mode=None, is_clip_min=None, is_clip_max=None, bias_kl=False,
                    entropy=False, config=None):
    """_k.grpo_token's contract (same arguments and outputs) on the CUDA cluster kernel: one read and one
    write of each row."""
    B, T, V = x.shape
    if B * T == 0:
        return
    cfg = {**CUDA_CONFIG, **(config or {})}
    has_is = samp is not None and is_mode is not None
    torch.ops.r1kernels.grpo_token(
        x, ids.long().contiguous(), adv, mask, old, ref, samp if has_is else None, scale, logp, stats, dx,
        list(dx_strides), inv_t=1.0 / temperature, eps_low=eps_low, eps_high=eps_high,
        delta=delta if delta is not None else 0.0, beta=beta, tau_pos=sapo_tau_pos, tau_neg=sapo_tau_neg,
        is_lo=is_clip_min if is_clip_min is not None else (-math.inf if is_mode == "token_mask" else 0.0),
        is_hi=is_clip_max if is_clip_max is not None else math.inf, loss_code=_ref.LOSS_CODE[loss_type],
        kl_code=_ref.KL_CODE[kl_estimator], has_delta=delta is not None, is_mask=is_mode == "token_mask",
        bias_kl=bool(bias_kl), entropy=bool(entropy), use_kl=ref is not None and beta != 0.0,
        cluster=cuda_cluster(V, x.element_size(), x.device, cfg["cluster"]))


def token_level(x, ids, adv, mask, old, ref, samp, num_items, dx, dx_strides, *, num_items_f, max_completion_length,
                temperature, epsilon, epsilon_high, delta, beta, loss_type, kl_estimator, rows=None,
                token_kernel="triton", softcap=None, **kernel_opts):
    """The token-level kernel: (per-token sums [5], logp); writes the gradient for upstream 1 into dx
    (strides dx_strides). x is the [B, T, V] logits of the whole batch, or with rows = (r0, r1) the
    [r1 - r0, V] logits of flattened rows r0:r1 of the B*T tokens (then logp is [r1 - r0]). The other
    tensors cover the whole batch (the reduction needs all of mask). token_kernel: "triton" (_k.grpo_token) or "cuda"
    (grpo_token_cuda). kernel_opts: KERNEL_OPTS. softcap (the fused head's, Triton only): the logits are
    softcap * tanh(x / softcap)."""
    B, T = ids.shape
    dev = x.device
    mask_f = mask.float().contiguous() if mask is not None else None
    s_B = row_scale(mask_f, B, T, loss_type, max_completion_length, num_items, num_items_f, dev)
    adv = adv.float().contiguous()
    old = old.float().contiguous() if old is not None else None
    ref = ref.float().contiguous() if ref is not None else None
    samp = samp.float().contiguous() if samp is not None else None
    if rows is None:
        n_rows, x3, adv_, s_ = B * T, x, adv, s_B
        ids_, mask_, old_, ref_, samp_ = ids.contiguous(), mask_f, old, ref, samp
    else:
        r0, r1 = rows
        n_rows, x3 = r1 - r0, x.view(1, r1 - r0, x.shape[-1])

        def flat(t):  # contiguous: reshape keeps a stride-0 view of an expanded [1, T] (a batch of one row)
            return t.reshape(-1)[r0:r1].contiguous() if t is not None else None
        ids_, mask_, old_, ref_, samp_ = flat(ids), flat(mask_f), flat(old), flat(ref), flat(samp)
        adv_ = flat(adv.reshape(B, -1).expand(B, T)).view(1, -1)
        s_ = flat(s_B[:, None].expand(B, T)).view(1, -1)
    logp = torch.empty(n_rows, device=dev, dtype=torch.float32)
    stats = torch.empty(6, n_rows, device=dev, dtype=torch.float32)
    launch = grpo_token_cuda if token_kernel == "cuda" else _k.grpo_token
    if softcap is not None:
        assert token_kernel == "triton", "softcap: the Triton token kernel only"
        kernel_opts = {**kernel_opts, "softcap": softcap}
    launch(x3, ids_, adv_, mask_, old_, ref_, samp_, s_, logp, stats, dx, dx_strides, temperature=temperature,
           eps_low=epsilon, eps_high=epsilon_high, delta=delta, beta=beta, loss_type=loss_type,
           kl_estimator=kl_estimator, **kernel_opts)
    return stats.sum(1), logp if rows is not None else logp.view(B, T)


def finish_stats(sums, mask, B, T):
    """[loss, then the five metrics (STAT_KEYS) as masked means] from the kernel's per-token sums."""
    n_tok = mask.float().sum().clamp(min=1.0) if mask is not None else torch.full((), float(max(B * T, 1)),
                                                                                   device=sums.device)
    return torch.cat([sums[:1], sums[1:] / n_tok])


@torch.library.custom_op("r1kernels::grpo_loss_fwd", mutates_args=())
def grpo_loss_fwd(logits: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor | None,
                  old: torch.Tensor | None, ref: torch.Tensor | None, samp: torch.Tensor | None,
                  num_items: torch.Tensor | None, *, num_items_f: float | None, max_completion_length: int | None,
                  temperature: float, epsilon: float, epsilon_high: float, delta: float | None, beta: float,
                  loss_type: str, kl_estimator: str, sapo_tau_pos: float, sapo_tau_neg: float, is_mode: str | None,
                  is_clip_min: float | None, is_clip_max: float | None, bias_kl: bool, entropy: bool,
                  token_kernel: str = "triton", grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (stats, logp, the logits' gradient for upstream 1); not grad: that gradient is an empty tensor and
    neither token kernel writes one (no [B, T, V] buffer)."""
    B, T, V = logits.shape
    dx = torch.empty(logits.shape, device=logits.device, dtype=logits.dtype) if grad else None
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    sums, logp = token_level(x, ids, adv, mask, old, ref, samp, num_items, dx, (T * V, V), **_opts(locals()))
    return finish_stats(sums, mask, B, T), logp, dx if grad else logits.new_empty(0)


@grpo_loss_fwd.register_fake
def _(logits, ids, adv, mask, old, ref, samp, num_items, grad=True, **opts):
    B, T, V = logits.shape
    return (logits.new_empty(6, dtype=torch.float32), logits.new_empty(B, T, dtype=torch.float32),
            torch.empty(logits.shape, device=logits.device, dtype=logits.dtype) if grad else logits.new_empty(0))


@torch.library.custom_op("r1kernels::grpo_loss_fwd_inplace", mutates_args=("logits",))
def grpo_loss_fwd_inplace(logits: torch.Tensor, ids: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor | None,
                          old: torch.Tensor | None, ref: torch.Tensor | None, samp: torch.Tensor | None,
                          num_items: torch.Tensor | None, *, num_items_f: float | None,
                          max_completion_length: int | None, temperature: float, epsilon: float, epsilon_high: float,
                          delta: float | None, beta: float, loss_type: str, kl_estimator: str, sapo_tau_pos: float,
                          sapo_tau_neg: float, is_mode: str | None, is_clip_min: float | None,
                          is_clip_max: float | None, bias_kl: bool, entropy: bool, token_kernel: str = "triton"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.stride(-1) != 1:
        raise ValueError("inplace_backward needs logits with a contiguous last dimension")
    B, T, V = logits.shape
    sums, logp = token_level(logits, ids, adv, mask, old, ref, samp, num_items, logits,
                             (logits.stride(0), logits.stride(1)), **_opts(locals()))
    return finish_stats(sums, mask, B, T), logp


@grpo_loss_fwd_inplace.register_fake
def _(logits, ids, adv, mask, old, ref, samp, num_items, **opts):
    B, T, V = logits.shape
    return logits.new_empty(6, dtype=torch.float32), logits.new_empty(B, T, dtype=torch.float32)


@torch.library.custom_op("r1kernels::grpo_scale_grad_", mutates_args=("grad",))
def grpo_scale_grad_(grad: torch.Tensor, g: torch.Tensor) -> None:
    """grad *= g in place; a no-op kernel when g == 1 (no host sync)."""
    _k.scale_(grad, g.reshape(1).float())


@grpo_scale_grad_.register_fake
def _(grad, g):
    return None


def may_overwrite_saved() -> bool:
    """Whether the backward running now may overwrite its saved tensors: no later backward reads them again (it
    frees the graph: not retain_graph / create_graph), or torch.compile traces it (its graph is functionalized).
    False where torch cannot tell (outside a backward)."""
    if torch.compiler.is_compiling():
        return True
    current = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return current is not None and not current()


def scale_saved_grads(ctx, g):
    """The backward of every op whose forward already wrote its gradients (for upstream 1): those gradients
    times the upstream scalar g; None for the inputs without one (and for all when the loss was not used).
    Invariant: a saved gradient is scaled in place only by a backward that frees the graph (the usual
    loss.backward(): no new buffer, a no-op kernel when g == 1); a backward that keeps it (retain_graph /
    create_graph) scales copies, so every later backward reads the unscaled gradients and gives the reference's
    result (one gradient-sized buffer, only then): may_overwrite_saved."""
    saved = ctx.saved_tensors
    if g is None:
        return (None,) * len(saved)
    if not may_overwrite_saved():
        saved = tuple(t.clone() for t in saved)
    for t in saved:
        grpo_scale_grad_(t, g)
    return saved


class _GRPOLoss(torch.autograd.Function):
    """Token level: (logits, inplace, the op's inputs, its keyword options) -> (stats, logp)."""

    @staticmethod
    def forward(ctx, logits, inplace, ids, adv, mask, old, ref, samp, num_items, opts):
        if inplace:
            stats, logp = grpo_loss_fwd_inplace(logits, ids, adv, mask, old, ref, samp, num_items, **opts)
            dx = logits
        else:
            stats, logp, dx = grpo_loss_fwd(logits, ids, adv, mask, old, ref, samp, num_items, **opts)
        ctx.save_for_backward(dx)
        ctx.mark_non_differentiable(logp)
        ctx.set_materialize_grads(False)  # no zero [B, T] upstream gradient for the unused log-probs
        return stats, logp

    @staticmethod
    def backward(ctx, g_stats, g_logp):
        (dx,) = scale_saved_grads(ctx, None if g_stats is None else g_stats[0])
        return (dx,) + (None,) * 9


@torch.library.custom_op("r1kernels::grpo_logprobs", mutates_args=())
def grpo_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, temperature: float,
                  entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp [B, T], lse [B*T], entropy [B, T] or empty) fp32; masked rows (mask 0) are skipped: logp = lse
    = entropy = 0."""
    B, T, _ = logits.shape
    logp, lse, ent = _lk.logprob_fwd(logits, ids, temperature, entropy,
                                     mask=mask.float().reshape(-1).contiguous() if mask is not None else None)
    if entropy and mask is not None:  # the kernel leaves masked rows' entropy unwritten
        ent = torch.where(mask.reshape(-1) != 0, ent, 0.0)
    return logp.view(B, T), lse, ent.view(B, T) if entropy else ent


@grpo_logprobs.register_fake
def _(logits, ids, mask, temperature, entropy):
    B, T, _ = logits.shape
    f = logits.new_empty(B, T, dtype=torch.float32)
    return f, logits.new_empty(B * T, dtype=torch.float32), torch.empty_like(f) if entropy else f.new_empty(0)


@torch.library.custom_op("r1kernels::grpo_logprobs_grad", mutates_args=())
def grpo_logprobs_grad(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                       g: torch.Tensor, g_ent: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """d(sum g * logp + g_ent * entropy)/d logits; rows with zero g (and g_ent) are written as zeros
    without reading the logits."""
    return _lk.logprob_bwd(logits, ids, lse, ent.reshape(-1) if g_ent is not None else lse, g, g_ent, temperature)


@grpo_logprobs_grad.register_fake
def _(logits, ids, lse, ent, g, g_ent, temperature):
    return torch.empty(logits.shape, device=logits.device, dtype=logits.dtype)


@torch.library.custom_op("r1kernels::grpo_logprobs_grad_", mutates_args=("logits",))
def grpo_logprobs_grad_(logits: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                        g: torch.Tensor, g_ent: torch.Tensor | None, temperature: float) -> None:
    """grpo_logprobs_grad written into the logits' own storage (each block is read before it is written)."""
    if logits.stride(-1) != 1:
        raise ValueError("inplace_backward needs logits with a contiguous last dimension")
    _lk.logprob_bwd(logits, ids, lse, ent.reshape(-1) if g_ent is not None else lse, g, g_ent, temperature,
                    out=logits, out_strides=(logits.stride(0), logits.stride(1)))


@grpo_logprobs_grad_.register_fake
def _(logits, ids, lse, ent, g, g_ent, temperature):
    return None


class _LogProbs(torch.autograd.Function):
    """The loss from per-token values: (logits, ids, mask, temperature, inplace, entropy) -> (logp [B, T],
    entropy [B, T] or empty), both differentiable."""

    @staticmethod
    def forward(ctx, logits, ids, mask, temperature, inplace, entropy):
        logp, lse, ent = grpo_logprobs(logits, ids, mask, temperature, entropy)
        ctx.save_for_backward(logits, ids, lse, ent)
        ctx.temperature, ctx.inplace = temperature, inplace
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g, g_ent):
        if g is None and g_ent is None:
            return (None,) * 6
        logits, ids, lse, ent = ctx.saved_tensors
        g = torch.zeros_like(lse) if g is None else g.float().contiguous()
        g_ent = g_ent.float().contiguous() if g_ent is not None and ent.numel() else None
        # in place only when no later backward reads the logits again (scale_saved_grads' rule)
        if ctx.inplace and may_overwrite_saved():
            grpo_logprobs_grad_(logits, ids, lse, ent, g, g_ent, ctx.temperature)
            dx = logits
        else:
            dx = grpo_logprobs_grad(logits, ids, lse, ent, g, g_ent, ctx.temperature)
        return dx, None, None, None, None, None


# The fused token kernel's options beyond the core ones (keyword-only arguments of the custom ops).
KERNEL_OPTS = ("sapo_tau_pos", "sapo_tau_neg", "is_mode", "is_clip_min", "is_clip_max", "bias_kl", "entropy")
_CORE_OPTS = ("num_items_f", "max_completion_length", "temperature", "epsilon", "epsilon_high", "delta", "beta",
              "loss_type", "kl_estimator", "token_kernel")


def _opts(names):
    """The keyword options of token_level from a custom op's locals()."""
    return {k: names[k] for k in _CORE_OPTS + KERNEL_OPTS}


def op_options(*, temperature, epsilon, epsilon_high, delta, beta, loss_type, kl_estimator, max_completion_length,
               num_items_in_batch, **extra):
    """(num_items tensor or None, the token-level ops' keyword options) from the public arguments."""
    o = {**_ref.EXTRA_DEFAULTS, **extra}
    nt = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else None
    has_is = o["sampling_logprobs"] is not None and o["vllm_importance_sampling_correction"]
    fl = (lambda v: None if v is None else float(v))
    return nt, dict(num_items_f=float(num_items_in_batch) if num_items_in_batch is not None and nt is None else None,
                    max_completion_length=max_completion_length, temperature=float(temperature),
                    epsilon=float(epsilon), epsilon_high=float(epsilon if epsilon_high is None else epsilon_high),
                    delta=fl(delta), beta=float(beta), loss_type=loss_type, kl_estimator=kl_estimator,
                    sapo_tau_pos=float(o["sapo_temperature_pos"]), sapo_tau_neg=float(o["sapo_temperature_neg"]),
                    is_mode=o["vllm_importance_sampling_mode"] if has_is else None,
                    is_clip_min=fl(o["vllm_importance_sampling_clip_min"]),
                    is_clip_max=fl(o["vllm_importance_sampling_clip_max"]), bias_kl=bool(o["use_bias_correction_kl"]),
                    entropy=bool(o["compute_entropy"]))


def stat_metrics(stats, entropy: bool) -> dict:
    """The metrics dict of a token-level op's stats (entropy only when it was computed)."""
    return {k: stats[i + 1].detach() for i, k in enumerate(STAT_KEYS) if entropy or k != "entropy"}


def per_token_loss(logp, ent, advantages, completion_mask, old_logprobs, ref_logprobs, opts):
    """(loss, logp (0 where masked), metrics): the reference loss and metrics on per-token log-probs logp [B, T]
    (and entropy ent [B, T] or None), both differentiable: the path for losses that are not token-local."""
    loss, metrics = _ref.grpo_loss_from_logprobs(logp, advantages, completion_mask, old_logprobs, ref_logprobs,
                                                 entropy=ent, **opts)
    return loss, _ref.masked_logprobs(logp, completion_mask), {k: v.detach() for k, v in metrics.items()}


def holds_own_grad(logits) -> bool:
    """Whether the kernels can write the logits' gradient into their own storage (inplace_backward): a contiguous
    last dim (else grpo_loss_fwd_inplace / grpo_logprobs_grad_ raise; at the sequence level only in backward)
    and no two elements sharing memory (an expanded view, stride 0 over a dim of size > 1: each copy's gradient
    would overwrite the others'). Other logits get a gradient buffer, as without inplace_backward."""
    return logits.stride(-1) == 1 and not any(st == 0 and n > 1 for st, n in zip(logits.stride(), logits.shape))


def grpo_loss_triton(logits, completion_ids, advantages, completion_mask=None, *, temperature=1.0,
                     inplace_backward=False, old_logprobs=None, ref_logprobs=None, token_kernel="triton", **opts):
    """Token-local losses (reference/grpo.py token_local): the fused kernel (token_kernel="triton": Triton's,
    "cuda": the cluster kernel). Others (sequence ratio, sequence weights, entropy terms): log-probs
    (+ entropy) by the Triton kernels, the loss by the reference."""
    inplace = bool(inplace_backward and logits.requires_grad and torch.is_grad_enabled() and holds_own_grad(logits))
    if not _ref.token_local(opts):
        x = logits if logits.stride(-1) == 1 or inplace else logits.contiguous()
        ent_on = _ref.reports_entropy(opts)
        logp, ent = _LogProbs.apply(x, completion_ids.contiguous(), completion_mask, float(temperature), inplace,
                                    ent_on)
        # with ent_on, ent is [B, T] even when empty (B or T = 0): the reference's entropy options read it
        return per_token_loss(logp, ent if ent_on else None, advantages, completion_mask, old_logprobs,
                              ref_logprobs, opts)
    samp = opts.get("sampling_logprobs")
    nt, kopts = op_options(temperature=temperature, **opts)
    kopts["token_kernel"] = token_kernel
    args = (completion_ids, advantages, completion_mask, old_logprobs, ref_logprobs,
            samp if kopts["is_mode"] else None, nt)
    if logits.requires_grad and torch.is_grad_enabled():
        stats, logp = _GRPOLoss.apply(logits, inplace, *args, kopts)
    else:  # no gradient wanted: the kernel writes none
        stats, logp, _ = grpo_loss_fwd(logits, *args, grad=False, **kopts)
    return stats[0], logp, stat_metrics(stats, kopts["entropy"])


def _eligible(logits, completion_ids, *a, **k):
    return logits.dim() == 3 and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)


grpo_loss_triton.eligible = _eligible


def grpo_loss_cuda(logits, completion_ids, advantages, completion_mask=None, **opts):
    """grpo_loss_triton with the CUDA cluster kernel for the token-level loss (sm_90+)."""
    return grpo_loss_triton(logits, completion_ids, advantages, completion_mask, token_kernel="cuda", **opts)


grpo_loss_cuda.eligible = _eligible
grpo_loss_cuda.devices = {"cuda"} if HAS_CUDA_TOKEN else set()
