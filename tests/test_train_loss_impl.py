"""loss_impl: what each model's forward applies to its lm_head's output (r1kernels.patch.lm_head.logit_scaling),
checked against the model's own logits; the linear path (rollout.Policy) of a model that multiplies its logits by s
(Cohere's logit_scale, Granite's 1 / logits_scaling, HyperCLOVAX's logits_scaling) scores at temperature T / s and
gives the model's own log-probs, entropy and gradients (it was refused: a ConfigError telling to set
loss_impl=logits, with the default config), and so does a soft-capped head (Gemma 2's final_logit_softcapping, the
kernels' softcap; it took the logits path); loss_impl=auto (r1train.loading.loss_impl_for, the default) takes the
model's own logits where the fused head cannot follow (a logit rule not known, an lm_head other than a
torch.nn.Linear, a LoRA adapter on lm_head) and linear otherwise; an explicit linear there is a ConfigError naming
loss_impl."""

import logging

import pytest
import torch
from conftest import assert_close

transformers = pytest.importorskip("transformers")

from r1kernels.patch.lm_head import logit_scaling  # noqa: E402
from r1train.config import ConfigError, TrainConfig, load_config  # noqa: E402
from r1train.loading import loss_impl_for  # noqa: E402
from r1train.rollout import Policy, logprob_fn  # noqa: E402

V = 61
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
# family -> (config, what its forward does to z = lm_head(hidden) as transformers' modeling code reads: ("scale", s)
# for logits = s * z, ("softcap", c) for c * tanh(z / c))
FAMILIES = {
    "cohere": (lambda: transformers.CohereConfig(logit_scale=0.3, **COMMON), ("scale", 0.3)),
    "cohere2": (lambda: transformers.Cohere2Config(logit_scale=0.3, **COMMON), ("scale", 0.3)),
    "granite": (lambda: transformers.GraniteConfig(logits_scaling=4.0, **COMMON), ("scale", 0.25)),
    "granitemoe": (lambda: transformers.GraniteMoeConfig(logits_scaling=4.0, num_local_experts=2,
                                                         num_experts_per_tok=1, **COMMON), ("scale", 0.25)),
    # logits_scaling = hidden_size / dim_model_base, dividing the hidden states before an unbiased lm_head
    "minicpm3": (lambda: transformers.MiniCPM3Config(**dict(COMMON, num_key_value_heads=4), dim_model_base=8,
                                                     q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                                     qk_rope_head_dim=8, v_head_dim=8), ("scale", 0.25)),
    "hyperclovax": (lambda: transformers.HyperCLOVAXConfig(logits_scaling=3.0, **COMMON), ("scale", 3.0)),
    "falcon_h1": (lambda: transformers.FalconH1Config(lm_head_multiplier=2.5, **COMMON), ("scale", 2.5)),
    "gemma2": (lambda: transformers.Gemma2Config(final_logit_softcapping=2.0, head_dim=8, **COMMON),
               ("softcap", 2.0)),
    "gemma3_text": (lambda: transformers.Gemma3TextConfig(final_logit_softcapping=2.0, head_dim=8, **COMMON),
                    ("softcap", 2.0)),
    # MPT's config carries logit_scale, which MptForCausalLM.forward does not apply
    "mpt": (lambda: transformers.MptConfig(vocab_size=V, d_model=32, n_heads=4, n_layers=1, logit_scale=0.5),
            ("scale", 1.0)),
    # keys Qwen2's forward does not read
    "qwen2": (lambda: transformers.Qwen2Config(logit_scale=0.5, final_logit_softcapping=2.0, **COMMON),
              ("scale", 1.0)),
}


