"""Rule rewards against hand-derived values; the runner's None / failure / timeout semantics; completion_text
reads a multi-message completion's first message, as TRL's rewards do."""

import asyncio
import json
import math
import random
import time

import numpy as np
import pytest
import train_helpers as H

from r1train import rewards as R

GOOD = "<think>2+3=5\n5+4=9</think><answer>9</answer>"


def test_accuracy_hand_values():
    comps = [GOOD, "<think>x</think><answer> 9.0 </answer>", "<answer>8</answer>", "no tags 9", GOOD]
    assert R.accuracy_reward(None, comps, answer=["9", "9", "9", "9", None]) == [1.0, 1.0, 0.0, 0.0, None]


def test_accuracy_last_answer_fraction_and_text():
    assert R.accuracy_reward(None, ["<answer>1</answer><answer>1/2</answer>"], answer=["0.5"]) == [1.0]
    assert R.accuracy_reward(None, ["<answer>Paris </answer>"], answer=["paris"]) == [1.0]
    assert R.accuracy_reward(None, [[{"role": "assistant", "content": GOOD}]], answer=["9"]) == [1.0]


def test_format_hand_values():
    comps = [GOOD, " <think>a</think>\n<answer>b</answer> ", "<think>a</think>", "<answer>9</answer>",
             "<think>a</think><answer>b</answer> trailing", "<think>a<answer>b</answer>"]
    assert R.format_reward(None, comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_language_consistency_hand_values():
    comps = ["<think>first add the numbers</think><answer>3</answer>",  # 4/4 english words
             "<think>first 加 then 减</think>",  # words: first, 加, then, 减 -> 2/4
             "<think>2+3=5</think><answer>5</answer>"]  # no words -> None
    assert R.language_consistency_reward(None, comps) == [1.0, 0.5, None]
    assert R.language_consistency_reward(None, comps[1:2], language="zh") == [0.5]


def test_soft_overlong_hand_values():
    f = R.soft_overlong_punishment(max_completion_len=10, soft_punish_cache=4)
    ids = [[0] * n for n in (3, 6, 7, 8, 10, 11)]
    # L <= 6: 0; 6 < L <= 10: (6 - L) / 4; L > 10: -1
    assert f(None, [""] * 6, ids) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]


def test_resolve_registry_import_path_and_errors():
    assert R.resolve("format") is R.format_reward
    assert R.resolve("r1train.rewards:format_reward") is R.format_reward
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        R.resolve("nope")
    with pytest.raises(ValueError, match="cannot import 'no_such_mod:f'"):
        R.resolve("no_such_mod:f")


def _boom_on_second(prompts, completions, completion_ids=None, **_):
    if any(c == "bad" for c in completions):
        raise RuntimeError("boom")
    return [1.0 for _ in completions]


def _slow(prompts, completions, completion_ids=None, **_):
    time.sleep(8)  # far past the runner's 0.2 s timeout: a wait for it would show whatever the machine's load
    return [1.0] * len(completions)


async def _async_len(prompts, completions, completion_ids=None, **_):
    await asyncio.sleep(0)
    return [float(len(c)) for c in completions]


def test_runner_isolates_failing_samples_timeouts_and_async():
    run = R.RewardRunner([_boom_on_second, _async_len, "accuracy"], timeout=5)
    table, failed = run(["p"] * 3, ["ok", "bad", GOOD], [[1], [2], [3]], {"answer": ["1", "1", None]})
    assert failed == [False, True, False]
    assert [row[0] for row in table] == [1.0, None, 1.0]
    assert [row[1] for row in table] == [2.0, 3.0, float(len(GOOD))]
    assert [row[2] for row in table] == [0.0, 0.0, None]
    assert run.failures == {"_boom_on_second": 1, "_async_len": 0, "accuracy": 0}
    slow = R.RewardRunner([_slow], timeout=0.2)
    t0 = time.time()
    table, failed = slow(["p"], ["x"], [[1]], {})
    assert failed == [True] and table == [[None]] and time.time() - t0 < 5.0


def test_symbolic_answers_with_math_verify():
    pytest.importorskip("math_verify")
    assert R.answers_match("\\frac{1}{2}", "0.5") and R.answers_match("x+1", "1+x")
    assert R.answers_match("\\sqrt{4}", "2") and not R.answers_match("\\sqrt{5}", "2")


SEEN_COLUMNS = []


def _answer_spy(prompts, completions, completion_ids=None, **cols):
    SEEN_COLUMNS.append({"prompts": prompts, **cols})
    return [0.0] * len(completions)


def _gold_rows(tmp_path, n=8):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "gold": str(i + 1)}) + "\n" for i in range(n)))
    return data


def test_training_rewards_receive_answer_from_answer_column(tmp_path):
    """answer_column=gold: GRPO's rewards get `answer` = each sample's gold value (the column evaluation reads),
    beside the columns under their own names, so the accuracy reward scores every sample (it returned None for
    all of them, a NaN mean and no learning signal, when only `gold` was passed)."""
    SEEN_COLUMNS.clear()
    data = _gold_rows(tmp_path)
    t = H.grpo_trainer(tmp_path / "out", f"dataset_name={data}", "answer_column=gold", "max_steps=1",
                       reward_funcs=[_answer_spy, "accuracy"])
    m = t.train()[0]
    assert math.isfinite(m["rewards/accuracy/mean"])
    (cols,) = SEEN_COLUMNS
    assert len(cols["answer"]) == 8 and cols["answer"] == cols["gold"]
    by_prompt = {f"What is {i}+1?": str(i + 1) for i in range(8)}
    assert all(a == by_prompt[p] for a, p in zip(cols["answer"], cols["prompts"]))


