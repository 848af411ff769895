"""rk.patch's fused layer ops (r1kernels/patch/layers.py) on Qwen2, Qwen3, Llama and Mistral: the patched
model's logits and every parameter's gradient equal the unpatched model's in float64 within the tolerance
table (fp32 and bf16, left-padded batches, gradient checkpointing); nothing else changes (state_dict keys,
class names, an unpatched model of the same class keeps HF's rotary). The generation engine on a patched
model: test_generation.py (tiny-qwen2-patched, tiny-llama-patched). Triton interpreter on CPU."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import assert_close, assert_close_set

transformers = pytest.importorskip("transformers")

import r1kernels as rk  # noqa: E402
from r1kernels.patch import layers  # noqa: E402
from r1kernels.patch.layers import patch_layers  # noqa: E402

V = 53


def _model(family, dtype=torch.float32):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"qwen2": lambda: transformers.Qwen2Config(**common),
           "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **common),
           "llama": lambda: transformers.LlamaConfig(**common),
           "mistral": lambda: transformers.MistralConfig(**common)}[family]()
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def _loss_and_grads(model, ids, mask, w_BLV):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = (logits.double() * w_BLV).sum()
    loss.backward()
    return logits.detach(), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,L,checkpointing", [(2, 7, False), (3, 12, True)])
def test_patched_model_matches_hf(device, family, dtype, B, L, checkpointing):
    base = _model(family).to(device)
    patched = copy.deepcopy(base)
    # The Triton interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest): its bf16 gradients run
    # ~1.5x HF's error (measured, 12 seeds), the reference ops' ~1.0x. So on CPU bf16 runs the reference ops
    # through the patched classes; the kernels' own bf16 backwards are held to the lowp rule op by op
    # (test_fused_decode.py), and on a GPU here too.
    interp = dtype == torch.bfloat16 and not torch.cuda.is_available()
    counts = patch_layers(patched, backend="torch" if interp else "auto")
    n_layers = base.config.num_hidden_layers
    assert counts == {"rms_norm": (4 if family == "qwen3" else 2) * n_layers + 1, "silu_mul": n_layers,
                      "apply_rotary": n_layers}
    assert [type(m).__name__ for m in patched.modules()] == [type(m).__name__ for m in base.modules()]
    assert list(patched.state_dict()) == list(base.state_dict())
    ref64 = copy.deepcopy(base).double()
    low = base.to(dtype)
    patched = patched.to(dtype)
    for m in (patched, low, ref64):
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, V, (B, L), device=device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    mask[0, : L // 3] = 0  # left padding
    w = torch.randn(B, L, V, dtype=torch.float64, device=device) * mask[..., None]
    out, grads = _loss_and_grads(patched, ids, mask, w)
    want, want_g = _loss_and_grads(ref64, ids, mask, w)
    lp = _loss_and_grads(low, ids, mask, w) if dtype != torch.float32 else (None, {})
    keep = mask.bool()
    assert_close(out[keep], want[keep], dtype, lowp=None if lp[0] is None else lp[0][keep], name="logits")
    assert all(g.dtype == dtype for g in grads.values())
    assert_close_set(grads, want_g, dtype, lowps=lp[1], name="grad")


def test_unpatched_model_of_the_same_class_keeps_hf_rotary(monkeypatch):
    """The rotary wrapper is module-level: an unpatched model calls HF's function through it."""
    patched, plain = _model("qwen2"), _model("qwen2")
    patch_layers(patched)
    calls = []
    real = rk.apply_rotary
    monkeypatch.setattr(rk, "apply_rotary", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(layers, "HOST_BOUND_ROWS", 0)  # the fused ops at any size
    ids = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        plain(ids)
        assert calls == []
        patched(ids)
    assert len(calls) == patched.config.num_hidden_layers


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_decode_steps_without_autograd_run_hf_forward(family, monkeypatch):
    """Without autograd, a decode step (one token a row, at most HOST_BOUND_ROWS rows: HF's generate, bound by
    host time per op) runs HF's own forward: logits bitwise the unpatched model's, no fused op called. More rows,
    whole sequences without autograd (TRL's old and reference log-probs: they ran HF's ops below 512 rows, so
    their ratio to the training forward's log-probs was not 1), and autograd at any size run every fused op,
    the no-grad forward bitwise the training one."""
    base = _model(family)
    patched = copy.deepcopy(base)
    patch_layers(patched)
    calls = []
    def counted(name, real):
        return lambda *a, **k: calls.append(name) or real(*a, **k)

    for name in ("rms_norm", "silu_mul", "apply_rotary"):
        monkeypatch.setattr(rk, name, counted(name, getattr(rk, name)))
    B, T = int(torch.randint(2, 5, ())), int(torch.randint(2, 6, ()))
    monkeypatch.setattr(layers, "HOST_BOUND_ROWS", B * T)  # the whole sequences fit: still fused
    step, seq, more = (torch.randint(0, V, s) for s in ((B, 1), (B, T), (B * T + 1, 1)))
    with torch.no_grad():
        assert torch.equal(patched(step).logits, base(step).logits)
        assert calls == []
        for ids in (seq, more):
            assert_close(patched(ids).logits, copy.deepcopy(base).double()(ids).logits, torch.float32)
            assert set(calls) == {"rms_norm", "silu_mul", "apply_rotary"}
            calls.clear()
        no_grad = patched(seq).logits
    calls.clear()
    with_grad = patched(seq).logits
    assert set(calls) == {"rms_norm", "silu_mul", "apply_rotary"}
    assert torch.equal(no_grad, with_grad.detach())
    with_grad.sum().backward()


def test_patch_twice_and_bad_input():
    m = _model("llama")
    a = patch_layers(m)
    assert patch_layers(m, backend="torch") == a
    assert all(getattr(x, "_r1k_layers_backend", "torch") == "torch" for x in m.modules())
    with pytest.raises(ValueError, match="backend"):
        patch_layers(m, backend="cuda")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=V)
    with pytest.raises(ValueError, match="model_type"):
        patch_layers(transformers.GPT2LMHeadModel(cfg))


