"""Prompt encoding and completion decoding (r1train/data.py) against what TRL 1.16 does."""

import torch
import train_helpers as H

from r1train import data as D
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
    # the GRPO rollout's one rendering: the same ids and mask, and the texts the rewards get (rendered_prompts)
    for prompts, cut in ((strings, 3), (chat + [[{"role": "user", "content": "Hi"}]], 512)):
        ids, mask, texts = D.encode_rendered_prompts(tok, prompts, cut)
        want_ids, want_mask = encode_prompts(tok, prompts, cut)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
        assert texts == D.rendered_prompts(tok, prompts, None)


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
            p, comp = sft_tokens(tok, row, 0, completion_column="completion", max_length=512, cache=cache)
            assert (p, comp) == (full[:n], full[n:])
            assert p[0] == tok.bos_token_id and comp[-1] == tok.eos_token_id and tok.eos_token_id not in comp[:-1]


def test_a_cut_prompt_is_warned_about_once(caplog, monkeypatch):
    """GRPO prompts over max_prompt_length keep their last tokens; the first cut in a process logs a warning
    naming the key (it was silent: a system message could go unseen). SFT cuts no prompt (TRL 1.16's
    SFTTrainer cuts only the whole row, to max_length) and warns of none."""
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
        ids, _ = D.encode_prompts(tok, [long], 5)
        assert ids[0].tolist() == full[-5:] and len(caplog.records) == 1  # once per value
        monkeypatch.setattr(D, "_warned_truncation", set())
        p, _ = D.sft_tokens(tok, {"prompt": long, "completion": "45"}, 0, completion_column="completion",
                            max_length=64)
        assert p == full and len(caplog.records) == 1  # SFT: the whole prompt, no warning


def test_a_directory_of_data_files_loads_as_trl_scripts_load_it(tmp_path, monkeypatch):
    """dataset_name / eval_dataset_name naming a local directory of data files (train.jsonl + test.jsonl), which
    TRL's scripts read with datasets.load_dataset(dataset_name), gives the rows of the named split (it was a
    DatasetError: the directory was read only as one saved by save_to_disk); a save_to_disk directory still
    loads, and a missing split is an error naming the split key."""
    import json
    import random

    import datasets
    import pytest

    from r1train.config import load_config
    from r1train.data import DatasetError, load_rows
    from r1train.loading import load_datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rng = random.Random()
    split_rows = {s: [{"prompt": [{"role": "system", "content": "Answer."}, {"role": "user", "content": f"{a}+{b}?"}],
                       "answer": str(a + b)} for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))]
                  for s, n in (("train", 5), ("test", 3))}
    d = tmp_path / "data"
    d.mkdir()
    for s, rows in split_rows.items():
        (d / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_rows(str(d), "test") == split_rows["test"]
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / 'out'}", f"dataset_name={d}",
                                          f"eval_dataset_name={d}", "reward_funcs=accuracy"])
    assert load_datasets(cfg) == (split_rows["train"], split_rows["test"])
    with pytest.raises(DatasetError, match="dataset_name: dataset .*: no split 'dev' .*dataset_split names"):
        load_rows(str(d), "dev", key="dataset_name")
    datasets.Dataset.from_list(split_rows["train"]).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved")) == split_rows["train"]


def test_a_csv_file_is_named_as_unread_and_a_directory_of_csv_loads(tmp_path, monkeypatch):
    """A .csv file given as dataset_name was sent to datasets.load_dataset as a Hub name: "cannot load ... as a
    Hugging Face dataset name: Couldn't find any data file" for a file that exists. Now the error names the
    formats read; a directory holding the CSV loads (datasets.load_dataset(dir), as TRL's scripts read it)."""
    import csv
    import random

    import datasets
    import pytest

    from r1train.data import DatasetError, load_rows

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rng = random.Random()
    rows = [{"prompt": f"What is {rng.randint(0, 999)}?", "answer": f"x{rng.randint(0, 999)}"} for _ in range(4)]
    (tmp_path / "d").mkdir()
    with open(tmp_path / "d" / "train.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["prompt", "answer"])
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DatasetError, match=r"dataset_name: '.*train.csv' is a file of a format r1train does not read"):
        load_rows(str(tmp_path / "d" / "train.csv"), key="dataset_name")
    assert load_rows(str(tmp_path / "d")) == rows