def _model(family, **overrides):
    cfg = FAMILIES[family][0]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _cfg(*overrides) -> TrainConfig:
    return load_config(overrides=["report_to=none", *overrides])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logit_scaling_is_what_the_forward_applies(family):
    model = _model(family)
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
        base = getattr(model, model.base_model_prefix)
        z = model.get_output_embeddings()(base(input_ids=ids).last_hidden_state).double()
    kind, value = FAMILIES[family][1]
    want = z * value if kind == "scale" else value * torch.tanh(z / value)
    assert_close(logits, want, name=f"{family} logits")  # the table entry is the forward's own rule
    got = logit_scaling(model)
    if kind == "scale":
        assert got.scale == pytest.approx(value) and got.softcap is None
        assert got.head_kwargs == ({} if value == 1.0 else {"logit_scale": pytest.approx(value)})
    else:
        assert got.scale == 1.0 and got.softcap == value and got.head_kwargs == {"softcap": value}
    if value == 1.0:  # keys the forward does not read are not reported
        assert got.keys == () and str(got) == "its logits are its lm_head's output"


@pytest.mark.parametrize("family", ["cohere", "granite", "hyperclovax", "gemma2", "gemma3_text"])
def test_linear_policy_gives_the_model_own_logprobs_entropy_and_gradients(family):
    model = _model(family)
    B, P, T = 3, 5, 7
    ids = torch.randint(0, V, (B, P + T))
    mask = torch.ones_like(ids)
    comp = ids[:, P:]
    temperature = float(torch.empty(()).uniform_(0.6, 1.4))
    kind, value = FAMILIES[family][1]
    if kind == "softcap":  # head logits of the cap's size, so that the cap changes the log-probs
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(15)
    pol = Policy(model, "linear")
    assert pol.head_kwargs == {"logit_scale" if kind == "scale" else "softcap": pytest.approx(value)}
    logp, ent = pol(ids, mask, T, logprob_fn(comp, temperature, return_entropy=True, backend="torch"))
    # the model's own logits (its forward applies the scale), at the temperature
    all_lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, P - 1:-1].double() / temperature,
                               -1)
    want_lp = all_lp.gather(-1, comp[..., None])[..., 0]
    want_ent = -(all_lp.exp() * all_lp).sum(-1)
    assert_close(logp, want_lp, name="log-probs")
    assert_close(ent, want_ent, name="entropy")
    g1, g2 = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad((logp * g1.float()).sum() + (ent * g2.float()).sum(), params, allow_unused=True)
    want = torch.autograd.grad((want_lp * g1).sum() + (want_ent * g2).sum(), params, allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), got, want):
        if b is not None:
            assert_close(a, b, name=f"grad {n}")


def test_auto_resolves_each_model_and_explicit_linear_refuses(caplog):
    caplog.set_level(logging.INFO, logger="r1train")
    auto, linear, logits = _cfg(), _cfg("loss_impl=linear"), _cfg("loss_impl=logits")
    assert auto.loss_impl == "auto"  # the default
    plain, scaled, capped = _model("qwen2"), _model("cohere"), _model("gemma2")
    assert loss_impl_for(plain, auto, log=True) == loss_impl_for(plain, linear) == "linear"
    assert caplog.records[-1].levelno == logging.INFO and "loss_impl=auto: linear" in caplog.messages[-1]
    assert loss_impl_for(scaled, auto, log=True) == loss_impl_for(scaled, linear) == "linear"
    assert "logit_scale=0.3" in caplog.messages[-1]
    assert loss_impl_for(capped, auto, log=True) == loss_impl_for(capped, linear) == "linear"
    assert caplog.records[-1].levelno == logging.INFO
    assert "soft-caps its logits (final_logit_softcapping=2.0), softcap=2" in caplog.messages[-1]
    n = len(caplog.records)
    assert loss_impl_for(capped, auto) == "linear" and len(caplog.records) == n  # log=False: no line
    for m in (plain, scaled, capped):
        assert loss_impl_for(m, logits) == "logits"


