"""r1kernels.patch on a tiny transformers DeepseekV3ForCausalLM: same logits and gradients as the unpatched
model, same state_dict, routing counts for the bias update."""
from __future__ import annotations

import copy
import io

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


def checkpointing_on(model, *, reentrant: bool):
    """transformers' own activation checkpointing switch (renamed in newer versions), reentrant or not."""
    kw = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


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


def test_patched_model_records_router_logits():
    """output_router_logits=True: the patched routers' logits, as HF's (transformers records them by the router
    class; the patched router subclasses it), also in a deep copy of the patched model."""
    model = _tiny()
    patched = copy.deepcopy(model)
    rk.patch(patched)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = model(ids, output_router_logits=True).router_logits
        got = patched(ids, output_router_logits=True).router_logits
    assert len(want) == 2 and len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(g, w.double(), torch.float32, name="router logits")
    with torch.no_grad():
        again = copy.deepcopy(patched)(ids, output_router_logits=True).router_logits
    assert all(torch.equal(a, g) for a, g in zip(again, got))


def _ref_counts(model, ids, layer, mask=None):
    """Expected tokens_per_expert of `layer` for ids: the reference route of that layer's router on the
    hidden states it sees (captured by a hook), pads (mask False) left out."""
    seen = {}
    mlp = model.model.layers[layer].mlp
    h = mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    gate = mlp.gate
    x = seen["x"].reshape(-1, gate.weight.shape[1])
    logits = torch.nn.functional.linear(x.float(), gate.weight.float())
    topk = rk.moe.route(logits, gate.e_score_correction_bias, top_k=gate.top_k, n_group=gate.n_group,
                        topk_group=gate.topk_group, backend="torch")[1]
    w = torch.ones(topk.shape, dtype=torch.int64) if mask is None else mask.reshape(-1, 1).long().expand(topk.shape)
    return torch.zeros(gate.num_experts, dtype=torch.int64).index_add_(0, topk.flatten(), w.flatten())


@pytest.mark.parametrize("experts", [True, False])
@pytest.mark.parametrize("shape", [(3, 10), (1, 7), (2, 1)])
def test_patch_counts_training_forwards_only(experts, shape):
    """Counts: exactly the routed tokens of training forwards (train mode, grad enabled), summed over
    forwards; eval-mode or no-grad forwards (generation, log-prob passes) add nothing; pads of token_mask
    are left out. The parameters are the HF router's own objects."""
    model = _tiny()
    gate = model.model.layers[1].mlp.gate
    replaced = dsv3.patch_deepseek_v3(model, experts=experts, backend="torch")
    assert any(k.endswith("experts") for k in replaced) == experts
    router = model.model.layers[1].mlp.gate
    assert router.weight is gate.weight and router.e_score_correction_bias is gate.e_score_correction_bias
    ids = torch.randint(0, 64, shape)
    mask = torch.rand(shape) < 0.7
    full = _ref_counts(model, ids, 1)
    expected = 2 * full + _ref_counts(model, ids, 1, mask)
    model(ids)
    router.token_mask = mask.reshape(-1)
    model(ids)
    for n in (ids.numel() + 1, ids.numel() - 1):  # another forward's size: an error naming it, nothing counted
        router.token_mask = torch.ones(n, dtype=torch.bool)
        with pytest.raises(ValueError, match="token_mask"):
            model(ids)
    router.token_mask = None  # every token
    model(ids)
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids)
    model.train()
    assert torch.equal(router.tokens_per_expert, expected)
    assert router.tokens_per_expert.sum().item() == (2 * ids.numel() + mask.sum().item()) * router.top_k


@pytest.mark.parametrize("reentrant", [False, True, "deepspeed"])
@pytest.mark.parametrize("shape", [(3, 10), (2, 1)])
def test_patch_counts_once_under_gradient_checkpointing(shape, reentrant):
    """Activation checkpointing re-runs each layer's forward inside backward; the recompute adds no counts,
    and the gradients equal those of a forward without checkpointing. Non-reentrant is r1train's mode;
    reentrant (transformers' use_reentrant=True, and DeepSpeed's checkpoint, which Megatron-style trainers use)
    runs the layer's first forward without grad, which is still the training forward and counts once."""
    model = _tiny()
    dsv3.patch_deepseek_v3(model, backend="torch")
    model.train()
    router = model.model.layers[1].mlp.gate
    ids = torch.randint(0, 64, shape)
    expected = _ref_counts(model, ids, 1)
    grads = []
    for gc in (False, True):
        if gc and not reentrant:
            from r1train.loading import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        elif gc:
            checkpointing_on(model, reentrant=True)
            if reentrant == "deepspeed":
                from deepspeed.runtime.activation_checkpointing import checkpointing as ds_ckpt

                for layer in model.model.layers:
                    layer._gradient_checkpointing_func = ds_ckpt.checkpoint
        model.zero_grad()
        router.tokens_per_expert.zero_()
        model(ids).logits.float().square().mean().backward()
        with torch.no_grad():  # a no-grad pass in train mode (transformers then does not checkpoint): no count
            model(ids)
        assert torch.equal(router.tokens_per_expert, expected), gc
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        assert_close(b, a, torch.float32, name="grad with checkpointing")


