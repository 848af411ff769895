"""Reference GRPO loss family: values derived by hand on a 2x2 example, gradients, compile."""
import math

import pytest
import torch

import r1kernels as rk
from r1kernels import reference as ref
from r1kernels.reference.grpo import grpo_loss_from_logprobs

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
    # delta clamps the ratio before TRL counts clipping: r = 1.25 -> 1.1, inside (0.8, 1.2); the gradient keeps
    # the clamp (test_surrogate_and_reductions), the metric follows it
    _, m = loss_of(loss_type="dapo", delta=1.1)
    assert m["clip_ratio/high_mean"] == 0.0 and m["clip_ratio/region_mean"] == 0.0
    _, m = loss_of(loss_type="dapo", delta=1.3)
    assert m["clip_ratio/high_mean"] == pytest.approx(1 / 3)


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


# the ratios of LOGP / OLD, token by token
RATIO = torch.tensor([[1.25, 1.0], [1.6, 0.5]], dtype=torch.float64)
# the dapo per-token surrogate of the 2x2 example (last token masked)
DAPO_TERMS = torch.tensor([[-1.2, -1.0], [1.6, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("est", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators(est, bias_correction):
    """+ beta * KL per token; use_bias_correction_kl (TRL's default) multiplies it by the ratio r."""
    d = torch.tensor([[0.3, -0.2], [0.5, 1.0]], dtype=torch.float64)  # l_ref - l
    ref_lp = LOGP + d
    k = {"k1": -d, "k2": d * d / 2, "k3": d.exp() - d - 1, "low_var_kl": d.exp() - d - 1}[est]
    k = k * RATIO if bias_correction else k
    base, _ = loss_of(loss_type="bnpo")
    loss, metrics = ref.grpo_loss_from_logprobs(LOGP, ADV, MASK, OLD, ref_lp, beta=0.1, loss_type="bnpo",
                                                kl_estimator=est, use_bias_correction_kl=bias_correction)
    kl_mean = float((k * MASK).sum() / 3)
    assert abs(loss.item() - (base + 0.1 * kl_mean)) < 1e-12
    assert abs(metrics["kl"].item() - kl_mean) < 1e-12


def test_bias_corrected_kl_gradient():
    """d(beta * k3 * r)/dl = beta * r * (k3 + dk3/dl) with dk3/dl = 1 - exp(l_ref - l), dr/dl = r."""
    d = torch.tensor([[0.3, -0.2], [0.5, 1.0]], dtype=torch.float64)
    logp = LOGP.clone().requires_grad_(True)
    loss, _ = ref.grpo_loss_from_logprobs(logp, torch.zeros(2, dtype=torch.float64), MASK, OLD, LOGP + d, beta=0.1,
                                          loss_type="bnpo")
    loss.backward()
    k3 = d.exp() - d - 1
    assert torch.allclose(logp.grad, 0.1 * RATIO * (k3 + 1 - d.exp()) * MASK / 3)


# sampling log-probs with l_old - l_sampling = log [[2, 1], [0.5, 4]] (the last token is masked: weight 1)
SAMP = OLD - torch.log(torch.tensor([[2.0, 1.0], [0.5, 4.0]], dtype=torch.float64))


@pytest.mark.parametrize("mode,clip_min,clip_max,w", [
    ("token_truncate", None, 3.0, [[2.0, 1.0], [0.5, 1.0]]),
    ("token_truncate", 0.8, 1.5, [[1.5, 1.0], [0.8, 1.0]]),
    ("token_mask", None, 1.5, [[0.0, 1.0], [0.5, 1.0]]),
    ("token_mask", 0.6, None, [[2.0, 1.0], [0.0, 1.0]]),
    ("sequence_truncate", None, 3.0, [[2.0, 2.0], [0.5, 0.5]]),   # sequence sums: log 2 and log 0.5
    ("sequence_truncate", 1.0, 1.5, [[1.5, 1.5], [1.0, 1.0]]),
    ("sequence_mask", None, 1.5, [[0.0, 0.0], [0.5, 0.5]]),
    ("sequence_mask", 0.6, 3.0, [[2.0, 2.0], [0.0, 0.0]]),
])
def test_rollout_correction(mode, clip_min, clip_max, w):
    """The policy term times TRL's vLLM importance-sampling weight from l_old and the sampling log-probs."""
    opts = dict(sampling_logprobs=SAMP, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                vllm_importance_sampling_clip_max=clip_max)
    loss, _ = loss_of(loss_type="dapo", **opts)
    w = torch.tensor(w, dtype=torch.float64)
    assert abs(loss - float((DAPO_TERMS * w * MASK).sum() / 3)) < 1e-12
    off, _ = loss_of(loss_type="dapo", vllm_importance_sampling_correction=False, **opts)
    assert abs(off - float((DAPO_TERMS * MASK).sum() / 3)) < 1e-12


def test_rollout_correction_without_old_uses_current_logprobs():
    """No old log-probs: l_old = l (detached), so w = exp(l - l_sampling); its gradient is 0."""
    logp = LOGP.clone().requires_grad_(True)
    samp = LOGP - torch.log(torch.tensor([[2.0, 1.0], [0.5, 4.0]], dtype=torch.float64))
    loss, _ = ref.grpo_loss_from_logprobs(logp, ADV, MASK, loss_type="dapo", sampling_logprobs=samp,
                                          vllm_importance_sampling_mode="token_truncate")
    w = torch.tensor([[2.0, 1.0], [0.5, 1.0]], dtype=torch.float64)
    assert abs(loss.item() - float((-ADV[:, None] * w * MASK).sum() / 3)) < 1e-12
    loss.backward()
    assert torch.allclose(logp.grad, -ADV[:, None] * w * MASK / 3)  # r = exp(l - sg(l)): dr/dl = 1


@pytest.mark.parametrize("threshold,kept", [(0.5, False), (1.0, True)])
def test_off_policy_mask(threshold, kept):
    """Sequence 1 (A < 0) has mean(l_sampling - l) = 0.7 over its tokens: dropped when 0.7 > threshold.
    Sequence 0 (A > 0) is kept whatever its divergence (here 5)."""
    samp = LOGP + torch.tensor([[5.0, 5.0], [0.7, 9.0]], dtype=torch.float64)
    loss, _ = loss_of(loss_type="dapo", sampling_logprobs=samp, vllm_importance_sampling_correction=False,
                      off_policy_mask_threshold=threshold)
    assert abs(loss - (-1.2 - 1.0 + (1.6 if kept else 0.0)) / 3) < 1e-12
    # without sampling log-probs the old ones measure it: mean(l_old - l) of sequence 1 = log(0.5 / 0.8) < 0.5
    loss, _ = loss_of(loss_type="dapo", off_policy_mask_threshold=threshold)
    assert abs(loss - (-1.2 - 1.0 + 1.6) / 3) < 1e-12


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


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_masked_positions_ignore_their_logprob_values(loss_type, level):
    """old / ref / sampling log-probs at masked positions do not reach the loss or its gradient: padding them
    with 0 where the policy's log-prob is -300 (exp overflows), with NaN, or with the policy's own values gives
    the same finite loss, metrics and gradient."""
    B, T = 3, 5
    logp0 = torch.randn(B, T, dtype=torch.float64) - 1.0
    logp0[:, 3:] = -300.0  # a low-temperature policy's log-prob of the pad token
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[:, 3:] = 0.0
    mask[1, 1:] = 0.0
    lps = [logp0 + 0.1 * torch.randn(B, T, dtype=torch.float64) for _ in range(3)]
    adv = torch.randn(B, dtype=torch.float64)
    runs = []
    for fill in ("policy", 0.0, math.nan):
        old, reflp, samp = [torch.where(mask.bool(), x, logp0 if fill == "policy" else torch.full_like(x, fill))
                            for x in lps]
        logp = logp0.clone().requires_grad_(True)
        loss, m = ref.grpo_loss_from_logprobs(logp, adv, mask, old, ref_logprobs=reflp, beta=0.04, loss_type=loss_type,
                                              importance_sampling_level=level, sampling_logprobs=samp,
                                              vllm_importance_sampling_correction=True)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), fill
        runs.append((loss.detach(), logp.grad, {k: v.detach() for k, v in m.items()}))
    for loss, g, m in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(g, runs[0][1])
        assert all(torch.equal(v, runs[0][2][k]) for k, v in m.items())


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


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_sapo_temperatures():
    """-A sigmoid(tau (r - 1)) 4 / tau with tau_pos for A > 0 and tau_neg otherwise."""
    loss, _ = loss_of(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)
    terms = [-_sig(0.5 * 0.25) * 4 / 0.5, -_sig(0.0) * 4 / 0.5, _sig(2.0 * 0.6) * 4 / 2.0]
    assert abs(loss - ((terms[0] + terms[1]) / 2 + terms[2]) / 2) < 1e-12


def test_luspo():
    """GSPO's sequence ratio (exp of the masked mean log-ratio), clipped; each sequence's terms summed, then
    averaged over sequences."""
    loss, _ = loss_of(loss_type="luspo", importance_sampling_level="sequence")
    r0, r1 = math.sqrt(1.25), 1.6
    assert abs(loss - ((-min(r0, 1.2)) * 2 + (-min(-r1, -1.2)) * 1) / 2) < 1e-12


def test_vespo():
    """phi(w) = exp(lambda + k log w - lambda w) of the sequence ratio w = exp(sum_t m log r) (k, lambda by the
    sign of A: 2, 3 for A >= 0; 3, 2 below), -phi A l per token, over the token count."""
    loss, _ = loss_of(loss_type="vespo")
    phi0 = math.exp(3 + 2 * math.log(1.25) - 3 * 1.25)
    phi1 = math.exp(2 + 3 * math.log(1.6) - 2 * 1.6)
    terms = [-phi0 * LOGP[0, 0].item(), -phi0 * LOGP[0, 1].item(), phi1 * LOGP[1, 0].item()]
    assert abs(loss - sum(terms) / 3) < 1e-12
    loss2, _ = loss_of(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=1.0, vespo_k_neg=1.0, vespo_lambda_neg=1.0)
    phi0, phi1 = math.exp(1 + math.log(1.25) - 1.25), math.exp(1 + math.log(1.6) - 1.6)
    terms = [-phi0 * LOGP[0, 0].item(), -phi0 * LOGP[0, 1].item(), phi1 * LOGP[1, 0].item()]
    assert abs(loss2 - sum(terms) / 3) < 1e-12


ENT = torch.tensor([[0.5, 2.0], [1.0, 3.0]], dtype=torch.float64)  # the last (masked) token's 3.0 is ignored


@pytest.mark.parametrize("q,kept", [(1.0, [[1, 1], [1, 0]]), (0.5, [[0, 1], [1, 0]]), (0.34, [[0, 1], [0, 0]])])
def test_top_entropy_quantile(q, kept):
    """Keep tokens whose entropy >= the (1 - q) quantile (linear interpolation) of the masked entropies
    [0.5, 2, 1]: the median 1.0 for q = 0.5, 1.32 for q = 0.34; the denominator stays the mask's."""
    loss, m = loss_of(loss_type="dapo", entropy=ENT, top_entropy_quantile=q)
    kept = torch.tensor(kept, dtype=torch.float64)
    assert abs(loss - float((DAPO_TERMS * kept).sum() / 3)) < 1e-12
    assert abs(m["entropy"] - 3.5 / 3) < 1e-12


@pytest.mark.parametrize("q,eff_mean", [(1.0, 3.5 / 3), (0.5, 3.0 / 2)])
def test_entropy_coef(q, eff_mean):
    """loss - entropy_coef * the mean entropy over the tokens trained on; gradient -coef * eff / n_eff."""
    base, _ = loss_of(loss_type="dapo", entropy=ENT, top_entropy_quantile=q)
    loss, _ = loss_of(loss_type="dapo", entropy=ENT, top_entropy_quantile=q, entropy_coef=0.1)
    assert abs(loss - (base - 0.1 * eff_mean)) < 1e-12
    ent = ENT.clone().requires_grad_(True)
    out, _ = ref.grpo_loss_from_logprobs(LOGP, ADV, MASK, OLD, entropy=ent, loss_type="dapo",
                                         top_entropy_quantile=q, entropy_coef=0.1)
    out.backward()
    eff = MASK if q == 1.0 else torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(ent.grad, -0.1 * eff / eff.sum())


def test_grpo_token_loss_reference_treats_old_ref_as_constants():
    """reference.grpo.grpo_loss_from_logprobs (the spec, also r1train's loss): 'All other tensors are constants'."""
    B, T = 3, 4
    logp = (torch.randn(B, T) - 2).requires_grad_()
    old = (logp.detach() + 0.05 * torch.randn(B, T)).requires_grad_()
    ref = (logp.detach() + 0.1 * torch.randn(B, T)).requires_grad_()
    adv = torch.randn(B, requires_grad=True)
    loss, _ = grpo_loss_from_logprobs(logp, adv, None, old, ref, beta=0.1)
    loss.backward()
    assert old.grad is None and ref.grad is None and adv.grad is None
    assert logp.grad is not None
