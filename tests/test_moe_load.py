"""r1train's ExpertLoad over rk.patch's routers: it patches unpatched DeepseekV3 routers (backend torch),
the routers count training forwards only (pads left out through token_mask), and step() applies the bias
update once, resets the counts and returns the load metrics as device scalars."""
from __future__ import annotations

import pytest
import torch
from test_patch_deepseek_v3 import _ref_counts, _tiny

from r1train.moe_load import ExpertLoad

pytest.importorskip("transformers")


@pytest.mark.parametrize("shape,rate", [((2, 9), 0.01), ((3, 5), 0.0), ((1, 1), 0.1)])
def test_expert_load_counts_training_forwards_and_steps(shape, rate):
    model = _tiny()
    hf_gates = [layer.mlp.gate for layer in model.model.layers[1:]]
    load = ExpertLoad(model, rate)
    assert load and len(load.routers) == 2
    for r, g in zip(load.routers, hf_gates):  # routers swapped in place, sharing the HF parameters
        assert r.backend == "torch" and r.weight is g.weight and r.e_score_correction_bias is g.e_score_correction_bias
    ids = torch.randint(0, 64, shape)
    mask = torch.rand(shape) < 0.6
    expected = torch.stack([_ref_counts(model, ids, i, mask) for i in (1, 2)])
    load.token_mask = mask.reshape(-1)
    model(ids)                      # counted (train mode, grad enabled), pads out
    with torch.no_grad():           # a log-prob pass: not counted
        model(ids)
    model.eval()                    # generation: eval mode (and no_grad): not counted
    model(ids)
    model.train()
    assert torch.equal(torch.stack([r.tokens_per_expert for r in load.routers]), expected)
    before = [r.e_score_correction_bias.clone() for r in load.routers]
    m = load.step()
    c = expected.float()
    for r, b0, c_E in zip(load.routers, before, c):
        assert torch.equal(r.e_score_correction_bias, b0 + rate * torch.sign(c_E.mean() - c_E))
        assert r.tokens_per_expert.sum().item() == 0
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())
    used = c.sum(1) > 0
    ratio = c.amax(1)[used] / c.mean(1)[used]
    if used.any():
        torch.testing.assert_close(m["moe/max_load_ratio"], ratio.mean())
        torch.testing.assert_close(m["moe/max_load_ratio_worst"], ratio.max())
    else:
        assert m["moe/max_load_ratio"].isnan() and m["moe/max_load_ratio_worst"].isnan()
    m2 = load.step()                # nothing routed since: no bias change, NaN metrics
    assert m2["moe/max_load_ratio"].isnan()


def test_expert_load_without_moe_is_empty():
    load = ExpertLoad(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    assert not load and load.step() == {} and load.token_mask is None
