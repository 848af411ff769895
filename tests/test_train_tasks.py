"""The built-in task, the character tokenizer and the tiny models."""

import random
import re

import pytest
import torch

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
    for bad in (108, 0, 200.0, True):  # below its own 109 tokens it was ignored silently
        with pytest.raises(ValueError, match="vocab_size must be an int >= 109"):
            char_tokenizer(vocab_size=bad)


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
    for ops in ("*", "++-", "--"):  # a repeated operator drew it more often, silently
        with pytest.raises(ValueError, match="task_ops"):
            ArithSpec(ops=ops)


@pytest.mark.parametrize("ops", ["-", "+", "+-"])
def test_problems_use_only_the_allowed_operators(ops):
    """task_ops='-' produced additions (131 of 200 problems): a running total at 0 forced '+1'. Every problem
    uses only the spec's operators, its operands in range, its running totals >= 0, its term count in range."""
    from r1train.tasks.arith import make_problem

    spec = ArithSpec(min_terms=3, max_terms=5, max_operand=9, ops=ops)
    rng = random.Random(int(torch.randint(0, 2**31 - 1, ())))
    for _ in range(500):
        nums, got = make_problem(rng, spec)
        assert set(got) <= set(ops) and 3 <= len(nums) <= 5 and all(1 <= b <= 9 for b in nums)
        total = nums[0]
        for o, b in zip(got, nums[1:]):
            total += b if o == "+" else -b
            assert total >= 0
    if ops == "-":
        with pytest.raises(ValueError, match="task_max_operand .* must be >= task_max_terms - 1"):
            ArithSpec(min_terms=3, max_terms=6, max_operand=4, ops="-")


@pytest.mark.parametrize("sizes", [(2000, 100), (300, 50)])
def test_builtin_held_out_set_never_trained_on(sizes):
    """The CLI's held-out problems (load_datasets) are distinct (its 400 of 126 two-term problems counted some
    several times) and never trained on; they and the training problems are split()'s, the demo's."""
    from r1train.config import ConfigError, TrainConfig, task_spec
    from r1train.loading import load_datasets
    from r1train.tasks import arith

    n_train, n_eval = sizes
    cfg = TrainConfig(task_train_size=n_train, task_eval_size=n_eval, task_min_terms=2, task_max_terms=2,
                      seed=random.randrange(2**31))
    train, ev = load_datasets(cfg)
    assert len(train) == n_train and len(ev) == n_eval
    q = lambda r: r["prompt"][-1]["content"]  # noqa: E731
    assert not {q(r) for r in train} & {q(r) for r in ev} and len({q(r) for r in ev}) == n_eval
    assert all(q(r) == f"What is {r['expression']}?" for r in train + ev)
    want = arith.split(n_train, n_eval, cfg.seed, task_spec(cfg))
    assert tuple([arith.expression(*p) for p in part] for part in want) == \
        ([r["expression"] for r in train], [r["expression"] for r in ev])
    with pytest.raises(ConfigError, match="distinct held-out problems.*task_eval_size=400"):
        load_datasets(TrainConfig(task_eval_size=400, task_min_terms=2, task_max_terms=2))  # of 126
    small = TrainConfig(task_train_size=10, task_eval_size=2, task_min_terms=2, task_max_terms=2, task_max_operand=1)
    with pytest.raises(ConfigError, match="task_train_size"):  # 1+1 and 1-1 only: both held out
        load_datasets(small)


