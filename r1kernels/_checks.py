"""Input validation shared by every public op: each failure is a ValueError naming the argument."""
from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)


def tensor(name: str, x, *, ndim=None, min_ndim=None, dtypes=None, kind: str = "") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must be {kind or dtypes}, got {x.dtype}")
    return x


def float_tensor(name, x, **kw):
    return tensor(name, x, dtypes=FLOAT_DTYPES, kind="a floating-point tensor", **kw)


def int_tensor(name, x, **kw):
    return tensor(name, x, dtypes=INT_DTYPES, kind="an int32/int64 tensor", **kw)


def same_device(**named):
    items = [(n, t) for n, t in named.items() if t is not None]
    dev0 = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev0:
            raise ValueError(f"{n} is on {t.device} but {items[0][0]} is on {dev0}")


def no_autograd(op: str, **named):
    """An inference-only op (no backward on its kernels) with grad mode on and an input that requires grad: a
    ValueError naming it (the torch path recorded a graph, the Triton one raised at backward or dropped it)."""
    if not torch.is_grad_enabled():
        return
    for name, t in named.items():
        if t is not None and t.requires_grad:
            raise ValueError(f"{op} is inference only (no autograd): {name} requires grad; call it under "
                             f"torch.no_grad() or pass {name}.detach()")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses t's elements can touch."""
    n = sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + n * t.element_size()


def writable(name: str, out: torch.Tensor, **read):
    """`out`, written in place, has no two elements at one address (an expanded view) and shares no memory with
    the tensors `read` (eager callers; addresses are not traceable)."""
    if out.numel() and torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"{name} is written in place and must not repeat memory (e.g. an expanded view); "
                         "pass a contiguous tensor")
    lo, hi = _span(out)
    for n, t in read.items():
        if t is not None and t.numel() and out.numel() and t.device == out.device:
            a, b = _span(t)
            if a < hi and lo < b:
                raise ValueError(f"{name} is written in place and must not share memory with {n}")


def shape(name, x, expected, what=""):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{what}, got {tuple(x.shape)}")


# Value checks (label range, NaN) need the data. On CPU they raise ValueError at once. On a GPU, reading
# the answer back is a host sync that idles the GPU while the host then launches the op (measured on an
# H100: 1.03 vs 0.81 ms for token_logprobs at N=8192, V=151936), so there they run asynchronously through
# torch._assert_async (a device-side assert, as torch's own cross_entropy does), unless
# R1K_SYNC_CHECKS=1 asks for ValueError at the price of the sync.
SYNC_CHECKS = os.environ.get("R1K_SYNC_CHECKS", "0") == "1"