def test_auto_takes_logits_where_the_head_is_not_known():
    auto, linear = _cfg(), _cfg("loss_impl=linear")
    # a model type whose use of a logit key is not known here (Gemma's forward ignores logit_scale, but nothing
    # here says so)
    unknown = transformers.AutoModelForCausalLM.from_config(
        transformers.GemmaConfig(logit_scale=0.5, head_dim=8, **COMMON))
    assert loss_impl_for(unknown, auto) == "logits"
    with pytest.raises(ConfigError, match="loss_impl=linear: GemmaForCausalLM: its config sets logit_scale=0.5, "
                                          "which r1kernels does not know"):
        loss_impl_for(unknown, linear)
    # rollout.Policy gives the same reason (LogitScaling.unfused_reason), once
    with pytest.raises(ValueError, match=r"^loss_impl='linear': GemmaForCausalLM: its config sets logit_scale=0.5, "
                                         "which r1kernels does not know how its forward applies; use 'logits'$"):
        Policy(unknown, "linear")
    # a cap outside the kernels' float32 range (_checks.MIN_SOFTCAP..MAX_SOFTCAP)
    for cap in (1e5, 1e-5):
        capped = _model("gemma2", final_logit_softcapping=cap)
        assert logit_scaling(capped).head_kwargs is None and loss_impl_for(capped, auto) == "logits"
        with pytest.raises(ConfigError, match="loss_impl=linear: Gemma2ForCausalLM: its forward soft-caps its logits "
                                              r"\(final_logit_softcapping=.*which the fused head kernels do not"):
            loss_impl_for(capped, linear)

    class ScaledHead(torch.nn.Linear):  # a head with its own output rule (e.g. transformers' DoryLMHead)
        def forward(self, x):
            return 2 * super().forward(x)

    model = _model("qwen2")
    model.lm_head = ScaledHead(32, V, bias=False)
    assert loss_impl_for(model, auto) == "logits"
    with pytest.raises(ConfigError, match="loss_impl=linear: Qwen2ForCausalLM's lm_head is a ScaledHead"):
        loss_impl_for(model, linear)


def test_lora_on_lm_head_takes_logits_unless_linear_is_asked():
    pytest.importorskip("peft")
    lora = ["use_peft=true", "lora_target_modules=q_proj,lm_head"]
    cfg = _cfg(*lora)  # no error: auto
    assert loss_impl_for(_model("qwen2"), cfg) == "logits"
    with pytest.raises(ConfigError, match="loss_impl=linear: lora_target_modules puts a LoRA adapter on lm_head"):
        _cfg(*lora, "loss_impl=linear")
    assert _cfg(*lora, "loss_impl=logits").loss_impl == "logits"


@pytest.mark.parametrize("quantile,family", [("1.0", "cohere"), ("0.5", "cohere"), ("1.0", "gemma2"),
                                             ("0.5", "gemma2")])
def test_grpo_loss_of_a_scaled_head_scores_the_model_own_logprobs(tmp_path, quantile, family):
    """A scaled head (Cohere) and a soft-capped one (Gemma 2) on the fused loss (quantile 1) and the log-prob
    path (quantile 0.5): the model's own log-probs and entropy."""
    import train_helpers as H

    from r1train.grpo import GRPOTrainer
    from r1train.tasks import char_tokenizer

    tok = char_tokenizer()
    common = dict(COMMON, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    mc = transformers.CohereConfig(**common, logit_scale=0.3) if family == "cohere" else \
        transformers.Gemma2Config(**common, final_logit_softcapping=2.0, head_dim=8)
    model = transformers.AutoModelForCausalLM.from_config(mc, dtype=torch.float32)
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "temperature=0.7", "log_entropy=true",
                                          f"top_entropy_quantile={quantile}", "rollout_engine=transformers"])
    rows = [{"prompt": "What is 3+4?", "answer": "7"}] * 2
    t = GRPOTrainer(cfg, model, tok, rows, reward_funcs=[H.digit_share])
    assert t.loss_impl == "linear"
    B, P, T = 4, 5, 6
    ids = torch.randint(3, len(tok), (B, P + T))
    mask, comp = torch.ones(B, T), ids[:, P:]
    out, ent = t.micro_step(ids, torch.ones_like(ids), comp, torch.randn(B), mask, None, None,
                            mask.sum().reshape(1), T)
    with torch.no_grad():
        all_lp = torch.log_softmax(model(input_ids=ids).logits[:, P - 1:-1].double() / 0.7, -1)
    assert_close(out.per_token_logprobs, all_lp.gather(-1, comp[..., None])[..., 0], name="log-probs")
    assert_close(ent, -(all_lp.exp() * all_lp).sum(-1).mean(), name="entropy")