def test_problems_do_not_depend_on_the_flaw_share():
    """The flaws' coin flips drew from the problems' stream, so task_flaw_share changed the problems (the same
    seed, other problems): they come from their own stream. A share flaws about that share of the rows, and
    the flawed rows at a share are among those at any larger share, with the same slips."""
    seed, spec = random.randrange(2**31), ArithSpec(min_terms=3, max_terms=4, max_operand=9)
    lo, hi = sorted(random.uniform(0.1, 0.9) for _ in range(2))
    rows = {s: generate(600, seed, spec, flaw_share=s) for s in (0.0, lo, hi, 1.0)}
    assert len({tuple(r["expression"] for r in rs) for rs in rows.values()}) == 1
    assert generate(600, seed, spec, flaw_share=lo) == rows[lo]
    flawed = {s: {i for i, (r, c) in enumerate(zip(rs, rows[0.0])) if r["solution"] != c["solution"]}
              for s, rs in rows.items()}
    assert not flawed[0.0] and len(flawed[1.0]) == 600 and flawed[lo] <= flawed[hi]
    assert all(rows[lo][i] == rows[hi][i] == rows[1.0][i] for i in flawed[lo])
    assert abs(len(flawed[lo]) / 600 - lo) < 0.1


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_forward(name):
    import torch

    tok = char_tokenizer()
    m = tiny_model(name, tok, hidden_size=32, num_layers=2)
    out = m(input_ids=torch.randint(0, len(tok), (2, 7)))
    assert out.logits.shape == (2, 7, len(tok)) and torch.isfinite(out.logits).all()


# ---- the demo stages' task family


def _value(line: str) -> tuple[int, int]:
    """(true value of the step's left side, written result) of "a+b=c" or "a plus b = c" / "a 加 b = c"."""
    lhs, rhs = line.split("=")
    for w, s in (("plus", "+"), ("minus", "-"), ("\u52a0", "+"), ("\u51cf", "-")):
        lhs = lhs.replace(w, s)
    return eval(lhs.replace(" ", "")), int(rhs)


def test_split_is_held_out_and_seeded():
    from r1train.tasks import arith

    spec = ArithSpec(min_terms=3, max_terms=3, max_operand=9)
    train, ev = arith.split(2000, 300, seed=5, spec=spec)
    assert (train, ev) == arith.split(2000, 300, seed=5, spec=spec)
    e_ev = [arith.expression(*p) for p in ev]
    assert len(set(e_ev)) == 300 and not set(e_ev) & {arith.expression(*p) for p in train}
    with pytest.raises(ValueError, match="distinct held-out"):
        arith.split(10, 100, seed=0, spec=ArithSpec(min_terms=2, max_terms=2, max_operand=2))


@pytest.mark.parametrize("slip", [0.0, 0.6, 1.0])
def test_cold_start_slips_are_forgotten_carries(slip):
    from r1train.tasks import arith

    train, _ = arith.split(800, 10, seed=1, spec=ArithSpec(min_terms=3, max_terms=4, max_operand=19))
    rows = arith.cold_start_rows(train, seed=1, slip_share=slip)
    with_carry = slipped = 0
    for r, (nums, ops) in zip(rows, train):
        assert format_reward(None, [r["completion"]]) == [1.0]
        assert r["answer"] == str(eval(arith.expression(nums, ops)))
        lines = r["completion"][7:].split("</think>")[0].split("\n")
        total, wrong = nums[0], []
        for line, op, b in zip(lines, ops, nums[1:]):
            truth, written = _value(line)
            assert line.startswith(str(total))  # the chain goes on from the written (maybe wrong) total
            if arith.carries(total, op, b):
                wrong.append(written != truth)
                assert written in (truth, truth - 10 if op == "+" else truth + 10)
            else:
                assert written == truth  # only carry/borrow steps ever slip
            total = written
        assert r["completion"].endswith(f"<answer>{total}</answer>")  # self-consistent to the end
        if wrong:  # a solution forgets every carry or none
            assert all(wrong) or not any(wrong)
            with_carry += 1
            slipped += wrong[0]
    assert with_carry > 400
    assert abs(slipped / with_carry - slip) < 0.07


