"""r1kernels.integrations.verl.linear_cross_entropy (verl's fused-kernel signature) against an independent
float64 torch computation of verl's formula: logprobs = log softmax(hidden @ weight.T / T)[label], entropy of
the same distribution, reduction none/sum/mean over the flattened rows; values and gradients. A NumPy or
integer temperature is one (verl calls float()); a process group of one rank is computed here, one of unknown
size still reaches verl."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close

from r1kernels.integrations import verl as integ
from r1kernels.integrations.verl import linear_cross_entropy


def _reference(hidden, weight, labels, temperature, reduction, lowp=False):
    """lowp: the product hidden @ weight.T in the inputs' dtype (as a bf16 lm_head rounds it), the rest in
    float64: the low-precision torch reference that sets the tolerance scale for bf16 gradients."""
    h2 = hidden.reshape(-1, hidden.shape[-1])
    z = ((h2 @ weight.t()).double() if lowp else h2.double() @ weight.double().t()) / temperature
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, labels.reshape(-1, 1))[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return {"none": logp, "sum": logp.sum(), "mean": logp.mean()}[reduction], entropy


@pytest.mark.parametrize("shape", [(1, 3, 1, 5), (2, 7, 16, 37), (3, 11, 32, 300)])  # B, T, H, V
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_formula(shape, reduction, dtype):
    B, T, H, V = shape
    temperature = float(torch.empty(()).uniform_(0.5, 1.5))
    hidden = (torch.randn(B, T, H) / H ** 0.25).to(dtype).requires_grad_()
    weight = (torch.randn(V, H) / H ** 0.25).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    logp, ent = linear_cross_entropy(hidden, weight, labels, temperature, reduction)
    ref_logp, ref_ent = _reference(hidden, weight, labels, temperature, reduction)
    assert logp.dtype == ent.dtype == torch.float32 and ent.shape == (B * T,)
    assert logp.shape == ref_logp.shape
    assert_close(logp, ref_logp, dtype, name="logprobs")
    assert_close(ent, ref_ent, dtype, name="entropy")
    g_logp, g_ent = torch.randn_like(ref_logp), torch.randn_like(ref_ent)
    (logp * g_logp.float()).sum().add((ent * g_ent.float()).sum()).backward()
    want = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum(), [hidden, weight])
    lowp = [None, None]
    if dtype != torch.float32:  # a few-element bf16 gradient can cancel: hold it to 2x torch's own bf16 error
        lp_logp, lp_ent = _reference(hidden, weight, labels, temperature, reduction, lowp=True)
        lowp = torch.autograd.grad((lp_logp * g_logp).sum() + (lp_ent * g_ent).sum(), [hidden, weight])
    for name, got, w, lp in zip(("hidden", "weight"), (hidden.grad, weight.grad), want, lowp):
        assert_close(got, w, dtype, lowp=lp, name=f"grad {name}")


def test_defaults_and_2d_inputs():
    hidden, weight, labels = torch.randn(9, 8), torch.randn(13, 8), torch.randint(0, 13, (9,))
    logp, ent = linear_cross_entropy(hidden, weight, labels)
    ref_logp, ref_ent = _reference(hidden, weight, labels, 1.0, "none")
    assert_close(logp, ref_logp)
    assert_close(ent, ref_ent)


@pytest.mark.parametrize("shape", [(2, 3, 8, 13), (1, 7, 16, 40)])
def test_tensor_temperature(shape):
    """verl's linear_cross_entropy passes float(temperature) on: a one-element tensor is a temperature there
    (it was a ValueError here)."""
    B, T, H, V = shape
    hidden, weight, labels = torch.randn(B, T, H), torch.randn(V, H), torch.randint(0, V, (B, T))
    t = float(torch.empty(()).uniform_(0.5, 1.5))
    logp, ent = linear_cross_entropy(hidden, weight, labels, torch.tensor(t), "none")
    ref_logp, ref_ent = _reference(hidden, weight, labels, t, "none")
    assert_close(logp, ref_logp, name="logprobs")
    assert_close(ent, ref_ent, name="entropy")


def test_bad_input():
    hidden, weight, labels = torch.randn(2, 5, 8), torch.randn(13, 8), torch.randint(0, 13, (2, 5))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, 1.0, "avg")
    with pytest.raises(ValueError, match="temperature"):
        linear_cross_entropy(hidden, weight, labels, 0.0)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:, :3])
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels + 13)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, torch.randn(13, 7), labels)
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden.long(), weight, labels)
    try:  # without verl, a vocabulary split over ranks is a clear error
        import verl  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="dist_process_group"):
            linear_cross_entropy(hidden, weight, labels, dist_process_group=object())


def test_install_binds_ours_and_keeps_verl_for_tensor_parallel(monkeypatch):
    """install() against a stand-in verl module: verl's name (and a module that imported it) become ours;
    a dist_process_group call reaches verl's own function, not ours again."""
    import sys
    import types

    from r1kernels.integrations import verl as integ

    calls = []

    def verl_lce(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        calls.append(dist_process_group)
        return "verl"

    fake = types.ModuleType(integ.VERL_MODULE)
    fake.linear_cross_entropy = verl_lce
    user = types.ModuleType("verl_user_module")
    user.linear_cross_entropy = verl_lce
    for name in ("verl", "verl.utils", "verl.utils.kernel"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, integ.VERL_MODULE, fake)
    monkeypatch.setitem(sys.modules, "verl_user_module", user)
    monkeypatch.setattr(integ, "_verl_original", [])
    monkeypatch.setattr(integ, "_warned", [])
    assert integ.install() is verl_lce and integ.install() is verl_lce
    assert fake.linear_cross_entropy is linear_cross_entropy and user.linear_cross_entropy is linear_cross_entropy
    hidden, weight, labels = torch.randn(4, 8), torch.randn(13, 8), torch.randint(0, 13, (4,))
    group = object()
    with pytest.warns(UserWarning, match="dist_process_group"):
        assert fake.linear_cross_entropy(hidden, weight, labels, dist_process_group=group) == "verl"
    assert calls == [group]


def test_no_rows_mean_is_an_error_sum_and_none_are_empty():
    """reduction='mean' over zero rows was a silent NaN."""
    hidden, weight, labels = torch.randn(0, 8), torch.randn(13, 8), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(hidden, weight, labels, 1.0, "mean")
    logp, ent = linear_cross_entropy(hidden, weight, labels, 1.0, "sum")
    assert logp.item() == 0.0 and ent.shape == (0,)
    logp, ent = linear_cross_entropy(hidden, weight, labels, 1.0, "none")
    assert logp.shape == ent.shape == (0,)


def test_labels_count_checked_with_zero_hidden_size():
    """hidden_size 0: numel 0 for any row count, so a label count that matched no row count passed the check and
    failed later in reshape(-1, 0) with a RuntimeError."""
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(torch.randn(2, 0), torch.randn(13, 0), torch.randint(0, 13, (5,)))


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