def test_sample_command_rewards_read_answer_column(tmp_path):
    """`r1train sample` scores with the same columns: accuracy is 0 or 1 per sample, never None (not applicable)."""
    from r1train.cli import main

    data = _gold_rows(tmp_path, 2)
    out = tmp_path / "samples"
    assert main(["sample", *H.FAST, f"dataset_name={data}", "answer_column=gold", "reward_funcs=accuracy",
                 "num_generations=2", f"output_dir={out}"]) == 0
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["rewards"]["accuracy"] in (0.0, 1.0) for r in rows)


def test_missing_answer_column_is_an_error_naming_it(tmp_path):
    from r1train.config import load_config
    from r1train.data import DatasetError
    from r1train.loading import load_datasets

    data = _gold_rows(tmp_path)
    cfg = load_config(overrides=[f"dataset_name={data}"])  # answer_column=answer: no such column
    with pytest.raises(DatasetError, match=r"answer_column='answer': no row .* has this column.*'gold'"):
        load_datasets(cfg)
    assert len(load_datasets(load_config(overrides=[f"dataset_name={data}", "reward_funcs=format"]))[0]) == 8


# ---- TRL 1.16's extra keyword arguments: trainer_state, log_extra, log_metric
def _hooks(prompts, completions, completion_ids=None, trainer_state=None, log_extra=None, log_metric=None, **_):
    """Logs each completion's length and the step; raises on 'bad' after logging (its logs must not stay)."""
    log_extra("length", [len(c) for c in completions])
    log_metric("hooks/step", float(trainer_state.global_step))
    if "bad" in completions:
        raise RuntimeError("bad")
    return [float(trainer_state.global_step)] * len(completions)


def _no_kwargs(prompts, completions, completion_ids):
    """No **kwargs: TRL's extra arguments are not passed to it (it worked before they were)."""
    return [1.0] * len(completions)


def _log_three(prompts, completions, log_metric, **_):
    log_metric("hooks/step", 3.0)
    return [0.0] * len(completions)


def test_runner_passes_trl_kwargs_and_keeps_what_returned_calls_logged():
    from transformers import TrainerState

    run = R.RewardRunner([_hooks, _no_kwargs, _log_three], timeout=5)
    state = TrainerState(global_step=7)
    table, failed = run(["p"] * 3, ["ok", "bad", "okay"], [[1], [2], [3]], {}, trainer_state=state)
    assert table == [[7.0, 1.0, 0.0], [None, 1.0, 0.0], [7.0, 1.0, 0.0]] and failed == [False, True, False]
    # the batch call raised (its logs dropped), the per-sample calls of "ok" and "okay" returned
    assert run.last_extra == [{"length": 2}, {}, {"length": 4}]
    assert run.take_metrics() == {"hooks/step": [7.0, 7.0, 3.0]} and run.take_metrics() == {}
    run([], [], [], {})  # outside training (`r1train sample`): a TrainerState at step 0
    assert run.take_metrics() == {"hooks/step": [0.0, 3.0]}


def _misuse(how):
    def misuse(prompts, completions, log_extra, log_metric, **_):
        how(log_extra, log_metric, len(completions))
        return [0.0] * len(completions)
    return misuse


@pytest.mark.parametrize("how, msg", [
    (lambda e, m, n: e("c", [1] * (n + 1)), "logged 3 values for column 'c' through log_extra for 2 completions"),
    (lambda e, m, n: e("c", 5), r"called log_extra\(str 'c', int 5\); it takes a column name \(str\) and a list"),
    (lambda e, m, n: e("c", [object()] * n), r"logged a value the completions log \(JSON\) cannot hold for column"),
    (lambda e, m, n: m("x", "1"), r"called log_metric\(str 'x', str '1'\); it takes a metric name \(str\) and a "
                                  "finite number"),
    (lambda e, m, n: m("x", float("nan")), r"called log_metric\(str 'x', float nan\)"),
])
def test_bad_trl_hook_calls_are_one_clear_error(how, msg):
    run = R.RewardRunner([_misuse(how)], timeout=5)
    with pytest.raises(R.RewardError, match=r"reward 'misuse' " + msg):
        run(["p", "q"], ["a", "b"], [[1], [2]], {})


SEEN_STATES = []


def curriculum(prompts, completions, completion_ids=None, trainer_state=None, log_extra=None, log_metric=None,
               **kw):
    """A TRL reward shaped by training progress (TRL's documented use of trainer_state)."""
    s = trainer_state
    SEEN_STATES.append((s.global_step, s.max_steps, s.epoch, s.num_train_epochs))
    log_metric("curriculum/progress", s.global_step / s.max_steps)
    log_extra("seen_step", [s.global_step] * len(completions))
    return [float(s.global_step < 1)] * len(completions)


