"""SFT rows: max_length bounds prompt + completion (TRL's keep_start truncation; no prompt-only cut), and
completion_only_loss=false scores the prompt tokens too (TRL semantics), checked against a hand-computed NLL of
a tiny model. SFTTrainer's logged metrics as TRL 1.16's (loss over the accumulation window, mean_token_accuracy,
entropy, num_tokens); a row without a usable prompt is named before training."""

import copy

import pytest
import torch
import train_helpers as H

from r1train.config import load_config
from r1train.data import DatasetError, sft_collate
from r1train.tasks import char_tokenizer

KW = dict(completion_column="completion")


def _kept(tok, rows, **kw):
    """Each row's kept tokens (prompt side then completion side, pads dropped) and its scored tokens."""
    p_ids, p_mask, c_ids, c_mask = sft_collate(tok, rows, **{**KW, **kw})
    ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1).bool()
    return [row[m].tolist() for row, m in zip(ids, mask)], [row[m].tolist() for row, m in zip(c_ids, c_mask.bool())]


def test_sft_max_length_keeps_the_first_tokens_of_prompt_and_completion():
    tok = char_tokenizer()
    eos = tok.eos_token_id
    rows = [{"prompt": "What is 12+30?", "completion": "<think>12+30=42</think><answer>42</answer>" * 3},
            {"prompt": "x" * 20, "completion": "the answer is 4"},
            {"prompt": "1+1?", "completion": "2"}]
    for max_length in (64, 30, 21, 200):
        kept, scored = _kept(tok, rows, max_length=max_length)
        for r, k, s in zip(rows, kept, scored):
            prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            full = prompt + tok(r["completion"], add_special_tokens=False)["input_ids"] + [eos]
            assert len(k) <= max_length and k == full[:max_length]  # keep_start over prompt + completion + eos
            assert s == full[len(prompt):max_length]  # the completion tokens that are left
    # completion_only_loss=false: the same kept tokens, every one after the first scored, even where the prompt
    # alone is longer than max_length
    for max_length in (64, 10):
        kept, scored = _kept(tok, rows, max_length=max_length, completion_only_loss=False)
        for r, k, s in zip(rows, kept, scored):
            full = tok(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"] + [eos]
            assert k == full[:max_length] and s == full[1:max_length]
    # the audit's case: a 300-token prompt and max_length=64 kept 301 tokens; now the prompt leaves no room for
    # any completion token, an error naming the row, the prompt's length and max_length
    with pytest.raises(DatasetError, match=r"SFT row 0: its prompt takes 300 tokens, so max_length=64 leaves no"):
        sft_collate(tok, [{"prompt": "x" * 300, "completion": "the answer is 4"}], max_length=64, **KW)


def test_sft_trainer_checks_every_row_against_max_length_before_training(tmp_path):
    from r1train.sft import SFTTrainer

    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=16", "max_prompt_length=8"])
    rows = [{"prompt": "1+1?", "completion": "2"}] * 3 + [{"prompt": "y" * 20, "completion": "z"}]
    with pytest.raises(DatasetError, match="SFT row 3: its prompt takes 20 tokens, so max_length=16"):
        SFTTrainer(cfg, None, char_tokenizer(), rows, [])  # no model work before the check
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("bad", [5, None, [{"role": "assistant"}]])
def test_sft_trainer_checks_every_rows_completion_before_training(tmp_path, bad):
    """A bad completion in dataset row 10 is an error naming row 10 when the trainer is built (it was found
    only when its batch was collated, numbered within the batch), whatever max_length."""
    from r1train.sft import SFTTrainer

    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=64", "max_prompt_length=32"])
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": f"a{i}"} for i in range(16)]
    rows[10] = {**rows[10], "completion": bad}
    with pytest.raises(DatasetError, match="SFT row 10: column 'completion' must be"):
        SFTTrainer(cfg, None, char_tokenizer(), rows, [])  # no model work before the check
    assert not (tmp_path / "metrics.jsonl").exists()
    rows[10] = {"prompt": rows[10]["prompt"]}  # no completion at all: missing, not "got None"
    with pytest.raises(DatasetError, match=r"SFT row 10: missing column 'completion' \(has \['prompt'\]\)"):
        SFTTrainer(cfg, None, char_tokenizer(), rows, [])


@pytest.mark.parametrize("row,what", [
    ({"completion": "2"}, r"missing column 'prompt'"),
    ({"prompt": None, "completion": "2"}, r"column 'prompt' is null"),
    ({"prompt": 5, "completion": "2"}, r"'prompt' must be a string or a list of chat messages"),
    ({"prompt": [], "completion": "2"}, r"'prompt' is an empty message list"),
    ({"prompt": [{"role": "user"}], "completion": "2"}, r"prompt message 0 must be"),
])
def test_sft_trainer_names_the_row_with_a_bad_prompt(tmp_path, row, what):
    """SFTTrainer given rows directly (as TRL's SFTTrainer takes train_dataset): a row whose prompt is missing,
    None, not text or messages, or a message without content was a KeyError / TypeError / ValueError with no
    row index (or, for a message without content, trained silently on the template's rendering of nothing).
    Now the DatasetError the CLI's loader gives, naming row 6 and the prompt, before any work."""
    from r1train.sft import SFTTrainer

    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=64"])
    rows = [{"prompt": f"{i}+1?", "completion": f"{i + 1}"} for i in range(9)]
    rows[6] = row
    with pytest.raises(DatasetError, match=r"SFT train_rows: row 6: " + what):
        SFTTrainer(cfg, None, char_tokenizer(), rows, [])
    assert not (tmp_path / "metrics.jsonl").exists()


def _hand_nll(model, tok, rows, max_length, completion_only):
    """Mean over the batch's scored tokens of -log p(token | the tokens before it), one plain forward per row."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            ids = (prompt + tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            ids = torch.tensor(ids[:max_length])
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
            tok_nll = -logp[:-1].gather(1, ids[1:, None])[:, 0]  # position t predicts token t + 1
            first = 0 if not completion_only else len(prompt) - 1  # the first scored token is ids[first + 1]
            nll, n = nll + tok_nll[first:].sum().item(), n + len(tok_nll) - first
    return nll / n


@pytest.mark.parametrize("padding_free", [False, True])
def test_completion_only_loss_false_scores_prompt_tokens(tmp_path, padding_free):
    """The step's loss (before its update) equals the hand-computed mean NLL over every token after each row's
    first (completion_only_loss=false) or over the completion tokens only (the default); they differ."""
    from r1train.loading import load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    rows = [{"prompt": "What is 3+4?", "completion": "<think>3+4=7</think><answer>7</answer>"},
            {"prompt": "What is 12+5-2?", "completion": "<answer>15</answer>"},
            {"prompt": "Hi", "completion": "<think>no sum</think><answer>0</answer>" * 2},
            {"prompt": "What is 9-1?", "completion": "8"}]
    losses = {}
    for flag in ("true", "false"):
        cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / flag}", f"completion_only_loss={flag}",
                                              "max_length=40", f"padding_free={str(padding_free).lower()}"])
        model, tok = load_model_and_tokenizer(cfg)
        want = _hand_nll(copy.deepcopy(model).eval(), tok, rows, 40, completion_only=flag == "true")
        t = SFTTrainer(cfg, model, tok, rows, [])
        losses[flag] = t.train_step(0, rows)["loss"]
        assert losses[flag] == pytest.approx(want, rel=1e-5)
    assert abs(losses["true"] - losses["false"]) > 1e-3


def test_sft_conversational_completion_is_tokenized_as_trl_sft():
    """A conversational completion of several messages ([assistant, user, assistant]) is trained whole, as
    TRL 1.16 SFTTrainer's tokenize_fn does: the chat template of prompt + completion, the scored tokens those
    after its common prefix with the prompt rendered with the generation prompt (only the last message was
    trained before); one message as before. Malformed or mixed rows are DatasetErrors naming the row."""
    from trl.data_utils import _tokenize, common_prefix_length

    from r1train.data import TokenCache, sft_tokens

    tok = char_tokenizer()
    prompt = [{"role": "user", "content": "2+3?"}]
    for comp in ([{"role": "assistant", "content": "Let me use the tool."}, {"role": "user", "content": "tool: 5"},
                  {"role": "assistant", "content": "<answer>5</answer>"}],
                 [{"role": "assistant", "content": "<answer>5</answer>"}]):
        p_ids = _tokenize(tok, prompt, add_generation_prompt=True)["input_ids"]
        full = _tokenize(tok, prompt + comp)["input_ids"]
        n = common_prefix_length(p_ids, full)
        for cache in (None, TokenCache(tok)):
            got = sft_tokens(tok, {"prompt": prompt, "completion": comp}, 0, cache=cache, max_length=512, **KW)
            assert got == (full[:n], full[n:])
        assert all(m["content"] in tok.decode(full[n:]) for m in comp)
    for i, bad, msg in ((3, {"prompt": "2+3?", "completion": comp}, "needs a conversational prompt"),
                        (4, {"prompt": prompt, "completion": []}, "non-empty list of messages"),
                        (5, {"prompt": prompt, "completion": [{"role": "assistant"}]}, "non-empty list of messages")):
        with pytest.raises(DatasetError, match=f"SFT row {i}: .*{msg}"):
            sft_tokens(tok, bad, i, max_length=512, **KW)


def test_sft_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    """A tokenizer with no pad token (e.g. Llama's, passed to the trainer directly) pads with its eos token, as
    TRL's SFTTrainer does: the step's loss is the hand-computed NLL. It was a TypeError from torch.full in the
    first step's collate (after the engine was built)."""
    import random

    from r1train.loading import load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    rng = random.Random()
    rows = [{"prompt": f"What is {rng.randint(0, 999)}+{rng.randint(0, 99)}?" + "x" * rng.randint(0, 9),
             "completion": "<answer>" + str(rng.randint(0, 10 ** rng.randint(1, 8))) + "</answer>"} for _ in range(4)]
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=48"])
    model, tok = load_model_and_tokenizer(cfg)
    tok.pad_token = None
    assert tok.pad_token_id is None
    want = _hand_nll(copy.deepcopy(model).eval(), tok, rows, 48, completion_only=True)
    t = SFTTrainer(cfg, model, tok, rows, [])
    assert tok.pad_token_id == tok.eos_token_id
    assert t.train_step(0, rows)["loss"] == pytest.approx(want, rel=1e-5)


def _merging_tokenizer(pairs):
    """A byte-pair tokenizer over a few characters whose merges join each (a, b) of pairs into one token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz0123456789 ?+")}}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(pairs)})
    core = Tokenizer(models.BPE(vocab, list(pairs)))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_prompt_merged_into_the_completion_is_scored_as_trl(tmp_path, padding_free):
    """A string prompt whose tokens all merge into the completion's first token (BPE: prompt "a", completion
    "b ..." -> "ab") left no context token: the first scored token was predicted from a pad position (a silent
    wrong loss), a batch of only such rows was a ValueError about label shapes, and padding_free refused it
    mid-training. Now, as in TRL's SFTTrainer (completion mask from the common prefix, labels shifted by one),
    every token after the row's first is scored: the step's loss equals that hand-computed NLL."""
    import random

    from r1train.loading import load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    rng = random.Random()
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [(a, b) for a, b in zip(rng.sample(letters, 4), rng.sample(letters, 4))]
    tok = _merging_tokenizer(pairs)
    rows = [{"prompt": a, "completion": b + " " + str(rng.randint(0, 10 ** 6))} for a, b in pairs]
    rows.append({"prompt": "what is " + str(rng.randint(0, 99)) + "?", "completion": " " + str(rng.randint(0, 99))})
    for batch in (rows[:2], rows[2:]):
        cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / str(len(batch))}", "max_length=40",
                                              f"padding_free={str(padding_free).lower()}"])
        model, _ = load_model_and_tokenizer(cfg)  # its 109-token vocabulary holds this tokenizer's ids
        nll, n = 0.0, 0
        with torch.no_grad():
            ref = copy.deepcopy(model).eval()
            for r in batch:
                full = tok(r["prompt"] + r["completion"] + "<eos>")["input_ids"]
                p = tok(r["prompt"])["input_ids"]
                first = next((i for i, (x, y) in enumerate(zip(p, full)) if x != y), len(p))  # TRL's prompt_len
                ids = torch.tensor(full)
                logp = torch.log_softmax(ref(ids[None]).logits[0].double(), -1)[:-1].gather(1, ids[1:, None])[:, 0]
                mask = torch.arange(1, len(full)) >= first  # labels[t] = ids[t] where completion_mask[t], t >= 1
                nll, n = nll - logp[mask].sum().item(), n + int(mask.sum())
        t = SFTTrainer(cfg, model, tok, batch, [])
        assert t.train_step(0, batch)["loss"] == pytest.approx(nll / n, rel=1e-5)


def _no_end_of_turn_template(tok):
    """The character tokenizer with a chat template that ends no turn (no eos after an assistant message)."""
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def _no_eos(tok):
    tok.eos_token = None
    assert tok.eos_token_id is None and tok.pad_token_id is not None
    return tok


@pytest.mark.parametrize("case", ["no_eos_string", "no_end_of_turn_chat", "no_eos_loss_on_all"])
def test_sft_trainer_names_the_dataset_row_whose_completion_gives_no_token(tmp_path, case):
    """A row whose completion tokenizes to nothing (an empty completion with a tokenizer that has no eos token,
    or an empty assistant message under a template that ends no turn) has no token to train on, whatever
    max_length. Once the trainer checked only the completion's type up front:
    the row was found mid-training, by its position in its batch, and the error blamed max_length. Now it is
    an error naming dataset row 13 when the trainer is built."""
    from r1train.sft import SFTTrainer

    tok, only = char_tokenizer(), "true"
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}], "completion": f"{i + 1}"} for i in range(20)]
    if case == "no_end_of_turn_chat":
        tok = _no_end_of_turn_template(tok)
        rows = [{**r, "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]
        rows[13] = {**rows[13], "completion": [{"role": "assistant", "content": ""}]}
    else:
        tok = _no_eos(tok)
        rows = [{**r, "prompt": r["prompt"][0]["content"]} for r in rows]
        rows[13] = {"prompt": "x", "completion": ""} if case == "no_eos_loss_on_all" else {**rows[13], "completion": ""}
        only = "false" if case == "no_eos_loss_on_all" else "true"
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=64", "max_prompt_length=32",
                                          f"completion_only_loss={only}"])
    with pytest.raises(DatasetError, match=r"SFT row 13: no token to train on: column 'completion' = .* tokenizes "
                                           "to nothing after the"):
        SFTTrainer(cfg, None, tok, rows, [])  # no model work before the check
    assert not (tmp_path / "metrics.jsonl").exists()


def test_sft_tokenizer_without_eos_adds_no_eos_id():
    """A tokenizer with no eos token (a pad token set): a string row gets no eos (TRL adds the eos *text*, here
    none); a conversational prompt with a string completion, or messages with no chat template, got the id None
    appended, a TypeError from torch.tensor in the step's collate. A completion that ends with the eos text gets
    no second eos, as a string row."""
    from r1train.data import sft_tokens

    tok = _no_eos(char_tokenizer())
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    p, c = sft_tokens(tok, {"prompt": chat, "completion": "<answer>5</answer>"}, 0, max_length=512, **KW)
    assert p == tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert c == ids("<answer>5</answer>")
    tok.chat_template = None
    p, c = sft_tokens(tok, {"prompt": chat, "completion": [{"role": "assistant", "content": "5"}]}, 0,
                      max_length=512, **KW)
    assert tok.decode(p + c) == "system: Be brief.\nuser: 2+3?\nassistant: 5\n" and None not in c
    rows = [{"prompt": chat, "completion": "5"}, {"prompt": "q", "completion": "a"}]
    _, _, c_ids, c_mask = sft_collate(tok, rows, max_length=512, **KW)
    assert c_ids[c_mask.bool()].tolist() == ids("5") + ids("a")
    tok = char_tokenizer()  # with an eos token: exactly one at the end
    eos = tok.eos_token_id
    for comp in ("5", "5" + tok.eos_token):
        _, c = sft_tokens(tok, {"prompt": chat, "completion": comp}, 0, max_length=512, **KW)
        assert c == ids("5") + [eos]


def test_a_null_completion_in_a_parquet_file_is_named_null(tmp_path):
    """A parquet SFT file where one row has no completion: pyarrow fills it with None, and the error said
    "missing column 'completion' (has ['completion', 'prompt'])", a column the row has. Now: the row, the
    column, and that it is null."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from r1train.config import load_config
    from r1train.loading import load_datasets

    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1?", "completion": "2"}, {"prompt": "2+2?"},
                                         {"prompt": "3+3?", "completion": "6"}]), str(path))
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / 'o'}", f"dataset_name={path}"])
    with pytest.raises(DatasetError, match=r"sft.parquet': row 1: column 'completion' is null \(None\)$"):
        load_datasets(cfg, sft=True)


