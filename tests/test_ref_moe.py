"""Reference DeepSeek-V3 routing, permutation and balancing: hand cases and transformers' router."""
import pytest
import torch

import r1kernels as rk
from r1kernels import reference as ref

ROUTE = dict(top_k=2, n_group=4, topk_group=2)


def test_route_hand_case_bias_selects_and_weights_use_unbiased_scores():
    logits = torch.zeros(1, 8)  # s = 0.5 for every expert; the bias alone decides
    bias = torch.arange(8.0) / 10
    w, ids = rk.moe.route(logits, bias, routed_scaling_factor=2.5, **ROUTE)
    assert ids.tolist() == [[7, 6]]
    assert torch.allclose(w, torch.tensor([[1.25, 1.25]]))  # 0.5 / (0.5 + 0.5) * 2.5


def test_dropped_groups_are_minus_inf_not_zero():
    logits = torch.arange(8.0).unsqueeze(0) / 10
    bias = -torch.ones(8)  # every biased score negative: masking with 0 would pick dropped experts
    _, ids = rk.moe.route(logits, bias, top_k=2, n_group=4, topk_group=1)
    assert ids.tolist() == [[7, 6]]


def test_ties_go_to_lower_index():
    _, ids = rk.moe.route(torch.full((3, 8), 0.3), torch.zeros(8), top_k=3, n_group=4, topk_group=2)
    assert ids.tolist() == [[0, 1, 2]] * 3


def test_no_norm_and_gradient_only_through_chosen_weights():
    logits = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    w, ids = ref.route(logits, bias, 4, 4, 2, 1.0, False)
    assert torch.allclose(w, torch.sigmoid(logits).gather(1, ids))
    w.sum().backward()
    assert bias.grad is None
    grad = torch.zeros_like(logits).scatter(1, ids, 1.0) * torch.sigmoid(logits) * (1 - torch.sigmoid(logits))
    assert torch.allclose(logits.grad, grad.detach())
    torch.autograd.gradcheck(lambda x: ref.route(x, bias.detach(), 4, 4, 2, 2.0, True)[0],
                             (logits.detach().requires_grad_(),))


def _hf_route(hidden, gate_weight, bias, cfg_kw):
    """transformers' DeepseekV3 routing -> (router_logits, weights, ids); 5.2x routes inside the router,
    earlier releases in DeepseekV3MoE.route_tokens_to_experts."""
    tf = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    cfg = tf.DeepseekV3Config(hidden_size=hidden.shape[1], moe_intermediate_size=8, intermediate_size=16, **cfg_kw)
    moe = m.DeepseekV3MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.copy_(gate_weight)
        moe.gate.e_score_correction_bias.copy_(bias)
    out = moe.gate(hidden)
    if isinstance(out, tuple) and len(out) == 3:
        return out
    ids, w = moe.route_tokens_to_experts(out)
    return out, w, ids


@pytest.mark.parametrize("E,n_group,topk_group,top_k", [(16, 4, 2, 4), (32, 8, 4, 8), (12, 3, 1, 2)])
def test_matches_transformers_router(E, n_group, topk_group, top_k):
    T, H = 64, 24
    hidden = torch.randn(T, H)
    gate_weight = torch.randn(E, H) / H**0.5
    gate_weight[1] = gate_weight[0] + 1e-4  # near-ties (distinct in fp32) between experts 0 and 1
    bias = torch.rand(E) * 0.05 + 0.01      # nonzero; biased scores stay positive (older HF masks with 0)
    cfg_kw = dict(n_routed_experts=E, n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k,
                  routed_scaling_factor=2.5, norm_topk_prob=True)
    logits, w_hf, ids_hf = _hf_route(hidden, gate_weight, bias, cfg_kw)
    w, ids = rk.moe.route(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                          routed_scaling_factor=2.5)
    order_hf = ids_hf.sort(-1)
    order = ids.sort(-1)
    assert torch.equal(order.values, order_hf.values)
    assert torch.allclose(w.gather(1, order.indices), w_hf.float().gather(1, order_hf.indices), atol=1e-6)


def test_permute_identity_experts_unpermute_is_weighted_sum():
    T, K, H, E = 9, 3, 5, 6
    hidden = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    permuted, row_map, counts = rk.moe.permute(hidden, ids, E)
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=E).tolist()
    experts_sorted = ids.flatten()[row_map.argsort()]
    assert torch.equal(experts_sorted, experts_sorted.sort().values)  # rows grouped by expert
    out = rk.moe.unpermute(permuted, row_map, w)
    assert torch.allclose(out, hidden * w.sum(1, keepdim=True), atol=1e-6)


