"""group_advantages as torch.ops.r1kernels.group_advantages (C++ on CPU, CUDA kernel when built) and
as a Triton kernel; fakes for torch.compile. Advantages carry no gradient (rewards are constants)."""
from __future__ import annotations

import torch

from .. import _backend

OP = "group_advantages"


if _backend.HAS_EXTENSION:
    @torch.library.register_fake("r1kernels::group_advantages")
    def _fake(rewards, group_size, scale, eps, weights):
        return rewards.new_empty(rewards.shape[0], dtype=torch.float32)

    def group_advantages_ext(rewards, group_size, scale, eps, reward_weights):
        """The extension's op: the "cpp" backend on CPU tensors, "cuda" on CUDA tensors."""
        return torch.ops.r1kernels.group_advantages(rewards, group_size, scale, float(eps), reward_weights)

    group_advantages_ext.devices = {d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                                    if _backend.extension_has(OP, key)}
    # NaN or inf rewards: ValueError on CPU, a device-side assert in the CUDA kernel (no extra launches)
    group_advantages_ext.checks_finite = True


try:
    from ..triton import advantage as _tk
except ImportError:  # no triton: the C++ / CUDA / reference paths remain
    _tk = None

if _tk is not None:
    @torch.library.custom_op("r1kernels::group_advantages_triton", mutates_args=())
    def _group_advantages_triton_op(rewards: torch.Tensor, group_size: int, scale: str, eps: float,
                                    weights: torch.Tensor | None) -> torch.Tensor:
        out = torch.empty(rewards.shape[0], device=rewards.device, dtype=torch.float32)
        w = weights.float().contiguous() if weights is not None else None
        return _tk.group_advantages(rewards.contiguous(), group_size, scale, eps, w, out)

    @_group_advantages_triton_op.register_fake
    def _(rewards, group_size, scale, eps, weights):
        return rewards.new_empty(rewards.shape[0], dtype=torch.float32)

    def group_advantages_triton(rewards, group_size, scale, eps, reward_weights):
        return _group_advantages_triton_op(rewards, group_size, scale, float(eps), reward_weights)