ROWS = [{"prompt": "What is 3+4?", "completion": "<think>3+4=7</think><answer>7</answer>" * 2},
        {"prompt": "Hi", "completion": "8"},
        {"prompt": "What is 12+5-2?", "completion": "<answer>15</answer>"},
        {"prompt": "What is 9-1?", "completion": "<think>9-1=8</think><answer>8</answer>"}]


def _hand(model, tok, rows, max_length=64):
    """Per row: (sum of NLL, correct top-1, entropy sum, scored count, all tokens) over the completion tokens
    (the labels of TRL's completion_mask, shifted by one), from the full logits."""
    out = []
    with torch.no_grad():
        for r in rows:
            prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            ids = (prompt + tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            ids = torch.tensor(ids[:max_length])
            logits = model(ids[None]).logits[0, :-1].double()  # position t predicts token t + 1
            logp = torch.log_softmax(logits, -1)
            first = len(prompt) - 1
            tgt = ids[1:][first:]
            lp = logp[first:].gather(1, tgt[:, None])[:, 0]
            ent = -(logp[first:].exp() * logp[first:]).sum(-1)
            top1 = logits[first:].argmax(-1) == tgt
            out.append((-lp.sum().item(), int(top1.sum()), ent.sum().item(), len(tgt), len(ids)))
    return out


@pytest.mark.parametrize("padding_free,loss_impl", [(False, "linear"), (True, "linear"), (False, "logits")])
def test_sft_logs_trl_metrics_over_the_accumulation_window(tmp_path, padding_free, loss_impl):
    """Two micro-batches of 2 rows (gradient_accumulation_steps=2) with very different completion lengths.
    TRL: loss = NLL sum / num_items_in_batch (the window's completion tokens, not a mean of per-micro-batch
    means); mean_token_accuracy and entropy = per forward, correct (first argmax == label) / scored and entropy
    sum / scored, averaged over the forwards; num_tokens = attention-mask tokens trained on so far (cumulative).
    Before: no mean_token_accuracy, entropy or num_tokens (only the step's `tokens`)."""
    from r1train.loading import load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=64", "per_device_train_batch_size=2",
                                          "gradient_accumulation_steps=2", f"loss_impl={loss_impl}",
                                          f"padding_free={str(padding_free).lower()}"])
    model, tok = load_model_and_tokenizer(cfg)
    t = SFTTrainer(cfg, model, tok, ROWS, [])
    warm = [t.train_step(s, ROWS) for s in range(12)]  # partly trained: some tokens right, NLLs far apart
    hand = _hand(copy.deepcopy(t.model).eval(), tok, ROWS)
    tokens = sum(h[4] for h in hand)  # prompt + completion + eos of the 4 rows
    micro = [hand[:2], hand[2:]]
    want_loss = sum(h[0] for h in hand) / sum(h[3] for h in hand)
    mean_of_means = sum(sum(h[0] for h in m) / sum(h[3] for h in m) for m in micro) / 2
    assert abs(want_loss - mean_of_means) > 5e-3 * want_loss  # the two normalizations differ (~1%)
    want_acc = sum(sum(h[1] for h in m) / sum(h[3] for h in m) for m in micro) / 2
    want_ent = sum(sum(h[2] for h in m) / sum(h[3] for h in m) for m in micro) / 2
    assert 0 < want_acc < 1 and want_acc != sum(h[1] for h in hand) / sum(h[3] for h in hand)

    m = t.train_step(12, ROWS)
    assert m["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert m["mean_token_accuracy"] == pytest.approx(want_acc, abs=1e-9)
    assert m["entropy"] == pytest.approx(want_ent, rel=1e-4, abs=1e-5)  # fp32 kernel
    # num_tokens: cumulative, as TRL's _total_train_tokens; kept in the checkpoint's trainer state (TRL restarts
    # it at 0 on resume); `tokens` (the step's, read by the demo's FLOP count) stays
    assert [w["num_tokens"] for w in warm] == [tokens * (s + 1) for s in range(12)]
    assert m["num_tokens"] == 13 * tokens and m["tokens"] == tokens
    assert t.trainer_state() == {"num_tokens": 13 * tokens}


def test_sft_mean_token_accuracy_of_a_memorized_row_is_one(tmp_path):
    """A few steps on one short row: the model learns it, and mean_token_accuracy reaches 1 while the loss falls
    (a metric computed on the wrong positions or tokens would not)."""
    from r1train.loading import load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    rows = [{"prompt": "1+1?", "completion": "2"}] * 2
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=32", "per_device_train_batch_size=2",
                                          "learning_rate=0.05", "padding_free=true"])
    model, tok = load_model_and_tokenizer(cfg)
    t = SFTTrainer(cfg, model, tok, rows, [])
    hist = [t.train_step(s, rows) for s in range(40)]
    assert hist[-1]["loss"] < 0.1 * hist[0]["loss"]
    assert hist[-1]["mean_token_accuracy"] == 1.0


