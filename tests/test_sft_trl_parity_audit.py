"""SFT against TRL 1.16's SFTTrainer (trl/trainer/sft_trainer.py): the logged metrics (compute_loss: loss,
mean_token_accuracy, entropy, num_tokens) and their definitions, the loss normalized over the whole gradient
accumulation window (num_items_in_batch), and rows without a usable prompt named before training. Expected
values are computed by hand from one plain forward per row of a copy of the model."""

import copy

import pytest
import torch
import train_helpers as H

from r1train.config import load_config
from r1train.data import DatasetError
from r1train.tasks import char_tokenizer

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