def test_a_json_file_of_json_lines_loads(tmp_path):
    """A .json file in JSON Lines form (one object a line, as many Hub datasets ship their .json files and as
    datasets' json loader reads them) was "not valid JSON: Extra data"; now its rows load as a .jsonl file's, a
    one-row file included; a bad line is named by row and line, and a JSON list still loads."""
    import json
    import random

    import pytest

    from r1train.data import DatasetError, load_rows

    rng = random.Random()
    rows = [{"prompt": [{"role": "user", "content": f"{rng.randint(0, 99)} caf\u00e9 \u52a0?"}],
             "answer": str(rng.randint(0, 99))} for _ in range(3)]
    p = tmp_path / "train.json"
    p.write_text("".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) + "\n" for r in rows), encoding="utf-8")
    assert load_rows(str(p)) == rows
    p.write_text(json.dumps(rows[0]) + "\n")
    assert load_rows(str(p)) == rows[:1]
    p.write_text(json.dumps(rows))
    assert load_rows(str(p)) == rows
    p.write_text(json.dumps(rows[0]) + "\n\n" + '{"prompt": "a" "answer": 1}\n')
    with pytest.raises(DatasetError, match=r"train.json: row 1 \(line 3\): invalid JSON"):
        load_rows(str(p))


def test_a_json_file_is_read_once(tmp_path, monkeypatch):
    """A .json file of JSON Lines was read twice (parsed whole as JSON, which fails on its second value, then
    read again line by line), as was a one-object file; now each is opened once and gives the rows of its
    lines. A bad line is still named by row and line."""
    import builtins
    import json
    import random

    import pytest

    from r1train.data import DatasetError, load_rows

    rng = random.Random()
    rows = [{"prompt": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}?", "answer": str(rng.randint(0, 99))}
            for _ in range(rng.randint(2, 6))]
    p = tmp_path / "train.json"
    opened, real_open = [], builtins.open

    def counting_open(file, *a, **kw):
        if str(file) == str(p):
            opened.append(file)
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", counting_open)
    cases = [("".join(json.dumps(r) + "\n" for r in rows), rows), (json.dumps(rows[0]), rows[:1]),
             (json.dumps(rows), rows), ("\n" + json.dumps(rows[0]) + "\r\n\n" + json.dumps(rows[1]), rows[:2])]
    for text, want in cases:
        p.write_bytes(text.encode())
        opened.clear()
        assert load_rows(str(p)) == want
        assert len(opened) == 1, text
    p.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n\n" + '{"prompt": "a" "answer": 1}\n')
    with pytest.raises(DatasetError, match=r"train.json: row 2 \(line 4\): invalid JSON"):
        load_rows(str(p))


def test_grpo_prompts_are_rendered_with_chat_template_kwargs_as_trl():
    """TRL 1.16's GRPOTrainer._tokenize_prompts renders conversational prompts with GRPOConfig.chat_template_kwargs
    (apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)) and
    encodes string prompts without them; it reads no per-row column for them. encode_prompts takes them (it had no
    way to pass them); a bad value, or keywords with chat prompts and no chat template, is a DatasetError naming
    chat_template_kwargs."""
    import random

    import pytest

    from r1train.data import DatasetError

    rng = random.Random()
    tok = char_tokenizer()
    tok.chat_template = "{% if think %}<think>{% endif %}" + tok.chat_template  # a `think` keyword shows
    chat = [[{"role": "user", "content": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}?"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    for kw in (None, {}, {"think": True}, {"think": False}):
        want = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       **(kw or {}))["input_ids"]
        ids, mask = encode_prompts(tok, chat, 512, chat_template_kwargs=kw)
        assert [[t for t, m in zip(r, k) if m] for r, k in zip(ids.tolist(), mask.tolist())] == want
        assert all((tok.decode(w).startswith("<think>")) == bool(kw and kw["think"]) for w in want)
    strings = ["What is 1+2?", "Hi"]
    ids, mask = encode_prompts(tok, strings, 512, chat_template_kwargs={"think": True})
    assert [[t for t, m in zip(r, k) if m] for r, k in zip(ids.tolist(), mask.tolist())] == tok(text=strings)[
        "input_ids"]
    for bad, msg in (("think", r"chat_template_kwargs must be a dict"),
                     ({"add_generation_prompt": False}, r"chat_template_kwargs sets \['add_generation_prompt'\]")):
        with pytest.raises(DatasetError, match=msg):
            encode_prompts(tok, chat, 512, chat_template_kwargs=bad)
    tok.chat_template = None
    assert encode_prompts(tok, strings, 512, chat_template_kwargs={"think": True})[0].shape[0] == 2
    with pytest.raises(DatasetError, match="chat_template_kwargs is passed to the chat template, and the tokenizer "
                                           "has none"):
        encode_prompts(tok, chat, 512, chat_template_kwargs={"think": True})
