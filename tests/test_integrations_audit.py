"""API audit of the verl and Liger drop-ins against the libraries they replace: arguments verl / Liger accept
that the drop-ins refused or treated differently.

- verl's linear_cross_entropy calls float(temperature): a NumPy scalar is a temperature there (it was a
  ValueError here).
- verl's Megatron path passes its tensor-parallel group even at TP size 1: a one-rank group is the same as
  none, so r1kernels computes it (it ran verl's kernel after a warning, or was a ValueError without verl).
- Liger's triton_grpo_loss(reduce=False) returns a per-token kl whose gradient its backward ignores: ours sent
  a gradient through kl into the logits.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close

from r1kernels.integrations import verl as integ
from r1kernels.integrations.verl import linear_cross_entropy


def _verl_inputs(B=2, T=5, H=16, V=37):
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    return hidden, weight, torch.randint(0, V, (B, T))


def _grads(fn, leaves):
    for t in leaves:
        t.grad = None
    logp, ent = fn()
    (logp.sum() + 0.5 * ent.sum()).backward()
    return logp.detach(), ent.detach(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("temperature", [np.float32(0.7), np.float64(0.7), np.int64(1), 1])
def test_verl_temperature_any_float_convertible(temperature):
    hidden, weight, labels = _verl_inputs()
    got = _grads(lambda: linear_cross_entropy(hidden, weight, labels, temperature, "none"), [hidden, weight])
    want = _grads(lambda: linear_cross_entropy(hidden, weight, labels, float(temperature), "none"), [hidden, weight])
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert_close(g, w.double())


def test_verl_temperature_not_a_number_is_named():
    hidden, weight, labels = _verl_inputs()
    with pytest.raises(ValueError, match="temperature"):
        linear_cross_entropy(hidden, weight, labels, torch.tensor([0.5, 0.7]))
    with pytest.raises(ValueError, match="temperature"):
        linear_cross_entropy(hidden, weight, labels, "warm")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_verl_one_rank_group_runs_r1kernels(tmp_path, monkeypatch, reduction):
    """A process group of one rank (Megatron's TP group at TP size 1) gives what no group gives, computed here:
    verl's function is not called and nothing is warned."""
    import torch.distributed as dist

    calls = []

    def verl_lce(*args):
        calls.append(args)
        return "verl"

    monkeypatch.setattr(integ, "_verl_original", [verl_lce])
    monkeypatch.setattr(integ, "_warned", [])
    hidden, weight, labels = _verl_inputs()
    want = _grads(lambda: linear_cross_entropy(hidden, weight, labels, 0.8, reduction), [hidden, weight])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = _grads(lambda: linear_cross_entropy(hidden, weight, labels, 0.8, reduction, dist.group.WORLD),
                         [hidden, weight])
    finally:
        dist.destroy_process_group()
    assert calls == []
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert_close(g, w.double())


def test_verl_unknown_group_still_reaches_verl(monkeypatch):
    """A group whose size cannot be read here (no initialized torch.distributed) still goes to verl's kernel."""
    monkeypatch.setattr(integ, "_verl_original", [lambda *a: "verl"])
    monkeypatch.setattr(integ, "_warned", [])
    hidden, weight, labels = _verl_inputs()
    with pytest.warns(UserWarning, match="dist_process_group"):
        assert linear_cross_entropy(hidden, weight, labels, dist_process_group=object()) == "verl"


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_liger_triton_unreduced_kl_carries_no_gradient(level):
    """reduce=False: a loss that adds the returned kl gets the gradient of the per-token loss alone, as in Liger
    (GrpoLossFunction.backward reads only the first output's gradient)."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger_triton

    from r1kernels.integrations import liger as ours

    B, T, V = 2, 6, 23
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
    mask = (torch.rand(B, T) > 0.3).float()
    mask[0, 0] = 1
    old, ref = torch.randn(B, T) - 3.0, torch.randn(B, T) - 3.0
    x = torch.randn(B, T + 1, V, requires_grad=True)
    kw = dict(temperature=0.9, beta=0.1, inplace=False, reduce=False, importance_sampling_level=level)
    grads = {}
    for name, fn in (("liger", liger_triton), ("ours", ours.triton_grpo_loss)):
        for with_kl in (False, True):
            x.grad = None
            loss, kl, _ = fn(x * 1.0, old, ref, ids, adv, mask, **kw)
            (loss.sum() + (3.0 * kl.sum() if with_kl else 0.0)).backward()
            grads[name, with_kl] = x.grad.clone()
    assert torch.equal(grads["liger", True], grads["liger", False])  # what Liger does
    assert_close(grads["ours", True], grads["ours", False].double(), name="ours: grad with kl added")
    assert_close(grads["ours", True], grads["liger", True].double(), name="ours vs Liger")
