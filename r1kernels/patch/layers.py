"""Fused layer ops in the training (and evaluation) forward of Hugging Face Llama-family models (Qwen2, Qwen3,
Llama, Mistral): each RMSNorm -> rk.rms_norm, each SiLU-gated MLP -> rk.silu_mul between its projections, and
each attention's rotary embedding -> rk.apply_rotary; forward and backward are one kernel each where HF's
eager code runs 3 to 10 (the norm alone: to fp32, pow, mean, rsqrt, two products, two casts).

How, so that nothing else changes:
- each patched module's class becomes a subclass of its own class with the same name and module (made once
  per class), whose forward is the fused one: parameters, buffers, state_dict keys, hooks (DeepSpeed's,
  peft's) and `type(m).__name__` stay as they were; instance attributes (the generation engine's decode-step
  patches) still shadow it;
- the rotary embedding is a module-level function of the modeling file (apply_rotary_pos_emb), called from
  the attention's forward: it is wrapped once per modeling module, and the wrapper takes the fused path only
  inside the forward of a patched attention or a `fused_rotary` scope (the generation engine's decode; a
  thread-local flag both set), so unpatched models of the same class in the process keep HF's code.
The numbers: fp32 math inside each kernel, rounded once (HF rounds after each op in bf16), so a patched
model's outputs and gradients match the unpatched model within the tolerance table, not bit for bit.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import torch

from ._pickle import reduce_made

FUSED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral")
_SUBCLASS: dict = {}
_ROPE = threading.local()  # .backend: set while a patched attention's forward runs

# A decode step (one token a row) without autograd over at most this many rows runs HF's own forward: the decode
# steps of HF's generate (TRL's rollout without vLLM) are bound by host time per op, where a fused op's dispatch
# (custom op, argument checks, Triton launch) costs more than the few eager ops it replaces save on the GPU
# (benchmarks/bench_patch_generate.py). Training forwards (autograd on) and forwards of whole sequences without
# autograd (TRL's old and reference log-probs) take the fused ops at any size: a log-prob ratio of two forwards
# of the same weights is 1 only when both run the same ops (bf16, 6 layers: 0.90-1.09 when the no-grad one ran
# HF's ops over <= 512 rows).
HOST_BOUND_ROWS = 512


def _host_bound(x: torch.Tensor) -> bool:
    """x: HF's [B, T, ...] hidden states ([B, T, heads, head_dim] at Qwen3's q/k norms); True for a no-grad
    decode step (T == 1) of at most HOST_BOUND_ROWS rows. [N, H] token rows (no T axis): never."""
    return (not torch.is_grad_enabled() and x.dim() >= 3 and x.shape[1] == 1
            and x.shape[0] <= HOST_BOUND_ROWS)


def _norm_forward(self, x):
    import r1kernels as rk

    if _host_bound(x):
        return type(self).__bases__[0].forward(self, x)
    return rk.rms_norm(x, self.weight, self.variance_epsilon, backend=self._r1k_layers_backend)


def _mlp_forward(self, x):
    import r1kernels as rk

    if _host_bound(x):
        return type(self).__bases__[0].forward(self, x)
    return self.down_proj(rk.silu_mul(self.gate_proj(x), self.up_proj(x), backend=self._r1k_layers_backend))


def _attention_forward(self, *args, **kwargs):
    x = args[0] if args else kwargs.get("hidden_states")
    if isinstance(x, torch.Tensor) and _host_bound(x):  # HF's rotary (a fused_rotary scope still applies)
        return type(self).__bases__[0].forward(self, *args, **kwargs)
    prev = getattr(_ROPE, "backend", None)
    _ROPE.backend = self._r1k_layers_backend
    try:
        return type(self).__bases__[0].forward(self, *args, **kwargs)
    finally:
        _ROPE.backend = prev


def _fused_class(cls, forward):
    if getattr(cls, "_r1k_layers", False):
        return cls
    if cls not in _SUBCLASS:
        _SUBCLASS[cls] = type(cls.__name__, (cls,), {"forward": forward, "_r1k_layers": True,
                                                     "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                     "__reduce_ex__": _reduce_fused})
    return _SUBCLASS[cls]


def _reduce_fused(self, protocol):
    """A patched module pickles as its base class's made patched again (patch/_pickle.py)."""
    cls = type(self)
    return reduce_made(self, protocol, _fused_class, cls.__bases__[0], cls.forward)


def _rope(orig, q, k, cos, sin, *args, **kwargs):
    """apply_rotary_pos_emb of a wrapped modeling module: the fused path inside a patched attention (or a
    fused_rotary scope) for the shapes it covers, orig (HF's) otherwise."""
    backend = getattr(_ROPE, "backend", None)
    if backend is None or args or kwargs.get("unsqueeze_dim", 1) != 1 or q.dim() != 4 or cos.dim() != 3:
        return orig(q, k, cos, sin, *args, **kwargs)
    sink = getattr(_ROPE, "defer", None)
    if sink is not None and sink.defer_rope and q.shape[2] == 1 and cos.shape[1] == 1:
        sink.rope = (cos[:, 0], sin[:, 0])  # applied by the caller's attention (fused_rotary's defer)
        return q, k
    import r1kernels as rk

    return rk.apply_rotary(q, k, cos, sin, backend=backend)


