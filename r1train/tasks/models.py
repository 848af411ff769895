"""Tiny models from transformers configs (random init, built in code, nothing downloaded).

`tiny-qwen2` / `tiny-llama`: dense decoder-only; `tiny-deepseek-v3`: DeepseekV3 with MLA attention,
one dense layer then MoE layers (sigmoid router with group-limited top-k and the
e_score_correction_bias used by auxiliary-loss-free balancing).
"""

from __future__ import annotations

import torch

TINY_MODELS = ("tiny-qwen2", "tiny-llama", "tiny-deepseek-v3")


def tiny_config(name: str, vocab_size: int, *, hidden_size: int = 128, num_layers: int = 4,
                num_heads: int = 4, max_position: int = 512, tokenizer=None, **overrides):
    """A transformers config for one of TINY_MODELS; `overrides` are set on the config last."""
    import transformers as tf

    ids = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, max_position_embeddings=max_position, **ids)
    if name == "tiny-qwen2":
        cfg = tf.Qwen2Config(intermediate_size=2 * hidden_size, num_key_value_heads=max(1, num_heads // 2),
                             tie_word_embeddings=True, rope_theta=10000.0, **common)
    elif name == "tiny-llama":
        cfg = tf.LlamaConfig(intermediate_size=2 * hidden_size, num_key_value_heads=num_heads,
                             tie_word_embeddings=False, rope_theta=10000.0, **common)
    elif name == "tiny-deepseek-v3":
        head = hidden_size // num_heads
        cfg = tf.DeepseekV3Config(
            intermediate_size=2 * hidden_size, moe_intermediate_size=hidden_size // 2,
            num_key_value_heads=num_heads, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
            topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
            q_lora_rank=None, kv_lora_rank=head, qk_rope_head_dim=head // 2, qk_nope_head_dim=head // 2,
            v_head_dim=head, tie_word_embeddings=False, rope_scaling=None, **common)
    else:
        raise ValueError(f"model_name_or_path: unknown tiny model {name!r}; choose one of {TINY_MODELS}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(name: str, tokenizer, seed: int = 0, **kw):
    """A randomly initialized tiny causal LM (fp32) whose vocabulary matches `tokenizer`."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(name, len(tokenizer), tokenizer=tokenizer, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # routers: unit-scale logits (HF's 0.02 init makes every token pick the same experts)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias") and getattr(m, "weight", None) is not None:
                m.weight.normal_(0.0, m.weight.shape[1] ** -0.5)
    return model
