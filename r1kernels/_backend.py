"""Backend choice for every public op: "auto" | "triton" | "cuda" | "cpp" | "torch" (env R1K_BACKEND).

Kernels are looked up in KERNELS by module path and function name: adding a kernel is adding the file
that defines the function (and, if it has limits, a `fn.eligible(*args, **kw) -> bool` attribute, which
must trace under torch.compile: shapes and dtypes only).
Everything is resolved at import time, so `pick` is plain table lookups and traces under torch.compile.
Resolution fails loudly: a listed kernel whose dependency is installed (triton for "triton", the built
extension r1kernels._C for "cuda" / "cpp") must import and define its function, else `import r1kernels`
raises ImportError naming the entry. Only a missing dependency makes a kernel unavailable.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")

# op -> [(backend, "module:function")], fastest first. "torch" (the reference) is always last and implied.
KERNELS: dict[str, list[tuple[str, str]]] = {
    "token_logprobs": [("triton", "r1kernels.ops.logprob:token_logprobs_triton")],
    "linear_token_logprobs": [("triton", "r1kernels.ops.linear_grpo:linear_token_logprobs_triton")],
    "grpo_loss": [("triton", "r1kernels.ops.grpo:grpo_loss_triton"), ("cuda", "r1kernels.ops.grpo:grpo_loss_cuda")],
    "linear_grpo_loss": [("triton", "r1kernels.ops.linear_grpo:linear_grpo_loss_triton")],
    "group_advantages": [("cuda", "r1kernels.ops.advantage:group_advantages_ext"),
                         ("triton", "r1kernels.ops.advantage:group_advantages_triton"),
                         ("cpp", "r1kernels.ops.advantage:group_advantages_ext")],
    "route": [("cuda", "r1kernels.ops.moe:route_cuda"), ("triton", "r1kernels.ops.moe:route_triton")],
    "permute": [("cuda", "r1kernels.ops.moe:permute_cuda"), ("triton", "r1kernels.ops.moe:permute_triton")],
    "unpermute": [("cuda", "r1kernels.ops.moe:unpermute_cuda"),
                  ("triton", "r1kernels.ops.moe:unpermute_triton")],
    "sample_tokens": [("triton", "r1kernels.ops.sampling:sample_tokens_triton")],
    "decode_attention": [("triton", "r1kernels.ops.decode_attention:decode_attention_triton")],
    "decode_linear": [("triton", "r1kernels.ops.decode_linear:decode_linear_triton")],
    "rms_norm": [("triton", "r1kernels.ops.fused:rms_norm_triton")],
    "apply_rotary": [("triton", "r1kernels.ops.fused:apply_rotary_triton")],
    "silu_mul": [("triton", "r1kernels.ops.fused:silu_mul_triton")],
}

# ops whose reference is their designed path beyond the kernel's limits (decode_linear: cuBLAS past 64 rows or one
# wave of programs): no warning when auto falls back to it
QUIET_FALLBACK = {"decode_linear"}

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
ENV_BACKEND = os.environ.get("R1K_BACKEND", "auto")
if ENV_BACKEND not in BACKENDS:
    raise ValueError(f"R1K_BACKEND must be one of {BACKENDS}, got {ENV_BACKEND!r}")

# the compiled extension registers torch.ops.r1kernels.* when imported; not built (a pure-Python install):
# the cuda / cpp kernels are unavailable. Built but not loading (e.g. built against another torch): an error.
HAS_EXTENSION = importlib.util.find_spec("r1kernels._C") is not None
if HAS_EXTENSION:
    try:
        importlib.import_module("r1kernels._C")
    except ImportError as e:
        raise ImportError(f"r1kernels._C exists but does not load ({e}); rebuild it (pip install -e .) or delete "
                          "it to run without the C++/CUDA kernels") from e


def extension_has(op: str, dispatch_key: str) -> bool:
    """True when r1kernels._C registered `op` with a kernel for dispatch_key ("CPU", "CUDA"); False also
    when it has no schema for `op` (ops with only a CUDA kernel exist only in CUDA builds)."""
    if not HAS_EXTENSION:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"r1kernels::{op}", dispatch_key)
    except RuntimeError:  # no such operator
        return False


# backend -> (whether its dependency is installed, what is missing otherwise)
DEPENDENCY = {"triton": (HAS_TRITON, "triton is not installed"),
              "cuda": (HAS_EXTENSION, "the r1kernels._C extension is not built"),
              "cpp": (HAS_EXTENSION, "the r1kernels._C extension is not built")}


def _load(op: str, backend: str, path: str):
    """The function `path` ("module:function") names, or None (with the reason in _MISSING) when the
    backend's dependency is not installed. Anything else that stops it loading is an ImportError."""
    installed, why = DEPENDENCY.get(backend, (True, ""))
    if not installed:
        _MISSING[path] = why
        return None
    module, name = path.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] == "triton" and not HAS_TRITON:
            _MISSING[path] = "triton is not installed"
            return None
        raise ImportError(f"r1kernels: the {backend} kernel of {op} ({path}) does not import: {e!r}") from e
    except ImportError as e:
        raise ImportError(f"r1kernels: the {backend} kernel of {op} ({path}) does not import: {e!r}") from e
    fn = getattr(mod, name, None)
    if fn is None:
        raise ImportError(f"r1kernels: the {backend} kernel of {op} ({path}) is missing: {module} defines no "
                          f"{name!r} (its dependency is installed)")
    return fn


