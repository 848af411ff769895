"""DeepSeek-V3 MoE routing: r1kernels.moe.route / permute / unpermute / update_bias / sequence_aux_loss."""
from __future__ import annotations

import torch

from . import _backend, _checks
from . import reference as _ref

__all__ = ["route", "router", "permute", "unpermute", "update_bias", "sequence_aux_loss"]


def check_gemm_dtype(gemm_dtype) -> None:
    """The router GEMM's dtype: None (fp32, transformers'), torch.float32 or torch.bfloat16."""
    if gemm_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"gemm_dtype must be None, torch.float32 or torch.bfloat16, got {gemm_dtype!r}")


def _eager():
    return not torch.compiler.is_compiling()


def _check_int(name, v, lo=1):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def check_routing_config(num_experts, top_k, n_group, topk_group):
    _check_int("top_k", top_k)
    _check_int("n_group", n_group)
    _check_int("topk_group", topk_group)
    if num_experts % n_group:
        raise ValueError(f"n_group={n_group} must divide the number of experts {num_experts}")
    if topk_group > n_group:
        raise ValueError(f"topk_group={topk_group} must be <= n_group={n_group}")
    if num_experts // n_group < 2:
        raise ValueError(f"each group needs >= 2 experts (group score = sum of its top 2); "
                         f"got {num_experts} experts in {n_group} groups")
    if top_k > topk_group * (num_experts // n_group):
        raise ValueError(f"top_k={top_k} exceeds the {topk_group * (num_experts // n_group)} experts in the "
                         f"topk_group={topk_group} kept groups of {num_experts // n_group}")


def route(router_logits, e_score_correction_bias, *, top_k, n_group, topk_group, routed_scaling_factor=1.0,
          norm_topk_prob=True, backend="auto"):
    """router_logits [T, E] -> (topk_weights fp32 [T, K], topk_ids int64 [T, K]) by DeepSeek-V3's
    sigmoid + bias + group-limited top-k; ids ordered by biased score, ties to the lower index.
    norm_topk_prob: a bool (a truthy string such as "false" would normalize); e_score_correction_bias finite
    (a NaN or inf bias selects arbitrary experts; checked eagerly, as permute's ids)."""
    # NumPy scalars as their Python values (kernels take Python numbers; r1kernels' convention)
    top_k, n_group, topk_group, routed_scaling_factor = map(
        _checks.as_python, (top_k, n_group, topk_group, routed_scaling_factor))
    _checks.float_tensor("router_logits", router_logits, ndim=2)
    E = router_logits.shape[1]
    _checks.float_tensor("e_score_correction_bias", e_score_correction_bias, ndim=1)
    _checks.shape("e_score_correction_bias", e_score_correction_bias, (E,))
    _checks.same_device(router_logits=router_logits, e_score_correction_bias=e_score_correction_bias)
    check_routing_config(E, top_k, n_group, topk_group)
    _checks.positive("routed_scaling_factor", routed_scaling_factor)
    if not isinstance(norm_topk_prob, bool):
        raise ValueError(f"norm_topk_prob must be a bool, got {norm_topk_prob!r}")
    if _eager():
        _checks.finite("e_score_correction_bias", e_score_correction_bias)
    fn = _backend.pick("route", backend, router_logits.device, router_logits, e_score_correction_bias,
                       top_k, n_group, topk_group)
    return (fn or _ref.route)(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
                              float(routed_scaling_factor), norm_topk_prob)


def router(hidden, gate_weight, e_score_correction_bias, *, top_k, n_group, topk_group, routed_scaling_factor=1.0,
           norm_topk_prob=True, gemm_dtype=None, backend="auto"):
    """The whole DeepSeek-V3 router: hidden [T, H] x gate_weight [E, H] -> (router_logits fp32 [T, E],
    topk_weights fp32 [T, K], topk_ids int64 [T, K]). gemm_dtype=None: transformers' fp32 GEMM;
    torch.bfloat16: bf16 operands, fp32 accumulation, fp32 logits (gradients too: bf16 operands)."""
    _checks.float_tensor("hidden", hidden, ndim=2)
    _checks.float_tensor("gate_weight", gate_weight, ndim=2)
    if gate_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"gate_weight must have shape [E, {hidden.shape[1]}], got {tuple(gate_weight.shape)}")
    _checks.same_device(hidden=hidden, gate_weight=gate_weight)
    check_gemm_dtype(gemm_dtype)
    from .ops.moe import router_logits
    logits = router_logits(hidden, gate_weight, gemm_dtype)
    w, ids = route(logits, e_score_correction_bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                   routed_scaling_factor=routed_scaling_factor, norm_topk_prob=norm_topk_prob, backend=backend)
    return logits, w, ids


