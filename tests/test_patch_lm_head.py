"""rk.patch on Qwen2/Qwen3/Llama/Mistral: the fused lm_head path (model(..., labels, fused_lm_head=True))
against the unpatched model's own logits in float64 -- log-probs, entropy, loss and gradients -- at several
shapes with -100 labels; the plain forward and generate stay the model's own. Gemma 2 / Gemma 3 text: the same
against their own soft-capped logits (final_logit_softcapping), through both fused paths."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close

transformers = pytest.importorskip("transformers")

import r1kernels as rk  # noqa: E402
from r1kernels.patch.lm_head import EXTRA_OUTPUTS, FusedLMHeadOutput, patch_lm_head  # noqa: E402

V = 61


def _model(family, bias=False):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"qwen2": lambda: transformers.Qwen2Config(tie_word_embeddings=True, **common),
           "qwen3": lambda: transformers.Qwen3Config(head_dim=8, **common),
           "llama": lambda: transformers.LlamaConfig(**common),
           "mistral": lambda: transformers.MistralConfig(**common)}[family]()
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if bias:  # a biased head (none of the four has one; the path supports it)
        model.lm_head.bias = torch.nn.Parameter(torch.randn(V) * 0.1)
    return model


def _expected(model, ids, mask, labels, temperature, **inputs):
    """log-probs, entropy [B, L - 1] and loss of labels from the model's own logits in float64 (inputs: more of its
    forward's inputs, e.g. a multimodal model's pixel_values)."""
    logits = model(input_ids=ids, attention_mask=mask, **inputs).logits[:, :-1].double() / temperature
    logp_all = torch.log_softmax(logits, -1)
    keep = labels[:, 1:] != -100
    logp = logp_all.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0] * keep
    ent = -(logp_all.exp() * logp_all).sum(-1) * keep
    return logp, ent, -logp.sum() / keep.sum().clamp(min=1)


def _check_grads(model, patched, out, logp, ent):
    """The patched model's parameter gradients of random weights of its log-probs and entropy equal the model's own
    (logp, ent: _expected's, from the model's logits)."""
    g_lp, g_ent = torch.randn(logp.shape, dtype=torch.float64), torch.randn(logp.shape, dtype=torch.float64)
    ((out.log_probs * g_lp.float()).sum() + (out.entropy * g_ent.float()).sum()).backward()
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    for (n, p), (_, p2) in zip(model.named_parameters(), patched.named_parameters()):
        if p.grad is not None:
            assert_close(p2.grad, p.grad, name=f"grad {n}")


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral"])
@pytest.mark.parametrize("B,L", [(1, 2), (3, 9), (2, 17)])
def test_fused_head_matches_logits(family, B, L):
    model = _model(family, bias=family == "llama")
    patched = copy.deepcopy(model)
    assert list(rk.patch(patched)) == ["forward", "layers"]
    temperature = float(torch.empty(()).uniform_(0.6, 1.4))
    patch_lm_head(patched, temperature=temperature)  # updates the defaults of the patched model
    ids = torch.randint(0, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, : L // 2] = 0  # left padding
    labels = ids.masked_fill((mask == 0) | (torch.rand(B, L) < 0.2), -100)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert isinstance(out, FusedLMHeadOutput) and out.log_probs.shape == (B, L - 1)
    logp, ent, loss = _expected(model, ids, mask, labels, temperature)
    assert_close(out.log_probs, logp, name="log_probs")
    assert_close(out.entropy, ent, name="entropy")
    assert_close(out.loss, loss, name="loss")
    _check_grads(model, patched, out, logp, ent)
    # the plain forward is the model's own (rk.patch also fuses its layers: fp32 math rounded once)
    torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)


def test_shift_labels_callable_and_all_masked():
    model = _model("qwen2")
    rk.patch(model)
    ids = torch.randint(0, V, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    a = model(input_ids=ids, labels=labels, fused_lm_head=True, return_entropy=False)
    assert a.entropy is None
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    b = model(input_ids=ids, shift_labels=shifted, fused_lm_head=True)
    assert_close(b.log_probs[:, :-1], a.log_probs.double())
    # a callable gets the hidden states scoring the last logits_to_keep tokens, inside the forward
    c = model(input_ids=ids, logits_to_keep=5, fused_lm_head=lambda h, w, bias: rk.linear_token_logprobs(
        h, w, ids[:, -5:], bias=bias))
    assert_close(c, a.log_probs[:, -5:].double())
    for keep in (8, 9):  # more tokens than have a next token to score: an error naming the key, not a wrapped slice
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(input_ids=ids, logits_to_keep=keep, fused_lm_head=lambda h, w, bias: h)
    full = model(input_ids=ids, logits_to_keep=7, fused_lm_head=lambda h, w, bias: rk.linear_token_logprobs(
        h, w, ids[:, 1:], bias=bias))
    assert_close(full[:, 2:], a.log_probs[:, 2:].double())  # a's first two labels are -100 (log-prob 0)
    # every label masked: zeros, still differentiable
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert out.log_probs.abs().sum() == 0 and out.loss.requires_grad
    out.loss.backward()


def test_generate_unchanged():
    model = _model("llama")
    patched = copy.deepcopy(model)
    rk.patch(patched)
    ids = torch.randint(0, V, (2, 4))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **kw), model.generate(ids, **kw))


def test_patch_twice_and_bad_input():
    model = _model("mistral")
    first = rk.patch(model)
    assert rk.patch(model)["forward"] == first["forward"]  # a bound method: equal, not one object
    with pytest.raises(ValueError, match="temperature"):
        patch_lm_head(model, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        patch_lm_head(model, backend="fast")
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=torch.randint(0, V, (1, 4)), fused_lm_head=True)
    with pytest.raises(ValueError, match="fused_lm_head"):
        model(input_ids=torch.randint(0, V, (1, 4)), fused_lm_head="yes")
    with pytest.raises(ValueError, match="temperature"):
        model(input_ids=torch.randint(0, V, (1, 4)), labels=torch.zeros(1, 4, dtype=torch.long), fused_lm_head=True,
              temperature=0.0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="no module"):
        rk.patch(gpt2)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        patch_lm_head(gpt2)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_cuda_backend_is_auto_for_the_head(family):
    """linear_token_logprobs has no CUDA kernel: rk.patch(backend='cuda') was accepted and every fused_lm_head call
    then failed ('no such kernel'); rk.patch reads 'cuda' as 'auto' for the head (as for the layer ops), a direct
    patch_lm_head(backend='cuda') is refused at once, the model left as it was."""
    torch.manual_seed(0)
    model = _model(family)
    plain = copy.deepcopy(model)
    with pytest.raises(ValueError, match="backend='cuda': linear_token_logprobs"):
        patch_lm_head(model, backend="cuda")
    assert getattr(model, "_r1k_lm_head", None) is None and "forward" not in model.__dict__
    rk.patch(model, backend="cuda")
    assert model._r1k_lm_head["backend"] == "auto"
    ids = torch.randint(0, V, (2, 6))
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
    want, _, _ = _expected(plain, ids, mask, ids, 1.0)
    assert_close(out.log_probs, want, name="log_probs")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_deepcopy_of_a_patched_model_is_its_own(family):
    """A reference copy (copy.deepcopy after rk.patch, as TRL and r1train make one) runs its own weights and
    defaults: after the original's weights move, the copy's plain and fused forwards equal an unpatched model
    loaded with the copy's weights, and gradients land on the copy; patching the copy changes only its defaults."""
    model = _model(family)
    plain = copy.deepcopy(model)
    rk.patch(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, V, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert_close(ref(input_ids=ids).logits, plain(input_ids=ids).logits.double(), torch.float32,
                     name="copy's logits")
    patch_lm_head(ref, temperature=0.5)
    assert model._r1k_lm_head["temperature"] == 1.0
    out = ref(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
    logp, _, _ = _expected(plain, ids, mask, ids, 0.5)
    assert_close(out.log_probs, logp, torch.float32, name="copy's fused log-probs")
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters()) and any(p.grad is not None for p in ref.parameters())


def test_logit_keys_the_forward_does_not_read_do_not_block_the_fused_head():
    """A Llama config carrying logit-scaling keys LlamaForCausalLM.forward never reads (as MPT's carries logit_scale)
    has logits = lm_head's output: the fused head patches and matches them (it was refused, naming the key); a
    model whose forward does scale its logits (Cohere) is still refused."""
    from r1kernels.patch.lm_head import unsupported_reason

    model = _model("llama")
    model.config.logit_scale, model.config.final_logit_softcapping = 0.5, 2.0
    patched = copy.deepcopy(model)
    patch_lm_head(patched)
    ids = torch.randint(0, V, (2, 7))
    mask = torch.ones_like(ids)
    out = patched(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
    logp, ent, _ = _expected(model, ids, mask, ids, 1.0)
    assert_close(out.log_probs, logp, name="log_probs")
    assert_close(out.entropy, ent, name="entropy")
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)
    cohere = transformers.AutoModelForCausalLM.from_config(transformers.CohereConfig(logit_scale=0.3, **common))
    assert "CohereForCausalLM is not one of" in unsupported_reason(cohere)
    with pytest.raises(ValueError, match="no fused lm_head path for this model"):
        patch_lm_head(cohere)


def _gemma(family, softcap=2.0):
    """A tiny Gemma 2 / Gemma 3 text model (eager attention) whose head's logits z are of the cap's size (std ~1.7),
    so that soft-capping changes its log-probs (the default init keeps |z| ~0.1, where c * tanh(z / c) ~ z)."""
    name = {"gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "gemma3n_text": "Gemma3nTextConfig",
            "gemma4_text": "Gemma4TextConfig", "vaultgemma": "VaultGemmaConfig", "nanochat": "NanoChatConfig",
            "beam": "BeamConfig", "recurrent_gemma": "RecurrentGemmaConfig"}[family]
    cfg_cls = getattr(transformers, name, None)
    if cfg_cls is None:  # pyproject allows transformers >= 4.56, before some of these families
        pytest.skip(f"this transformers has no {name}")
    extra = {}  # Gemma 3n's per-layer inputs, LAuReL and AltUp at tiny sizes, one full-attention layer
    if family == "gemma3n_text":
        extra = dict(vocab_size_per_layer_input=V, hidden_size_per_layer_input=8, laurel_rank=4, altup_num_inputs=2,
                     num_kv_shared_layers=0, activation_sparsity_pattern=[0.0], intermediate_size=[48],
                     layer_types=["full_attention"])
    if family == "gemma4_text":  # its full-attention head_dim and per-layer inputs at tiny sizes too
        extra = dict(layer_types=["full_attention"], global_head_dim=8, vocab_size_per_layer_input=V,
                     hidden_size_per_layer_input=8)
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=softcap)
    if family == "recurrent_gemma":  # its cap key; one local-attention block
        drop = ("head_dim", "max_position_embeddings", "final_logit_softcapping")
        kw = {k: v for k, v in kw.items() if k not in drop}
        extra = dict(logits_soft_cap=softcap, lru_width=32, attention_window_size=16, block_types=["attention"])
    cfg = cfg_cls(**{**kw, **extra})
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        model.lm_head.weight.mul_(15)  # tied to the embeddings (Gemma's default): they scale too
    return model.eval()


