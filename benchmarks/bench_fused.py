"""The fused layer ops at a training micro-batch (8 x 768 tokens of a Qwen2.5-1.5B layer), forward and
forward+backward: rms_norm [6144, 1536], silu_mul [6144, 8960], apply_rotary q [8, 12, 768, 128] (the
transposed view of the q projection, as HF passes it) and k [8, 2, 768, 128]. Providers: HF's math in eager
torch (r1kernels.reference.fused, what an unpatched model runs), torch.compile of it, ours (the public API,
the custom op with its Triton backward) and Liger when installed. Floor: each input read once and each
output written once (forward), plus the backward's reads and writes."""
from __future__ import annotations

import torch

import r1kernels as rk
from r1kernels.reference import fused as ref

from .harness import Case, Rotating, Skip

TOKENS, HIDDEN, INTER, HQ, HK, D, BATCH = 6144, 1536, 8960, 12, 2, 128, 8


def _no_liger(*_):
    raise Skip("liger-kernel not installed")


def _liger(name, device):
    """Liger's function for name (rms_norm / silu_mul / rope), or _no_liger (its row is skipped)."""
    if device != "cuda":  # Liger's kernels are Triton on the GPU only
        return _no_liger
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", True)
        if name == "silu_mul":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return LigerSiLUMulFunction.apply
        from liger_kernel.ops.rope import LigerRopeFunction
        return LigerRopeFunction.apply
    except ImportError:
        return _no_liger


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _providers(fns: dict, inputs: Rotating, backward: bool) -> dict:
    """name -> closure: fn(*inputs) (+ backward of every output with a fixed gradient)."""
    def run(fn):
        def go():
            args = inputs.next()
            outs = fn(*args)
            if backward:
                outs = outs if isinstance(outs, tuple) else (outs,)
                for a in args:
                    a.grad = None
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return go
    return {p: run(fn) for p, fn in fns.items()}


def _op_cases(device: str, quick: bool, backward: bool) -> list[Case]:
    M, H, C, B = (TOKENS, HIDDEN, INTER, BATCH) if not quick else (64, 128, 256, 2)
    T = M // B
    dt = _dtype(device)
    out = []
    es = torch.tensor([], dtype=dt).element_size()
    tag = " fwd+bwd" if backward else ""
    g = dict(device=device, dtype=dt, requires_grad=backward)

    def rms_in():
        return (torch.randn(M, H, **g), torch.rand(H, **g))
    rms = {"torch (HF math)": lambda x, w: ref.rms_norm(x, w, 1e-6),
           "torch.compile": torch.compile(lambda x, w: ref.rms_norm(x, w, 1e-6)),
           "r1kernels": lambda x, w: rk.rms_norm(x, w, 1e-6)}
    lg = _liger("rms_norm", device)
    rms["liger"] = lambda x, w: lg(x, w, 1e-6)
    out.append(Case(f"rms_norm{tag}", f"{M}x{H} {dt}", _providers(rms, Rotating(rms_in), backward),
                    bytes=(5 if backward else 2) * M * H * es, peers=("torch.compile", "liger")))

    def silu_in():
        return (torch.randn(M, C, **g), torch.randn(M, C, **g))
    silu = {"torch (HF math)": ref.silu_mul, "torch.compile": torch.compile(ref.silu_mul),
            "r1kernels": rk.silu_mul, "liger": _liger("silu_mul", device)}
    out.append(Case(f"silu_mul{tag}", f"{M}x{C} {dt}", _providers(silu, Rotating(silu_in), backward),
                    bytes=(8 if backward else 3) * M * C * es, peers=("torch.compile", "liger")))

    def rope_in():
        q = torch.randn(B, T, HQ, D, **g)
        k = torch.randn(B, T, HK, D, **g)
        pos = torch.arange(T, device=device, dtype=torch.float32)
        ang = pos[:, None] / 10000 ** (torch.arange(0, D, 2, device=device) / D)[None, :]
        ang = torch.cat([ang, ang], -1)[None]
        return q, k, ang.cos().to(dt), ang.sin().to(dt)

    def transposed(fn):  # HF passes q/k as the [B, H, T, D] view of the projections' [B, T, H, D]
        return lambda q, k, c, s: fn(q.transpose(1, 2), k.transpose(1, 2), c, s)
    rope = {"torch (HF math)": transposed(ref.apply_rotary),
            "torch.compile": transposed(torch.compile(ref.apply_rotary)),
            "r1kernels": transposed(rk.apply_rotary), "liger": transposed(_liger("rope", device))}
    out.append(Case(f"apply_rotary{tag}", f"q {B}x{HQ}x{T}x{D} k {B}x{HK}x{T}x{D} {dt}",
                    _providers(rope, Rotating(rope_in), backward),
                    bytes=(4 if backward else 2) * B * T * (HQ + HK) * D * es, peers=("torch.compile", "liger")))
    return out


def _layers_case(device: str, quick: bool, backward: bool) -> Case:
    """Two Qwen2.5-1.5B decoder layers (HF Qwen2Model, sdpa, random weights) on one micro-batch: unpatched
    vs r1kernels.patch_layers; what the ops above add up to inside a model, with the projections around."""
    import copy

    from transformers import Qwen2Config, Qwen2Model

    from r1kernels.patch.layers import patch_layers

    B, T, H = (BATCH, TOKENS // BATCH, HIDDEN) if not quick else (2, 32, 128)
    cfg = Qwen2Config(hidden_size=H, intermediate_size=INTER if not quick else 256, num_hidden_layers=2,
                      num_attention_heads=HQ if not quick else 4, num_key_value_heads=HK, vocab_size=1024,
                      attn_implementation="sdpa")
    dt = _dtype(device)
    torch.manual_seed(0)
    hf = Qwen2Model(cfg).to(device=device, dtype=dt)
    ours = copy.deepcopy(hf)
    patch_layers(ours)
    inputs = Rotating(lambda: (torch.randn(B, T, H, device=device, dtype=dt, requires_grad=backward),))

    def run(model):
        def go():
            (x,) = inputs.next()
            with torch.set_grad_enabled(backward):
                y = model(inputs_embeds=x).last_hidden_state
            if backward:
                model.zero_grad(set_to_none=True)
                y.backward(torch.ones_like(y))
        return go
    provs = {"HF eager": run(hf), "r1kernels.patch_layers": run(ours)}
    return Case(f"2 decoder layers{' fwd+bwd' if backward else ''}", f"B={B} T={T} H={H} {dt}", provs,
                peers=("HF eager",))


def cases(device: str, quick: bool) -> list[Case]:
    """The ops, then the layers they make up."""
    return [c for b in (False, True) for c in (*_op_cases(device, quick, b), _layers_case(device, quick, b))]
