"""SFT on models that are not plain Qwen/Llama: Gemma 2's attention logit soft-capping, which padding_free's packed
attention ignored (it trained on other attention outputs than the model's own, with no error; now an error naming
padding_free, before any update; without the soft-capping the packed step's loss is the model's own NLL), and its
final logit soft-capping, which loss_impl=linear's fused head kernels ignored (a wrong loss with no error; now a
ConfigError naming loss_impl, while loss_impl=logits trains on the model's own NLL)."""

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


def test_sft_loss_impl_linear_refuses_a_soft_capped_head(tmp_path):
    from r1train.config import ConfigError
    from r1train.sft import SFTTrainer

    tok = char_tokenizer()
    base = _gemma2(tok, None, final_softcap=2.0)
    want = _hand_nll(copy.deepcopy(base).eval(), tok, ROWS)
    uncapped = copy.deepcopy(base).eval()
    uncapped.config.final_logit_softcapping = None  # the logits the fused head kernels compute: hidden @ W.T
    assert abs(_hand_nll(uncapped, tok, ROWS) - want) > 0.1 * want  # what loss_impl=linear trained on before
    for impl in ("linear", "logits"):
        cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / impl}", "max_length=64", f"loss_impl={impl}",
                                              "per_device_train_batch_size=3"])
        if impl == "linear":
            with pytest.raises(ConfigError, match=r"loss_impl=linear: Gemma2ForCausalLM's config sets "
                                                  r"final_logit_softcapping=2.0, .*; set loss_impl=logits"):
                SFTTrainer(cfg, copy.deepcopy(base), tok, ROWS, [])
        else:
            assert SFTTrainer(cfg, copy.deepcopy(base), tok, ROWS, []).train_step(0, ROWS)["loss"] == \
                pytest.approx(want, rel=1e-5)


def test_packed_attention_refuses_a_non_causal_attention_module():
    """transformers' sdpa reads the attention module's is_causal attribute (Gemma 3's bidirectional attention sets
    it False without passing a keyword): packed attention, causal, refuses it; a causal module passes."""
    import types

    from r1train.packing import check_attention_kwargs

    check_attention_kwargs(types.SimpleNamespace(is_causal=True), {"softcap": None, "is_causal": True})
    with pytest.raises(ValueError, match="padding_free: SimpleNamespace's attention passes is_causal=False"):
        check_attention_kwargs(types.SimpleNamespace(is_causal=False), {})
