"""Input validation shared by every public op: each failure is a ValueError naming the argument."""
from __future__ import annotations

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


def shape(name, x, expected, what=""):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{what}, got {tuple(x.shape)}")


def labels_in_range(name, labels, V, ignore_index=None):
    if labels.numel() == 0:
        return
    lab = labels if ignore_index is None else labels[labels != ignore_index]
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= V):
        raise ValueError(f"{name} must lie in [0, {V}), got values in [{int(lab.min())}, {int(lab.max())}]")


def positive(name, v, *, allow_zero=False):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
        raise ValueError(f"{name} must be a number, got {v!r}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def choice(name, v, options):
    if v not in options:
        raise ValueError(f"{name} must be one of {options}, got {v!r}")