def permute(hidden, topk_ids, num_experts, *, backend="auto"):
    """hidden [T, H], topk_ids [T, K] -> (permuted [T*K, H] grouped by expert, row_map int64 [T*K]
    (row of permuted for flat slot t*K+k), tokens_per_expert int64 [E])."""
    _checks.float_tensor("hidden", hidden, ndim=2)
    _checks.int_tensor("topk_ids", topk_ids, ndim=2)
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_ids must have {hidden.shape[0]} rows (one per token of hidden), "
                         f"got {tuple(topk_ids.shape)}")
    num_experts = _checks.as_python(num_experts)
    _check_int("num_experts", num_experts)
    _checks.same_device(hidden=hidden, topk_ids=topk_ids)
    if _eager():
        _checks.labels_in_range("topk_ids", topk_ids, num_experts)
    return _permute(hidden, topk_ids, num_experts, backend)


def _permute(hidden, topk_ids, num_experts, backend="auto"):
    """permute without the data-dependent id check (no device sync): ids known valid (from route)."""
    fn = _backend.pick("permute", backend, hidden.device, hidden, topk_ids, num_experts)
    return (fn or _ref.permute)(hidden, topk_ids, num_experts)


def unpermute(expert_out, row_map, topk_weights, *, backend="auto"):
    """expert_out [T*K, H], row_map [T*K], topk_weights [T, K] -> [T, H] = sum_k w * expert_out[row]."""
    _checks.float_tensor("expert_out", expert_out, ndim=2)
    _checks.int_tensor("row_map", row_map, ndim=1)
    _checks.float_tensor("topk_weights", topk_weights, ndim=2)
    n = topk_weights.shape[0] * topk_weights.shape[1]
    _checks.shape("row_map", row_map, (n,), " (T*K of topk_weights)")
    if expert_out.shape[0] != n:
        raise ValueError(f"expert_out must have {n} rows (T*K of topk_weights), got {tuple(expert_out.shape)}")
    _checks.same_device(expert_out=expert_out, row_map=row_map, topk_weights=topk_weights)
    if _eager():
        _checks.labels_in_range("row_map", row_map, n)
        if n:  # a permutation of [0, T*K), as permute returns: the kernels' backward writes each row once
            hit = torch.zeros(n, dtype=torch.bool, device=row_map.device)
            hit.index_fill_(0, row_map.long().clamp(0, n - 1), True)
            _checks._value_check(hit.all(), f"row_map must be a permutation of [0, {n}) (the row_map permute "
                                            "returns), got a repeated row")
    return _unpermute(expert_out, row_map, topk_weights, backend)


def _unpermute(expert_out, row_map, topk_weights, backend="auto"):
    """unpermute without the data-dependent row_map check (no device sync): row_map from permute."""
    fn = _backend.pick("unpermute", backend, expert_out.device, expert_out, row_map, topk_weights)
    return (fn or _ref.unpermute)(expert_out, row_map, topk_weights)


