"""K4 group advantages: 4096 groups x 16 (DESIGN.md section 6). Providers: torch reference (float64),
torch.compile(reference), triton, cuda, each also replayed from a captured CUDA graph (the GPU time
without Python launch cost), and an empty kernel (eager and graph) as the yardstick: target <= 2x it."""
from __future__ import annotations

import torch

import r1kernels as rk
from r1kernels.reference import group_advantages as ref_adv

from .harness import Case, graphed


def _case(device, n_groups, G, R, scale) -> Case:
    from r1kernels import _backend
    rewards = torch.randn(n_groups * G, R, device=device) if R > 1 else torch.randn(n_groups * G, device=device)
    w = torch.rand(R, device=device) if R > 1 else None
    provs = {}
    for b in _backend.available("group_advantages", device):
        provs[b] = (lambda b=b: rk.group_advantages(rewards, G, scale=scale, reward_weights=w, backend=b))
    if device == "cuda":
        compiled = torch.compile(ref_adv)
        provs["torch.compile"] = lambda: compiled(rewards, G, scale, 1e-4, w)
        for b in ("triton", "cuda"):
            if b in provs:
                fn = _backend.pick("group_advantages", b, rewards.device, rewards, G)
                provs[f"{b} (graph)"] = graphed(lambda fn=fn: fn(rewards, G, scale, 1e-4, w))
        e = torch.empty(1, device=device)
        provs["empty kernel"] = lambda: e.add_(0)
        provs["empty kernel (graph)"] = graphed(lambda: e.add_(0))
    return Case("group_advantages", f"{n_groups}x{G} R={R} {scale}", provs, bytes=n_groups * G * (4 * R + 4),
                peers=("torch.compile",) if device == "cuda" else ())


def cases(device: str, quick: bool) -> list[Case]:
    shapes = [(4096, 16, 1, "group"), (4096, 16, 3, "group"), (4096, 16, 1, "batch")]
    if device == "cpu":
        shapes = [(64, 16, 1, "group")]
    return [_case(device, *s) for s in shapes]