@pytest.mark.parametrize("N,H,V,chunk_bytes,with_bias", [(600, 64, 1000, None, False), (1100, 48, 777, 1 << 15, True),
                                                          (1000, 32, 3000, 1 << 17, False), (0, 16, 100, None, True)])
@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_sft_top1_is_the_first_argmax_of_fp32_logits(monkeypatch, N, H, V, chunk_bytes, with_bias, dev):
    """loss_impl linear's top-1 (mean_token_accuracy) of bf16 hidden states and head: the first argmax of the
    fp32-accumulated logits, as TRL's, in chunks of rows and vocab blocks (small chunk budgets); logits rounded to
    bf16 tie near-equal maxima, where their first argmax is often another token (these inputs have such rows).
    Operands on a grid of 1/4 keep every fp32 logit exact whatever the GEMM's summation order, so the wanted
    index is unambiguous (among exact ties, the first)."""
    import r1train.sft as S

    if chunk_bytes is not None:
        monkeypatch.setattr(S, "_TOP1_CHUNK_BYTES", chunk_bytes)
    grid = lambda *shape: (torch.randint(-8, 9, shape) / 4).bfloat16().to(dev)  # noqa: E731
    x, w = grid(1, N, H), grid(V, H)  # logits of std ~2 sqrt(H), multiples of 1/16: bf16 rounds them to 1/4..1
    b = grid(V) if with_bias else None
    want = (x.float() @ w.float().t() + (0 if b is None else b.float())).argmax(-1)
    if N:
        lg16 = torch.nn.functional.linear(x, w, b)
        assert ((lg16 == lg16.amax(-1, keepdim=True)).sum(-1) > 1).any(), "no bf16 tie: the test checks nothing"
        assert (lg16.argmax(-1) != want).any()
    out, top1 = S.top1_fn(want, lambda *a: "out")(x, w, b)
    assert out == "out" and top1.shape == (1, N) and top1.all()
    # exact fp32 ties across vocab blocks: the first index, as argmax
    same = grid(1, H).expand(V, H).contiguous()
    _, top1 = S.top1_fn(torch.zeros(1, N, dtype=torch.long, device=dev), lambda *a: None)(x, same, None)
    assert top1.all()
    # loss_impl logits: the logits' own first argmax
    lg = torch.randn(1, N, V, device=dev).bfloat16()
    assert S.top1_fn(lg.argmax(-1), lambda _: None)(lg)[1].all()