def test_permute_hand_row_map():
    hidden = torch.arange(3.0).unsqueeze(1)
    ids = torch.tensor([[1, 0], [0, 2], [1, 2]])  # flat: 1 0 0 2 1 2
    permuted, row_map, counts = rk.moe.permute(hidden, ids, 3)
    assert counts.tolist() == [2, 2, 2]
    assert row_map.tolist() == [2, 0, 1, 4, 3, 5]
    assert permuted.flatten().tolist() == [0.0, 1.0, 0.0, 2.0, 1.0, 2.0]


def test_unpermute_gradients():
    T, K, H = 4, 2, 3
    out = torch.randn(T * K, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    row_map = torch.randperm(T * K)
    torch.autograd.gradcheck(lambda o, w: ref.unpermute(o, row_map, w), (out, w))


def test_update_bias_hand():
    bias = torch.zeros(4)
    rk.moe.update_bias(bias, torch.tensor([1, 2, 3, 6]), rate=0.5)
    assert bias.tolist() == [0.5, 0.5, 0.0, -0.5]


def test_sequence_aux_loss_hand_and_gradient():
    logits = torch.zeros(2, 2)  # s' = 0.5 each; both tokens pick expert 0: f = [2, 0]
    loss = rk.moe.sequence_aux_loss(logits, torch.tensor([[0], [0]]), seq_len=2, top_k=1, alpha=0.1)
    assert abs(loss.item() - 0.1) < 1e-7
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ref.sequence_aux_loss(x, None, 3, 2, 1.0), (x,))


def test_update_bias_rejects_bad_counts_and_leaves_bias():
    """NaN counts were a silent no-op (sign(NaN) = 0), negative / bool / complex counts silently applied."""
    for bad in (torch.tensor([1.0, float("nan"), 3.0, 4.0]), torch.tensor([1, -2, 3, 4]),
                torch.tensor([True, False, True, False]), torch.tensor([1, 2, 3, 4]) * 1j):
        bias = torch.zeros(4)
        with pytest.raises(ValueError, match="tokens_per_expert"):
            rk.moe.update_bias(bias, bad)
        assert not bias.any()
    bias = torch.zeros(4)
    rk.moe.update_bias(bias, torch.tensor([1.0, 2.0, 3.0, 6.0]), rate=0.5)  # float counts still work
    assert bias.tolist() == [0.5, 0.5, 0.0, -0.5]


def test_update_bias_exact_for_counts_past_2_pow_24():
    """fp32 counts round 2**24 + 1 to 2**24 = the fp32 mean: the overloaded expert got no step."""
    bias = torch.zeros(2)
    rk.moe.update_bias(bias, torch.tensor([2**24 + 1, 2**24 - 1]), rate=0.5)
    assert bias.tolist() == [-0.5, 0.5]


def test_sequence_aux_loss_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="router_logits"):  # was a RuntimeError from reshape(0, -1)
        rk.moe.sequence_aux_loss(torch.randn(0, 8), None, seq_len=4, top_k=2)


def test_sequence_aux_loss_underflowing_scores_not_nan():
    x = torch.full((4, 8), -100.0).requires_grad_()  # sigmoid underflows to 0 for every expert: was 0 / 0 = NaN
    x.data[0, 0] = 0.0
    loss = rk.moe.sequence_aux_loss(x, None, seq_len=2, top_k=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    y = torch.randn(6, 8, dtype=torch.float64)
    z = torch.randn(6, 8, dtype=torch.float64)  # ordinary logits: unchanged by the guard
    s = torch.sigmoid(y)
    p = (s / s.sum(-1, keepdim=True)).view(2, 3, 8).mean(1)
    ids = z.topk(2, -1).indices
    f = torch.zeros(2, 8, dtype=torch.float64).scatter_add_(1, ids.view(2, -1), torch.ones(2, 6, dtype=torch.float64))
    want = 1e-4 * (f * 8 / (2 * 3) * p).sum(-1).mean()
    torch.testing.assert_close(rk.moe.sequence_aux_loss(y, ids, seq_len=3, top_k=2), want)
