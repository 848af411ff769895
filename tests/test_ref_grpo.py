"""Reference GRPO loss family: values derived by hand on a 2x2 example, gradients, compile."""
import math

import pytest
import torch

import r1kernels as rk
from r1kernels import reference as ref

# logp and old log-probs chosen so the ratios are r = [[1.25, 1.0], [1.6, 0.5]]; A = [+1, -1];
# the last token is masked. Per-token surrogate (eps 0.2): [[-1.2, -1.0], [1.6, (0.8 masked)]].
LOGP = torch.tensor([[math.log(0.5), math.log(0.25)], [math.log(0.8), math.log(0.1)]], dtype=torch.float64)
OLD = torch.tensor([[math.log(0.4), math.log(0.25)], [math.log(0.5), math.log(0.2)]], dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)


def loss_of(**kw):
    loss, metrics = ref.grpo_loss_from_logprobs(LOGP.clone(), ADV, MASK, OLD, **kw)
    return loss.item(), {k: v.item() for k, v in metrics.items()}


@pytest.mark.parametrize("loss_type,kw,expected", [
    ("grpo", {}, ((-1.2 - 1.0) / 2 + 1.6) / 2),
    ("bnpo", {}, (-1.2 - 1.0 + 1.6) / 3),
    ("dr_grpo", {"max_completion_length": 4}, (-1.2 - 1.0 + 1.6) / (2 * 4)),
    ("dr_grpo", {}, (-1.2 - 1.0 + 1.6) / (2 * 2)),
    ("dapo", {}, (-1.2 - 1.0 + 1.6) / 3),
    ("dapo", {"num_items_in_batch": 6}, (-1.2 - 1.0 + 1.6) / 6),
    ("dapo", {"delta": 1.1}, (-1.1 - 1.0 + 1.2) / 3),       # r' = min(r, 1.1) in the unclipped branch
    ("dapo", {"epsilon_high": 0.3}, (-1.25 - 1.0 + 1.6) / 3),
])
def test_surrogate_and_reductions(loss_type, kw, expected):
    loss, m = loss_of(loss_type=loss_type, **kw)
    assert abs(loss - expected) < 1e-12


def test_clip_metrics():
    _, m = loss_of(loss_type="dapo")
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 3)  # r=1.25 > 1.2 with A > 0
    assert m["clip_ratio/low_mean"] == 0.0                     # r=0.5 < 0.8 with A < 0, but masked
    assert m["clip_ratio/region_mean"] == pytest.approx(1 / 3)
    assert m["kl"] == 0.0


def test_cispo_and_sapo():
    loss, _ = loss_of(loss_type="cispo", epsilon_high=1.3)
    w = [[1.25, 1.0], [1.3, 0.5]]
    terms = [-w[0][0] * LOGP[0, 0], -w[0][1] * LOGP[0, 1], w[1][0] * LOGP[1, 0]]
    assert abs(loss - float(sum(terms)) / 3) < 1e-12
    loss, _ = loss_of(loss_type="sapo")
    sig = lambda x: 1 / (1 + math.exp(-x))
    terms = [-sig(0.25) * 4, -sig(0.0) * 4, sig(1.05 * 0.6) * 4 / 1.05]
    # per sequence, then over sequences (TRL 1.16, Liger 0.8.5), not per token as dapo
    assert abs(loss - ((terms[0] + terms[1]) / 2 + terms[2]) / 2) < 1e-12