def capturing(x: torch.Tensor) -> bool:
    """x is a CUDA tensor and the current stream is being captured into a CUDA graph (no host sync allowed)."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _sync(x: torch.Tensor) -> bool:
    """Check by reading the answer back: on CPU, and on a GPU under R1K_SYNC_CHECKS=1 except while a CUDA graph
    is being captured (a read-back there fails the capture; the device assert is captured instead)."""
    return x.device.type == "cpu" or (SYNC_CHECKS and not capturing(x))


class AdvantageOverflowError(ValueError):
    """rk.group_advantages: finite rewards whose advantages leave float32 (or whose float64 std would overflow).
    A ValueError, so callers that catch ValueError keep working; trainers catch this one to name their option."""


def _value_check(ok: torch.Tensor, message: str, error: type[ValueError] = ValueError):
    if _sync(ok):
        if not bool(ok):
            raise error(message)
    else:
        torch._assert_async(ok, message)


def labels_in_range(name, labels, V, hint=""):
    if labels.numel() == 0:
        return
    if _sync(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"{name} must lie in [0, {V}){hint}, got values in [{lo}, {hi}]")
        return
    lo, hi = torch.aminmax(labels)
    _value_check((lo >= 0) & (hi < V), f"{name} must lie in [0, {V}){hint}")


def finite(name, x, hint=""):
    _value_check(torch.isfinite(x).all(), f"{name} contains NaN or inf{hint}")


def is_real(v) -> bool:
    """v is a real number: a Python int / float or a NumPy real scalar (numbers.Real: np.float32, np.int64, ...).
    Not a bool (np.bool_ is no numbers.Real either), not an array or a tensor (not even one element)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def is_integral(v) -> bool:
    """v is an integer: a Python int or a NumPy integer scalar (numbers.Integral); not a bool, array or tensor."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def as_python(v):
    """A NumPy real scalar as the Python number of its value, for the checks below and the kernels after them
    (public ops convert their scalar options once, at entry: kernels receive Python numbers): an integer as int
    (np.int64(5) -> 5), any other real as float (exact: np.float32(0.9) -> the double float(np.float32(0.9)), not
    0.9; NaN / inf stay NaN / inf for the check to name). Anything else is returned unchanged: Python ints and
    floats (a huge int stays exact), bools, arrays, tensors and junk, which the check that follows names."""
    if type(v) in (int, float) or not is_real(v):
        return v
    return int(v) if is_integral(v) else float(v)


def positive(name, v, *, allow_zero=False, allow_inf=False):
    """v is a real number (not a bool, not NaN) > 0 (>= 0 with allow_zero); inf only with allow_inf. A NumPy real
    scalar is judged as its Python value (as_python); returns that Python number, for the caller to pass on."""
    v = as_python(v)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or (v == math.inf and not allow_inf):
        raise ValueError(f"{name} must be a {'number' if allow_inf else 'finite number'}, got {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    return v


# The smallest sampling / loss temperature: the kernels scale logits by 1 / temperature in float32, which
# overflows to inf below ~3e-39 (NaN log-probs), and logits of magnitude 30 overflow below ~1e-37. 1e-5 is
# also where vLLM switches to greedy; for argmax decoding pass greedy instead.
MIN_TEMPERATURE = 1e-5
# The largest: float32's maximum (a larger one rounds to inf there: z = x / inf is 0, or NaN for a -inf logit).
MAX_TEMPERATURE = torch.finfo(torch.float32).max
# The smallest top_p: float32's smallest normal number (the kernels compare the mass in float32; below it top_p
# rounds to 0 or a subnormal, which a GPU may flush to 0, and top-p would keep every token, not the top one).
MIN_TOP_P = torch.finfo(torch.float32).tiny


def temperature(v, name="temperature"):
    """positive(name, v) and in [MIN_TEMPERATURE, MAX_TEMPERATURE]; returns v as a Python number (as positive)."""
    v = positive(name, v)
    if v < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be >= {MIN_TEMPERATURE} (smaller scales the logits past float32's range); "
                         f"for argmax decoding use greedy, got {v!r}")
    if v > MAX_TEMPERATURE:  # exact for a Python int of any size
        raise ValueError(f"{name} must be <= float32's maximum {MAX_TEMPERATURE} (the kernels divide in float32), "
                         f"got {v!r}")
    return v


# The fused head kernels' soft-cap range: they compute c * tanh(x / c) in float32 as c - 2c / (e^(2x/c) + 1),
# whose absolute error grows as c * 2^-24 (measured: log-prob errors 3e-6 at c = 30, 1.6e-3 at 1e4, NaN where c
# passes float32's range), and a c that rounds to 0 in float32 gives 0 / 0 gradients. Models use 15-50.
MIN_SOFTCAP, MAX_SOFTCAP = 1e-3, 1e3


def softcap_in_range(v: float) -> bool:
    """Whether the fused head kernels compute a cap of v (MIN_SOFTCAP <= v <= MAX_SOFTCAP)."""
    return MIN_SOFTCAP <= v <= MAX_SOFTCAP


def softcap(v, name="softcap"):
    """None, or a finite number in [MIN_SOFTCAP, MAX_SOFTCAP]; returns None or v as a Python float."""
    if v is None:
        return None
    v = float(positive(name, v))
    if not softcap_in_range(v):
        raise ValueError(f"{name} must be in [{MIN_SOFTCAP:g}, {MAX_SOFTCAP:g}] (the kernels' float32 tanh), got {v!r}")
    return v


def choice(name, v, options):
    if v not in options:
        raise ValueError(f"{name} must be one of {options}, got {v!r}")
