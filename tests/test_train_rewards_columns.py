"""What reward functions receive: the dataset columns TRL 1.16 forwards (all but prompt, completion and
completion_ids), copies only of what a function can hold (none for r1train's own rewards), and GRPOTrainer's
reward_funcs given in code, with reward_weights checked against them (TRL's rule)."""

import functools
import json
import random

import pytest
import train_helpers as H

from r1train import rewards as R
from r1train.data import reward_columns


def _spy(seen):
    def spy(prompts, completions, completion_ids, **kw):
        seen.append({**{k: v for k, v in kw.items() if k not in R.TRL_KWARGS}, "completion_ids": completion_ids})
        return [0.0] * len(completions)
    return spy


# ---- TRL 1.16, GRPOTrainer._calculate_rewards: every input column but "prompt", "completion", "completion_ids"
def test_reward_functions_get_every_column_trl_forwards():
    """A prompt-completion dataset's reference completion is no reward argument; completion_ids is always the
    generated ids, whatever a column of that name holds."""
    rng = random.Random()
    extra = {f"col{k}": rng.random() for k in range(rng.randint(1, 4))}
    rows = [{"prompt": f"q{i}", "completion": f"ref{i}", "completion_ids": [7, i], "answer": str(i), **extra}
            for i in range(3)]
    seen, G = [], 2
    ids = [[rng.randint(0, 9)] for _ in range(3 * G)]
    R.RewardRunner([_spy(seen)], timeout=5)([r["prompt"] for r in rows for _ in range(G)], ["c"] * (3 * G), ids,
                                           reward_columns(rows, G, "answer"))
    want = {k for r in rows for k in r} - {"prompt", "completion", "completion_ids"}
    assert set(seen[0]) - {"completion_ids"} == want
    assert seen[0]["completion_ids"] == ids
    assert all(seen[0][k] == [r[k] for r in rows for _ in range(G)] for k in want)


def test_answer_column_named_completion_still_reaches_accuracy_as_answer():
    """answer_column is r1train's: its values come as `answer` even when its column is one TRL keeps back."""
    rows = [{"prompt": "1+1?", "completion": "2"}, {"prompt": "2+2?", "completion": "5"}]
    seen = []
    R.RewardRunner([_spy(seen)], timeout=5)(["1+1?", "2+2?"], ["x", "y"], [[1], [2]],
                                           reward_columns(rows, 1, "completion"))
    assert "completion" not in seen[0] and seen[0]["answer"] == ["2", "5"]


# ---- copies: a function gets copies of what it can hold; r1train's own rewards only read theirs
class Counted:
    """A column value that counts its copies (copy.deepcopy and pickle both reduce it) and tells them apart."""
    copies = 0

    def __init__(self, hits=None):
        self.hits = [] if hits is None else hits

    def __reduce_ex__(self, protocol):
        type(self).copies += 1
        return (Counted, (list(self.hits),))


def _no_column(prompts, completions, completion_ids):
    return [0.0] * len(completions)


def _takes_tests(prompts, completions, tests, **_):
    for t in tests:
        t.hits.append(1)  # in place: no other completion, function or row may see it
    return [float(len(t.hits)) for t in tests]


def _takes_tests_too(prompts, completions, tests, **_):
    return _takes_tests(prompts, completions, tests)


def _columns(n):
    return {"tests": [Counted()] * n, "answer": ["1"] * n}


@pytest.mark.parametrize("funcs", [[_no_column], ["accuracy", "format", "language", "overlong"]])
def test_a_function_that_cannot_hold_a_column_gets_no_copy_of_it(funcs):
    """_no_column's call fails binding (TypeError, as TRL's), before any of its code runs; r1train's rewards
    never change their arguments. Each got n copies per call (and n more for _no_column's per-sample retries)."""
    n = random.randint(2, 6)
    Counted.copies = 0
    cols = _columns(n)
    _, failed = R.RewardRunner(funcs, timeout=5)(["p"] * n, ["<answer>1</answer>"] * n, [[1]] * n, cols)
    assert failed == [funcs == [_no_column]] * n
    assert Counted.copies == 0


def test_each_completion_and_function_gets_its_own_copy():
    n = random.randint(2, 6)
    cols = _columns(n)
    run = R.RewardRunner([_takes_tests, _takes_tests_too], timeout=5)
    for _ in range(2):  # two steps
        table, failed = run(["p"] * n, ["c"] * n, [[1]] * n, cols)
        assert table == [[1.0, 1.0]] * n and failed == [False] * n
    assert cols["tests"][0].hits == []


def _wrapped_no_column(prompts, completions, completion_ids):
    return [0.0] * len(completions)


@functools.wraps(_wrapped_no_column)
def _logs_then_calls(*args, **kw):
    """A decorator's wrapper: its code runs with every argument before the wrapped function's binding fails."""
    kw["tests"][0].hits.append("seen")
    return _wrapped_no_column(*args, **kw)