_MISSING: dict[str, str] = {}
# op -> [(backend, fn)] of the kernels whose dependency is installed; a `fn.devices` set (made at import)
# may narrow where a kernel runs, e.g. to the devices the built extension has kernels for.
_LOADED: dict[str, list[tuple[str, object]]] = {}
for _op, _entries in KERNELS.items():
    _LOADED[_op] = [(b, f) for b, p in _entries if (f := _load(_op, b, p)) is not None]

_WARNED: set[str] = set()


def _runs_on(backend: str, device_type: str) -> bool:
    if backend == "cuda":
        return device_type == "cuda"
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and TRITON_INTERPRET)
    if backend == "cpp":
        return device_type == "cpu"
    return True


def _candidates(op: str, device_type: str) -> list[tuple[str, object, object]]:
    """[(backend, fn, fn.eligible or None)] of the loaded kernels of op that run on device_type, fastest first."""
    return [(b, f, getattr(f, "eligible", None)) for b, f in _LOADED.get(op, [])
            if _runs_on(b, device_type) and device_type in getattr(f, "devices", (device_type,))]


# (op, device type) -> _candidates, made once: pick is a lookup plus the eligibility checks (host time per
# call is paid per layer by the MoE ops)
_RUNS = {(op, dev): _candidates(op, dev) for op in _LOADED for dev in ("cpu", "cuda")}


def _runnable(op: str, device_type: str) -> list[tuple[str, object, object]]:
    cands = _RUNS.get((op, device_type))
    return cands if cands is not None else _candidates(op, device_type)


def pick(op: str, backend: str, device: torch.device, *args, **kwargs):
    """The kernel function to call, or None for the torch reference."""
    if backend == "auto":
        backend = ENV_BACKEND
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None
    dev = device.type
    cands = _runnable(op, dev)
    if backend == "auto":
        fn = kernel(op, backend, device, *args, **kwargs)
        if fn is not None:
            return fn
        if dev == "cuda" and op not in _WARNED and op not in QUIET_FALLBACK and not torch.compiler.is_compiling():
            _WARNED.add(op)
            warnings.warn(f"r1kernels: no kernel eligible for {op} on cuda; using the torch reference")
        return None
    for name, fn, eligible in cands:
        if name == backend:
            if eligible is None or eligible(*args, **kwargs):
                return fn
            raise ValueError(f"backend={backend!r} for {op} does not support these inputs ({_describe(args, kwargs)}); "
                             "backend='auto' falls back to the torch reference")
    if any(name == backend for name, _ in _LOADED.get(op, [])):
        raise ValueError(f"backend={backend!r} for {op} cannot run on {dev} tensors here ({_why(op, backend)})")
    raise ValueError(f"backend={backend!r} is not available for {op} ({_why(op, backend)})")


def _describe(args, kwargs) -> str:
    """The tensor inputs' dtypes and shapes (positional ones by position), for an eligibility error."""
    items = [(f"input {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return ", ".join(f"{n}: {str(t.dtype).replace('torch.', '')} {list(t.shape)}" for n, t in items
                     if isinstance(t, torch.Tensor)) or "no tensors"


def kernel(op: str, backend: str, device: torch.device, *args, **kwargs):
    """The kernel pick would run for these inputs, or None where the reference would run (or pick would raise:
    a named backend that cannot take them); quiet. For callers with their own fallback (the generation engine)."""
    if backend == "auto":
        backend = ENV_BACKEND
    for name, fn, eligible in _runnable(op, device.type):
        if backend in ("auto", name) and (eligible is None or eligible(*args, **kwargs)):
            return fn
    return None


def _why(op: str, backend: str) -> str:
    paths = [p for b, p in KERNELS.get(op, []) if b == backend]
    if not paths:
        return "no such kernel"
    if paths[0] in _MISSING:
        return _MISSING[paths[0]]
    if backend == "triton":
        return "needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
    return "the extension has no kernel for this device"


def lacking(ops, backend: str) -> list[str]:
    """The ops of `ops` with no kernel of `backend` in KERNELS ("auto" and "torch": none)."""
    if backend in ("auto", "torch"):
        return []
    return [op for op in ops if backend not in [b for b, _ in KERNELS.get(op, [])]]


def available(op: str, device_type: str = "cuda") -> list[str]:
    """Backends that would run `op` on tensors of device_type (the reference "torch" always)."""
    return [b for b, _, _ in _runnable(op, device_type)] + ["torch"]
