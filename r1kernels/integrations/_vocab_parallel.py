"""Token log-probs and entropy of a vocabulary split over the ranks of a process group (Megatron's tensor-parallel
layout, the one verl's kernels assume): rank r of a group of W holds the logits of token ids [r * Vl, (r + 1) * Vl),
every shard the same size Vl, and every rank the same rows and the same (full-vocabulary) labels.

Each rank runs r1kernels' op on its own shard (labels off the shard replaced by an in-shard index: local_labels)
and gets, per row, lse_r (the shard's log-sum-exp: the logits op returns it; the fused lm_head op gives the shard
log-prob of that index, and lse_r is that index's logit minus it), ent_r (the shard distribution's entropy) and the
label's logit where the shard holds it (lse_r + the shard log-prob). Two all-reduces combine them:

    m = max_r lse_r                    (all-reduce MAX; also carries the shard-size and label-range checks, read
                                        without a host sync: r1kernels' device-side value checks)
    w_r = exp(lse_r - m)               (in (0, 1]; 1 on the rank holding the max)
    S = sum_r w_r,  D = sum_r w_r (ent_r + m - lse_r),  Z = sum_r [label on r] (z_label - m)   (one all-reduce SUM)
    lse = m + log S,  logp = Z - log S,  entropy = D / S + log S

(entropy = sum_r pi_r ent_r - sum_r pi_r log pi_r with pi_r = w_r / S, the mixture identity: every term of D and
log S is >= 0, so nothing cancels). The log-probs alone (logits_logprobs) leave D out; the entropy alone
(logits_entropy) has no labels: its local index is 0 on every rank, and the label check and Z are left out. The SUM
is differentiable with an identity backward: the outputs are computed the same on every rank and so is the loss on
them (Megatron's convention), and each rank's own terms enter S, D, Z once, so the chain rule through the identity
gives each rank the full-vocabulary gradient restricted to its shard; m only shifts the exponents and is a
constant. Gradients into anything a shard's logits come from (the hidden states of a vocab-parallel lm_head) are
this rank's part; summing them over the group is the caller's, as it is with verl's kernel and Megatron's own
vocab-parallel cross-entropy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _backend, _check_logits_labels, linear_token_logprobs
from .. import reference as _ref
from .._checks import _value_check
from ..reference.logprob import acc


class _GroupSum(torch.autograd.Function):
    """all_reduce(SUM) over group; backward is the identity (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


def rank_and_size(group):
    return dist.get_rank(group), dist.get_world_size(group)


def local_labels(labels, rank, shard):
    """-> (idx, owned): each label's offset within its own shard (labels mod shard; the local label where this
    shard holds it), and owned: the rows whose label is on this shard. A row whose label is elsewhere still needs
    an index (lse_r = z_idx - logp_r; any in-shard index works), and its gradient reaches that weight row twice,
    from the kernel (-c, onehot) and the gather (+c), cancelling up to rounding: the offset spreads those rows over
    the shard as the labels themselves are spread (index 0 for all of them put N rows' rounding error into one
    bf16 weight row: 2.3 against a true 3.5 at N = 4096)."""
    owned = labels.div(shard, rounding_mode="floor") == rank
    return labels.long().remainder(shard), owned


def combine(logp_r, ent_r, z_idx, owned, labels, shard, group, world, lse_r=None):
    """Per-row shard results -> full-vocabulary (logp or None, entropy or None). logp_r / z_idx: the shard log-prob
    and logit of the local index; ent_r: the shard entropy or None; owned: rows whose label is on this shard;
    lse_r: the shard's log-sum-exp where the kernel gives it (else z_idx - logp_r). labels and owned None: the
    entropy alone (ent_r and lse_r given; no label check, no log-prob, logp None)."""
    if lse_r is None:
        lse_r = z_idx - logp_r
    vocab = shard * world
    # shard sizes (and the label flag) ride on the MAX: exact in any float dtype up to 2**24, far above a vocab shard
    tail = [lse_r.new_tensor(shard), lse_r.new_tensor(-shard)]
    if labels is not None:
        tail.append(((labels < 0) | (labels >= vocab)).any().to(lse_r.dtype))
    stat = torch.cat([lse_r.detach().reshape(-1), torch.stack(tail)])
    dist.all_reduce(stat, op=dist.ReduceOp.MAX, group=group)
    # checked on the reduced values without a host read: a ValueError for CPU tensors (and under
    # R1K_SYNC_CHECKS=1), a device assert for CUDA ones, as r1kernels' other value checks
    n = len(tail)
    hi, neg_lo = stat[-n], stat[-n + 1]
    _value_check((hi == shard) & (neg_lo == -shard),
                 "weight / logits: every rank of the tensor-parallel group must hold a vocabulary shard of the same "
                 f"size (Megatron's layout: rank r holds ids [r * Vl, (r + 1) * Vl)); this rank's is {shard}, "
                 "another's differs")
    if labels is not None:
        _value_check(stat[-1] == 0, f"labels must be token ids in [0, {vocab}) (the full vocabulary: {world} ranks x "
                                    f"{shard} ids each) on every rank")
    m = stat[:-n].reshape(lse_r.shape)
    # a row's shard with no probability mass (every logit -inf: lse_r = -inf, its entropy and log-prob NaN) adds
    # nothing: w_r = 0, Z's term -inf where it holds the label, and its NaN terms are replaced before any product
    # (0 * NaN is NaN, in the backward too: the gradient into such a shard is 0, as the full vocabulary's). A NaN
    # lse_r (NaN logits) stays live: the NaN reaches the outputs
    live = lse_r != float("-inf")
    lse_r = torch.where(live, lse_r, m)
    w = torch.where(live, torch.exp(lse_r - m), 0.0)
    parts = [w]
    if labels is not None:
        z_idx = torch.where(live, z_idx, float("-inf"))
        parts.append(torch.where(owned, z_idx - m, torch.zeros_like(z_idx)))
    if ent_r is not None:
        parts.append(w * (torch.where(live, ent_r, 0.0) + (m - lse_r)))
    sums = _GroupSum.apply(torch.stack(parts), group)
    log_s = sums[0].log()
    logp = None if labels is None else sums[1] - log_s
    ent = None if ent_r is None else sums[-1] / sums[0] + log_s
    return logp, ent


def _shard_lse(logits, idx, entropy, backend):
    """The shard's (log-prob of idx, lse, entropy or None) [...] from r1kernels' token_logprobs kernels (the
    reference on the torch backend), lse with its own gradient: no gather of the idx logit, whose backward is a
    full [..., Vl] zero tensor added to the kernel's gradient."""
    _check_logits_labels("logits", logits, "labels", idx, 1.0, check_values=False)  # idx: in the shard by making
    fn = _backend.pick("token_logprobs", backend, logits.device, logits, idx)
    if fn is not None:  # a row of -inf logits: lse -inf, zero gradient when its outputs' gradients are 0 (combine)
        return fn.with_lse(logits, idx, 1.0, entropy)
    # the reference's autograd gives such a row NaN gradients whatever its upstream (softmax of -inf only): it runs
    # on zeros there and reports lse -inf, for combine to leave the row out
    dead = torch.isneginf(logits).all(-1, keepdim=True)
    logp, lse, ent = _ref.token_logprobs_lse(logits.masked_fill(dead, 0.0), idx, 1.0, entropy)
    return logp, lse.masked_fill(dead[..., 0], float("-inf")), ent


def logits_logprobs(logits, labels, group, backend="auto"):
    """logits [..., Vl] (this rank's shard), labels [...] full-vocabulary ids -> fp32 (fp64 for float64 logits)
    full-vocabulary log-probs [...]."""
    rank, world = rank_and_size(group)
    shard = logits.shape[-1]
    idx, owned = local_labels(labels, rank, shard)
    logp_r, lse_r, _ = _shard_lse(logits, idx, False, backend)
    return combine(logp_r, None, logp_r + lse_r, owned, labels, shard, group, world, lse_r=lse_r)[0]


def logits_entropy(logits, group, backend="auto"):
    """logits [..., Vl] (this rank's shard) -> fp32 (fp64 for float64 logits) full-vocabulary entropy [...]. The
    shard's op still takes an index per row: 0, on every rank."""
    world = dist.get_world_size(group)
    idx = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    _, lse_r, ent_r = _shard_lse(logits, idx, True, backend)
    return combine(None, ent_r, None, None, None, logits.shape[-1], group, world, lse_r=lse_r)[1]


def linear_logprobs(hidden, weight, labels, temperature, group, backend="auto"):
    """hidden [N, H], weight [Vl, H] (this rank's lm_head shard), labels [N] full-vocabulary ids ->
    full-vocabulary (log-probs, entropy) [N] of softmax(hidden @ weight.T / temperature) across the group."""
    rank, world = rank_and_size(group)
    shard = weight.shape[0] if weight.dim() == 2 else 0
    if shard == 0:
        raise ValueError(f"weight must be this rank's [V / tp, H] vocabulary shard with V / tp >= 1, got shape "
                         f"{tuple(weight.shape)}")
    idx, owned = local_labels(labels, rank, shard)
    logp_r, ent_r = linear_token_logprobs(hidden, weight, idx, temperature=temperature, return_entropy=True,
                                          backend=backend)
    z_idx = (acc(hidden) * acc(weight[idx])).sum(-1) / temperature
    return combine(logp_r, ent_r, z_idx.to(logp_r.dtype), owned, labels, shard, group, world)
