"""The KV cache of one rollout and the attention function transformers calls while the engine runs.

The engine registers `ATTN_NAME` with transformers' AttentionInterface and switches the model's config to
it for the duration of a rollout, so the model's own forward (projections, RoPE, MoE routing, norms) runs
unchanged and only attention goes through here: prefill writes each prompt's keys/values into the cache
and attends with torch sdpa; decode calls rk.decode_attention with the new token's keys/values, which it
stores at position lens[b] and attends over the lens[b] + 1 valid positions (one kernel). transformers
builds no mask for an attention name it has no mask function for, so no [B, L] mask exists in decode.

Cache layout: k[layer] [Bmax, Hkv, L, Dk], v[layer] [Bmax, Hkv, L, Dv]; row b holds its tokens at
positions 0..lens[b]-1 with no padding (prompts are left-padded only in the prefill input). Decode works
on the first `rows` rows (the engine compacts live rows to the front). Shared-prompt reads (the rows of one
prompt reading one row's copy of it) were measured slower (benchmarks/NOTES-decode-linear.md) and removed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import r1kernels as rk

ATTN_NAME = "r1train_engine"
_ACTIVE: list = []  # the KVCache in use (set by the engine around model calls)


class KVCache:
    def __init__(self, n_layers: int, lens: torch.Tensor, length: int, backend: str = "auto"):
        self.rows_max, self.length, self.backend = lens.numel(), length, backend
        self.k: list = [None] * n_layers
        self.v: list = [None] * n_layers
        self.lens = lens  # int64 [rows_max]: valid positions per row (the engine's static buffer)
        self.mode = "decode"
        self.start_B = self.mask_B1PP = None  # prefill inputs
        # decode reads positions [0, window) (None: all L). An eager decode step sets it to the host-known
        # bound prompt length + steps >= lens + 1 (no sync); captured steps keep None (static shapes).
        self.window: int | None = None
        self.rope = None  # (cos, sin) [B, D] of this decode step, left by the rotary wrapper (fused_rotary)

    @property
    def defer_rope(self) -> bool:
        """Decode applies the rotary embedding inside rk.decode_attention (no rotary kernel a layer)."""
        return self.mode == "decode"

    # ---- prefill: the prompt's keys/values into the cache, causal attention over the padded prompt
    def set_prefill(self, prompt_mask_BP: torch.Tensor):
        B, P = prompt_mask_BP.shape
        if P > self.length:
            raise ValueError(f"prompt of {P} tokens does not fit the cache of {self.length}")
        m = prompt_mask_BP.bool()
        n_B = m.sum(1)
        self.start_B = P - n_B  # left padding: position j of row b is column start_B[b] + j
        causal = torch.ones(P, P, dtype=torch.bool, device=m.device).tril()
        eye = torch.eye(P, dtype=torch.bool, device=m.device)
        self.mask_B1PP = ((causal[None] & m[:, None, :]) | eye[None])[:, None]  # pad queries see themselves
        self.mode = "prefill"
        return n_B

    def prefill(self, i, q, k, v, scale):
        B, Hkv, P, _ = k.shape
        if self.k[i] is None:
            self.k[i] = k.new_zeros(self.rows_max, Hkv, self.length, k.shape[-1])
            self.v[i] = v.new_zeros(self.rows_max, Hkv, self.length, v.shape[-1])
        col_BP = (self.start_B[:, None] + torch.arange(P, device=k.device)[None]).clamp(max=P - 1)
        for src, dst in ((k, self.k[i]), (v, self.v[i])):
            idx = col_BP[:, None, :, None].expand(B, Hkv, P, src.shape[-1])
            dst[:B, :, :P] = src.gather(2, idx)  # positions >= n_b hold junk; never read (lens)
        G = q.shape[1] // Hkv
        if G > 1:
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask_B1PP, scale=scale)
        return out.transpose(1, 2).contiguous()

    def repeat_prefill(self, rows_B: torch.Tensor, P: int):
        """The prefill ran on distinct prompts: row b gets prompt row rows_B[b]'s keys/values (positions < P)."""
        for t in self.k + self.v:
            if t is not None:
                t[:rows_B.numel(), :, :P] = t[:, :, :P].index_select(0, rows_B)

    # ---- decode: one new token per row
    def decode(self, i, q, k, v, scale):
        b, w = q.shape[0], self.window
        pos_b = self.lens[:b]
        # the kernel stores k/v at position lens[b] itself and attends to lens[b] + 1 positions; lens counts
        # from the prompt lengths up (never negative): no data check in every layer of an uncaptured step
        cos, sin = self.rope or (None, None)
        self.rope = None
        out = rk.decode_attention(q[:, :, 0], self.k[i][:b, :, :w], self.v[i][:b, :, :w], pos_b, scale=scale,
                                  k_new=k[:, :, 0], v_new=v[:, :, 0], cos=cos, sin=sin, check_lens=False,
                                  backend=self.backend)
        return out[:, None]  # [b, 1, Hq, Dv]

    def compact(self, keep_idx: torch.Tensor):
        """Move rows keep_idx (ascending) to the front of every buffer."""
        n = keep_idx.numel()
        for t in self.k + self.v:
            if t is not None:
                t[:n] = t.index_select(0, keep_idx)


def position_ids(mask_BL: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what HF generate uses)."""
    return (mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def engine_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface signature: q [B, Hq, T, Dk], k/v [B, Hkv, T, D] -> ([B, T, Hq, Dv],
    None)."""
    cache = _ACTIVE[-1]
    if cache.mode == "prefill":
        return cache.prefill(module.layer_idx, query, key, value, scaling), None
    return cache.decode(module.layer_idx, query, key, value, scaling), None


def register():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, engine_attention)