def _wrap_rope(mod) -> bool:
    """Wrap mod.apply_rotary_pos_emb once: the fused path inside a patched attention, HF's elsewhere."""
    orig = getattr(mod, "apply_rotary_pos_emb", None)
    if orig is None:
        return False
    if getattr(orig, "_r1k_orig", None) is not None:
        return True
    if isinstance(orig, torch.nn.Module):
        # transformers with `kernels` installed: the name holds a kernels function-module, and unpickling an
        # attention makes its private copy as type(mod.apply_rotary_pos_emb)(): so the wrapper is a module of a
        # subclass of that class (made with no arguments, like it), not a function; such a private copy runs
        # as the base's (orig dispatches to it)
        base = type(orig)

        def forward(self, *args, **kwargs):
            if self is mod.apply_rotary_pos_emb:
                return _rope(orig, *args, **kwargs)
            return base.forward(self, *args, **kwargs)

        wrapper = type(base.__name__, (base,), {"forward": forward, "_r1k_orig": orig,
                                                "__module__": base.__module__})()
    else:
        def wrapper(q, k, cos, sin, *args, **kwargs):
            return _rope(orig, q, k, cos, sin, *args, **kwargs)

        wrapper._r1k_orig = orig
        wrapper.__doc__ = orig.__doc__
    mod.apply_rotary_pos_emb = wrapper
    return True


@contextlib.contextmanager
def fused_rotary(model, backend: str = "auto", defer=None):
    """Inside: every attention of `model`'s modeling modules applies its rotary embedding with rk.apply_rotary
    (the same wrapper as patch_layers', switched on for this thread), patched or not; after, HF's code again
    for unpatched attentions. defer: an object whose `defer_rope` is true while its attention applies the
    rotation itself: then a one-token call returns q and k unrotated and sets defer.rope = (cos, sin) [B, D]
    (the generation engine's decode step: rk.decode_attention rotates in its kernel)."""
    mods = {sys.modules.get(type(m).__module__) for m in model.modules() if type(m).__name__.endswith("Attention")}
    wrapped = [mod for mod in mods if mod is not None and _wrap_rope(mod)]
    prev, prev_defer = getattr(_ROPE, "backend", None), getattr(_ROPE, "defer", None)
    if wrapped:
        _ROPE.backend, _ROPE.defer = backend, defer
    try:
        yield
    finally:
        if wrapped:
            _ROPE.backend, _ROPE.defer = prev, prev_defer


def is_rms_norm(m) -> bool:
    """An HF RMSNorm over the last dim (weight [H], variance_epsilon): what rk.rms_norm computes."""
    return (type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1)


def is_silu_mlp(m) -> bool:
    """An HF gated MLP down_proj(act_fn(gate_proj(x)) * up_proj(x)) with SiLU: what rk.silu_mul fuses."""
    act = getattr(m, "act_fn", None)
    return (all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in ("SiLU", "SiLUActivation"))


def layers_backend(backend: str) -> str:
    """The layer ops' backend for a caller's op backend: they have Triton kernels and the reference only, so
    "cuda" / "cpp" (kernels other ops have) mean "auto"."""
    return backend if backend in ("auto", "triton", "torch") else "auto"


def patch_layers(model, *, backend: str = "auto") -> dict:
    """Swap model's RMSNorms, SiLU MLPs and rotary embeddings for the fused ops (module docstring); returns
    {"rms_norm": n, "silu_mul": n, "apply_rotary": n} (modules patched). Patching twice changes nothing but
    the backend."""
    from .. import _checks

    _checks.choice("backend", backend, ("auto", "triton", "torch"))
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in FUSED_MODEL_TYPES:
        raise ValueError(f"model: fused layers support model_type {', '.join(FUSED_MODEL_TYPES)}, got {mtype!r}")
    counts = {"rms_norm": 0, "silu_mul": 0, "apply_rotary": 0}
    for m in model.modules():
        cls = type(m)
        if is_rms_norm(m):
            m.__class__, key = _fused_class(cls, _norm_forward), "rms_norm"
        elif is_silu_mlp(m):
            m.__class__, key = _fused_class(cls, _mlp_forward), "silu_mul"
        elif cls.__name__.endswith("Attention") and _wrap_rope(sys.modules.get(cls.__module__)):
            m.__class__, key = _fused_class(cls, _attention_forward), "apply_rotary"
        else:
            continue
        m._r1k_layers_backend = backend
        counts[key] += 1
    return counts


def unpatch_layers(model) -> dict:
    """Undo patch_layers: each patched module's class is its own class again (its forward HF's); returns the counts
    of patch_layers' keys. The rotary wrapper stays in the modeling module: outside a patched attention (or a
    fused_rotary scope) it calls HF's function."""
    names = {_norm_forward: "rms_norm", _mlp_forward: "silu_mul", _attention_forward: "apply_rotary"}
    counts = dict.fromkeys(names.values(), 0)
    for m in model.modules():
        cls = type(m)
        if cls.__dict__.get("_r1k_layers", False):
            m.__class__ = cls.__bases__[0]
            del m._r1k_layers_backend
            counts[names[cls.forward]] += 1
    return counts
