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


# ---- audit additions
@pytest.mark.parametrize("rate", [-1.0, float("nan"), float("inf"), True, "0.1"])
def test_expert_load_rejects_bad_rate_before_any_work(rate):
    """A bad rate is an error naming it when ExpertLoad is made, not at the first step() -- after a whole
    training step (forwards, backward, optimizer step) has run."""
    model = _tiny()
    with pytest.raises(ValueError, match="rate"):
        ExpertLoad(model, rate)


def test_expert_load_token_mask_is_checked():
    """token_mask counts each real token once: an integer mask counts its nonzero tokens once (an attention mask
    holding 2 counted that token twice), a float mask is an error naming token_mask (0.5 counted nothing)."""
    model = _tiny()
    load = ExpertLoad(model, 0.0)
    ids = torch.randint(0, 64, (2, 5))
    mask = torch.rand(2, 5) < 0.6
    mask[0, 0] = True
    expected = torch.stack([_ref_counts(model, ids, i, mask) for i in (1, 2)])
    load.token_mask = mask.long().reshape(-1) * 2
    model(ids)
    assert torch.equal(torch.stack([r.tokens_per_expert for r in load.routers]), expected)
    for bad in (mask.float().reshape(-1) * 0.5, mask.reshape(-1).tolist()):
        with pytest.raises(ValueError, match="token_mask"):
            load.token_mask = bad


@pytest.mark.parametrize("delta", [1, -1, 5])
def test_expert_load_token_mask_of_another_size_is_an_error(delta):
    """A token_mask whose size is not the training forward's token count was ignored (every token, pads too,
    counted): now that forward is a ValueError naming token_mask and counts nothing. Forwards that do not count
    (no-grad log-prob passes, eval-mode generation, which run with the last micro-batch's mask still set) are
    not affected; a right-size mask and None count as before (against _ref_counts' independent routing)."""
    model = _tiny()
    load = ExpertLoad(model, 0.0)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.rand(2, 6) < 0.6
    load.token_mask = torch.ones(ids.numel() + delta, dtype=torch.bool)
    with torch.no_grad():
        model(ids)                  # not counted: no check either
    model.eval()
    model(ids)
    model.train()
    with pytest.raises(ValueError, match="token_mask"):
        model(ids)
    assert all(r.tokens_per_expert.sum().item() == 0 for r in load.routers)
    load.token_mask = mask.reshape(-1)
    model(ids)
    load.token_mask = None
    model(ids)
    expected = torch.stack([_ref_counts(model, ids, i, mask) + _ref_counts(model, ids, i) for i in (1, 2)])
    assert torch.equal(torch.stack([r.tokens_per_expert for r in load.routers]), expected)


def test_expert_load_rejects_a_low_precision_bias_before_any_work():
    """model.to(bf16) casts e_score_correction_bias, whose rate-sized steps need float32: an error naming it when
    ExpertLoad is made (it came from the first step(), after a whole training step)."""
    with pytest.raises(ValueError, match="e_score_correction_bias must be float32.*bfloat16"):
        ExpertLoad(_tiny(dtype=torch.bfloat16), 1e-3)
    assert ExpertLoad(_tiny(), 1e-3)