def test_a_wrapper_whose_wrapped_function_takes_no_column_still_gets_copies():
    cols = _columns(2)
    R.RewardRunner([_logs_then_calls], timeout=5)(["p"] * 2, ["c"] * 2, [[1]] * 2, cols)
    assert cols["tests"][0].hits == []


def test_what_pickle_cannot_hold_is_deep_copied():
    """A value holding a lambda (no pickle) still comes as a copy."""
    row = {"prompt": [{"role": "user", "content": "q"}], "meta": {"check": lambda c: len(c), "hits": []}}

    def uses_meta(prompts, completions, meta, **_):
        for p, m in zip(prompts, meta):
            m["hits"].append(m["check"](p))
            p.append({"role": "tool", "content": "x"})
        return [float(len(m["hits"])) for m in meta]
    before, run = repr(row), R.RewardRunner([uses_meta], timeout=5)
    for _ in range(2):  # two steps
        table, failed = run([row["prompt"]] * 3, ["c"] * 3, [[1]] * 3, reward_columns([row], 3, "answer"))
        assert table == [[1.0]] * 3 and failed == [False] * 3
    assert repr(row) == before


# ---- GRPOTrainer(reward_funcs=...) in code: TRL's reward_weights are one per function passed
def _len_reward(prompts, completions, completion_ids=None, **_):
    return [float(len(R.completion_text(c))) for c in completions]


def _digits(prompts, completions, completion_ids=None, **_):
    return H.digit_share(prompts, completions)


def _trainer(out, *overrides, weights=None, reward_funcs=None):
    from r1train.config import load_config
    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_datasets, load_model_and_tokenizer

    # reward_funcs: accuracy,format; reward_weights as a config file or the command line gives them (their count
    # is the functions GRPOTrainer runs: TRL's rule)
    w = [] if weights is None else ["reward_weights=" + ",".join(map(repr, weights))]
    cfg = load_config(overrides=H.FAST + [f"output_dir={out}", *w, *overrides])
    model, tok = load_model_and_tokenizer(cfg)
    return GRPOTrainer(cfg, model, tok, load_datasets(cfg)[0], reward_funcs=reward_funcs)


def test_rows_given_in_code_are_checked_for_columns_named_like_reward_arguments(tmp_path):
    """GRPOTrainer's training rows given in code (not through load_datasets): a `prompts` column would replace
    the prompts argument silently (TRL: a TypeError); it is a DatasetError naming it, before output_dir is
    touched. A one-shot iterable of rows is read once."""
    from r1train.config import load_config
    from r1train.data import DatasetError
    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_model_and_tokenizer

    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}"])
    model, tok = load_model_and_tokenizer(cfg)
    rows = [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(8)]
    with pytest.raises(DatasetError, match=r"GRPOTrainer's train_rows: column\(s\) \['prompts'\]"):
        GRPOTrainer(cfg, model, tok, [{**r, "prompts": "x"} for r in rows])
    assert not (tmp_path / "metrics.jsonl").exists()
    assert len(GRPOTrainer(cfg, model, tok, iter(rows)).train_rows) == 8


def test_weights_follow_the_reward_functions_passed_in_code(tmp_path):
    w = [random.uniform(0.1, 2) for _ in range(3)]
    t = _trainer(tmp_path, weights=w, reward_funcs=[_len_reward, _digits, "format"])
    assert t.rewards.names == ["_len_reward", "_digits", "format"]
    assert t.reward_w_R.tolist() == pytest.approx(w)


def test_one_reward_function_not_in_a_list_is_taken_as_trl_takes_it(tmp_path):
    t = _trainer(tmp_path, reward_funcs=_len_reward)
    assert t.rewards.names == ["_len_reward"] and t.reward_w_R.tolist() == [1.0]


def test_an_empty_reward_funcs_is_an_error_not_the_configs_functions(tmp_path):
    with pytest.raises(ValueError, match="reward_funcs: an empty list"):
        _trainer(tmp_path, reward_funcs=[])


def test_weights_of_another_count_than_the_functions_passed_fail_before_output_dir_is_touched(tmp_path):
    """The check ran after Trainer.__init__, whose overwrite_output_dir had deleted the last run's metrics."""
    last_run = json.dumps({"step": 1, "loss": random.random()}) + "\n"
    (tmp_path / "metrics.jsonl").write_text(last_run)
    with pytest.raises(ValueError, match="reward_weights has 2 entries for") as e:
        _trainer(tmp_path, "reward_weights=1,2", "overwrite_output_dir=true", reward_funcs=[_len_reward])
    assert (tmp_path / "metrics.jsonl").read_text() == last_run
    assert "the 1 reward functions passed (_len_reward)" in str(e.value)