def test_update_router_biases_applies_and_resets():
    model = _tiny()
    rk.patch(model)
    rs = dsv3.routers(model)
    assert len(rs) == 2
    model(torch.randint(0, 64, (3, 10)))
    before = [r.e_score_correction_bias.clone() for r in rs]
    counts = torch.stack([r.tokens_per_expert.clone() for r in rs])
    applied = dsv3.update_router_biases(model, rate=0.01)
    assert torch.equal(applied, counts)
    for r, b0, c in zip(rs, before, counts):
        expected = b0 + 0.01 * torch.sign(c.float().mean() - c.float())
        assert torch.equal(r.e_score_correction_bias, expected)
        assert r.tokens_per_expert.sum().item() == 0
    assert dsv3.update_router_biases(torch.nn.Linear(2, 2)) is None


def test_patch_bf16_router_gemm_close():
    """The bf16 router GEMM is wired in: outputs stay close. Biases fix every token's experts, so bf16 rounding
    cannot flip a near-tie choice (the op-level bf16 GEMM numerics are test_moe.py's
    test_router_fp32_and_bf16_gemm): within a group 1.0 apart, and the groups' top-2 sums 2 * group size
    apart (a random permutation of all experts let two groups' sums tie, and the sigmoid scores, which vary
    by < 1, then chose the group: 1 seed in the full suite flipped one)."""
    model = _tiny()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                G = model.config.n_group
                gs = m.e_score_correction_bias.numel() // G
                b_Gs = torch.randperm(G)[:, None] * gs + torch.stack([torch.randperm(gs) for _ in range(G)])
                m.e_score_correction_bias.copy_(b_Gs.flatten().float())
    patched = copy.deepcopy(model)
    dsv3.patch_deepseek_v3(patched, gemm_dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (2, 12))
    torch.testing.assert_close(patched(ids).logits, model(ids).logits, atol=0.1, rtol=0.1)


def test_patch_rejects_other_models():
    with pytest.raises(ValueError, match="no module"):
        rk.patch(torch.nn.Linear(3, 3))


def test_patch_reads_zero3_partitioned_shapes():
    """Under DeepSpeed ZeRO-3 a model built inside zero.Init (transformers' from_pretrained with ZeRO-3 on: TRL's
    GRPOTrainer given a model name) holds each parameter as a (0,) tensor with its full shape in ds_shape: the
    patch read the (0,) shape (0 experts counted; the experts' layout check failed to unpack it). With the data
    put back (as ZeRO-3 gathers it in the forward) the patched model computes the unpatched one's logits."""
    model = _tiny()
    want_E = model.config.n_routed_experts
    ref = copy.deepcopy(model)
    full = {}
    for name, p in model.named_parameters():  # partitioned as ZeRO-3 leaves them between forwards
        full[name] = p.data
        p.ds_shape = p.shape
        p.data = p.data.new_empty(0)
    dsv3.patch_deepseek_v3(model)
    routers = dsv3.routers(model)
    assert routers and all(r.num_experts == want_E and r.tokens_per_expert.shape == (want_E,) for r in routers)
    assert all(m.num_experts == want_E for m in model.modules() if isinstance(m, dsv3.R1KExperts))
    for name, p in model.named_parameters():
        p.data = full[name]
    _compare(ref, model, "cpu", torch.float32, torch.float32)


@pytest.mark.parametrize("backend, msg", [("fastest", "backend must be one of"),
                                          ("cpp", "no cpp kernel for route, permute, unpermute")])
def test_patch_refuses_a_backend_before_changing_the_model(backend, msg):
    """A backend the MoE ops cannot run was accepted and failed at the first forward ('fastest', 'cpp'): now a
    ValueError naming it, the model left as it was."""
    model = _tiny()
    classes = [type(m) for m in model.modules()]
    for call in (rk.patch, dsv3.patch_deepseek_v3):
        with pytest.raises(ValueError, match=msg):
            call(model, backend=backend)
        assert [type(m) for m in model.modules()] == classes


@pytest.mark.parametrize("gemm_dtype", ["bf16", torch.float16, torch.float64, torch.int8])
def test_patch_refuses_a_gemm_dtype_before_changing_the_model(gemm_dtype):
    """A router GEMM dtype the op refuses was accepted at patch time and failed at the first forward: now a
    ValueError naming gemm_dtype, the model left as it was."""
    model = _tiny()
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="gemm_dtype must be"):
        dsv3.patch_deepseek_v3(model, gemm_dtype=gemm_dtype)
    assert [type(m) for m in model.modules()] == classes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_patch_matches_unpatched(dtype):
    model = _tiny("cuda", dtype, E=32, n_group=8, topk_group=4, top_k=8, H=64)
    patched = copy.deepcopy(model)
    rk.patch(patched)
    _compare(model, patched, "cuda", dtype, torch.float32 if dtype == torch.float32 else torch.bfloat16)


