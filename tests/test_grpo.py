"""grpo_loss: the single-pass Triton kernel (interpreter on CPU) vs the float64 reference: loss, metrics,
per-token log-probs (where the mask is 1: masked tokens are not read) and the logits' gradient."""
from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES, assert_close

import r1kernels as rk
from r1kernels.reference import grpo as R

triton = pytest.importorskip("triton")
from r1kernels.ops import grpo as grpo_ops  # noqa: E402


def _inputs(B, T, V, device="cpu", dtype=torch.float32, adv_per_token=False, mask_kind="random"):
    logits = (torch.randn(B, T, V, device=device) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, T, device=device) if adv_per_token else torch.randn(B, device=device)
    mask = (torch.rand(B, T, device=device) > 0.25).float()
    if mask_kind == "random" and B > 1:
        mask[-1] = 0  # a fully masked row
    elif mask_kind == "none":
        mask = None
    elif mask_kind == "empty":
        mask = torch.zeros(B, T, device=device)
    base = R.token_logprobs(logits, ids)
    old = base + 0.3 * torch.randn(B, T, device=device)
    ref = base + 0.3 * torch.randn(B, T, device=device)
    return logits, ids, adv, mask, old, ref


def _check(logits, ids, adv, mask, dtype=torch.float32, inplace=False, **kw):
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    y = x * 1.0 if inplace else x  # in place needs a non-leaf
    out = rk.grpo_loss(y, ids, adv, mask, backend="triton", inplace_backward=inplace, **kw)
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    ref = rk.grpo_loss(x64, ids, adv.double(), mask, backend="torch", **kw64)
    g = 1.0 + torch.rand(()).item()  # a non-unit upstream gradient exercises the backward scaling
    (out.loss * g).backward()
    (ref.loss * g).backward()
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close(out.loss, ref.loss, torch.float32, name="loss")
    m = torch.ones_like(ref.per_token_logprobs) if mask is None else mask.double()
    assert_close(out.per_token_logprobs * m, ref.per_token_logprobs * m, torch.float32, name="logp")
    assert set(out.metrics) == set(ref.metrics)
    for k in ref.metrics:
        assert_close(out.metrics[k], ref.metrics[k], torch.float32, name=k)
    assert x.grad.dtype == logits.dtype
    assert_close(x.grad, x64.grad, dtype, name="grad")
    if mask is not None:  # masked tokens: exact zero gradient
        assert (x.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
@pytest.mark.parametrize("level", R.IS_LEVELS)
def test_loss_types(loss_type, level):
    logits, ids, adv, mask, old, ref = _inputs(3, 5, 37)
    _check(logits, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.04, loss_type=loss_type,
           importance_sampling_level=level, epsilon_high=0.28 if loss_type != "cispo" else 4.0,
           max_completion_length=7 if loss_type == "dr_grpo" else None)


@pytest.mark.parametrize("kl_estimator", R.KL_ESTIMATORS)
def test_kl_estimators(kl_estimator):
    logits, ids, adv, mask, old, ref = _inputs(2, 4, 29)
    ref = ref + 3.0 * torch.randn_like(ref)  # far from the policy: exercises low_var_kl's clamps
    _check(logits, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1, kl_estimator=kl_estimator)


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_old_absent(level, loss_type):
    logits, ids, adv, mask, _, _ = _inputs(3, 4, 31)
    _check(logits, ids, adv, mask, loss_type=loss_type, importance_sampling_level=level)


@pytest.mark.parametrize("case", ["delta", "temperature", "adv_per_token", "num_items", "num_items_tensor",
                                  "beta0_ref", "no_mask", "empty_mask", "T1", "inplace", "inplace_seq", "V_block"])
def test_options(case):
    B, T, V = {"T1": (4, 1, 23), "V_block": (2, 3, 128)}.get(case, (3, 5, 41))  # V_block: no partial block
    logits, ids, adv, mask, old, ref = _inputs(B, T, V, adv_per_token=case == "adv_per_token",
                                               mask_kind={"no_mask": "none", "empty_mask": "empty"}.get(case, "random"))
    kw = dict(old_logprobs=old)
    if case == "delta":
        kw.update(delta=1.05, epsilon=0.1)
    elif case == "temperature":
        kw.update(temperature=0.7, ref_logprobs=ref, beta=0.02)
    elif case == "num_items":
        kw.update(num_items_in_batch=11)
    elif case == "num_items_tensor":
        kw.update(num_items_in_batch=torch.tensor(13.0))
    elif case == "beta0_ref":
        kw.update(ref_logprobs=ref, beta=0.0)
    elif case == "inplace_seq":
        kw.update(importance_sampling_level="sequence", ref_logprobs=ref, beta=0.1)
    _check(logits, ids, adv, mask, inplace=case.startswith("inplace"), **kw)


@pytest.mark.parametrize("shape", [(3, 5, 41), (2, 3, 128), (2, 2, 200)])
def test_prefetch_variant(monkeypatch, shape):
    """The software-prefetch path of the kernel (R1K_GRPO_PREFETCH=1), in place and not."""
    monkeypatch.setenv("R1K_GRPO_PREFETCH", "1")
    logits, ids, adv, mask, old, ref = _inputs(*shape)
    _check(logits, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1)
    _check(logits, ids, adv, mask, inplace=True, old_logprobs=old, loss_type="grpo")


def test_low_precision_bf16():
    logits, ids, adv, mask, old, ref = _inputs(2, 6, 53, dtype=torch.bfloat16)
    _check(logits, ids, adv, mask, dtype=torch.bfloat16, old_logprobs=old, ref_logprobs=ref, beta=0.05)


def test_sliced_logits():
    logits, ids, adv, mask, old, _ = _inputs(2, 6, 33)
    _check(logits[:, :-1], ids[:, :-1], adv, mask[:, :-1], old_logprobs=old[:, :-1])


def test_inplace_writes_into_logits():
    logits, ids, adv, mask, old, _ = _inputs(2, 3, 17)
    h = logits.clone().requires_grad_()
    y = h * 1.0
    out = rk.grpo_loss(y, ids, adv, mask, old_logprobs=old, backend="triton", inplace_backward=True)
    out.loss.backward()
    assert torch.equal(y.detach(), h.grad)  # the gradient lives in the logits' storage


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(inplace):
    logits, ids, adv, mask, old, ref = _inputs(2, 4, 27)

    def f(x):
        out = rk.grpo_loss(x * 1.0, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1,
                           inplace_backward=inplace, backend="triton")
        return out.loss, out.metrics["clip_ratio/region_mean"]

    x = logits.clone().requires_grad_()
    loss, _ = torch.compile(f, fullgraph=True)(x)
    loss.backward()
    x64 = logits.double().requires_grad_()
    ref_out = R.grpo_loss(x64, ids, adv.double(), mask, old_logprobs=old.double(), ref_logprobs=ref.double(),
                          beta=0.1)
    ref_out[0].backward()
    assert_close(loss, ref_out[0], torch.float32, name="compiled loss")
    assert_close(x.grad, x64.grad, torch.float32, name="compiled grad")


def test_opcheck():
    logits, ids, adv, mask, old, ref = _inputs(2, 3, 19)
    args = (ids, adv, mask, old, ref, None, None, None, 1.0, 0.2, 0.28, None, 0.04, 3, 2)
    # autograd + fake + schema with gradients; the full AOT check without (its harness returns the saved
    # gradient buffer as a graph output, which the in-place backward scaling then mutates).
    torch.library.opcheck(grpo_ops.grpo_loss_fwd, (logits.clone().requires_grad_(),) + args + (False,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    for seq in (False, True):
        torch.library.opcheck(grpo_ops.grpo_loss_fwd, (logits.clone(),) + args + (seq,))
    torch.library.opcheck(grpo_ops.grpo_loss_fwd_inplace, (logits.clone(),) + args + (False,))
    torch.library.opcheck(grpo_ops.grpo_scale_grad_, (logits.clone(), torch.tensor(2.0)))


@pytest.mark.gpu
@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_real_shape(level, inplace):
    B, T, V = 2, 256, 151936
    logits, ids, adv, mask, old, ref = _inputs(B, T, V, device="cuda", dtype=torch.bfloat16)
    _check(logits, ids, adv, mask, dtype=torch.bfloat16, inplace=inplace, old_logprobs=old, ref_logprobs=ref,
           beta=0.04, importance_sampling_level=level, loss_type="grpo" if level == "sequence" else "dapo")
    assert TOLERANCES[torch.bfloat16] > 0
