"""Edge cases of the public GRPO entry points found by an audit: old / ref / sampling log-probs are constants of
the loss on every backend (no gradient into them, none through them into the model that produced them), and
the num_items_in_batch / max_completion_length checks."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

import r1kernels as rk

BACKENDS = ["torch", "triton"]


def _dapo_k3_loss(logits, ids, adv, mask, old, ref, beta, eps, temperature):
    """Independent float64 token-level dapo loss with the k3 KL times the ratio (TRL's bias-corrected KL, the
    default), old / ref as constants: sum(mask * L) / sum(mask)."""
    z = logits.double() / temperature
    logp = z.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    r = torch.exp(logp - old.double())
    a = adv.double()[:, None]
    pg = -torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
    d = ref.double() - logp
    L = pg + beta * (torch.exp(d) - d - 1.0) * r
    m = mask.double()
    return (L * m).sum() / m.sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_and_ref_logprobs_get_no_gradient(backend):
    """old_logprobs / ref_logprobs computed with grad (from another forward pass) were differentiated through by
    the torch reference (a gradient into the model that made them), not by the kernels."""
    B, T, V = 3, 5, 29
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    mask = (torch.rand(B, T) > 0.25).long()
    mask[:, 0] = 1
    other = torch.randn(B, T, V, requires_grad=True)  # the model old/ref came from
    lp_other = torch.log_softmax(other, -1).gather(-1, ids[..., None])[..., 0]
    old = lp_other + 0.05 * torch.randn(B, T)
    ref = lp_other + 0.2 * torch.randn(B, T)
    x = logits.clone().requires_grad_()
    out = rk.grpo_loss(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1, epsilon=0.2,
                       temperature=0.9, backend=backend)
    out.loss.backward()
    assert other.grad is None or other.grad.abs().max() == 0, "gradient flowed through old/ref log-probs"
    x64 = logits.double().requires_grad_()
    want = _dapo_k3_loss(x64, ids, adv, mask, old.detach(), ref.detach(), 0.1, 0.2, 0.9)
    want.backward()
    assert_close(out.loss, want.detach(), name="loss")
    assert_close(x.grad, x64.grad, name="logits grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_old_ref_logprobs_get_no_gradient(backend):
    B, T, H, V = 2, 4, 8, 23
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) / math.sqrt(H)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    mask = torch.ones(B, T, dtype=torch.long)
    src = torch.randn(B, T, requires_grad=True)
    lp = torch.log_softmax((hidden @ weight.t()).double(), -1).gather(-1, ids[..., None])[..., 0].float()
    old, ref = lp + 0.05 * src, lp + 0.2 * src
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = rk.linear_grpo_loss(h, w, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1, backend=backend)
    out.loss.backward()
    assert src.grad is None or src.grad.abs().max() == 0, "gradient flowed through old/ref log-probs"
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = _dapo_k3_loss(h64 @ w64.t(), ids, adv, mask, old.detach(), ref.detach(), 0.1, 0.2, 1.0)
    want.backward()
    assert_close(out.loss, want.detach(), name="loss")
    assert_close(h.grad, h64.grad, name="hidden grad")
    assert_close(w.grad, w64.grad, name="weight grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_sampling_logprobs_get_no_gradient(backend, mode):
    B, T, V = 2, 4, 13
    logits = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    old = rk.token_logprobs(logits.detach(), ids)
    samp = (old + 0.05 * torch.randn(B, T)).requires_grad_()
    out = rk.grpo_loss(logits, ids, torch.randn(B), old_logprobs=old, sampling_logprobs=samp,
                       vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=10.0, backend=backend)
    out.loss.backward()
    assert samp.grad is None or samp.grad.abs().max() == 0
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_grpo_token_loss_reference_treats_old_ref_as_constants():
    """reference.grpo.grpo_loss_from_logprobs (the spec, also r1train's loss): 'All other tensors are constants'."""
    from r1kernels.reference.grpo import grpo_loss_from_logprobs
    B, T = 3, 4
    logp = (torch.randn(B, T) - 2).requires_grad_()
    old = (logp.detach() + 0.05 * torch.randn(B, T)).requires_grad_()
    ref = (logp.detach() + 0.1 * torch.randn(B, T)).requires_grad_()
    adv = torch.randn(B, requires_grad=True)
    loss, _ = grpo_loss_from_logprobs(logp, adv, None, old, ref, beta=0.1)
    loss.backward()
    assert old.grad is None and ref.grad is None and adv.grad is None
    assert logp.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_liger_triton_grpo_loss_per_token_old_ref_no_gradient(backend):
    """liger's triton_grpo_loss(reduce=False) differentiated through old_logp / ref_logp; Liger's kernel does not."""
    from r1kernels.integrations.liger import triton_grpo_loss
    B, T, V = 2, 3, 11
    x = torch.randn(B, T + 1, V)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    lp = torch.log_softmax(x[:, :-1].double() / 0.9, -1).gather(-1, ids[..., None])[..., 0].float()
    old = (lp + 0.05 * torch.randn(B, T)).requires_grad_()
    ref = (lp + 0.2 * torch.randn(B, T)).requires_grad_()
    xx = x.clone().requires_grad_()
    g = torch.randn(B, T)
    loss, _, _ = triton_grpo_loss(xx, old, ref, ids, adv, reduce=False, backend=backend)
    (loss * g).sum().backward()
    assert old.grad is None and ref.grad is None
    # independent float64: per-token dapo loss + 0.04 * k3 (no bias correction), old/ref constants
    x64 = x.double().requires_grad_()
    logp = (x64[:, :-1] / 0.9).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    r = torch.exp(logp - old.detach().double())
    a = adv.double()[:, None]
    d = ref.detach().double() - logp
    L = -torch.minimum(r * a, r.clamp(0.8, 1.4) * a) + 0.04 * (torch.exp(d) - d - 1.0)
    (L * g.double()).sum().backward()
    assert_close(loss, L.detach(), name="per-token loss")
    assert_close(xx.grad, x64.grad, name="logits grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -3.0])
def test_num_items_in_batch_tensor_must_be_finite_positive(backend, value):
    """A tensor inf divided the loss to 0 silently (a Python float inf was already a ValueError)."""
    B, T, V = 2, 3, 7
    with pytest.raises(ValueError, match="num_items_in_batch"):
        rk.grpo_loss(torch.randn(B, T, V), torch.randint(0, V, (B, T)), torch.randn(B),
                     num_items_in_batch=torch.tensor(value), backend=backend)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        rk.linear_grpo_loss(torch.randn(B, T, 4), torch.randn(V, 4), torch.randint(0, V, (B, T)), torch.randn(B),
                            num_items_in_batch=torch.tensor([value]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_completion_length_bool_rejected(backend):
    """True was taken as max_completion_length=1 (dr_grpo's loss then T times too large)."""
    B, T, V = 2, 3, 7
    with pytest.raises(ValueError, match="max_completion_length"):
        rk.grpo_loss(torch.randn(B, T, V), torch.randint(0, V, (B, T)), torch.randn(B), loss_type="dr_grpo",
                     max_completion_length=True, backend=backend)