def _uncapped_logprobs(model, ids, mask, temperature):
    """log_softmax(z / T) of the head's output z, float64 [B, L - 1, V]: what an uncapped fused head would score."""
    with torch.no_grad():
        hidden = getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=mask).last_hidden_state
        z = model.get_output_embeddings()(hidden)[:, :-1]
    return torch.log_softmax(z.double() / temperature, -1)


@pytest.mark.parametrize("family,backend", [("gemma2", "auto"), ("gemma3_text", "auto"), ("gemma3n_text", "auto"),
                                            ("gemma4_text", "auto"), ("vaultgemma", "auto"), ("nanochat", "auto"),
                                            ("beam", "auto"), ("recurrent_gemma", "auto"), ("gemma2", "triton")])
def test_soft_capped_head_matches_logits(family, backend):
    """Gemma 2 / 3 / 3n / 4 text, VaultGemma, NanoChat, Beam, RecurrentGemma (transformers' forward: logits =
    c * tanh(z / c), c = final_logit_softcapping, RecurrentGemma's logits_soft_cap):
    rk.patch gives them the fused lm_head path (they were refused: 'its forward soft-caps its logits'), whose
    log-probs, entropy, loss and gradients equal their own logits' (the cap matters here: the uncapped head's
    log-probs differ); a callable gets softcap=c."""
    from r1kernels.patch.lm_head import unsupported_reason

    if backend == "triton":
        pytest.importorskip("triton")
    model = _gemma(family)
    assert unsupported_reason(model) is None
    patched = copy.deepcopy(model)
    assert list(rk.patch(patched, backend=backend)) == ["forward"]  # no fused layer ops for Gemma
    temperature = float(torch.empty(()).uniform_(0.6, 1.4))
    patch_lm_head(patched, temperature=temperature, backend=backend)
    B, L = 3, 9
    # no pad id 0: its embedding row is zero (padding_idx), and Gemma 3n's AltUp takes mean(h^2) ** 0.5 of it, whose
    # infinite derivative makes the model's own gradients NaN (seen with R1K_TEST_SEED=1519708759)
    ids = torch.randint(1, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, : L // 2] = 0  # left padding
    labels = ids.masked_fill((mask == 0) | (torch.rand(B, L) < 0.2), -100)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    logp, ent, loss = _expected(model, ids, mask, labels, temperature)
    assert_close(out.log_probs, logp, name="log_probs")
    assert_close(out.entropy, ent, name="entropy")
    assert_close(out.loss, loss, name="loss")
    uncapped = _uncapped_logprobs(model, ids, mask, temperature).gather(-1, labels[:, 1:].clamp(min=0)[..., None])
    assert ((uncapped[..., 0] - logp).abs() * (labels[:, 1:] != -100)).max() > 0.1
    _check_grads(model, patched, out, logp, ent)
    # a callable (the TRL drop-in's contract) is called with softcap=c and scores the last logits_to_keep tokens
    got = patched(input_ids=ids, attention_mask=mask, logits_to_keep=5,
                  fused_lm_head=lambda h, w, bias, softcap: rk.linear_token_logprobs(
                      h, w, ids[:, -5:], bias=bias, temperature=temperature, softcap=softcap, backend=backend))
    assert_close(got, _expected(model, ids, mask, ids, temperature)[0][:, -5:], name="callable's log-probs")


def test_soft_cap_read_at_each_call_and_callable_contract():
    """The fused paths read final_logit_softcapping at each call, as the forward does (a cap set after patching is
    applied; none: the head's own logits, and a callable is called with three arguments as before); on a capped
    model a callable that does not declare a softcap parameter is a ValueError naming fused_lm_head (it would score
    the uncapped logits); a cap the kernels cannot apply is refused, naming the model."""
    from r1kernels.patch.lm_head import unsupported_reason

    model = _gemma("gemma3_text", softcap=None)
    patch_lm_head(model)
    ids = torch.randint(0, V, (2, 6))
    mask = torch.ones_like(ids)
    for cap in (None, 3.0):
        model.config.final_logit_softcapping = cap
        out = model(input_ids=ids, attention_mask=mask, labels=ids, fused_lm_head=True)
        logp, ent, _ = _expected(model, ids, mask, ids, 1.0)
        assert_close(out.log_probs, logp, name=f"log_probs, cap {cap}")
        assert_close(out.entropy, ent, name=f"entropy, cap {cap}")
    model.config.final_logit_softcapping = None
    seen = []
    model(input_ids=ids, fused_lm_head=lambda *a, **k: seen.append((len(a), k)))
    assert seen == [(3, {})]
    model.config.final_logit_softcapping = 3.0
    model(input_ids=ids, fused_lm_head=lambda *a, softcap, **k: seen.append((len(a), dict(k, softcap=softcap))))
    assert seen[-1] == (3, {"softcap": 3.0})
    with pytest.raises(ValueError, match="fused_lm_head: Gemma3ForCausalLM soft-caps its logits at 3"):
        model(input_ids=ids, fused_lm_head=lambda h, w, bias: h)
    model.config.final_logit_softcapping = 0.0  # transformers' forward would divide by 0
    assert "which the fused head kernels do not compute" in unsupported_reason(model)
    with pytest.raises(ValueError, match="model: no fused lm_head path"):
        model(input_ids=ids, labels=ids, fused_lm_head=True)
    with pytest.raises(ValueError, match="no fused lm_head path.*final_logit_softcapping=0.0"):
        patch_lm_head(_gemma("gemma2", softcap=0.0))


def test_soft_capped_model_refuses_a_kwargs_catch_all_callable():
    """A **kwargs catch-all does not declare softcap: a callable that takes it there can drop the cap and score
    the uncapped logits without an error, so on a capped model it is a ValueError naming fused_lm_head, before
    the callable runs; one that declares softcap (keyword-only too) is called with it."""
    model = _gemma("gemma2")
    patch_lm_head(model)
    ids = torch.randint(0, V, (2, 6))
    called = []

    def drops_cap(h, w, b, **kw):
        called.append(kw)
        return rk.linear_token_logprobs(h, w, ids[:, 1:], bias=b)  # the uncapped log-probs

    for fn in (drops_cap, lambda *a, **kw: called.append(kw)):
        with pytest.raises(ValueError, match=r"^fused_lm_head: Gemma2ForCausalLM .*declare a softcap parameter"):
            model(input_ids=ids, fused_lm_head=fn)
    assert called == []
    model(input_ids=ids, fused_lm_head=lambda h, w, b, *, softcap, **kw: called.append(softcap))
    assert called == [2.0]


def test_soft_capped_model_reads_a_module_callables_forward():
    """A torch.nn.Module passed as fused_lm_head is called through Module.__call__ (*args, **kwargs): whether it
    takes softcap is its forward's signature (also under torch.compile's wrapper), so a head module that declares
    softcap gets it and one whose forward does not is refused."""
    model = _gemma("gemma2")
    patch_lm_head(model)
    ids = torch.randint(0, V, (2, 6))
    seen = []

    class Head(torch.nn.Module):
        def forward(self, h, w, b=None, softcap=None):
            seen.append(softcap)
            return rk.linear_token_logprobs(h, w, ids[:, 1:], bias=b, softcap=softcap)

    class NoCap(torch.nn.Module):
        def forward(self, h, w, b=None, **kw):
            return rk.linear_token_logprobs(h, w, ids[:, 1:], bias=b)

    want = model(input_ids=ids, fused_lm_head=Head().forward)
    got = model(input_ids=ids, fused_lm_head=Head())
    assert seen == [2.0, 2.0] and torch.equal(got, want)
    with pytest.raises(ValueError, match=r"^fused_lm_head: Gemma2ForCausalLM .*declare a softcap parameter"):
        model(input_ids=ids, fused_lm_head=NoCap())
    compiled = torch.compile(Head(), backend="eager")
    model(input_ids=ids, fused_lm_head=compiled)
    assert seen[-1] == 2.0


def _labels(B, L):
    ids = torch.randint(0, V, (B, L))
    return ids, torch.ones(B, L, dtype=torch.long), ids.masked_fill(torch.rand(B, L) < 0.2, -100)


def test_repatch_goes_over_a_forward_wrapped_since_and_keeps_unnamed_options():
    """Something that wraps the fused forward after patching (TRL's GRPOTrainer puts its own fused-head forward
    over it, taking fused_lm_head itself) is wrapped again by the next patch: the fused call is ours again (it
    reached the wrapper, which failed); plain calls still pass through it. A re-patch sets only the options it
    names (rk.patch's backend kept the temperature and fp32 head; it reset them to 1.0 / False)."""
    B, L = int(torch.randint(1, 4, ())), int(torch.randint(3, 12, ()))
    model = _model("qwen2")
    patched = copy.deepcopy(model)
    temperature = float(torch.empty(()).uniform_(0.5, 0.9))
    patch_lm_head(patched, temperature=temperature, fp32_lm_head=True)
    seen = []
    inner = patched.forward

    def foreign(*args, fused_lm_head=None, **kwargs):  # takes fused_lm_head as its own, as TRL's does
        seen.append(fused_lm_head)
        if fused_lm_head is not None:
            raise TypeError("the foreign fused path")
        return inner(*args, **kwargs)

    patched.forward = foreign
    rk.patch(patched, backend="torch")
    ids, mask, labels = _labels(B, L)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    state = patched._r1k_lm_head
    assert (state["temperature"], state["fp32"], state["backend"]) == (temperature, True, "torch")
    logp, ent, _ = _expected(model, ids, mask, labels, temperature)
    assert_close(out.log_probs, logp, name="log_probs")
    assert_close(out.entropy, ent, name="entropy")
    torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)
    assert seen == [None]  # the plain call went through the foreign forward; the fused one did not


