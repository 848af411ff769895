"""Prompt encoding and completion decoding (r1train/data.py) against what TRL 1.16 does."""

import torch
import train_helpers as H

from r1train.config import load_config
from r1train.data import decode_completions, encode_prompts
from r1train.loading import load_model_and_tokenizer
from r1train.rewards import format_reward
from r1train.rollout import Rollout, sample
from r1train.tasks import char_tokenizer


def _rollout(tok, rows, eos_ids):
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tok.pad_token_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return Rollout(ids[:, :0], mask[:, :0], ids, mask, torch.zeros(len(rows), dtype=torch.bool), eos_ids=eos_ids)


def test_completion_ending_at_any_eos_id_decodes_as_at_the_tokenizers_eos():
    """A completion that stopped at a second eos id of the model (an end-of-turn token) decodes to the same
    text as one that stopped at the tokenizer's eos: the eos is not part of the text, so format_reward scores
    both; the text ends before the first eos the rollout was sampled with."""
    tok = char_tokenizer()
    eot = tok.convert_tokens_to_ids("<|user|>")
    a = tok("<think>1+2=3</think><answer>3</answer>", add_special_tokens=False)["input_ids"]
    ro = _rollout(tok, [a + [tok.eos_token_id], a + [eot], a[:5] + [eot] + a[5:] + [tok.eos_token_id]],
                  (tok.eos_token_id, eot))
    texts = decode_completions(tok, ro)
    assert texts[0] == texts[1] == tok.decode(a, skip_special_tokens=False)
    assert texts[2] == tok.decode(a[:5], skip_special_tokens=False)
    assert format_reward(None, texts[:2]) == format_reward(None, texts[:1]) * 2 == [1.0, 1.0]


def test_sample_records_its_eos_ids_and_decoding_stops_at_each(tmp_path):
    """rollout.sample keeps the eos ids it stopped at on the Rollout; a rollout that also stops at the token
    the model samples at position k (same seed, same prefix) decodes to the first k tokens of the one
    without it."""
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_completion_length=12"])
    model, tok = load_model_and_tokenizer(cfg)
    p_ids, p_mask = encode_prompts(tok, ["What is 1+2?"], cfg.max_prompt_length)
    kw = dict(max_new_tokens=12, pad_id=tok.pad_token_id, seeds_B=[0], backend="torch")
    ro = sample(model, p_ids, p_mask, eos_id=tok.eos_token_id, **kw)
    assert ro.eos_ids == (tok.eos_token_id,)
    full = [t for t, k in zip(ro.completion_ids_BT[0].tolist(), ro.completion_mask_BT[0].tolist()) if k]
    k = next(k for k in range(1, len(full)) if full[k] not in full[:k] and full[k] != tok.eos_token_id)
    ro2 = sample(model, p_ids, p_mask, eos_id=[tok.eos_token_id, full[k]], **kw)
    assert ro2.eos_ids == (tok.eos_token_id, full[k])
    assert decode_completions(tok, ro2) == [tok.decode(full[:k], skip_special_tokens=False)]


def _bos_tokenizer():
    """A Llama-style tokenizer: encoding with the defaults (add_special_tokens=True) prepends BOS."""
    from tokenizers import processors

    tok = char_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_token_id)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def test_prompts_are_encoded_as_trl_grpo_encodes_them():
    """String prompts with the tokenizer's defaults (TRL 1.16 GRPOTrainer._tokenize_prompts:
    processing_class(text=prompts), so a BOS); chat prompts through apply_chat_template(add_generation_prompt,
    tokenize=True), with no second BOS."""
    tok = _bos_tokenizer()
    strings = ["What is 1+2?", "Hi"]
    ids, mask = encode_prompts(tok, strings, 512)
    want = tok(text=strings)["input_ids"]
    assert [[t for t, m in zip(r, k) if m] for r, k in zip(ids.tolist(), mask.tolist())] == want
    chat = [[{"role": "user", "content": "What is 1+2?"}]]
    ids, mask = encode_prompts(tok, chat, 512)
    want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids.tolist() == want
    assert encode_prompts(tok, strings, 3)[0].tolist() == [w[-3:] for w in tok(text=strings)["input_ids"]]


def test_sft_string_rows_are_tokenized_as_trl_sft():
    """A string prompt-completion row: the prompt and scored ids equal TRL 1.16 SFTTrainer's tokenize_fn (eos
    text added to the completion, prompt and prompt + completion encoded with the defaults, completion after
    their common prefix): the BOS is kept."""
    from trl.data_utils import _tokenize, common_prefix_length

    from r1train.data import TokenCache, sft_tokens

    tok = _bos_tokenizer()
    for row in ({"prompt": "2+3?", "completion": "<answer>5</answer>"},
                {"prompt": "q", "completion": "a" + tok.eos_token}):
        c = row["completion"] if row["completion"].endswith(tok.eos_token) else row["completion"] + tok.eos_token
        p_ids = _tokenize(tok, row["prompt"])["input_ids"]
        full = _tokenize(tok, row["prompt"] + c)["input_ids"]
        n = common_prefix_length(p_ids, full)
        for cache in (None, TokenCache(tok)):
            p, comp = sft_tokens(tok, row, 0, completion_column="completion", max_length=512,
                                 max_prompt_length=512, cache=cache)
            assert (p, comp) == (full[:n], full[n:])
            assert p[0] == tok.bos_token_id and comp[-1] == tok.eos_token_id and tok.eos_token_id not in comp[:-1]


def test_a_cut_prompt_is_warned_about_once(caplog, monkeypatch):
    """Prompts over max_prompt_length keep their last tokens (GRPO and SFT); the first cut in a process logs a
    warning naming the key (it was silent: a system message could go unseen)."""
    import logging

    import r1train.data as D
    from r1train.tasks import char_tokenizer

    monkeypatch.setattr(D, "_warned_truncation", set())
    tok = char_tokenizer()
    long, short = "1+2+3+4+5+6+7+8+9=", "1+2="
    full = D.prompt_ids(tok, long)
    with caplog.at_level(logging.WARNING, logger="r1train"):
        ids, mask = D.encode_prompts(tok, [short, long], len(full))
        assert not caplog.records  # nothing cut
        ids, mask = D.encode_prompts(tok, [short, long], 5)
        assert ids[1].tolist() == full[-5:] and mask.sum(1).tolist() == [min(5, len(D.prompt_ids(tok, short))), 5]
        assert len(caplog.records) == 1 and "max_prompt_length=5" in caplog.text
        p, _ = D.sft_tokens(tok, {"prompt": long, "completion": "45"}, 0, completion_column="completion",
                            max_length=64, max_prompt_length=5)
        assert p == full[-5:] and len(caplog.records) == 1  # once per value