def test_grpo_rewards_get_trl_trainer_state_log_metric_and_log_extra(tmp_path):
    SEEN_STATES.clear()
    t = H.grpo_trainer(tmp_path, "max_steps=3", reward_funcs=[curriculum, _log_three])
    hist = t.train()
    # TRL: at step k's generation global_step is k (steps done), epoch k / steps per epoch
    prompts_per_step = t.cfg.per_device_train_batch_size * t.cfg.gradient_accumulation_steps // t.cfg.num_generations
    steps_per_epoch = len(t.train_rows) / prompts_per_step
    assert SEEN_STATES == [(k, 3, k / steps_per_epoch, 1) for k in range(3)]
    assert [h["curriculum/progress"] for h in hist] == [k / 3 for k in range(3)]
    assert [h["hooks/step"] for h in hist] == [3.0] * 3
    assert [h["reward"] for h in hist] == [1.0, 0.0, 0.0]
    with open(tmp_path / "completions.jsonl") as fh:
        rows = [json.loads(x) for x in fh]
    assert len(rows) == 3 * t.cfg.per_device_train_batch_size
    assert all(r["seen_step"] == r["step"] - 1 for r in rows)


def _own_metric(name):
    def own_metric(prompts, completions, log_metric, **_):
        log_metric(name, 1.0)
        return [0.0] * len(completions)
    return own_metric


def _own_column(prompts, completions, log_extra, **_):
    log_extra("advantage", [1.0] * len(completions))
    return [0.0] * len(completions)


@pytest.mark.parametrize("fn, msg", [
    (_own_metric("reward"), r"log_metric: \['reward'\] are metrics the trainer logs itself"),
    # the loss phase's and the loop's own keys (they overwrote the reward's value without an error)
    (_own_metric("entropy"), r"log_metric: \['entropy'\] are metrics the trainer logs itself"),
    (_own_metric("loss"), r"log_metric: \['loss'\] are metrics the trainer logs itself"),
    (_own_metric("learning_rate"), r"log_metric: \['learning_rate'\] are metrics the trainer logs itself"),
    (_own_metric("eval/accuracy"), r"log_metric: \['eval/accuracy'\] are metrics the trainer logs itself"),
    (_own_column, r"log_extra: columns \['advantage'\] are the completions log's")])
def test_trl_hooks_cannot_overwrite_the_trainers_own(tmp_path, fn, msg):
    t = H.grpo_trainer(tmp_path, "max_steps=1", reward_funcs=[fn])
    with pytest.raises(R.RewardError, match=msg):
        t.train()
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text().strip()


def test_a_logged_metric_of_another_name_is_logged(tmp_path):
    t = H.grpo_trainer(tmp_path, "max_steps=1", reward_funcs=[_own_metric("mine/x")])
    assert t.train()[0]["mine/x"] == 1.0


# ---- audit: answer comparison, format, missing completions
def test_format_needs_each_tag_once_in_order():
    """A second <answer> (accuracy reads the last: a model could hedge), a second <think>, or a tag inside the other
    block is not the R1 format."""
    ok = "<think>\nsteps\n</think>\n<answer>\n7\n</answer>\n"
    comps = [ok,
             "<think>a</think><answer>6</answer><answer>7</answer>",
             "<think>a</think><think>b</think><answer>7</answer>",
             "<think><think>a</think><answer>7</answer>",
             "<think>a</think><answer>6</think><answer>7</answer>",
             "<think>a <answer>6</answer></think><answer>7</answer>"]
    assert R.format_reward(None, comps) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("pred, gold, want", [
    ("12,000", "12000", 1.0), ("3 141 592", "3141592", 1.0), ("-2,500.5", "-2500.5", 1.0),  # thousands separators
    ("4,7", "47", 0.0), ("1 9", "19", 0.0), ("12,34", "1234", 0.0),  # a pair, a list, a decimal comma: not 47
])
def test_commas_and_spaces_count_only_as_thousands_separators(pred, gold, want):
    assert R.accuracy_reward(None, [f"<think>t</think><answer>{pred}</answer>"], answer=[gold]) == [want]


def test_integer_answers_match_exactly_however_large():
    """Off by one is a wrong count; a relative tolerance made 2000001 match 2000000."""
    comps = [f"<answer>{x}</answer>" for x in ("2000001", "2000000", "2000000.0", "$\\boxed{2000000}$")]
    assert R.accuracy_reward(None, comps, answer=["2000000"] * 4) == [0.0, 1.0, 1.0, 1.0]
    big = 10**20 + 1  # beyond float's 53-bit mantissa
    assert R.accuracy_reward(None, [f"<answer>{big - 1}</answer>", f"<answer>{big}</answer>"],
                             answer=[str(big)] * 2) == [0.0, 1.0]
    assert R.accuracy_reward(None, ["<answer>0.0000000004</answer>"], answer=["0"]) == [0.0]
    # a decimal gold still allows a rounded answer
    assert R.accuracy_reward(None, ["<answer>0.6667</answer>", "<answer>2/3</answer>"],
                             answer=["0.66666666", "0.666667"]) == [0.0, 1.0]


def test_huge_exponent_is_no_number_and_returns_fast():
    t0 = time.time()
    assert R.accuracy_reward(None, ["<answer>1e999999999</answer>"], answer=["1"]) == [0.0]
    assert time.time() - t0 < 5


def test_missing_completions_are_empty_text():
    """None, no messages, or a message with content None is no text: not the word 'None' (an English word
    for the language reward, 1.0)."""
    missing = [None, [], [{"role": "assistant", "content": None}], [{"role": "assistant"}]]
    assert R.language_consistency_reward(None, missing) == [None] * 4
    assert R.format_reward(None, missing) == [0.0] * 4
    assert R.accuracy_reward(None, missing, answer=["None"] * 4) == [0.0] * 4


