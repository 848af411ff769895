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

    def group_advantages_cpp(rewards, group_size, scale, eps, reward_weights):
        return torch.ops.r1kernels.group_advantages(rewards, group_size, scale, float(eps), reward_weights)

    def group_advantages_cuda(rewards, group_size, scale, eps, reward_weights):
        return torch.ops.r1kernels.group_advantages(rewards, group_size, scale, float(eps), reward_weights)

    group_advantages_cpp.devices = {"cpu"} if _backend.extension_has(OP, "CPU") else set()
    group_advantages_cuda.devices = {"cuda"} if _backend.extension_has(OP, "CUDA") else set()
