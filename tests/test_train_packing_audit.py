"""reduction_weights against r1kernels' reduce_loss summed over the padded micro-batches, every loss type, with
and without num_items (the "items" losses without it divide by each micro-batch's own token count)."""
from __future__ import annotations

import random

import pytest
import torch

from r1kernels.reference.grpo import LOSS_TYPES, reduce_loss
from r1train.packing import reduction_weights
from tests.conftest import TOLERANCES


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_items", [False, True])
def test_reduction_weights_equal_padded_micro_batches(loss_type, with_items):
    N, T, mb = random.randint(3, 9), random.randint(1, 7), random.randint(1, 4)
    m = (torch.rand(N, T, dtype=torch.float64) > 0.4).double()
    m[random.randrange(N)] = 0  # a row with no loss token
    L = torch.randn(N, T, dtype=torch.float64)
    items = m.sum().clamp(min=1.0).reshape(1) / 3 if with_items else None
    w, _, _ = reduction_weights(loss_type, m, mb, max_completion_length=T, num_items=items)
    packed = (w.double() * (m * L).sum(1)).sum()
    padded = sum(reduce_loss(L[s:s + mb], m[s:s + mb], loss_type, T, items) for s in range(0, N, mb))
    assert abs(float(packed - padded)) <= TOLERANCES[torch.float32] * max(abs(float(padded)), 1.0)