def _torch_only(op, backend):
    """Ops with only the torch implementation: backend= is validated like every op's; auto/torch run it, a
    named kernel backend raises (R1K_BACKEND does not apply: there is nothing else to pick)."""
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend={backend!r} is not available for {op}: it has no {backend} kernel, only the "
                         "torch implementation (use backend='auto' or 'torch')")


def check_bias_float32(bias, name="bias", hint=""):
    """update_bias's dtype rule: rate-sized steps vanish or double in bf16/fp16 (0.6016 + 1e-3 == 0.6016)."""
    if bias.dtype != torch.float32:
        raise ValueError(f"{name} must be float32 (transformers keeps e_score_correction_bias in fp32{hint}), got "
                         f"{bias.dtype}")


def update_bias(bias, tokens_per_expert, *, rate=1e-3, all_reduce=False, group=None, backend="auto"):
    """Auxiliary-loss-free balancing, in place and without grad: bias += rate * sign(mean - count).
    Sum tokens_per_expert over micro-batches first; all_reduce=True sums it over the ranks of `group`
    (torch.distributed, default group) before the update, so every rank applies the same step.
    backend: "auto" or "torch" (the only implementation; a named kernel backend raises)."""
    _torch_only("update_bias", backend)
    _checks.float_tensor("bias", bias, ndim=1)
    check_bias_float32(bias)
    _checks.tensor("tokens_per_expert", tokens_per_expert, ndim=1,
                   dtypes=_checks.INT_DTYPES + (torch.int16, torch.int8, torch.uint8) + _checks.FLOAT_DTYPES,
                   kind="an integer or floating-point tensor of counts")
    _checks.shape("tokens_per_expert", tokens_per_expert, bias.shape, " (one count per expert)")
    _checks.same_device(bias=bias, tokens_per_expert=tokens_per_expert)
    if tokens_per_expert.is_floating_point():
        _checks.finite("tokens_per_expert", tokens_per_expert)
    if tokens_per_expert.numel():
        _checks._value_check((tokens_per_expert >= 0).all(), "tokens_per_expert must be >= 0 (token counts)")
    rate = _checks.positive("rate", rate, allow_zero=True)
    if all_reduce:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("all_reduce=True needs an initialized torch.distributed process group")
        tokens_per_expert = tokens_per_expert.clone()
        dist.all_reduce(tokens_per_expert, group=group)
    return _ref.update_bias(bias, tokens_per_expert, rate)


def sequence_aux_loss(router_logits, topk_ids, *, seq_len, top_k, alpha=1e-4, backend="auto"):
    """DeepSeek-V3's sequence-wise balance loss; router_logits [B*S, E], topk_ids [B*S, K] or None
    (None: the plain top-K of the sigmoid scores, as in the paper). backend: "auto" or "torch" (the only
    implementation; a named kernel backend raises)."""
    _torch_only("sequence_aux_loss", backend)
    _checks.float_tensor("router_logits", router_logits, ndim=2)
    N, E = router_logits.shape
    seq_len, top_k, alpha = map(_checks.as_python, (seq_len, top_k, alpha))
    _check_int("seq_len", seq_len)
    _check_int("top_k", top_k)
    if N == 0:
        raise ValueError("router_logits has no rows: the loss averages over sequences, undefined for an empty batch")
    if N % seq_len:
        raise ValueError(f"seq_len={seq_len} must divide the {N} rows of router_logits")
    if top_k > E:
        raise ValueError(f"top_k={top_k} exceeds the {E} experts")
    if topk_ids is not None:
        _checks.int_tensor("topk_ids", topk_ids, ndim=2)
        _checks.shape("topk_ids", topk_ids, (N, top_k))
        _checks.same_device(router_logits=router_logits, topk_ids=topk_ids)
        if _eager():
            _checks.labels_in_range("topk_ids", topk_ids, E)
    _checks.positive("alpha", alpha, allow_zero=True)
    return _ref.sequence_aux_loss(router_logits, topk_ids, seq_len, top_k, alpha)
