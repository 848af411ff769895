"""Decode attention (one generation step): Qwen2.5-1.5B heads (Hq=12, Hkv=2, D=128) bf16 against a static
KV cache of L positions. Providers: the torch reference, torch sdpa over the whole static cache with a
padding mask (what transformers does: repeat_kv, then a masked dense attention), the same with
enable_gqa, triton through the public API and through the op alone, and the op replayed from a captured
CUDA graph (how the generation engine runs it). Bytes floor: the valid K/V positions read once, q read,
out written."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import r1kernels as rk

from .harness import Case, Rotating, graphed


def _case(device, B, Hq, Hkv, L, D, lens, dtype) -> Case:
    G = Hq // Hkv

    def make():
        return (torch.randn(B, Hq, D, device=device).to(dtype), torch.randn(B, Hkv, L, D, device=device).to(dtype),
                torch.randn(B, Hkv, L, D, device=device).to(dtype))

    inputs = Rotating(make, n=3 if device == "cuda" else 1)
    mask = (torch.arange(L, device=device)[None, :] < lens[:, None])[:, None, None, :]  # shared by all layers

    def public(backend):
        def run():
            q, k, v = inputs.next()
            return rk.decode_attention(q, k, v, lens, backend=backend)
        return run

    def sdpa_repeat_kv():
        q, k, v = inputs.next()
        k = k[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hq, L, D)
        v = v[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hq, L, D)
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask)[:, :, 0]

    def sdpa_gqa():
        q, k, v = inputs.next()
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)[:, :, 0]

    provs = {"torch": public("torch"), "torch sdpa (full cache + mask)": sdpa_repeat_kv,
             "torch sdpa enable_gqa (full cache + mask)": sdpa_gqa}
    if "triton" in rk._backend.available("decode_attention", device):
        provs["triton"] = public("triton")
    try:
        from r1kernels.ops.decode_attention import decode_attention_triton
    except ImportError:  # no triton
        decode_attention_triton = None
    if decode_attention_triton is not None and (device == "cuda" or rk._backend.TRITON_INTERPRET):
        def op():
            q, k, v = inputs.next()
            return decode_attention_triton(q, k, v, lens)
        provs["triton (op, no API checks)"] = op
        if device == "cuda":
            q0, k0, v0 = inputs.sets[0]
            provs["triton (op, CUDA graph)"] = graphed(lambda: decode_attention_triton(q0, k0, v0, lens))
            # what the generation engine runs: the step's k/v stored at lens (lens - 1 keeps lens + 1 <= L)
            kn, vn = k0[:, :, 0].clone(), v0[:, :, 0].clone()
            provs["triton + store new token (op, CUDA graph)"] = graphed(
                lambda: decode_attention_triton(q0, k0, v0, lens - 1, None, kn, vn))
    peers = ("torch sdpa (full cache + mask)", "torch sdpa enable_gqa (full cache + mask)")
    if device == "cuda":
        q0, k0, v0 = inputs.sets[0]
        provs["torch sdpa enable_gqa (CUDA graph)"] = graphed(
            lambda: F.scaled_dot_product_attention(q0[:, :, None], k0, v0, attn_mask=mask, enable_gqa=True))
        peers += ("torch sdpa enable_gqa (CUDA graph)",)
    esize = torch.tensor([], dtype=dtype).element_size()
    kv_bytes = int(lens.clamp(max=L).sum()) * Hkv * 2 * D * esize
    lo, hi = int(lens.min()), int(lens.max())
    shape = f"B={B} Hq={Hq} Hkv={Hkv} D={D} L={L} lens={lo}..{hi} {str(dtype).split('.')[-1]}"
    return Case("decode_attention", shape, provs, bytes=kv_bytes + 2 * B * Hq * D * esize,
                peers=peers)


def _shared_prompt_bound(device, B=64, G=8, P=256, T=256, Hq=12, Hkv=2, D=128, L=1024) -> Case:
    """The rollout's shape at mid-rollout (B rows = B / G prompts x G completions, P prompt positions, T own
    positions a row), CUDA-graph replay: each row reading its copy of the prompt (the engine today) vs the same
    kernel reading only the bytes a shared-prompt kernel would (P / G prompt positions a row): a bound on what
    reading each prompt once per group could save (benchmarks/NOTES-decode-linear.md), not a kernel."""
    from r1kernels.ops.decode_attention import decode_attention_triton

    bf = torch.bfloat16
    q, k, v = (torch.randn(B, Hq, D, device=device).to(bf), torch.randn(B, Hkv, L, D, device=device).to(bf),
               torch.randn(B, Hkv, L, D, device=device).to(bf))
    own = torch.full((B,), P + T, device=device)
    shared = torch.full((B,), P // G + T, device=device)
    provs = {"per-row prompt copies (engine)": graphed(lambda: decode_attention_triton(q, k, v, own)),
             "bytes of a shared prompt (bound)": graphed(lambda: decode_attention_triton(q, k, v, shared))}
    kv_bytes = B * (P // G + T) * Hkv * 2 * D * 2
    return Case("decode_attention shared-prompt bound", f"B={B} G={G} P={P} T={T} Hq={Hq} Hkv={Hkv} D={D} bf16",
                provs, bytes=kv_bytes + 2 * B * Hq * D * 2)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case(device, 4, 4, 2, 64, 32, torch.tensor([64, 1, 30, 47]), torch.float32)]
    B, L = (16, 512) if quick else (64, 1024)
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(L // 4, 3 * L // 4 + 1, (B,), generator=gen).to(device)
    return [_case(device, B, 12, 2, L, 128, lens, torch.bfloat16),
            _case(device, 8, 12, 2, 4096, 128, torch.full((8,), 4096, device=device), torch.bfloat16)] + \
        ([] if quick else [_shared_prompt_bound(device)])
