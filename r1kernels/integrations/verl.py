"""verl's fused linear log-prob/entropy kernel signature (verl/utils/kernel/linear_cross_entropy.py) backed
by r1kernels.linear_token_logprobs:

    linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None)
        -> (logprobs, entropy)

hidden [..., H] and labels [...] are flattened to N rows; weight is [V, H]. logprobs = log softmax(hidden @
weight.T / temperature)[label] (fp32 [N] with reduction "none", else its sum or mean over the N rows, a
scalar); entropy is the fp32 [N] entropy of the same distribution. Both are differentiable (into hidden and
weight). temperature goes through float() as in verl (None is 1.0; an int, NumPy scalar or one-element tensor
works), reduction is case-insensitive (None is "none"). A dist_process_group of one rank (verl's Megatron path
passes its tensor-parallel group even at TP size 1) is the same as none and runs here. A vocabulary split over
a larger group (tensor parallel) is not implemented here: that call runs verl's own kernel when verl is
installed (one warning) and is a ValueError otherwise. Sequence parallelism (Ulysses) needs nothing here: verl
slices hidden / labels before the call.

Deliberate differences from verl's kernel (each where verl's gives garbage, NaN or an error of its own):
labels outside [0, V), a temperature that is not finite and > 0, and reduction="mean" over zero rows are
ValueErrors naming the argument; any hidden size and device work (verl's asserts CUDA, contiguous inputs and
hidden_size % 128 == 0).

`install()` binds it in place of verl's in the calling process. verl's actors are Ray workers, so it must
run in each of them, e.g. ray.init(runtime_env={"worker_process_setup_hook":
"r1kernels.integrations.verl.install"}).
"""
from __future__ import annotations

import math
import warnings

import torch

from .. import _checks, linear_token_logprobs

__all__ = ["linear_cross_entropy", "install"]

REDUCTIONS = ("none", "sum", "mean")
VERL_MODULE = "verl.utils.kernel.linear_cross_entropy"
_warned = []
_verl_original = []  # verl's function, once install() has replaced it


def install():
    """Make verl call r1kernels: verl's linear_cross_entropy, and every loaded module that imported it by name,
    become ours in this process. Returns verl's function. Needs verl."""
    import importlib
    import sys

    module = importlib.import_module(VERL_MODULE)
    old = _verl_original[0] if _verl_original else module.linear_cross_entropy
    if not _verl_original:
        _verl_original.append(old)
    for m in list(sys.modules.values()):
        if getattr(m, "linear_cross_entropy", None) is old:
            m.linear_cross_entropy = linear_cross_entropy
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
    if dist_process_group is not None and _group_size(dist_process_group) == 1:
        dist_process_group = None  # one rank holds the whole vocabulary (verl's Megatron path passes its TP group
        # even at tensor-parallel size 1): the same as no group, so r1kernels runs
    if dist_process_group is not None:
        try:
            verl_fn = _verl_fn()
        except ImportError as e:
            raise ValueError("dist_process_group (a vocabulary split over ranks) is not implemented by r1kernels; "
                             "install verl to run its kernel for it, or pass dist_process_group=None") from e
        if not _warned:
            _warned.append(True)
            warnings.warn("r1kernels: verl's linear_cross_entropy runs for dist_process_group", stacklevel=2)
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
    logp, ent = linear_token_logprobs(hidden.reshape(rows, hidden.shape[-1]), weight, labels.reshape(-1),
                                      temperature=temperature, return_entropy=True, backend=backend)
    reduction = reduction.lower()
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, ent