def test_message_content_as_text_parts():
    """A chat message's content may be a list of parts (transformers' multimodal format)."""
    parts = [{"type": "text", "text": "<think>one plus one</think>"}, {"type": "image"},
             {"type": "text", "text": "<answer>2</answer>"}]
    c = [[{"role": "assistant", "content": parts}]]
    assert R.format_reward(None, c) == [1.0]
    assert R.accuracy_reward(None, c, answer=["2"]) == [1.0]
    assert R.language_consistency_reward(None, c) == [1.0]


def test_blank_or_nan_gold_is_not_applicable():
    """A row without a gold answer (blank text, or NaN as pandas loads a missing value) is None: an empty
    <answer> scored 1.0 against a blank gold, and 'nan' against NaN."""
    comps = ["<answer></answer>", "<answer> </answer>", "<answer>nan</answer>", "<answer>5</answer>"]
    assert R.accuracy_reward(None, comps, answer=["", "   ", float("nan"), 5]) == [None, None, None, 1.0]


def test_numpy_nan_gold_is_missing():
    """A missing gold answer given as numpy's float32 NaN (not a Python float subclass) is "no gold answer"
    (None), as a Python NaN is: never a gold "nan" that an <answer>nan</answer> matches."""
    x = random.randint(-10**6, 10**6)
    golds = [np.float32("nan"), np.float16("nan"), float("nan"), None, np.float32(x), x, 10**400]
    assert [R.has_gold(g) for g in golds] == [False, False, False, False, True, True, True]
    comps = ["<answer>nan</answer>"] * 4 + [f"<answer>{x}</answer>"] * 3
    out = R.accuracy_reward(None, comps, answer=golds)
    assert out[:4] == [None] * 4 and out[4] == 1.0 and out[5] == 1.0 and out[6] == 0.0


def test_text_answer_with_final_full_stop():
    comps = ["<answer>Mount Everest.</answer>", "<answer>mount  everest</answer>", "<answer>K2.</answer>"]
    assert R.accuracy_reward(None, comps, answer=["Mount Everest"] * 3) == [1.0, 1.0, 0.0]
    assert R.accuracy_reward(None, ["<answer>6!</answer>"], answer=["6"]) == [0.0]  # 720, not 6


def test_language_counts_each_chinese_character_as_a_word():
    """Chinese has no spaces: a whole run of characters was one 'word' beside each English word, so a chain of
    thought of 12 Chinese characters and 2 English words scored 0.5 for zh and 2/3 for en."""
    cot = "<think>先把两个数相加然后 check 再除以 two</think><answer>3</answer>"  # 12 characters, 2 English words
    assert R.language_consistency_reward(None, [cot], language="zh") == [12 / 14]
    assert R.language_consistency_reward(None, [cot], language="en") == [2 / 14]


def test_language_column_does_not_replace_the_configured_language():
    """Datasets often have a `language` column; every column reaches the rewards by name, and it took the place of
    cfg.language in the built-in language reward, which then raised on every sample (the step stopped)."""
    from r1train.config import load_config

    cfg = load_config(overrides=["reward_funcs=language", "language=zh"])
    run = R.RewardRunner(["language"], cfg, timeout=5)
    comps = ["<think>加减</think><answer>1</answer>", "<think>add it</think><answer>1</answer>"]
    table, failed = run(["p", "q"], comps, [[1], [2]], {"language": ["English", "English"]})
    assert table == [[1.0], [0.0]] and failed == [False, False]


def test_language_per_row_as_a_dataset_column():
    """Called directly (as TRL does, with the dataset's columns), `language` may name each row's target language."""
    comps = ["<think>加减</think>", "<think>加减</think>", "<think>add 加</think>"]
    assert R.language_consistency_reward(None, comps, language=["zh", "en", "en"]) == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match=r"language: 2 values for 3 completions"):
        R.language_consistency_reward(None, comps, language=["zh", "en"])


def test_accuracy_answer_column_of_another_length_is_an_error():
    """One gold answer per completion: a shorter or longer `answer` list is an error naming it (zip scored only the
    first len(answer) completions and returned a shorter list)."""
    comps = [f"<think>x</think><answer>{i}</answer>" for i in range(4)]
    assert R.accuracy_reward(None, comps, answer=[str(i) for i in range(4)]) == [1.0] * 4
    for n in (3, 5):
        with pytest.raises(ValueError, match="answer"):
            R.accuracy_reward(None, comps, answer=[str(i) for i in range(n)])


# ---- completion_text: TRL's completion[0]["content"]

TURNS = [[{"role": "assistant", "content": "<think>2 plus 3</think><answer>5</answer>"},
          {"role": "tool", "content": "calculator: 7"}],
         [{"role": "assistant", "content": "<answer>7</answer>"},
          {"role": "user", "content": "sure?"},
          {"role": "assistant", "content": "<think>check</think><answer>5</answer>"}]]


