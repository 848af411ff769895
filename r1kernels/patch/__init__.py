"""Explicit drop-ins for Hugging Face models (nothing is patched on import)."""
from __future__ import annotations


def patch(model, *, backend: str = "auto"):
    """Swap supported modules of `model` for r1kernels implementations; returns {name: what was replaced}.
    DeepseekV3 MoE layers get the fused router/experts; Qwen2/Qwen3/Llama/Mistral causal LMs get the
    fused lm_head log-prob path (`model(..., labels=labels, fused_lm_head=True)`, see patch/lm_head.py) and
    fused, differentiable RMSNorm / SiLU-MLP / rotary ops in every forward (patch/layers.py; the counts
    under "layers"); the soft-capped Gemma-family causal LMs (lm_head.SOFTCAP_CLASSES) get the fused lm_head
    path only (their soft-capped logits). backend: an op backend ("auto", "triton", "cuda", "torch"; the layer
    ops and the lm_head's read "cuda" as "auto": they have no CUDA kernel; "cpp" is refused: neither the lm_head's
    nor the MoE layers' ops have a C++ kernel), checked before anything changes. Patching a patched model raises
    nothing and sets the backend."""
    from .. import _backend, _checks
    from .deepseek_v3 import patch_deepseek_v3, routers
    from .layers import FUSED_MODEL_TYPES, layers_backend, patch_layers
    from .lm_head import LM_HEAD_CLASSES, SOFTCAP_CLASSES, head_backend, patch_lm_head

    _checks.choice("backend", backend, _backend.BACKENDS)
    replaced = {}
    # the lm_head patch first: it checks all its arguments before it changes anything, so a bad backend leaves
    # the model as it was (not half patched)
    if type(model).__name__ in LM_HEAD_CLASSES + SOFTCAP_CLASSES:
        replaced.update(patch_lm_head(model, backend=head_backend(backend)))
    replaced.update(patch_deepseek_v3(model, backend=backend))
    if getattr(getattr(model, "config", None), "model_type", None) in FUSED_MODEL_TYPES:
        # the layer ops have Triton kernels and the reference only: "cuda" / "cpp" mean "auto" for them
        replaced["layers"] = patch_layers(model, backend=layers_backend(backend))
    if not replaced and not routers(model):  # a DeepseekV3 model patched before is still supported
        raise ValueError(f"model ({type(model).__name__}) has no module that r1kernels.patch supports "
                         f"(supported: transformers DeepseekV3 MoE layers; fused lm_head log-probs for "
                         f"{', '.join(LM_HEAD_CLASSES + SOFTCAP_CLASSES)})")
    return replaced


def unpatch(model) -> dict:
    """Undo patch(model): the lm_head forward, the DeepseekV3 routers and experts and the fused layers go back to
    transformers' own, holding the patched model's current parameters and buffers (trained values kept; the
    state_dict is unchanged); returns {name: what was taken out} ({} for a model with nothing patched)."""
    from .deepseek_v3 import unpatch_deepseek_v3
    from .layers import unpatch_layers
    from .lm_head import unpatch_lm_head

    out = {**unpatch_lm_head(model), **unpatch_deepseek_v3(model)}
    layers = unpatch_layers(model)
    if any(layers.values()):
        out["layers"] = layers
    return out


def is_patched(model) -> bool:
    """Whether patch(model) changed anything of `model` that unpatch would undo (its lm_head forward, a DeepseekV3
    router or expert block, a fused layer)."""
    from .deepseek_v3 import moe_routers

    return (getattr(model, "_r1k_lm_head", None) is not None or bool(moe_routers(model, patched=True))
            or any(type(m).__dict__.get("_r1k_layers", False) for m in model.modules()))
