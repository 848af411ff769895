"""The built-in task, the character tokenizer and the tiny models."""

import re

import pytest

from r1train.rewards import accuracy_reward, format_reward
from r1train.tasks import TINY_MODELS, ArithSpec, char_tokenizer, generate, tiny_model
from r1train.tasks.tokenizer import TAGS


def test_tokenizer_roundtrip_tags_and_template():
    tok = char_tokenizer()
    s = "<think>12+3=15\n15-4=11</think><answer>11</answer>"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == s
    assert len(ids) == len(s) - sum(len(t) - 1 for t in TAGS)  # each tag is one token
    for t in TAGS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 1+2?"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == "<|user|>What is 1+2?<|assistant|>"
    assert len(char_tokenizer(vocab_size=500)) == 500


def test_arith_answers_flaws_and_determinism():
    spec = ArithSpec(min_terms=3, max_terms=5, max_operand=9)
    rows = generate(400, seed=1, spec=spec, flaw_share=0.5)
    assert rows == generate(400, seed=1, spec=spec, flaw_share=0.5)
    flawed = 0
    for r in rows:
        expr = re.search(r"What is (.*)\?", r["prompt"][0]["content"]).group(1)
        assert str(eval(expr)) == r["answer"]  # the unique numeric answer
        assert format_reward(None, [r["solution"]]) == [1.0]
        bad = accuracy_reward(None, [r["solution"]], answer=[r["answer"]]) == [0.0]
        flawed += bad
        for line in r["solution"].split("</think>")[0][7:].split("\n"):
            lhs, rhs = line.split("=")
            assert bad or int(rhs) >= 0  # correct chains never go negative
            assert int(rhs) == eval(lhs) or bad  # every step of a correct chain is right
    assert 0.4 < flawed / len(rows) < 0.6
    assert all(accuracy_reward(None, [r["solution"]], answer=[r["answer"]]) == [1.0]
               for r in generate(50, seed=2, spec=spec, flaw_share=0.0))
    with pytest.raises(ValueError, match="task ops"):
        ArithSpec(ops="*")


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_forward(name):
    import torch

    tok = char_tokenizer()
    m = tiny_model(name, tok, hidden_size=32, num_layers=2)
    out = m(input_ids=torch.randint(0, len(tok), (2, 7)))
    assert out.logits.shape == (2, 7, len(tok)) and torch.isfinite(out.logits).all()