def test_completion_text_reads_the_first_message_as_trl():
    """A multi-message completion (assistant turn, then a tool or user turn) is scored on its first message,
    as trl.rewards' accuracy_reward / think_format_reward read completion[0]["content"]."""
    assert [R.completion_text(c) for c in TURNS] == [c[0]["content"] for c in TURNS]
    assert R.accuracy_reward(None, TURNS, answer=["5", "5"]) == [1.0, 0.0]
    assert R.format_reward(None, TURNS) == [1.0, 0.0]
    trl_rewards = pytest.importorskip("trl.rewards")
    ours = [[{"role": "assistant", "content": R.completion_text(c)}] for c in TURNS]
    assert trl_rewards.think_format_reward(ours) == trl_rewards.think_format_reward(TURNS) == [1.0, 0.0]


def test_completion_text_keeps_the_missing_text_contract():
    """None, no messages, a first message with None or no content: "" (never "None"); strings and text parts
    as before."""
    for c in (None, [], [{"role": "assistant", "content": None}], [{"role": "assistant"}],
              [{"role": "assistant", "content": None}, {"role": "tool", "content": "x"}]):
        assert R.completion_text(c) == "", c
    assert R.completion_text("<answer>1</answer>") == "<answer>1</answer>"
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert R.completion_text([{"role": "assistant", "content": parts}, {"role": "tool", "content": "c"}]) == "ab"


# ---- review findings: hangs, anagrams, the question as its own answer, LaTeX number spellings, accepted lists
@pytest.mark.parametrize("pred", ["2^{2^{40}}", "10^{999999999}", "9^{9^{9^{9}}}", "99999999999!", "2^2^40"])
@pytest.mark.parametrize("gold", ["5", "x^2+1"])
def test_a_costly_answer_is_scored_fast(pred, gold):
    """sympy evaluated these exactly in C code holding the GIL: the reward never returned and RewardRunner's timeout
    could not fire (nor is there one at evaluation or rejection sampling). They score 0, at once."""
    t0 = time.time()
    assert R.accuracy_reward(None, [f"<answer>{pred}</answer>"], answer=[gold]) == [0.0]
    assert time.time() - t0 < 5


@pytest.mark.parametrize("pred, gold", [("listen", "silent"), ("pots", "stop"), ("Mary", "Army"), ("no", "on"),
                                        ("York New", "New York"), ("act the", "the cat")])
def test_words_are_not_products_of_symbols(pred, gold):
    """math-verify reads bare letters as a product of symbols, so anagrams scored 1.0."""
    assert R.accuracy_reward(None, [f"<answer>{pred}</answer>"], answer=[gold]) == [0.0]
    assert R.accuracy_reward(None, [f"<answer>{gold}</answer>"], answer=[gold]) == [1.0]


def test_the_question_is_not_its_own_answer():
    """A numeric gold answer is matched by a number (or a form such as \\sqrt{4}), not by an arithmetic expression
    of that value: on the built-in task, answering "What is 7+5-7+8?" with 7+5-7+8 scored 1.0."""
    from r1train.tasks.arith import ArithSpec, draw

    rng = random.Random(int(np.random.randint(0, 2**31 - 1)))
    for nums, ops, expr in draw(rng, ArithSpec(), 20):
        value = nums[0] + sum(b if o == "+" else -b for o, b in zip(ops, nums[1:]))
        comps = [f"<answer>{expr}</answer>", f"<answer>{value}</answer>", f"<answer>$\\boxed{{{value}}}$</answer>"]
        assert R.accuracy_reward(None, comps, answer=[str(value)] * 3) == [0.0, 1.0, 1.0]
    assert R.answers_match("\\sqrt{4}", "2") and not R.answers_match("2\\times 1", "2")


def test_an_answer_stating_no_single_value_does_not_match_a_number():
    """Sign clutter, a false equation and two numbers scored 1.0 against a numeric gold (math-verify reads one number
    of them; '--3' for 3 was rewarded in the demo's own run); one value in any spelling still matches."""
    rng = random.Random(int(np.random.randint(0, 2**31 - 1)))
    for _ in range(20):
        v, w = rng.randint(-999, 999), rng.randint(1000, 1999)  # w != v
        bad = [f"--{v}", f"{v}-", f"+-{v}", f"-{v}-", f"{w}={v}", f"{w} = {v}", f"{w}\n{v}", f"{v} \\approx {w}",
               f"{v}\\text{{ (or }}{w})", f"{w} \\lor {v}", f"x={w}\\quad x={v}"]
        good = [f"{v}", f"x = {v}", f"\\boxed{{{v}}}", f"({v})", f"{v}.0", f"{v}\\text{{ cm}}"]
        got = R.accuracy_reward(None, [f"<answer>{p}</answer>" for p in bad + good], answer=[str(v)] * (len(bad) + 6))
        assert got == [0.0] * len(bad) + [1.0] * len(good), list(zip(bad + good, got))
    assert R.answers_match("\\sqrt[3]{27}", "3") and R.answers_match("\\sqrt{144}", "12")


@pytest.mark.parametrize("pred, gold", [("\\$5", "5"), ("\\$18.50", "18.5"), ("\\$1,000", "1000"),
                                        ("10\\,000", "10000"), ("\\boxed{10\\,000}", "10000"), ("10,\\!000", "10000"),
                                        ("1{,}000", "1000"), ("\\dfrac{3}{6}", "0.5"), ("-\\frac{1}{2}", "-0.5"),
                                        ("x = 13", "13")])