@pytest.mark.parametrize("backend", ["cuda", "cpp"])
def test_rk_patch_backends_of_other_ops(backend):
    """rk.patch takes the op backends: the layer ops (Triton and the reference only) read "cuda" / "cpp" as
    "auto" (layers_backend), as r1train does; a backend the lm_head refuses ("cpp") raises before anything is
    patched, so the model is left as it was, not half patched."""
    model = _model("qwen2")
    classes = [type(m) for m in model.modules()]
    if backend == "cpp":
        with pytest.raises(ValueError, match="backend"):
            rk.patch(model, backend=backend)
        assert [type(m) for m in model.modules()] == classes and not hasattr(model, "_r1k_lm_head")
        assert "forward" not in vars(model)
        return
    out = rk.patch(model, backend=backend)
    assert out["layers"]["apply_rotary"] == model.config.num_hidden_layers
    assert model._r1k_lm_head["backend"] == "auto"  # linear_token_logprobs has no CUDA kernel (lm_head.head_backend)
    assert {getattr(m, "_r1k_layers_backend", "auto") for m in model.modules()} == {"auto"}


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_patched_model_pickles_patched(family):
    """torch.save(model) of an rk.patch'ed model reloads patched (the same fused modules and classes, the fused
    lm_head path, the same outputs), and an unpatched model of the same class saved after it reloads too: the
    made classes and the wrapped rotary name would otherwise fail to pickle or reload as HF's forward."""
    model, plain = _model(family), _model(family)
    rk.patch(model, backend="torch")
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        want, want_plain = model(ids, labels=ids, fused_lm_head=True), plain(ids).logits
    for copied in (_save_load(model), copy.deepcopy(model)):
        assert [type(m) for m in copied.modules()] == [type(m) for m in model.modules()]
        assert copied.forward.model is copied and copied._r1k_lm_head["backend"] == "torch"
        with torch.no_grad():
            got = copied(ids, labels=ids, fused_lm_head=True)
        assert torch.equal(got.log_probs, want.log_probs) and torch.equal(got.label_mask, want.label_mask)
        assert patch_layers(copied) == patch_layers(model)  # patched before: the same counts, nothing new
    with torch.no_grad():
        assert torch.equal(_save_load(plain)(ids).logits, want_plain)