def test_step_word_languages_and_mixing():
    from r1train.rewards import language_consistency_reward
    from r1train.tasks import arith

    train, _ = arith.split(400, 10, seed=2, spec=ArithSpec(min_terms=3, max_terms=3))
    pure = arith.cold_start_rows(train, seed=2, words=True)
    assert all(v == 1.0 for v in language_consistency_reward(None, [r["completion"] for r in pure]))
    assert all(" plus " in r["completion"] or " minus " in r["completion"] for r in pure)
    mixed = arith.cold_start_rows(train, seed=2, words=True, mix_share=0.3)
    lines = [ln for r in mixed for ln in r["completion"][7:].split("</think>")[0].split("\n")]
    zh = sum(("\u52a0" in ln or "\u51cf" in ln) for ln in lines) / len(lines)
    assert 0.25 < zh < 0.35
    for r in mixed:  # the words change, the arithmetic does not
        assert all(_value(ln)[0] == _value(ln)[1] for ln in r["completion"][7:].split("</think>")[0].split("\n"))
        assert accuracy_reward(None, [r["completion"]], answer=[r["answer"]]) == [1.0]
    tok = char_tokenizer()
    s = mixed[0]["completion"] + "7 \u52a0 5 = 12\n12 \u51cf 3 = 9"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == s and tok.unk_token_id not in ids


def test_pretrain_corpus_styles():
    from r1train.tasks import arith

    train, _ = arith.split(2000, 10, seed=3, spec=ArithSpec(min_terms=3, max_terms=4))
    rows = arith.pretrain_rows(train, seed=3, work_share=0.3, tag_share=0.2, fact_share=0.5)
    assert len(rows) == 3000 and all(isinstance(r["prompt"], str) and r["prompt"].startswith("What is ") for r in rows)
    facts = [r for r in rows if r["prompt"].count("+") + r["prompt"].count("-") == 1]
    probs = [r for r in rows if r not in facts]
    assert len(facts) == 1000 and all(r["completion"] == r["answer"] == str(eval(r["prompt"][8:-2])) for r in facts)
    tagged = [r for r in probs if format_reward(None, [r["completion"]]) == [1.0]]
    worked = [r for r in probs if "=" in r["completion"]]
    assert abs(len(tagged) / len(probs) - 0.2) < 0.04 and abs(len(worked) / len(probs) - 0.3) < 0.04
    assert all(accuracy_reward(None, [r["completion"]], answer=[r["answer"]]) == [1.0] for r in tagged)
    for r in probs:  # untagged documents end with the answer, plainly
        if r not in tagged:
            assert "<" not in r["completion"] and r["completion"].split()[-1] == r["answer"]


def test_sft_collate_with_the_token_cache_equals_fresh_encoding():
    """The SFT token cache changes nothing: a batch collated twice through one cache (the second time from
    the cache) equals the batch encoded afresh; a cache that is full stops storing but keeps encoding."""
    from r1train.data import TokenCache, sft_collate
    from r1train.tasks import arith

    tok = char_tokenizer()
    train, _ = arith.split(24, 4, 3, ArithSpec())
    rows = arith.cold_start_rows(train, 3)
    rows[0] = {**rows[0], "prompt": rows[0]["prompt"][-1]["content"]}  # a plain-string prompt too
    kw = dict(completion_column="completion", max_length=40)
    want = sft_collate(tok, rows, **kw)
    for cache in (TokenCache(tok), TokenCache(tok, max_entries=5)):
        for batch in (rows[:10], rows, rows[::-1]):
            got = sft_collate(tok, batch, cache=cache, **kw)
            ref = sft_collate(tok, batch, **kw)
            assert all(torch.equal(a, b) for a, b in zip(got, ref))
        # a string row is one entry (prompt + completion, as TRL tokenizes it), a chat row two (prompt, completion)
        entries = sum(1 if isinstance(r["prompt"], str) else 2 for r in rows)
        assert len(cache) == min(cache.max_entries, entries)
    assert all(torch.equal(a, b) for a, b in zip(sft_collate(tok, rows, cache=TokenCache(tok), **kw), want))