def test_patch_twice_and_after_a_router_only_patch():
    """rk.patch on a patched model (as r1train's loading and a trainer may both call it) keeps it patched and
    raises nothing; after a router-only patch (ExpertLoad's experts=False) it fuses the experts too. Outputs
    and gradients still equal the unpatched model's."""
    model = _tiny()
    twice = copy.deepcopy(model)
    first = rk.patch(twice)
    assert rk.patch(twice, backend="torch") == {}
    assert all(r.backend == "torch" for r in dsv3.routers(twice))
    assert sorted(first) == [f"model.layers.{i}.mlp.{m}" for i in (1, 2) for m in ("experts", "gate")]
    routed_only = copy.deepcopy(model)
    dsv3.patch_deepseek_v3(routed_only, experts=False)
    assert sorted(rk.patch(routed_only)) == [f"model.layers.{i}.mlp.experts" for i in (1, 2)]
    assert all(isinstance(routed_only.model.layers[i].mlp.experts, dsv3.R1KExperts) for i in (1, 2))
    for patched in (twice, routed_only):
        assert set(patched.state_dict()) == set(model.state_dict())
        model.zero_grad()
        _compare(model, patched, "cpu", torch.float32, torch.float32)


def test_patched_model_pickles_patched():
    """torch.save(model) / copy.deepcopy of a patched DeepseekV3 model: the routers (a class made per router
    class) reload as R1KRouter, and the logits are the same."""
    model = _tiny()
    rk.patch(model)
    ids = torch.randint(0, 64, (2, 9))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for copied in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert isinstance(copied.model.layers[1].mlp.gate, dsv3.R1KRouter)
        assert type(copied.model.layers[1].mlp.gate) is type(model.model.layers[1].mlp.gate)
        with torch.no_grad():
            assert torch.equal(copied(ids).logits, model(ids).logits)


def test_unpatch_restores_transformers_modules_with_the_patched_models_values():
    """rk.patch.unpatch puts transformers' router and experts back, holding what the patched model holds now: the
    balanced e_score_correction_bias, trained weights, and the buffers a dtype change after the patch replaced (the
    replaced modules kept theirs). The model is then the unpatched model of those values: its classes, state_dict
    and logits (bitwise: both run transformers' code) are a fresh model's loaded with them."""
    from r1kernels.patch import unpatch

    model = _tiny()
    fresh = copy.deepcopy(model)
    rk.patch(model, backend="torch")
    with torch.no_grad():
        for r in dsv3.routers(model):
            r.e_score_correction_bias.add_(torch.linspace(-0.02, 0.02, r.num_experts))
            r.weight.mul_(1.5)
    model.to(torch.bfloat16)  # the routers' bias buffers become new tensors
    want = {k: v.clone() for k, v in model.state_dict().items()}
    taken = unpatch(model)
    assert sorted(taken) == [f"model.layers.{i}.mlp.{m}" for i in (1, 2) for m in ("experts", "gate")]
    assert not dsv3.routers(model) and len(dsv3.routers_to_patch(model)) == 2
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
    got = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    fresh.to(torch.bfloat16).load_state_dict(want)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert unpatch(model) == {}


def test_router_lists_count_the_moe_blocks_gates():
    """routers / routers_to_patch (and r1train's LoRA router count) are one helper: each MoE block's `gate` that is
    a DeepSeek-V3 router. A router that a wrapper holds (peft wraps the router it adapts: the block's gate is then
    the wrapper) is not a router of the model: routers() counted it (it looked at every module), and
    routers_to_patch listed the MoE blocks, not their routers."""
    model = _tiny()
    blocks = [model.model.layers[i].mlp for i in (1, 2)]
    assert dsv3.routers_to_patch(model) == [b.gate for b in blocks] and dsv3.routers(model) == []
    rk.patch(model, backend="torch")
    assert dsv3.routers(model) == [b.gate for b in blocks] and dsv3.routers_to_patch(model) == []
    assert dsv3.moe_routers(model) == [b.gate for b in blocks]

    class Wrapper(torch.nn.Module):  # as peft's ParamWrapper holds the router it adapts
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    blocks[0].gate = Wrapper(blocks[0].gate)
    assert dsv3.routers(model) == [blocks[1].gate] and dsv3.moe_routers(model) == [blocks[1].gate]


@pytest.mark.parametrize("kw, name", [(dict(n_group=4, topk_group=5), "topk_group"),
                                      (dict(E=12, n_group=8, topk_group=2), "n_group"),
                                      (dict(n_group=4, topk_group=1, top_k=5), "top_k")])
def test_patch_names_a_bad_routing_config(kw, name):
    """A routing config the router cannot run is an error naming the key when the model is patched (it came
    from the first forward)."""
    try:
        model = _tiny(**kw)
    except Exception as e:  # noqa: BLE001 -- a transformers that refuses the config itself
        pytest.skip(f"transformers refuses the config: {e!r}")
    with pytest.raises(ValueError, match=name):
        dsv3.patch_deepseek_v3(model)
