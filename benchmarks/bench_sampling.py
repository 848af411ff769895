"""Token sampling: B=64 rows of V=151936 bf16 logits (one decode step of a rollout batch). Providers: the torch
reference and triton through the public API, and on CUDA the triton op replayed from a CUDA graph (as the
generation engine runs it: no launch overhead). Cases: plain sampling, top-p 0.9 + top-k 50, top-p 0.9 alone, greedy.
Bytes floor: one read of the logits (the outputs are 12 bytes a row)."""
from __future__ import annotations

import itertools

import torch

import r1kernels as rk

from .harness import Case, Rotating


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        B, V = 4, 1000
    else:
        B, V = (16, 32000) if quick else (64, 151936)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = f"B={B} V={V} {str(dtype).split('.')[-1]}"
    logit_bytes = B * V * torch.tensor([], dtype=dtype).element_size()

    def make():
        logits = (torch.randn(B, V, device=device) * 2).to(dtype)
        seeds = torch.randint(0, 2**62, (B,), device=device)
        return logits, seeds, torch.randint(0, 4096, (B,), device=device)

    inputs = Rotating(make, n=3 if device == "cuda" else 1)
    backends = ["torch"] + (["triton"] if "triton" in rk._backend.available("sample_tokens", device) else [])

    def run(backend, **opts):
        def f():
            logits, seeds, positions = inputs.next()
            return rk.sample_tokens(logits, seeds, positions, backend=backend, **opts)
        return f

    def graphed(pass_sub=None, bits=None, **opts):
        """pass_sub, bits: an experiment's sampling.PASS_SUB / BITS for the captured kernels (None: the module's)."""
        from r1kernels.ops.sampling import sample_tokens_triton
        from r1kernels.triton import sampling
        graphs = []
        kept = sampling.PASS_SUB, sampling.BITS
        sampling.PASS_SUB, sampling.BITS = pass_sub or kept[0], bits or kept[1]
        try:
            for logits, seeds, positions in inputs.sets:
                sample_tokens_triton(logits, seeds, positions, **opts)  # compile outside the capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    sample_tokens_triton(logits, seeds, positions, **opts)
                graphs.append(g)
        finally:
            sampling.PASS_SUB, sampling.BITS = kept
        it = itertools.cycle(graphs)
        return lambda: next(it).replay()

    out = []
    for name, opts in (("sample_tokens", {}), ("sample_tokens top_p=0.9 top_k=50", dict(top_p=0.9, top_k=50)),
                       ("sample_tokens top_p=0.9", dict(top_p=0.9)), ("sample_tokens greedy", dict(greedy=True))):
        providers = {b: run(b, **opts) for b in backends}
        if device == "cuda" and "triton" in backends:
            providers["triton (cuda graph)"] = graphed(**opts)
            if "top_p" in opts:  # the bisection passes: sub-block width (1024: whole blocks), bits a pass
                for sub, bits in ((1024, None), (None, 2), (1024, 2), (1024, 1)):
                    variant = ", ".join([f"PASS_SUB={sub}"] * bool(sub) + [f"BITS={bits}"] * bool(bits))
                    providers[f"triton (cuda graph, {variant})"] = graphed(pass_sub=sub, bits=bits, **opts)
        out.append(Case(name, shape, providers, bytes=logit_bytes))
    return out