def test_fused_head_of_a_float64_model_is_float64():
    B, L = int(torch.randint(1, 4, ())), int(torch.randint(3, 12, ()))
    model = _model("llama").double()
    patched = copy.deepcopy(model)
    patch_lm_head(patched, backend="torch")
    ids, mask, labels = _labels(B, L)
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    logp, ent, loss = _expected(model, ids, mask, labels, 1.0)
    assert out.log_probs.dtype == torch.float64
    torch.testing.assert_close(out.log_probs, logp)
    torch.testing.assert_close(out.entropy, ent)
    torch.testing.assert_close(out.loss, loss)


@pytest.mark.parametrize("name", ["labels", "shift_labels"])
def test_labels_of_another_shape_are_an_error_naming_them(name):
    model = _model("qwen3")
    patch_lm_head(model)
    B, L = int(torch.randint(1, 4, ())), int(torch.randint(3, 12, ()))
    ids, mask, labels = _labels(B, L)
    for bad in (labels[:, 1:], labels[:1].expand(B + 1, L)):
        with pytest.raises(ValueError, match=rf"{name} must have shape \({B}, {L}\)"):
            model(input_ids=ids, attention_mask=mask, fused_lm_head=True, **{name: bad})


def _own_logits(model, ids, mask):
    """The model's own next-token logits [B, L - 1, V] in float64 (its forward's soft-cap included)."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()


def _expected_extras(logits, labels, temperature):
    """TRL's FusedCausalLMOutput extras of the next-token labels from float64 logits [B, L - 1, V], 0 / False at -100:
    log sum_v p_v^2 (as logsumexp of 2 log p), mean_v logits / T, label == argmax; the gap between the two largest
    logits / T (argmax is only compared where rounding cannot swap them) and the scale of the mean's terms."""
    x = logits / temperature
    y = labels[:, 1:]
    keep = y != -100
    top2 = x.topk(2, -1).values
    return dict(log_sum_sq_probs=torch.logsumexp(2 * torch.log_softmax(x, -1), -1) * keep,
                mean_logits=x.mean(-1) * keep, is_top1=(x.argmax(-1) == y) & keep,
                gap=top2[..., 0] - top2[..., 1], mean_scale=(x.abs().mean(-1) * keep).norm().item())