@pytest.mark.parametrize("est", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators(est):
    d = torch.tensor([[0.3, -0.2], [0.5, 1.0]], dtype=torch.float64)  # l_ref - l
    ref_lp = LOGP + d
    k = {"k1": -d, "k2": d * d / 2, "k3": d.exp() - d - 1, "low_var_kl": d.exp() - d - 1}[est]
    base, _ = loss_of(loss_type="bnpo")
    loss, metrics = ref.grpo_loss_from_logprobs(LOGP, ADV, MASK, OLD, ref_lp, beta=0.1, loss_type="bnpo",
                                                kl_estimator=est)
    kl_mean = float((k * MASK).sum() / 3)
    assert abs(loss.item() - (base + 0.1 * kl_mean)) < 1e-12
    assert abs(metrics["kl"].item() - kl_mean) < 1e-12


def test_low_var_kl_clamps():
    lp = torch.zeros(1, 1, dtype=torch.float64)
    kl = ref.grpo.kl_per_token(lp, lp + 30.0, "low_var_kl")
    assert kl.item() == 10.0


def test_sequence_level_ratio():
    loss, _ = loss_of(loss_type="grpo", importance_sampling_level="sequence")
    r0, r1 = math.sqrt(1.25), 1.6  # exp(mean masked log-ratio) per sequence
    l0 = -min(r0, 1.2)   # both tokens share r0, A=+1
    l1 = -min(-r1, -1.2)
    assert abs(loss - (l0 + l1) / 2) < 1e-12


def test_no_old_logprobs_gives_unit_ratio_and_logprob_gradient():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = ref.grpo_loss_from_logprobs(logp, ADV, MASK, loss_type="grpo")
    assert abs(loss.item()) < 1e-12  # (-1 + 1) / 2
    loss.backward()
    expect = torch.tensor([[-0.25, -0.25], [0.5, 0.0]], dtype=torch.float64)  # -A / (n_i * B)
    assert torch.allclose(logp.grad, expect)


def test_empty_mask_is_zero_not_nan():
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"):
        loss, m = ref.grpo_loss_from_logprobs(LOGP, ADV, torch.zeros_like(MASK), OLD, loss_type=lt)
        assert loss.item() == 0.0 and all(torch.isfinite(v) for v in m.values())


def test_cispo_gradient_stops_at_the_weight():
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = ref.grpo_loss_from_logprobs(logp, ADV, MASK, OLD, loss_type="cispo", epsilon_high=1.3)
    loss.backward()
    w = torch.tensor([[1.25, 1.0], [1.3, 0.5]], dtype=torch.float64)
    assert torch.allclose(logp.grad, -w * ADV.unsqueeze(-1) * MASK / 3)


# cispo is left out: its weight is a stop-gradient, which finite differences cannot see.
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck_through_logits(loss_type, level):
    B, T, V = 2, 3, 7
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    old = (ref.token_logprobs(logits.detach(), ids) + 0.1 * torch.randn(B, T, dtype=torch.float64))
    reflp = old + 0.1 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    f = lambda x: ref.grpo_loss(x, ids, adv, mask, temperature=0.8, old_logprobs=old, ref_logprobs=reflp, beta=0.05,
                                epsilon_high=0.5, loss_type=loss_type,
                                importance_sampling_level=level)[0]
    torch.autograd.gradcheck(f, (logits,))


def test_public_api_output_and_linear_equivalence():
    B, T, H, V = 2, 4, 8, 19
    h = torch.randn(B, T, H)
    w = torch.randn(V, H)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    out = rk.linear_grpo_loss(h, w, ids, adv, beta=0.0)
    out2 = rk.grpo_loss(h @ w.t(), ids, adv)
    assert isinstance(out, rk.GRPOLossOutput)
    assert torch.allclose(out.loss, out2.loss, atol=1e-6)
    assert torch.allclose(out.per_token_logprobs, out2.per_token_logprobs, atol=1e-5)
    assert set(out.metrics) == {"kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}


def test_compiles_fullgraph():
    B, T, V = 2, 5, 23
    logits = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    old = torch.randn(B, T) * 0.1 - 3

    def f(x):
        return rk.grpo_loss(x, ids, adv, old_logprobs=old, ref_logprobs=old, beta=0.04, backend="torch").loss

    eager = f(logits)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(logits)
    assert torch.allclose(eager, compiled, atol=1e-6)
