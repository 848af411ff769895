"""MoE expert-load tracking and DeepSeek-V3 auxiliary-loss-free balancing for an HF policy.

A forward hook on every router (a module with an `e_score_correction_bias` buffer, e.g. HF
DeepseekV3TopkRouter or rk.patch's router, which return the chosen expert ids as their last integer tensor)
counts the chosen ids while `recording` is on (training forwards only; the generation engine never sets
it). Counts live on the router's device and are added with index_add_ (no host sync per forward); after
each optimizer step they are all-reduced over ranks in one call, drive rk.moe.update_bias
(bias += rate * sign(mean - count)), are reported as max/mean load with one device-to-host copy, and reset.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import r1kernels as rk


class ExpertLoad:
    def __init__(self, model, rate: float = 1e-3):
        self.rate = rate
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.counts: list = [None] * len(self.routers)  # float32 [E] on the router's device
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
            E = module.e_score_correction_bias.numel()
            if self.counts[i] is None:
                self.counts[i] = torch.zeros(E, dtype=torch.float32, device=ids_NK.device)
            w_NK = torch.ones(ids_NK.shape, dtype=torch.float32, device=ids_NK.device)
            if self.token_mask is not None and self.token_mask.numel() == ids_NK.shape[0]:
                w_NK = w_NK * self.token_mask.to(ids_NK.device, torch.float32)[:, None]  # pads count 0
            self.counts[i].index_add_(0, ids_NK.reshape(-1).long(), w_NK.reshape(-1))
        return hook

    @torch.no_grad()
    def step(self) -> dict:
        """After an optimizer step: all-reduce counts, update each router's bias, reset; returns metrics."""
        live = [(r, c) for r, c in zip(self.routers, self.counts) if c is not None]
        if not live:
            return {}
        counts_RE = torch.stack([c for _, c in live])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts_RE)
        if self.rate > 0:
            for (r, _), c_E in zip(live, counts_RE):
                rk.moe.update_bias(r.e_score_correction_bias.data, c_E.to(r.e_score_correction_bias.device),
                                   rate=self.rate)  # zero counts: sign(0 - 0) = 0, no change
        used_R = counts_RE.sum(1) > 0
        ratio_R = counts_RE.max(1).values / counts_RE.mean(1).clamp(min=1e-12)
        self.counts = [None] * len(self.routers)
        n, mean, worst = torch.stack([used_R.sum(), (ratio_R * used_R).sum(),
                                      (ratio_R * used_R).max()]).tolist()
        if n == 0:
            return {}
        return {"moe/max_load_ratio": mean / n, "moe/max_load_ratio_worst": worst}
