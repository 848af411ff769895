"""MoE auxiliary-loss-free balancing for an r1train policy, over rk.patch's routers (the one mechanism:
r1kernels/patch/deepseek_v3.py).

Counting rule: each patched router adds the experts it chose to its device counter in training forwards
only (module.training and grad enabled, once per forward under either activation-checkpointing mode:
dsv3.training_forward). The generation engine runs the model in eval mode
under no_grad, and the old / reference log-prob passes run under no_grad, so none of them count; pads do
not count either (`token_mask`, set by the trainer before each training forward). Once per optimizer step,
`step()` sums the counts over ranks (one all-reduce), moves each e_score_correction_bias by
rk.moe.update_bias (bias += rate * sign(mean - count)), resets the counts, and returns the load metrics
as device scalars: the host reads them with the step's other metrics, once per logged step.

A policy whose DeepseekV3 routers are not patched (patch_model=false, or CPU by default) gets its routers
(only) swapped for rk.patch's router with backend="torch": the same parameter and buffer objects and
transformers' routing math, plus the counter.
"""

from __future__ import annotations

import torch

from r1kernels import _checks
from r1kernels.moe import check_bias_float32
from r1kernels.patch import deepseek_v3 as dsv3


class ExpertLoad:
    def __init__(self, model, rate: float = 1e-3):
        _checks.positive("rate", rate, allow_zero=True)  # here, not at the first step() after a training step
        self.model, self.rate = model, rate
        if not dsv3.routers(model):
            dsv3.patch_deepseek_v3(model, backend="torch", experts=False)
        self.routers = dsv3.routers(model)
        for r in self.routers:  # update_bias's rule, here and not at the first step() after a training step
            check_bias_float32(r.e_score_correction_bias, "moe_bias_update_rate: the routers' e_score_correction_bias",
                               "; a model.to(dtype) cast it, from_pretrained keeps it")

    def __bool__(self):
        return bool(self.routers)

    @property
    def token_mask(self):
        """[N] bool of the real (non-pad) tokens of the next training forwards, on every router."""
        return self.routers[0].token_mask if self.routers else None

    @token_mask.setter
    def token_mask(self, mask_N):
        # the routers count int64(mask) per token: a float mask (0.5 -> 0) or an int one (2) miscounted silently
        if mask_N is not None:
            if not isinstance(mask_N, torch.Tensor) or mask_N.dtype.is_floating_point or mask_N.dtype.is_complex:
                got = mask_N.dtype if isinstance(mask_N, torch.Tensor) else type(mask_N).__name__
                raise ValueError(f"token_mask must be None or a bool (or 0/1 integer) tensor of the forward's "
                                 f"tokens, got {got}")
            if mask_N.dtype != torch.bool:
                mask_N = mask_N != 0
        for r in self.routers:
            r.token_mask = mask_N

    @torch.no_grad()
    def step(self) -> dict:
        """After an optimizer step: update the biases from the counts summed over ranks, reset the counts;
        returns {"moe/max_load_ratio": mean over the routers that routed tokens of max / mean load,
        "moe/max_load_ratio_worst": their max} as fp32 device scalars (NaN when no router routed a token)."""
        counts_RE = dsv3.update_router_biases(self.model, self.rate)
        if counts_RE is None:
            return {}
        c_RE = counts_RE.float()
        used_R = c_RE.sum(1) > 0
        ratio_R = torch.where(used_R, c_RE.amax(1) / c_RE.mean(1).clamp(min=1e-12), 0.0)
        n = used_R.sum()
        nan = torch.full((), float("nan"), device=c_RE.device)
        return {"moe/max_load_ratio": torch.where(n > 0, ratio_R.sum() / n.clamp(min=1), nan),
                "moe/max_load_ratio_worst": torch.where(n > 0, ratio_R.max(), nan)}
