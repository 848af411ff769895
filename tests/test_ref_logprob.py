"""Reference token log-probs: hand-derived values, gradcheck, the chunked linear variant."""
import math

import pytest
import torch
from conftest import assert_close

import r1kernels as rk
from r1kernels import reference as ref


def test_hand_values_with_temperature_and_entropy():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    logits = (2.0 * p.log()).unsqueeze(0)  # at T=2 the softmax is p
    lp, ent = rk.token_logprobs(logits, torch.tensor([2]), temperature=2.0, return_entropy=True)
    assert lp.dtype == torch.float64  # float64 stays float64; lower precisions give fp32
    assert rk.token_logprobs(logits.half(), torch.tensor([2]), temperature=2.0).dtype == torch.float32
    assert abs(lp.item() - math.log(0.3)) < 1e-6
    assert abs(ent.item() + sum(x * math.log(x) for x in p.tolist())) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_log_softmax(dtype):
    logits = torch.randn(3, 5, 37) * 3
    labels = torch.randint(0, 37, (3, 5))
    out = rk.token_logprobs(logits.to(dtype), labels)
    expect = torch.log_softmax(logits.to(dtype).double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert_close(out, expect, torch.float32)


def test_gradcheck_logprob_and_entropy():
    logits = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (4,))
    for T in (1.0, 0.7):
        torch.autograd.gradcheck(lambda x, T=T: ref.token_logprobs(x, labels, T, True), (logits,))


def test_linear_matches_materialized_and_gradcheck():
    N, H, V = 13, 6, 29
    h = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,))
    lp, ent = ref.linear_token_logprobs(h, w, y, b, 0.9, True, chunk_rows=4)
    lp2, ent2 = ref.token_logprobs(h @ w.t() + b, y, 0.9, True)
    assert_close(lp, lp2, torch.float32)
    assert_close(ent, ent2, torch.float32)
    torch.autograd.gradcheck(lambda h, w, b: ref.linear_token_logprobs(h, w, y, b, 0.9, True, chunk_rows=5),
                             (h, w, b))


def test_linear_public_api_shapes():
    h = torch.randn(2, 3, 8)
    w = torch.randn(17, 8)
    y = torch.randint(0, 17, (2, 3))
    lp = rk.linear_token_logprobs(h, w, y)
    assert lp.shape == (2, 3) and lp.dtype == torch.float32
    assert_close(lp, torch.log_softmax((h @ w.t()).double(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1))
