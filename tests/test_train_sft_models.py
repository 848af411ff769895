"""SFT on models that are not plain Qwen/Llama: Gemma 2's attention logit soft-capping, which padding_free's packed
attention ignored (it trained on other attention outputs than the model's own, with no error; now an error naming
padding_free, before any update; without the soft-capping the packed step's loss is the model's own NLL); its
final logit soft-capping, which the fused head kernels apply (softcap; the default loss_impl=auto took the logits
path for it, an explicit linear was a ConfigError): every loss_impl trains on the model's own NLL; and Cohere's /
Granite's logit scale, which the default config refused (a ConfigError telling to set loss_impl=logits): the linear
path now scores at temperature / scale, the model's own NLL."""

import copy

import pytest
import torch
import train_helpers as H

from r1train.config import load_config
from r1train.tasks import char_tokenizer

ROWS = [{"prompt": "What is 3+4?", "completion": "<think>3+4=7</think><answer>7</answer>"},
        {"prompt": "Hi", "completion": "<answer>8</answer>"},
        {"prompt": "What is 12+5-2?", "completion": "15"}]


def _gemma2(tok, attn_softcap, final_softcap=None):
    """A tiny Gemma 2 (eager attention: the one that applies the soft-capping) with large attention and output
    logits, so that soft-capping them changes the outputs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    mc = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                      final_logit_softcapping=final_softcap, attn_logit_softcapping=attn_softcap,
                      pad_token_id=tok.pad_token_id)
    mc._attn_implementation = "eager"
    model = Gemma2ForCausalLM(mc)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(30)
        model.lm_head.weight.mul_(30)  # large logits too (tied to the embeddings: not in named_parameters)
    return model


def _hand_nll(model, tok, rows):
    """Mean over the rows' completion tokens (+ eos) of -log p(token | the tokens before it), one plain HF forward
    per row (the model's own attention)."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            prompt = tok(r["prompt"])["input_ids"]
            ids = torch.tensor(tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"])
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)[:-1].gather(1, ids[1:, None])[:, 0]
            nll, n = nll - logp[len(prompt) - 1:].sum().item(), n + len(ids) - len(prompt)
    return nll / n


@pytest.mark.parametrize("softcap", [None, 0.5])
def test_sft_padding_free_refuses_attention_it_does_not_compute(tmp_path, softcap):
    from r1train.sft import SFTTrainer

    tok = char_tokenizer()
    base = _gemma2(tok, softcap)
    want = _hand_nll(copy.deepcopy(base).eval(), tok, ROWS)
    for pf in ("false", "true"):
        cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / pf}", "max_length=64", f"padding_free={pf}",
                                              "per_device_train_batch_size=3"])
        model = copy.deepcopy(base)
        t = SFTTrainer(cfg, model, tok, ROWS, [])
        if softcap is not None and pf == "true":
            p0 = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(ValueError, match=r"padding_free: Gemma2Attention's attention passes softcap=0.5, "
                                                 r"which r1train's packed attention does not implement; set "
                                                 r"padding_free=false"):
                t.train_step(0, ROWS)
            assert all(torch.equal(a, b) for a, b in zip(p0, model.parameters()))  # no update
        else:
            assert t.train_step(0, ROWS)["loss"] == pytest.approx(want, rel=1e-5)


def test_sft_soft_capped_head_trains_on_its_own_logits(tmp_path, caplog):
    from r1train.rollout import sequence_logprobs
    from r1train.sft import SFTTrainer

    tok = char_tokenizer()
    base = _gemma2(tok, None, final_softcap=2.0)
    want = _hand_nll(copy.deepcopy(base).eval(), tok, ROWS)
    uncapped = copy.deepcopy(base).eval()
    uncapped.config.final_logit_softcapping = None  # the logits the fused head kernels compute: hidden @ W.T
    assert abs(_hand_nll(uncapped, tok, ROWS) - want) > 0.1 * want  # what loss_impl=linear would train on
    for impl in (None, "logits", "linear"):  # None: the default (auto), the fused head with softcap=2
        keys = [f"output_dir={tmp_path / str(impl)}", "max_length=64", "per_device_train_batch_size=3"]
        cfg = load_config(overrides=H.FAST + keys + ([f"loss_impl={impl}"] if impl else []))
        caplog.clear()
        t = SFTTrainer(cfg, copy.deepcopy(base), tok, ROWS, [])
        want_impl = impl or "linear"
        assert t.loss_impl == want_impl and t.engine.module.impl == want_impl
        assert t.engine.module.head_kwargs == ({"softcap": 2.0} if want_impl == "linear" else {})
        assert not any(m.startswith("loss_impl=auto: logits") for m in caplog.messages)
        ids = torch.tensor([tok("What is 3+4?<answer>7</answer>")["input_ids"]])
        with torch.no_grad():  # the training forward's log-probs are the model's own
            got = sequence_logprobs(t.engine.module, ids, torch.ones_like(ids), ids[:, 5:], backend="torch")
            own = torch.log_softmax(base(ids).logits[0, 4:-1].double(), -1).gather(1, ids[0, 5:, None])[:, 0]
        torch.testing.assert_close(got[0].double(), own, rtol=1e-5, atol=1e-6)
        assert t.train_step(0, ROWS)["loss"] == pytest.approx(want, rel=1e-5)


def _scaled(family, tok):
    """A tiny Cohere (logits * logit_scale) or Granite (logits / logits_scaling) with large logits."""
    import transformers

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, pad_token_id=tok.pad_token_id)
    mc = (transformers.CohereConfig(logit_scale=0.3, **common) if family == "cohere" else
          transformers.GraniteConfig(logits_scaling=4.0, **common))
    model = transformers.AutoModelForCausalLM.from_config(mc, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)
    return model


@pytest.mark.parametrize("family", ["cohere", "granite"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_scaled_head_trains_linear_on_its_own_logits(tmp_path, family, padding_free):
    from r1train.sft import SFTTrainer

    tok = char_tokenizer()
    base = _scaled(family, tok)
    want = _hand_nll(copy.deepcopy(base).eval(), tok, ROWS)
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=64", "per_device_train_batch_size=3",
                                          f"padding_free={str(padding_free).lower()}"])
    t = SFTTrainer(cfg, copy.deepcopy(base), tok, ROWS, [])
    assert t.loss_impl == "linear"
    assert t.engine.module.head_kwargs == {"logit_scale": pytest.approx(0.3 if family == "cohere" else 0.25)}
    assert t.train_step(0, ROWS)["loss"] == pytest.approx(want, rel=1e-5)


def test_packed_attention_refuses_a_non_causal_attention_module():
    """transformers' sdpa reads the attention module's is_causal attribute (Gemma 3's bidirectional attention sets
    it False without passing a keyword): packed attention, causal, refuses it; a causal module passes."""
    import types

    from r1train.packing import check_attention_kwargs

    check_attention_kwargs(types.SimpleNamespace(is_causal=True), {"softcap": None, "is_causal": True})
    with pytest.raises(ValueError, match="padding_free: SimpleNamespace's attention passes is_causal=False"):
        check_attention_kwargs(types.SimpleNamespace(is_causal=False), {})
