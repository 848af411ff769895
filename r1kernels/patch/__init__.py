"""Explicit drop-ins for Hugging Face models (nothing is patched on import)."""
from __future__ import annotations


def patch(model):
    """Swap supported modules of `model` for r1kernels implementations; returns {name: replaced module}."""
    from .deepseek_v3 import patch_deepseek_v3

    replaced = patch_deepseek_v3(model)
    if not replaced:
        raise ValueError(f"model ({type(model).__name__}) has no module that r1kernels.patch supports "
                         "(supported: transformers DeepseekV3 MoE layers)")
    return replaced
