"""Group-relative advantages. Math in float64 so any fp32 kernel that also accumulates in float64
(the C++ one does) rounds to the same fp32 bits."""
from __future__ import annotations

import torch


def group_advantages(rewards, group_size, scale="group", eps=1e-4, reward_weights=None):
    """rewards [B*G] or [B*G, R] -> fp32 advantages [B*G]; groups are consecutive rows."""
    r = rewards.double()
    if r.dim() == 2:
        w = torch.ones(r.shape[1], dtype=torch.float64, device=r.device) if reward_weights is None \
            else torch.as_tensor(reward_weights, dtype=torch.float64, device=r.device)
        r = (r * w).sum(-1)
    r_BG = r.view(-1, group_size)
    centered = r_BG - r_BG.mean(-1, keepdim=True)
    if scale == "group":
        centered = centered / (r_BG.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps)
    return centered.reshape(-1).float()