# ---- chat_template_kwargs (TRL GRPOConfig's): GRPO's conversational prompts and its reward model's texts
def test_grpo_rollout_prompts_are_rendered_with_chat_template_kwargs(tmp_path, monkeypatch):
    """The prompt ids GRPOTrainer samples from are the tokenizer's apply_chat_template with the config's
    chat_template_kwargs (a template keyword that shows in the text); with no chat template they are an error
    before any work."""
    from r1train import grpo
    from r1train.config import load_config
    from r1train.data import DatasetError
    from r1train.loading import load_datasets, load_model_and_tokenizer

    rng = random.Random()
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}?"}], "answer": "1"}
            for _ in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / 'out'}", f"dataset_name={data}",
                                          "chat_template_kwargs={think: true}", "reward_funcs=format"])
    model, tok = load_model_and_tokenizer(cfg)
    tok.chat_template = "{% if think %}<think>{% endif %}" + tok.chat_template
    t = grpo.GRPOTrainer(cfg, model, tok, load_datasets(cfg)[0])

    class Sampled(Exception):
        pass

    def fake_sample(model, ids, mask, **_):
        raise Sampled([[i for i, m in zip(r, k) if m] for r, k in zip(ids.tolist(), mask.tolist())])

    monkeypatch.setattr(grpo, "sample", fake_sample)
    with pytest.raises(Sampled) as got:
        t._rollout(0, rows[:2], [0, 1])
    want = tok.apply_chat_template([r["prompt"] for r in rows[:2]], add_generation_prompt=True, tokenize=True,
                                   return_dict=True, think=True)["input_ids"]
    G = cfg.num_generations
    assert got.value.args[0] == [w for w in want for _ in range(G)]
    assert all(tok.decode(w).startswith("<think>") for w in want)
    tok.chat_template = None
    with pytest.raises(DatasetError, match="chat_template_kwargs"):
        grpo.GRPOTrainer(cfg, model, tok, load_datasets(cfg)[0])


def test_reward_model_texts_use_chat_template_kwargs():
    """A reward model's chat texts are rendered with GRPO's chat_template_kwargs (TRL's reward-model path)."""
    from r1train.reward_model import RewardModel
    from r1train.tasks import char_tokenizer

    rm = RewardModel("unused", chat_template_kwargs={"think": True})
    rm.tokenizer = char_tokenizer()
    rm.tokenizer.chat_template = "{% if think %}<think>{% endif %}" + rm.tokenizer.chat_template
    p = [{"role": "user", "content": "1+1?"}]
    c = [{"role": "assistant", "content": "2"}]
    assert rm.texts([p], [c]) == [rm.tokenizer.apply_chat_template(p + c, tokenize=False, think=True)]
    assert rm.texts([p], [c])[0].startswith("<think>")


def test_a_users_wrapper_of_a_builtin_reward_gets_copies():
    """A functools.wraps wrapper of accuracy_reward (update_wrapper copies the wrapped function's __dict__) that
    edits its prompts in place changes no dataset row and no other function's input: only this module's own
    rewards get the caller's objects."""
    row = {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}

    @functools.wraps(R.accuracy_reward)
    def noted(prompts, completions, **kw):
        for p in prompts:
            p.append({"role": "system", "content": "noted"})
        return R.accuracy_reward(prompts, completions, **kw)

    seen = []

    def count(prompts, completions, **_):
        seen.append([len(p) for p in prompts])
        return [0.0] * len(prompts)
    before, run = repr(row), R.RewardRunner([noted, count], timeout=5)
    for _ in range(3):
        run([row["prompt"]] * 4, ["<answer>2</answer>"] * 4, [[1]] * 4, reward_columns([row], 4, "answer"))
    assert repr(row) == before and seen == [[1] * 4] * 3
    assert R._copied(R.accuracy_reward) == frozenset() and R._copied(noted) is None


def test_an_answer_column_replaced_by_answer_column_is_named_in_a_warning(caplog):
    """answer_column=gold with rows that have their own `answer`: reward functions get `answer` = the gold values
    (documented) and a warning says the rows' `answer` is not passed; no warning without such a column."""
    from r1train.config import load_config
    from r1train.loading import check_reward_columns

    cfg = load_config(overrides=["report_to=none", "answer_column=gold"])
    rows = [{"prompt": "q", "gold": "2", "answer": "two"}]
    with caplog.at_level("WARNING", logger="r1train"):
        check_reward_columns(cfg, rows, "rows")
    assert any("answer_column='gold'" in r.getMessage() and "`answer`" in r.getMessage() for r in caplog.records)
    assert reward_columns(rows, 2, "gold")["answer"] == ["2", "2"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="r1train"):
        check_reward_columns(cfg, [{"prompt": "q", "gold": "2"}], "rows")
        check_reward_columns(load_config(overrides=["report_to=none"]), rows, "rows")
    assert not caplog.records
