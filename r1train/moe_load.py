"""MoE expert-load tracking and DeepSeek-V3 auxiliary-loss-free balancing for an HF policy.

A forward hook on every router (a module with an `e_score_correction_bias` buffer, e.g. HF
DeepseekV3TopkRouter, which returns (router_logits, topk_weights, topk_ids)) counts the chosen expert ids
while `recording` is on (training forwards only, not generation). After each optimizer step the counts,
summed over micro-batches and all-reduced over ranks, drive rk.moe.update_bias (bias += rate *
sign(mean - count)) and are reported as max/mean load.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import r1kernels as rk


class ExpertLoad:
    def __init__(self, model, rate: float = 1e-3):
        self.rate = rate
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.counts = [torch.zeros(r.e_score_correction_bias.numel(), dtype=torch.float64)
                       for r in self.routers]
        self.recording = False
        self.token_mask = None  # flattened [N] bool of real (non-pad) tokens for the current forward
        for i, r in enumerate(self.routers):
            r.register_forward_hook(self._hook(i))

    def __bool__(self):
        return bool(self.routers)

    def _hook(self, i):
        def hook(module, args, out):
            if not self.recording:
                return
            ids = [t for t in (out if isinstance(out, tuple) else (out,))
                   if torch.is_tensor(t) and not t.is_floating_point()]
            if not ids:
                return
            ids_NK = ids[-1].reshape(-1, ids[-1].shape[-1])
            if self.token_mask is not None and self.token_mask.numel() == ids_NK.shape[0]:
                ids_NK = ids_NK[self.token_mask.to(ids_NK.device)]
            E = self.counts[i].numel()
            self.counts[i] += torch.bincount(ids_NK.reshape(-1).cpu(), minlength=E)[:E].double()
        return hook

    @torch.no_grad()
    def step(self) -> dict:
        """After an optimizer step: all-reduce counts, update each router's bias, reset; returns metrics."""
        if not self.routers:
            return {}
        ratios = []
        for r, c in zip(self.routers, self.counts):
            bias = r.e_score_correction_bias
            c_dev = c.to(bias.device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(c_dev)
            if c_dev.sum() > 0:
                ratios.append((c_dev.max() / c_dev.mean()).item())
                if self.rate > 0:
                    rk.moe.update_bias(bias.data, c_dev.float(), rate=self.rate)
            c.zero_()
        if not ratios:
            return {}
        return {"moe/max_load_ratio": sum(ratios) / len(ratios), "moe/max_load_ratio_worst": max(ratios)}
