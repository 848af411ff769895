"""linear_grpo_loss: chunked cuBLAS logits + the fused Triton loss kernel vs the float64 reference:
loss, metrics, per-token log-probs and the gradients of hidden, weight and bias."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import r1kernels as rk
from r1kernels.reference import grpo as R

triton = pytest.importorskip("triton")
from r1kernels.ops import linear_grpo as lin_ops  # noqa: E402


def _check(B, T, H, V, device="cpu", dtype=torch.float32, with_bias=True, **kw):
    hidden = (torch.randn(B, T, H, device=device)).to(dtype)
    weight = (torch.randn(V, H, device=device) / H ** 0.5 * 3).to(dtype)
    bias = (torch.randn(V, device=device) * 0.1).to(dtype) if with_bias else None
    ids = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, device=device)
    mask = (torch.rand(B, T, device=device) > 0.2).float()
    mask[0, -1] = 0
    base = R.token_logprobs((hidden.float() @ weight.float().t()), ids)
    old = base + 0.2 * torch.randn(B, T, device=device)
    ref = base + 0.2 * torch.randn(B, T, device=device)
    opts = dict(old_logprobs=old, ref_logprobs=ref, beta=0.05, **kw)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    b = leaves[2] if with_bias else None
    b64 = leaves64[2] if with_bias else None
    out = rk.linear_grpo_loss(leaves[0], leaves[1], ids, adv, mask, bias=b, backend="triton", **opts)
    o64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in opts.items()}
    exp = rk.linear_grpo_loss(leaves64[0], leaves64[1], ids, adv.double(), mask, bias=b64, backend="torch", **o64)
    (out.loss * 1.5).backward()
    (exp.loss * 1.5).backward()
    assert_close(out.loss, exp.loss, dtype, name="loss")
    assert_close(out.per_token_logprobs * mask, exp.per_token_logprobs * mask, dtype, name="logp")
    for k in exp.metrics:
        if k.startswith("clip_ratio") and dtype != torch.float32:
            # token fractions: a bf16-rounded logit can move a ratio across a clip bound (one token in a few
            # hundred); the fp32 reference computes the logits unrounded
            assert abs(out.metrics[k].item() - exp.metrics[k].item()) <= 0.01, k
        else:
            assert_close(out.metrics[k], exp.metrics[k], dtype, name=k)
    for t, t64, name in zip(leaves, leaves64, ("hidden", "weight", "bias")):
        assert t.grad.dtype == t.dtype
        assert_close(t.grad, t64.grad, dtype, name=f"grad {name}")


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_matches_reference(level, loss_type):
    _check(3, 4, 8, 37, importance_sampling_level=level, loss_type=loss_type, temperature=0.9)


def test_chunks_and_no_bias(monkeypatch):
    monkeypatch.setattr(lin_ops, "CHUNK_ROWS", 4)  # one sequence per chunk
    _check(3, 4, 6, 29, with_bias=False)
    _check(3, 4, 6, 29, importance_sampling_level="sequence")


def test_compile_fullgraph():
    B, T, H, V = 2, 3, 5, 17
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    f = torch.compile(lambda h, w: rk.linear_grpo_loss(h, w, ids, adv, backend="triton").loss, fullgraph=True)
    f(hidden, weight).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    R.linear_grpo_loss(h64, w64, ids, adv.double())[0].backward()
    assert_close(hidden.grad, h64.grad, name="compiled grad hidden")
    assert_close(weight.grad, w64.grad, name="compiled grad weight")
    torch.library.opcheck(lin_ops.linear_grpo_fwd, (hidden.detach(), weight.detach(), None, ids, adv, None, None, None,
                                                     None, None, None, 1.0, 0.2, 0.2, None, 0.0, 3, 2, False))


@pytest.mark.gpu
def test_gpu_real_shape():
    _check(2, 256, 3584, 151936, device="cuda", dtype=torch.bfloat16)