@pytest.mark.parametrize("padding_free", [False, True])
def test_sft_cuts_no_prompt_to_max_prompt_length(tmp_path, padding_free):
    """TRL 1.16's SFTTrainer cuts no prompt: only the whole row, to its first max_length tokens. Prompts longer
    than max_prompt_length (a GRPO key) were cut to their last max_prompt_length tokens in SFT. A step on rows
    with long prompts now trains on every prompt token: its token count and loss are those of the rows kept
    whole up to max_length (prompt + completion + eos), computed from the model's full logits."""
    import random

    from r1train.loading import load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    rng, max_length = random.Random(), 48
    digits = lambda n: "".join(rng.choice("0123456789+") for _ in range(n))  # noqa: E731
    rows = [{"prompt": f"What is {digits(rng.randint(12, 30))}?", "completion": f"<answer>{digits(n)}</answer>"}
            for n in [40] + [rng.randint(1, 6) for _ in range(3)]]  # row 0 longer than max_length
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_prompt_length=8", f"max_length={max_length}",
                                          "per_device_train_batch_size=2", "gradient_accumulation_steps=2",
                                          f"padding_free={str(padding_free).lower()}"])
    model, tok = load_model_and_tokenizer(cfg)
    hand = _hand(copy.deepcopy(model).eval(), tok, rows, max_length)
    assert all(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) > 8 for r in rows)
    assert any(h[4] == max_length for h in hand) and all(h[3] >= 1 for h in hand)  # some rows cut, each scored
    m = SFTTrainer(cfg, model, tok, rows, []).train_step(0, rows)
    assert m["tokens"] == sum(h[4] for h in hand)
    assert m["loss"] == pytest.approx(sum(h[0] for h in hand) / sum(h[3] for h in hand), rel=1e-5)