def _labels_half_argmax(ids, mask, logits):
    """Next-token labels of ids, about half of them the model's own argmax (is_top1 True there); -100 at padding
    and at about 20% of the rest."""
    B, L = ids.shape
    top = torch.cat([ids[:, :1], logits.argmax(-1)], 1)
    labels = torch.where(torch.rand(B, L) < 0.5, top, ids)
    return labels.masked_fill((mask == 0) | (torch.rand(B, L) < 0.2), -100)


def _check_extras(out, want, dtype=torch.float32):
    keep = out.label_mask
    assert_close(out.log_sum_sq_probs, want["log_sum_sq_probs"], dtype, name="log_sum_sq_probs")
    assert_close(out.mean_logits, want["mean_logits"], dtype, name="mean_logits", scale=want["mean_scale"])
    assert out.is_top1.dtype == torch.bool and not out.is_top1[~keep].any()
    clear = want["gap"] > 1e-4
    assert torch.equal(out.is_top1[clear], want["is_top1"][clear])
    for name in EXTRA_OUTPUTS:
        assert not getattr(out, name).requires_grad, name


@pytest.mark.parametrize("family,dtype", [("qwen2", torch.float32), ("llama", torch.float32),
                                          ("gemma2", torch.float32), ("llama", torch.float64)])
