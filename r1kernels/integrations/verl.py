"""verl's fused linear log-prob/entropy kernel signature (verl/utils/kernel/linear_cross_entropy.py) backed
by r1kernels.linear_token_logprobs:

    linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None)
        -> (logprobs, entropy)

hidden [..., H] and labels [...] are flattened to N rows; weight is [V, H]. logprobs = log softmax(hidden @
weight.T / temperature)[label] (fp32 [N] with reduction "none", else its sum or mean over the N rows, a
scalar); entropy is the fp32 [N] entropy of the same distribution. Both are differentiable (into hidden and
weight). temperature goes through float() as in verl (None is 1.0; an int, NumPy scalar or one-element tensor
works), reduction is case-insensitive (None is "none"). A dist_process_group of one rank (verl's Megatron path
passes its tensor-parallel group even at TP size 1) is the same as none.

Tensor parallel (dist_process_group of W > 1 ranks, verl's Megatron fused path): weight is this rank's
vocabulary shard [V / W, H] holding token ids [rank * V / W, (rank + 1) * V / W) (Megatron's layout; every rank
the same shard size, else a ValueError naming weight), hidden and the full-vocabulary labels are the same on
every rank. Each rank runs r1kernels on its shard and two all-reduces over the group give every rank the
full-vocabulary log-probs and entropy (r1kernels/integrations/_vocab_parallel.py). As with verl's kernel, the
weight gradient is the full-vocabulary one of this rank's shard and the hidden gradient is this rank's part:
the group's sum is the full one (verl's sequence-parallel gather reduces it). A group whose size cannot be read
(torch.distributed not initialized) runs verl's own kernel when verl is installed (one warning) and is a
ValueError otherwise. Sequence parallelism (Ulysses) needs nothing here: verl slices hidden / labels before the
call.

verl's unfused Megatron path (use_fused_kernels=False) computes the same two quantities from vocab-parallel
logits with verl.utils.megatron.tensor_parallel.vocab_parallel_log_probs_from_logits(logits, labels) and
vocab_parallel_entropy(vocab_parallel_logits); the functions of those names here are their drop-ins (Megatron's
tensor-parallel group unless group= is given; fp32 results, differentiable into the logits, which are not
modified -- Megatron's cross-entropy overwrites them).

Deliberate differences from verl's kernel (each where verl's gives garbage, NaN or an error of its own):
labels outside [0, V), a temperature that is not finite and > 0, and reduction="mean" over zero rows are
ValueErrors naming the argument; any hidden size and device work (verl's asserts CUDA, contiguous inputs and
hidden_size % 128 == 0). vocab_parallel_entropy returns fp32 (verl's: the logits' dtype).

`install()` binds them in place of verl's in the calling process. verl's actors are Ray workers, so it must
run in each of them, e.g. ray.init(runtime_env={"worker_process_setup_hook":
"r1kernels.integrations.verl.install"}). verl's FSDP workers call linear_cross_entropy only with
actor_rollout_ref.model.fused_kernel_options.impl_backend=triton: its default, torch, runs verl's own
FusedLinearForPPO, which install() leaves alone (Megatron's fused path always calls linear_cross_entropy).
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import _checks, linear_token_logprobs, token_logprobs
from . import _vocab_parallel

__all__ = ["linear_cross_entropy", "vocab_parallel_log_probs_from_logits", "vocab_parallel_entropy", "install"]

REDUCTIONS = ("none", "sum", "mean")
VERL_MODULE = "verl.utils.kernel.linear_cross_entropy"
VERL_TP_MODULE = "verl.utils.megatron.tensor_parallel"  # imports megatron: absent from FSDP-only installs
_warned = []
_verl_original = []  # verl's function, once install() has replaced it


def _rebind(old, new, name):
    """Every loaded module whose `name` is `old` gets `new`."""
    import sys

    for m in list(sys.modules.values()):
        if getattr(m, name, None) is old:
            setattr(m, name, new)


def install():
    """Make verl call r1kernels: verl's linear_cross_entropy and, where verl's Megatron utilities import,
    vocab_parallel_log_probs_from_logits / vocab_parallel_entropy -- and every loaded module that imported them
    by name -- become ours in this process. Returns verl's linear_cross_entropy. Needs verl."""
    import importlib

    module = importlib.import_module(VERL_MODULE)
    old = _verl_original[0] if _verl_original else module.linear_cross_entropy
    if not _verl_original:
        _verl_original.append(old)
    _rebind(old, linear_cross_entropy, "linear_cross_entropy")
    try:
        tp = importlib.import_module(VERL_TP_MODULE)
    except ImportError:  # no megatron: verl's Megatron workers cannot run here either
        return old
    for name, ours in (("vocab_parallel_log_probs_from_logits", vocab_parallel_log_probs_from_logits),
                       ("vocab_parallel_entropy", vocab_parallel_entropy)):
        theirs = getattr(tp, name, None)
        if theirs is not None and theirs is not ours:
            _rebind(theirs, ours, name)
    return old


def _verl_fn():
    if _verl_original:
        return _verl_original[0]
    import importlib

    return importlib.import_module(VERL_MODULE).linear_cross_entropy


