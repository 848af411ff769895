"""Fused kernels in the model's own decode forward, while the engine runs: each Hugging Face RMSNorm ->
rk.rms_norm (one kernel instead of six), each SiLU-gated MLP -> rk.silu_mul between its projections (one
instead of two), and the rotary embedding of Llama-family attention -> rk.apply_rotary (one launch for q
and k instead of about ten). Instance attributes shadow the class methods for the duration and are
removed after, so training forwards run the unpatched code."""
from __future__ import annotations

import contextlib
import sys
import types

import r1kernels as rk

ROPE_MODELS = ("qwen2", "qwen3", "llama", "mistral")


def _norm(self, x):
    return rk.rms_norm(x, self.weight, self.variance_epsilon, backend=self._r1k_backend)


def _mlp(self, x):
    return self.down_proj(rk.silu_mul(self.gate_proj(x), self.up_proj(x), backend=self._r1k_backend))


def _patchable_mlp(m) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in ("SiLU", "SiLUActivation"))


@contextlib.contextmanager
def fused_decode_ops(model, backend: str = "auto"):
    patched = []
    for m in model.modules():
        name = type(m).__name__
        fn = None
        if name.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None:
            fn = _norm
        elif _patchable_mlp(m):
            fn = _mlp
        if fn is not None:
            m.forward, m._r1k_backend = types.MethodType(fn, m), backend
            patched.append(m)
    mods = []
    if getattr(model.config, "model_type", None) in ROPE_MODELS:
        for m in model.modules():
            mod = sys.modules.get(type(m).__module__)
            if type(m).__name__.endswith("Attention") and hasattr(mod, "apply_rotary_pos_emb") and mod not in [
                    x for x, _ in mods]:
                mods.append((mod, mod.apply_rotary_pos_emb))

                def rope(q, k, cos, sin, unsqueeze_dim=1, _orig=mod.apply_rotary_pos_emb):
                    if unsqueeze_dim != 1:
                        return _orig(q, k, cos, sin, unsqueeze_dim)
                    return rk.apply_rotary(q, k, cos, sin, backend=backend)
                mod.apply_rotary_pos_emb = rope
    try:
        yield
    finally:
        for m in patched:
            del m.forward, m._r1k_backend
        for mod, orig in mods:
            mod.apply_rotary_pos_emb = orig
