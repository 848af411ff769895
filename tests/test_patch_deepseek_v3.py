"""r1kernels.patch on a tiny transformers DeepseekV3ForCausalLM: same logits and gradients as the unpatched
model, same state_dict, routing counts for the bias update."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close

import r1kernels as rk
from r1kernels.patch import deepseek_v3 as dsv3

tf = pytest.importorskip("transformers")


def _tiny(device="cpu", dtype=torch.float32, E=16, n_group=4, topk_group=2, top_k=4, H=32):
    cfg = tf.DeepseekV3Config(vocab_size=64, hidden_size=H, intermediate_size=48, moe_intermediate_size=16,
                              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
                              n_routed_experts=E, n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k,
                              first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
                              max_position_embeddings=64)
    model = tf.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("experts" in name or "gate" in name):
                p.normal_(0, 0.2)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.uniform_(0.0, 0.05)
    return model.to(device=device, dtype=dtype)


def _compare(model, patched, device, dtype, tol_dtype):
    ids = torch.randint(0, 64, (2, 12), device=device)
    out = model(ids, labels=ids)
    out_p = patched(ids, labels=ids)
    assert_close(out_p.logits, out.logits.double(), tol_dtype, name="logits")
    out.loss.backward()
    out_p.loss.backward()
    for (n, p), (n2, p2) in zip(model.named_parameters(), patched.named_parameters()):
        assert n == n2
        if p.grad is not None:
            assert p2.grad is not None, n
            assert_close(p2.grad, p.grad.double(), tol_dtype, name=f"grad {n}")


def test_patch_matches_unpatched_logits_and_grads():
    model = _tiny()
    patched = copy.deepcopy(model)
    replaced = rk.patch(patched)
    assert sorted(replaced) == [f"model.layers.{i}.mlp.{m}" for i in (1, 2) for m in ("experts", "gate")]
    assert set(patched.state_dict()) == set(model.state_dict())
    assert isinstance(patched.model.layers[1].mlp.gate, dsv3.R1KRouter)
    _compare(model, patched, "cpu", torch.float32, torch.float32)


def test_patch_shares_parameters_and_counts_tokens():
    model = _tiny()
    gate = model.model.layers[1].mlp.gate
    rk.patch(model)
    router = model.model.layers[1].mlp.gate
    assert router.weight is gate.weight and router.e_score_correction_bias is gate.e_score_correction_bias
    ids = torch.randint(0, 64, (3, 10))
    model(ids)
    model(ids[:1])
    assert router.tokens_per_expert.sum().item() == (30 + 10) * router.top_k
    before = router.e_score_correction_bias.clone()
    counts = router.tokens_per_expert.clone()
    assert dsv3.update_router_biases(model, rate=0.01) == 2
    expected = before + 0.01 * torch.sign(counts.float().mean() - counts.float())
    assert torch.equal(router.e_score_correction_bias, expected)
    assert router.tokens_per_expert.sum().item() == 0


def test_patch_router_only_counts_too():
    model = _tiny()
    replaced = dsv3.patch_deepseek_v3(model, experts=False)
    assert all(k.endswith("gate") for k in replaced)
    model(torch.randint(0, 64, (1, 7)))
    assert model.model.layers[2].mlp.gate.tokens_per_expert.sum().item() == 7 * 4


def test_patch_bf16_router_gemm_close():
    model = _tiny()
    patched = copy.deepcopy(model)
    dsv3.patch_deepseek_v3(patched, gemm_dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(patched(ids).logits, model(ids).logits, atol=0.1, rtol=0.1)


def test_patch_rejects_other_models():
    with pytest.raises(ValueError, match="no module"):
        rk.patch(torch.nn.Linear(3, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_patch_matches_unpatched(dtype):
    model = _tiny("cuda", dtype, E=32, n_group=8, topk_group=4, top_k=8, H=64)
    patched = copy.deepcopy(model)
    rk.patch(patched)
    _compare(model, patched, "cuda", dtype, torch.float32 if dtype == torch.float32 else torch.bfloat16)