def test_latex_spellings_of_a_number(pred, gold):
    """An escaped dollar sign read as a math delimiter, a thin-space thousands separator read as 1 * 0: 0.0."""
    assert R.accuracy_reward(None, [f"<answer>{pred}</answer>"], answer=[gold]) == [1.0]
    assert R.accuracy_reward(None, [f"<answer>{pred}</answer>"], answer=[str(float(gold) + 1)]) == [0.0]


def test_a_list_of_accepted_answers():
    """A gold column of lists: any accepted answer matches (its text "['5', 'five']" matched none); a list of
    none is no gold answer."""
    comps = ["<answer>five</answer>", "<answer>5</answer>", "<answer>6</answer>", "<answer>5</answer>"]
    golds = [["5", "five"], ("5", "five"), ["5", "five"], [None, " "]]
    assert R.accuracy_reward(None, comps, answer=golds) == [1.0, 1.0, 0.0, None]
    assert not R.has_gold([]) and R.has_gold([None, "x"])


# ---- a generation prompt that opens the thought: DeepSeek-R1-Distill's and Qwen3's templates end it with "<think>\n"
_WORDS = ["add", "the", "carry", "so", "we", "get", "first", "then", "check", "it"]


def _thought(rng):
    return " ".join(rng.choice(_WORDS + [str(rng.randint(0, 999))]) for _ in range(rng.randint(1, 12)))


def _prefilled_prompts(rng, n):
    """n rendered prompts that end by opening the thought, in a few templates' spellings and trailing whitespace."""
    heads = ["<｜begin▁of▁sentence｜><｜User｜>{q}<｜Assistant｜>", "Question: {q}\nAnswer: ",
             "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"]
    return [rng.choice(heads).format(q=f"What is {rng.randint(0, 99)}+{rng.randint(0, 99)}?") + "<think>" +
            rng.choice(["", "\n", "\n\n", " ", "\r\n"]) for _ in range(n)]


def test_format_scores_a_completion_after_a_prompt_that_opens_the_thought():
    """After a prompt that ends with <think> (maybe whitespace after it) the completion starts inside the thought:
    well formed, it scores 1.0 as <think> + completion (every completion scored 0.0); one that opens <think> again
    holds two and scores 0.0; text prompts are read as they are, chat prompts through prompts_text (their
    rendering). A prompt that does not end by opening the thought scores exactly as before."""
    rng = random.Random(random.getrandbits(32))
    n = 12
    rendered = _prefilled_prompts(rng, n)
    chats = [[{"role": "user", "content": p}] for p in rendered]  # the rendering is what counts, not the messages
    ws = [rng.choice(["", "\n", " \n\n"]) for _ in range(n)]
    well = [f"{ws[i]}{_thought(rng)}{ws[i]}</think>{ws[i]}<answer>{rng.randint(0, 99)}</answer>{ws[i]}"
            for i in range(n)]
    again = [rng.choice(["", "\n", " "]) + "<think>" + c.lstrip() for c in well]
    unclosed = [c.replace("</think>", "") for c in well]
    for comps, want in ((well, 1.0), (again, 0.0), (unclosed, 0.0)):
        assert R.format_reward(rendered, comps) == [want] * n
        assert R.format_reward(chats, [[{"role": "assistant", "content": c}] for c in comps],
                               prompts_text=rendered) == [want] * n
    # not prefilled: a prompt that ends elsewhere (after a closed thought, text after <think>, no tag) or a chat
    # prompt without its rendering scores the completion alone, as before
    plain = [p.rstrip().removesuffix("<think>") + rng.choice(["<think>x</think>\n", "<think> Let me see.", "<think>x",
                                                               "", "</think>", "<think/>"]) for p in rendered]
    mixed = [rng.choice([w, a, u]) for w, a, u in zip(well, again, unclosed)]
    before = R.format_reward(None, mixed)
    assert before == [float(c.lstrip().startswith("<think>") and "</think>" in c) for c in mixed]
    assert R.format_reward(plain, mixed) == R.format_reward(chats, mixed) == before
    assert R.format_reward(chats, mixed, prompts_text=plain) == before
    assert R.format_reward(None, well) == [0.0] * n and R.format_reward(None, again) == [1.0] * n
    with pytest.raises(ValueError, match="prompts_text: 1 values for 2 completions"):
        R.format_reward(None, well[:2], prompts_text=rendered[:1])


def test_language_reads_the_thought_from_the_start_after_a_prompt_that_opens_it():
    """After a prefilled <think> the thought runs from the completion's start to </think>: the answer's words are
    not part of it (the whole completion was read, as for a completion with no thought)."""
    rng = random.Random(random.getrandbits(32))
    rendered = _prefilled_prompts(rng, 6)
    comps = [f"{_thought(rng)} 加</think><answer>{rng.choice(['五', '六', '七'])}</answer>" for _ in rendered]
    words = [len(R._WORD.findall(c.split("</think>")[0])) for c in comps]
    assert R.language_consistency_reward(rendered, comps) == [(w - 1) / w for w in words]
    # no prefill: no thought found, the whole text is read, without its tags (the answer is one more word, Chinese)
    assert R.language_consistency_reward(None, comps) == [(w - 1) / (w + 1) for w in words]
    lang = R.RewardRunner(["language"], R1Cfg(), timeout=5)
    table, _ = lang([[{"role": "user", "content": "q"}]] * 6, comps, [[1]] * 6, {}, prompts_text=rendered)
    assert [row[0] for row in table] == [(w - 1) / w for w in words]