def _tool_template(tok):
    """The character tokenizer's chat template, preceded by the names of the row's tools and a marker for a
    `think` keyword (chat_template_kwargs), as a tool-calling template renders them."""
    tok.chat_template = ("{% if tools %}<|system|>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}"
                         "{% endif %}{% if think %}<think>{% endif %}" + tok.chat_template)
    return tok


def test_sft_renders_a_rows_tools_and_chat_template_kwargs_as_trl():
    """TRL 1.16's SFTTrainer renders a conversational row with its `tools` column (a list, or JSON text) and its
    `chat_template_kwargs` column: apply_chat_template(prompt, add_generation_prompt=True, tools=..., **kwargs)
    and of prompt + completion likewise, the completion after their common prefix. Both columns were ignored: the
    model trained on prompts without the tool schemas it is told about at inference. Bad values, or either column
    with no chat template to render it, are DatasetErrors naming the row and the column."""
    import json
    import random

    from r1train.data import TokenCache, sft_tokens

    rng = random.Random()
    tok = _tool_template(char_tokenizer())
    name = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
    tools = [{"type": "function", "function": {"name": name, "description": "adds",
                                               "parameters": {"type": "object", "properties": {}}}}]
    prompt = [{"role": "user", "content": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}?"}]
    comp = [{"role": "assistant", "content": f"<answer>{rng.randint(0, 200)}</answer>"}]

    def trl(p, c, **kw):  # TRL's tokenize_fn (conversational prompt-completion), written out
        render = lambda m, **k: tok.apply_chat_template(m, tokenize=True, return_dict=True, **k)["input_ids"]  # noqa
        p_ids, full = render(p, add_generation_prompt=True, **kw), render(p + c, **kw)
        n = next((j for j, (x, y) in enumerate(zip(p_ids, full)) if x != y), min(len(p_ids), len(full)))
        return full[:n], full[n:]

    for extra, kw in (({"tools": tools}, {"tools": tools}), ({"tools": json.dumps(tools)}, {"tools": tools}),
                      ({"chat_template_kwargs": {"think": True}}, {"think": True}),
                      ({"tools": tools, "chat_template_kwargs": {"think": True}}, {"tools": tools, "think": True})):
        for cache in (None, TokenCache(tok)):
            got = sft_tokens(tok, {"prompt": prompt, "completion": comp, **extra}, 0, cache=cache, max_length=512,
                             **KW)
            assert got == trl(prompt, comp, **kw)
        assert (name in tok.decode(got[0])) == ("tools" in kw) and ("<think>" in tok.decode(got[0])) == ("think" in kw)
    # a string completion to a conversational prompt (r1train's own format): the prompt rendered with them too
    p, _ = sft_tokens(tok, {"prompt": prompt, "completion": "5", "tools": tools}, 0, max_length=512, **KW)
    assert p == trl(prompt, comp, tools=tools)[0] and name in tok.decode(p)
    # absent or None: as without the columns
    plain = sft_tokens(tok, {"prompt": prompt, "completion": comp}, 0, max_length=512, **KW)
    assert sft_tokens(tok, {"prompt": prompt, "completion": comp, "tools": None, "chat_template_kwargs": None}, 0,
                      max_length=512, **KW) == plain == trl(prompt, comp)
    for i, extra, msg in ((3, {"tools": "{not json"}, r"column 'tools' is text that is not JSON"),
                          (4, {"tools": 5}, r"column 'tools' must be a list"),
                          (5, {"chat_template_kwargs": "think"}, r"column 'chat_template_kwargs' must be a dict"),
                          (6, {"chat_template_kwargs": {"tokenize": False}},
                           r"column 'chat_template_kwargs' sets \['tokenize'\]")):
        with pytest.raises(DatasetError, match=f"SFT row {i}: {msg}"):
            sft_tokens(tok, {"prompt": prompt, "completion": comp, **extra}, i, max_length=512, **KW)
    tok.chat_template = None
    with pytest.raises(DatasetError, match="SFT row 7: column 'tools' is passed to the chat template, and the "
                                           "tokenizer has none"):
        sft_tokens(tok, {"prompt": prompt, "completion": comp, "tools": tools}, 7, max_length=512, **KW)


def test_sft_decodes_each_rows_tools_text_once(tmp_path, monkeypatch):
    """A row's `tools` column as JSON text was decoded each time the row was collated (every step; its token ids
    were cached). SFTTrainer decodes each text once, when it checks its rows before training, and its steps'
    collates give the same tensors as a collate that decodes every row afresh (no cache)."""
    import json

    from r1train.data import TokenCache
    from r1train.loading import load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    def tools(name):
        return json.dumps([{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}])

    texts = [tools("add"), tools("mul")]
    rows = [{"prompt": [{"role": "user", "content": f"{j}+{j}?"}], "completion": f"{2 * j}", "tools": texts[j % 2]}
            for j in range(4)]
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_length=96", "per_device_train_batch_size=2"])
    model, tok = load_model_and_tokenizer(cfg)
    _tool_template(tok)
    decoded, loads = [], json.loads
    monkeypatch.setattr(json, "loads", lambda s, *a, **k: (decoded.append(s), loads(s, *a, **k))[1])
    t = SFTTrainer(cfg, model, tok, rows, [])
    assert sorted(s for s in decoded if s in texts) == sorted(texts)  # once each, before training
    n = len(decoded)
    for step in range(2):
        t.train_step(step, rows)
    got = sft_collate(tok, rows, **t.token_keys(cfg))
    assert len(decoded) == n and isinstance(t.tokens.json_values[texts[0]], list)
    want = sft_collate(tok, rows, **{**t.token_keys(cfg), "cache": TokenCache(tok, 0)})  # decodes each row again
    assert len(decoded) == n + len(rows)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def _thinking_generation_prompt(tok):
    """The character tokenizer with a chat template whose generation prompt opens a <think> block that an
    assistant message does not start with (as DeepSeek-R1's and Qwen3's templates render them): the prompt
    rendered alone is not a prefix of prompt + completion."""
    tok.chat_template = tok.chat_template.replace("{% if add_generation_prompt %}<|assistant|>",
                                                  "{% if add_generation_prompt %}<|assistant|><think>")
    return tok


def test_sft_warns_once_of_a_prompt_that_is_not_a_prefix_of_prompt_and_completion(caplog, monkeypatch):
    """TRL 1.16's SFTTrainer (tokenize_fn) warns once where the tokenized prompt is not a prefix of the tokenized
    prompt + completion (common prefix shorter than the prompt): the row trains without the prompt's end. r1train
    split such rows alike but said nothing. Now the first one logs a warning naming the row and the ids left out,
    for a chat template whose generation prompt differs and for BPE tokens merging across a string row's
    boundary; the split is unchanged (the common prefix of the two tokenizations, computed here with TRL's)."""
    import logging
    import random

    from trl.data_utils import _tokenize, common_prefix_length

    import r1train.data as D

    ours = lambda: [r.getMessage() for r in caplog.records if r.name == "r1train"]  # noqa: E731
    rng = random.Random()
    tok = _thinking_generation_prompt(char_tokenizer())
    prompt = [{"role": "user", "content": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}?"}]
    comp = [{"role": "assistant", "content": f"<answer>{rng.randint(0, 200)}</answer>"}]
    p_ids = _tokenize(tok, prompt, add_generation_prompt=True)["input_ids"]
    full = _tokenize(tok, prompt + comp)["input_ids"]
    n = common_prefix_length(p_ids, full)
    assert n < len(p_ids)  # TRL's condition for its warning holds
    monkeypatch.setattr(D, "_warned_not_prefix", False)
    row = {"prompt": prompt, "completion": comp}
    with caplog.at_level(logging.WARNING, logger="r1train"):
        for cache in (None, D.TokenCache(tok)):
            got = D.sft_tokens(tok, row, 3, max_length=512, cache=cache, **KW)
            assert got == (full[:n], full[n:])
        assert len(ours()) == 1 and "SFT row 3: the tokenized prompt is not a prefix" in ours()[0]
        assert repr(tok.decode(p_ids[n:])) in ours()[0]
        # a row whose prompt is a prefix (a string completion follows the rendered prompt): no warning
        monkeypatch.setattr(D, "_warned_not_prefix", False)
        D.sft_tokens(tok, {"prompt": prompt, "completion": "5"}, 0, max_length=512, **KW)
        assert len(ours()) == 1
        # a cached row warns too (the cache keeps what its prompt left out)
        cache = D.TokenCache(tok)
        D.sft_tokens(tok, row, 0, max_length=512, cache=cache, **KW)
        monkeypatch.setattr(D, "_warned_not_prefix", False)
        D.sft_tokens(tok, row, 4, max_length=512, cache=cache, **KW)
        assert [m[:10] for m in ours()[1:]] == ["SFT row 0:", "SFT row 4:"] and len(cache) > 0

    # a string row: BPE merges the prompt's last character with the completion's first
    a, b = rng.sample("abcdefghijklmnopqrstuvwxyz", 2)
    tok = _merging_tokenizer([(a, b)])
    row = {"prompt": "what is " + a, "completion": b + " " + str(rng.randint(0, 99))}
    p_ids = _tokenize(tok, row["prompt"])["input_ids"]
    full = _tokenize(tok, row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
    n = common_prefix_length(p_ids, full)
    assert n < len(p_ids)
    monkeypatch.setattr(D, "_warned_not_prefix", False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1train"):
        assert D.sft_tokens(tok, row, 7, max_length=512, **KW) == (full[:n], full[n:])
        assert D.sft_tokens(tok, {**row, "prompt": row["prompt"] + " "}, 8, max_length=512, **KW)  # a prefix
        assert len(ours()) == 1 and ours()[0].startswith("SFT row 7:") and repr(a) in ours()[0]