@pytest.mark.parametrize("B,L", [(1, 2), (3, 9), (2, 17)])
def test_extra_outputs_match_logits(family, dtype, B, L):
    """extra_outputs: log_sum_sq_probs, mean_logits and is_top1 (TRL's names, read by its SFT / DPO / KTO trainers)
    of the model's own logits / T in float64 (Gemma 2's soft-capped ones), 0 / False at -100 labels, without
    gradient, in the log-probs' dtype; log-probs, entropy and loss are unchanged; not asked for: None."""
    model = (_gemma("gemma2") if family == "gemma2" else _model(family, bias=family == "llama")).to(dtype)
    patched = copy.deepcopy(model)
    temperature = float(torch.empty(()).uniform_(0.6, 1.4))
    patch_lm_head(patched, temperature=temperature, backend="torch" if dtype == torch.float64 else None)
    ids = torch.randint(1, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, : L // 2] = 0  # left padding
    logits = _own_logits(model, ids, mask)
    labels = _labels_half_argmax(ids, mask, logits)
    plain = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert all(getattr(plain, name) is None for name in EXTRA_OUTPUTS)
    patch_lm_head(patched, extra_outputs=("is_top1", "mean_logits", "log_sum_sq_probs"))
    out = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert out.mean_logits.dtype == out.log_sum_sq_probs.dtype == out.log_probs.dtype == dtype
    _check_extras(out, _expected_extras(logits, labels, temperature), dtype)
    logp, ent, loss = _expected(model, ids, mask, labels, temperature)
    assert_close(out.log_probs, logp, dtype, name="log_probs")
    assert_close(out.entropy, ent, dtype, name="entropy")
    assert_close(out.loss, loss, dtype, name="loss")
    patch_lm_head(patched, extra_outputs=("mean_logits",))  # only what is named
    one = patched(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert one.is_top1 is None and one.log_sum_sq_probs is None and torch.equal(one.mean_logits, out.mean_logits)
    for bad in ("is_top1", ("token_accuracy",), 3, [None], [["is_top1"]]):
        with pytest.raises(ValueError, match="extra_outputs"):
            patch_lm_head(patched, extra_outputs=bad)


def test_extra_outputs_of_an_all_masked_batch_are_zeros():
    model = _model("qwen2")
    patch_lm_head(model, extra_outputs=EXTRA_OUTPUTS)
    ids = torch.randint(0, V, (2, 5))
    out = model(input_ids=ids, labels=torch.full_like(ids, -100), fused_lm_head=True)
    assert out.log_sum_sq_probs.abs().sum() == 0 and out.mean_logits.abs().sum() == 0 and not out.is_top1.any()
    assert out.is_top1.shape == out.mean_logits.shape == (2, 4)


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy"), ("log_probs", "entropy", "is_top1"),
                                     ("log_probs", "entropy", "mean_logits"),
                                     ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")])
def test_patch_over_trls_fused_head_takes_its_options(outputs):
    """A model TRL's add_fused_lm_head has patched (what its trainers do when built: SFT asks for is_top1, DPO for
    mean_logits and is_top1 (+ log_sum_sq_probs), KTO for mean_logits) and rk.patch then goes over: the fused call
    is ours and returns every field TRL's forward returns (were missing: AttributeError in TRL's trainers), at TRL's
    temperature and fp32 head setting, against the model's own float64 logits; the others are None as TRL's are."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    B, L = int(torch.randint(1, 4, ())), int(torch.randint(3, 12, ()))
    model = _model("qwen2")
    plain = copy.deepcopy(model)
    temperature, fp32 = float(torch.empty(()).uniform_(0.6, 1.4)), bool(torch.randint(0, 2, ()))
    trl_utils.add_fused_lm_head(model, temperature=temperature, cast_lm_head_to_fp32=fp32, outputs=outputs)
    trl_forward = model.forward
    rk.patch(model, backend="torch")
    state = model._r1k_lm_head
    assert (state["temperature"], state["fp32"], state["return_entropy"]) == (temperature, fp32, "entropy" in outputs)
    assert state["extra_outputs"] == tuple(n for n in EXTRA_OUTPUTS if n in outputs)
    ids = torch.randint(0, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    logits = _own_logits(plain, ids, mask)
    labels = _labels_half_argmax(ids, mask, logits)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert isinstance(out, FusedLMHeadOutput)
    theirs = trl_forward(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    for name in ("entropy", *EXTRA_OUTPUTS):
        assert (getattr(out, name) is None) == (getattr(theirs, name) is None), name
    logp, ent, loss = _expected(plain, ids, mask, labels, temperature)
    assert_close(out.log_probs, logp, name="log_probs")
    assert_close(out.loss, loss, name="loss")
    if "entropy" in outputs:
        assert_close(out.entropy, ent, name="entropy")
    want = _expected_extras(logits, labels, temperature)
    for name in EXTRA_OUTPUTS:
        if name in outputs:
            kw = {"scale": want["mean_scale"]} if name == "mean_logits" else {}
            got = getattr(out, name)
            if got.dtype == torch.bool:
                clear = want["gap"] > 1e-4
                assert torch.equal(got[clear], want[name][clear]) and torch.equal(got[clear], theirs.is_top1[clear])
            else:
                assert_close(got, want[name], name=name, **kw)
    # a later explicit option wins over TRL's
    patch_lm_head(model, temperature=1.0, extra_outputs=())
    assert state["temperature"] == 1.0 and state["extra_outputs"] == ()


def _trl_trainer(kind, path, tok, out_dir, seed, n):
    """A TRL SFT / DPO / KTO trainer of the tiny model saved at path on arithmetic rows of the numbers n (one step,
    SGD, CPU)."""
    import trl
    from datasets import Dataset

    common = dict(output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=2, report_to="none",
                  use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True, logging_steps=1, optim="sgd",
                  learning_rate=0.1, seed=seed)
    if kind == "sft":
        rows, cls, cfg = [{"prompt": f"{i}+{i}=", "completion": f"{2 * i}"} for i in n], trl.SFTTrainer, trl.SFTConfig
    elif kind == "dpo":
        rows = [{"prompt": f"{i}+{i}=", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"} for i in n]
        cls, cfg = trl.DPOTrainer, trl.DPOConfig
    else:
        rows = [{"prompt": f"{i}+{i}=", "completion": f"{2 * i + k % 2}", "label": k % 2 == 0}
                for k, i in enumerate(n)]
        cls, cfg = trl.KTOTrainer, trl.KTOConfig
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return cls(model=model, args=cfg(**common), train_dataset=Dataset.from_list(rows), processing_class=tok)


@pytest.mark.parametrize("kind", ["sft", "dpo", "kto"])
def test_trl_trainers_run_on_a_model_patched_after_them(kind, tmp_path):
    """TRL 1.16's SFTTrainer / DPOTrainer / KTOTrainer built on a model, then rk.patch(model): a training step runs
    through r1kernels' fused head (it failed: 'FusedLMHeadOutput' object has no attribute 'is_top1' / 'mean_logits')
    and logs what the same trainer logs with TRL's own fused head (loss, grad_norm, entropy, mean_token_accuracy,
    logits/*, ...)."""
    pytest.importorskip("trl")
    from r1train.tasks.models import tiny_model
    from r1train.tasks.tokenizer import char_tokenizer

    tok = char_tokenizer()
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    tiny_model("tiny-qwen2", tok, seed=seed, hidden_size=32, num_layers=1).save_pretrained(tmp_path / "m")
    n = [int(x) for x in torch.randint(0, 50, (4,))]
    logs = []
    for patched in (False, True):
        tr = _trl_trainer(kind, str(tmp_path / "m"), tok, tmp_path / str(patched), seed, n)
        if patched:
            rk.patch(tr.model, backend="torch")
            assert isinstance(tr.model.forward, type(tr.model._r1k_lm_head["forward"]))
        tr.train()
        logs.append(tr.state.log_history[0])
    want, got = logs
    keys = {k for k in want if isinstance(want[k], float) and k not in ("epoch", "learning_rate")}
    assert keys == {k for k in got if isinstance(got[k], float) and k not in ("epoch", "learning_rate")}
    assert {"loss", "grad_norm", "entropy"} <= keys
    for k in keys:
        assert_close(torch.tensor(got[k]), torch.tensor(want[k], dtype=torch.float64), name=k)