def test_a_prompt_ending_with_an_empty_closed_thought_scores_the_answer_after_it():
    """Qwen3's template with enable_thinking=False ends the prompt with "<think>\\n\\n</think>\\n\\n": the template
    wrote the (empty) thought, so a completion that answers is the format (it scored 0.0: the completion alone has
    no thought), one that thinks again holds two thoughts and is not, and the language reward finds no words in the
    thought (None). A thought with words in the prompt is not read as the completion's."""
    rng = random.Random(random.getrandbits(32))
    n = 10
    tails = ["<think>\n\n</think>\n\n", "<think></think>", "<think> </think>\n"]
    closed = [p.rstrip().removesuffix("<think>") + rng.choice(tails) for p in _prefilled_prompts(rng, n)]
    answers = [rng.choice(["", "\n"]) + f"<answer>{rng.randint(0, 99)}</answer>" for _ in range(n)]
    thinks = [f"<think>{_thought(rng)}</think>{a}" for a in answers]
    assert R.format_reward(closed, answers) == [1.0] * n
    assert R.format_reward(None, answers, prompts_text=closed) == [1.0] * n
    assert R.format_reward(closed, thinks) == [0.0] * n
    assert R.language_consistency_reward(closed, answers) == [None] * n
    worded = [p.replace("</think>", "some words</think>") for p in closed]
    assert R.format_reward(worded, answers) == [0.0] * n and R.format_reward(worded, thinks) == [1.0] * n


def test_language_reward_does_not_count_tag_names_as_words():
    """Without a closed thought the whole text is read: its tags (<think>, <answer>, ...) are not words, so a
    Chinese thought cut short before </think> is all Chinese, and an answer alone has no words (None)."""
    rng = random.Random(random.getrandbits(32))
    han = "".join(rng.choice("加减乘除等于") for _ in range(rng.randint(1, 9)))
    assert R.language_consistency_reward(None, [f"<think>{han}"], language="zh") == [1.0]
    assert R.language_consistency_reward(None, [f"<answer>{rng.randint(0, 9)}</answer>"]) == [None]
    assert R.language_consistency_reward(None, [f"<think>{han}</think><answer>x</answer>"], language="zh") == [1.0]


class R1Cfg:
    language = "en"
    max_completion_length = 8
    overlong_buffer_len = 2


def test_answer_rewards_read_the_completion_alone_after_a_prefilled_thought():
    rng = random.Random(random.getrandbits(32))
    rendered = _prefilled_prompts(rng, 8)
    golds = [str(rng.randint(0, 99)) for _ in rendered]
    comps = [f"{_thought(rng)}</think><answer>{g if rng.random() < 0.5 else int(g) + 1}</answer>" for g in golds]
    want = [float(R.extract_answer(c) == g) for c, g in zip(comps, golds)]
    assert R.accuracy_reward(rendered, comps, answer=golds) == want
    assert R.accuracy_reward(None, comps, answer=golds, prompts_text=rendered) == want


SEEN_TEXTS = []


def _names_prompts_text(prompts, completions, completion_ids=None, prompts_text=None, **_):
    SEEN_TEXTS.append(prompts_text)
    if "bad" in map(R.completion_text, completions):
        raise RuntimeError("bad")
    return [0.0] * len(completions)


def _takes_kwargs(prompts, completions, **kw):
    """A TRL-style function: it gets exactly TRL's arguments and the columns."""
    SEEN_TEXTS.append(sorted(kw))
    return [0.0] * len(completions)


def test_runner_passes_prompts_text_to_a_function_that_names_it():
    """prompts_text reaches the functions that name it (format and language do), the i-th alone in a per-sample
    retry, and no function that only takes **kwargs (TRL passes no such argument); a dataset column of that name
    still reaches those."""
    from r1train.data import reward_columns

    SEEN_TEXTS.clear()
    rng = random.Random(random.getrandbits(32))
    rendered = _prefilled_prompts(rng, 3)
    comps = [f"{_thought(rng)}</think><answer>1</answer>", "bad", "<think>x</think><answer>1</answer>"]
    run = R.RewardRunner([_names_prompts_text, _takes_kwargs, "format"], timeout=5)
    rows = [{"prompt": [{"role": "user", "content": str(i)}], "prompts_text": f"col{i}"} for i in range(3)]
    table, failed = run([r["prompt"] for r in rows], comps, [[1]] * 3, reward_columns(rows, 1, "answer"),
                        prompts_text=rendered)
    assert [row[2] for row in table] == [1.0, 0.0, 0.0] and failed == [False, True, False]
    assert SEEN_TEXTS == [rendered, [rendered[0]], [rendered[1]], [rendered[2]],
                          ["completion_ids", "log_extra", "log_metric", "prompts_text", "trainer_state"]]
    SEEN_TEXTS.clear()
    table, _ = run([r["prompt"] for r in rows], comps[:1] * 3, [[1]] * 3, {})  # no prompts_text: none known
    assert [row[2] for row in table] == [0.0] * 3 and SEEN_TEXTS[0] is None
    with pytest.raises(ValueError, match="prompts_text: 2 values for 3 completions"):
        run([r["prompt"] for r in rows], comps, [[1]] * 3, {}, prompts_text=rendered[:2])