def _float_temperature(temperature):
    """verl's wrapper passes float(temperature) on (None is 1.0): an int, a NumPy scalar or a one-element tensor
    is a temperature there."""
    if temperature is None:
        return 1.0
    try:
        return float(temperature.detach() if isinstance(temperature, torch.Tensor) else temperature)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"temperature must be a number (verl calls float() on it), got {temperature!r}") from e


def _group_size(group):
    """The world size of dist_process_group, None where it is not a process group of an initialized
    torch.distributed (then verl's kernel, or the error, decides)."""
    dist = torch.distributed
    try:
        return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else None
    except (RuntimeError, ValueError, TypeError, AttributeError):
        return None


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None, *,
                         backend="auto"):
    """Drop-in for verl.utils.kernel.linear_cross_entropy.linear_cross_entropy (module docstring).
    backend (keyword only, not verl's): the r1kernels backend."""
    temperature = _float_temperature(temperature)
    reduction = "none" if reduction is None else reduction
    if not isinstance(reduction, str) or reduction.lower() not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    size = None if dist_process_group is None else _group_size(dist_process_group)
    if size == 1:
        dist_process_group = None  # one rank holds the whole vocabulary (verl's Megatron path passes its TP group
        # even at tensor-parallel size 1): the same as no group
    if dist_process_group is not None and size is None:
        try:
            verl_fn = _verl_fn()
        except ImportError as e:
            raise ValueError("dist_process_group: not a process group of an initialized torch.distributed; "
                             "install verl to run its kernel for it, or pass dist_process_group=None") from e
        if not _warned:
            _warned.append(True)
            warnings.warn("r1kernels: verl's linear_cross_entropy runs for dist_process_group (its size is "
                          "unknown here)", stacklevel=2)
        return verl_fn(hidden, weight, labels, temperature, reduction, dist_process_group)
    _checks.float_tensor("hidden", hidden, min_ndim=1)
    _checks.int_tensor("labels", labels)
    rows = math.prod(hidden.shape[:-1])  # not numel // H: hidden_size 0 has numel 0 for any row count
    if labels.numel() != rows:
        raise ValueError(f"labels must have one entry per row of hidden ({rows} rows), got shape "
                         f"{tuple(labels.shape)}")
    if rows == 0 and reduction.lower() == "mean":
        raise ValueError("hidden has no rows: reduction='mean' averages over them, undefined for an empty batch "
                         "(use reduction='sum' or 'none')")
    h2, y = hidden.reshape(rows, hidden.shape[-1]), labels.reshape(-1)
    if dist_process_group is None:
        logp, ent = linear_token_logprobs(h2, weight, y, temperature=temperature, return_entropy=True,
                                          backend=backend)
    else:
        _checks.temperature(temperature)
        logp, ent = _vocab_parallel.linear_logprobs(h2, weight, y, temperature, dist_process_group, backend)
    reduction = reduction.lower()
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, ent


def _tp_group(group):
    """group, else Megatron's tensor-parallel group (what verl's functions use)."""
    if group is not None:
        return group
    try:
        from megatron.core import parallel_state as mpu
    except ImportError as e:
        raise ValueError("group: pass the tensor-parallel process group (Megatron, whose group is the default, "
                         "is not installed)") from e
    return mpu.get_tensor_model_parallel_group()


def _tp_group_and_size(group):
    group = _tp_group(group)
    size = _group_size(group)
    if size is None:
        raise ValueError(f"group must be a process group of an initialized torch.distributed, got {group!r}")
    return group, size


def vocab_parallel_log_probs_from_logits(logits, labels, *, group=None, backend="auto"):
    """Drop-in for verl.utils.megatron.tensor_parallel.vocab_parallel_log_probs_from_logits: logits [..., V / tp]
    (this rank's vocabulary shard, Megatron's layout), labels [...] full-vocabulary ids -> fp32 log softmax(full
    logits)[label] [...] on every rank. group (keyword only, not verl's): the tensor-parallel group, default
    Megatron's; backend: the r1kernels backend."""
    group, size = _tp_group_and_size(group)
    if size == 1:
        return token_logprobs(logits, labels, backend=backend)
    _checks.float_tensor("logits", logits, min_ndim=1)
    _checks.int_tensor("labels", labels)
    _checks.shape("labels", labels, logits.shape[:-1], " (the leading dims of logits)")
    return _vocab_parallel.logits_logprobs(logits, labels, group, backend)


def vocab_parallel_entropy(vocab_parallel_logits, *, group=None, backend="auto"):
    """Drop-in for verl.utils.megatron.tensor_parallel.vocab_parallel_entropy: logits [..., V / tp] (this rank's
    vocabulary shard) -> fp32 entropy [...] of softmax over the full vocabulary, on every rank. group / backend
    as in vocab_parallel_log_probs_from_logits. No log-prob is combined or reduced (r1kernels has no entropy-only
    op: its per-row log-prob at index 0, one element read and one written by the same kernel, is discarded, or on a
    group of W > 1 ranks gives the shard's log-sum-exp)."""
    logits = vocab_parallel_logits
    _checks.float_tensor("vocab_parallel_logits", logits, min_ndim=1)
    group, size = _tp_group_and_size(group)
    if size == 1:
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        return token_logprobs(logits, labels, return_entropy=True, backend=backend)[1]
    return _vocab_parallel.logits_entropy(logits, group, backend)