def test_grpo_rewards_get_the_rendered_prompts_a_template_opens_the_thought_in(tmp_path, monkeypatch):
    """GRPOTrainer passes each sample's generation prompt as rendered for sampling (chat prompts through the chat
    template with chat_template_kwargs, text prompts as they are): with a template that ends it with "<think>\\n"
    the format reward scores a well-formed completion without the tag 1.0 (0.0 for every completion before)."""
    from r1train import grpo
    from r1train.config import load_config
    from r1train.loading import load_datasets, load_model_and_tokenizer

    SEEN_TEXTS.clear()
    rng = random.Random(random.getrandbits(32))
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}?"}], "answer": "1"}
            for _ in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / 'out'}", f"dataset_name={data}",
                                          "chat_template_kwargs={think: true}"])
    model, tok = load_model_and_tokenizer(cfg)
    tok.chat_template += "{% if add_generation_prompt and think %}<think>\n{% endif %}"
    t = grpo.GRPOTrainer(cfg, model, tok, load_datasets(cfg)[0], reward_funcs=[_names_prompts_text, "format"])
    G = cfg.num_generations
    thoughts = [f"{_thought(rng)}</think>\n<answer>{rng.randint(0, 9)}</answer>" for _ in range(2 * G)]
    monkeypatch.setattr(grpo, "decode_completions", lambda tok, ro: thoughts[:ro.completion_ids_BT.shape[0]])
    table = t._rollout(0, rows[:2], [0, 1])[3]
    want = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False, think=True)
            for r in rows[:2]]
    assert all(w.endswith("<|assistant|><think>\n") for w in want)
    assert SEEN_TEXTS == [[w for w in want for _ in range(G)]]
    assert [row[1] for row in table] == [1.0] * (2 * G)
    texts = [f"Q{rng.randint(0, 99)}: <think>", f"Q{rng.randint(0, 99)}: "]  # text prompts: as they are
    table = t._rollout(1, [{"prompt": p, "answer": "1"} for p in texts], [2, 3])[3]
    assert SEEN_TEXTS[1] == [p for p in texts for _ in range(G)]
    assert [row[1] for row in table] == [1.0] * G + [0.0] * G


def test_sample_rows_renders_each_prompt_once_and_hands_on_the_rendering(tmp_path, monkeypatch):
    """sample_rows renders each chat prompt once (chat_template_kwargs applied) and keeps the rendering per completion
    in rollout.prompt_texts, which rejection sampling and `r1train sample` give the rewards (they rendered every
    prompt a second time): equal to rendered_prompts, one prompt_text call per prompt."""
    from r1train import data as D
    from r1train.config import load_config
    from r1train.loading import load_model_and_tokenizer
    from r1train.rollout import sample_rows

    rng = random.Random(random.getrandbits(32))
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / 'out'}", "chat_template_kwargs={think: true}",
                                          "max_completion_length=3"])
    model, tok = load_model_and_tokenizer(cfg)
    tok.chat_template += "{% if add_generation_prompt and think %}<think>\n{% endif %}"
    rows = [{"prompt": [{"role": "user", "content": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}?"}]}
            for _ in range(rng.randint(2, 5))] + [{"prompt": f"Q{rng.randint(0, 99)}:"}]
    k, bs = rng.randint(1, 3), rng.randint(1, 3)
    want = D.rendered_prompts(tok, [r["prompt"] for r in rows], cfg.chat_template_kwargs, k)
    calls = []
    real = D.prompt_text
    monkeypatch.setattr(D, "prompt_text", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = [t for _, chunk, ro, texts in sample_rows(model, tok, rows, num_samples=k, cfg=cfg, batch_size=bs)
           for t in ro.prompt_texts]
    assert got == want and len(calls) == len(rows)
    assert all(w.endswith("<think>\n") for w in want[:-k]) and want[-1] == rows[-1]["prompt"]


@pytest.mark.parametrize("gold, pred", [(r"\text{Monday}", "Monday"), ("Monday", r"\text{Monday}"),
                                        (r"\text{(C)}", "C"), (r"\textbf{(C)}", "(c)"), (r"\text{yes}", "Yes."),
                                        (r"$\boxed{\text{B}}$", "B"), (r"\mathrm{Paris}", "paris")])
def test_word_golds_in_latex_text_commands_match_the_word(gold, pred):
    """MATH-style golds (\\text{(C)}, \\text{Monday}) against the bare word, either way round (both scored 0:
    words are not sent to math-verify, and the text comparison kept the command); another word still fails."""
    assert R.accuracy_reward(None, [f"<answer>{pred}</answer>"], answer=[gold]) == [1.0]
    assert R.accuracy_reward(None, ["<answer>Tuesday</answer>", "<answer>(D)</answer>"], answer=[gold] * 2) == [0.0,
                                                                                                              0.0]


@pytest.mark.parametrize("pred, gold", [("2^3", "8"), ("3^{2}", "9"), ("2**3", "8"), ("(1+1)^3", "8")])
def test_a_power_is_an_expression_not_its_value(pred, gold):
    """A numeric gold is never matched by an arithmetic expression (README): powers were (2^3 scored 1 for 8)."""
    assert R.accuracy_reward(None, [f"<answer>{pred}</answer>"], answer=[gold]) == [0.0]
    assert R.accuracy_reward(None, [f"<answer>{gold}</answer>"], answer=[gold]) == [1.0]
