"""Reward functions and datasets handled as TRL 1.16's GRPOTrainer handles them (each expectation written out from
TRL's code): async rewards on one event loop, reward names of partials and callable objects, in-place changes to
a reward's arguments, 0-d and complex return values, each completion in its own prompt's format."""

import asyncio
import functools
import json
import time

import numpy as np
import pytest
import torch
import train_helpers as H

from r1train import rewards as R
from r1train.config import ConfigError
from r1train.data import reward_columns

# ---- async rewards: TRL 1.16 runs every async reward on one event loop for the trainer's life
# (start_event_loop_in_daemon, then asyncio.run_coroutine_threadsafe(..., self.async_loop) each step)
_SEM = asyncio.Semaphore(1)  # a judge's concurrency limit, made once (as an httpx / openai AsyncClient is)
_JUDGE_CALLS = []


async def judge(prompts, completions, **_):
    _JUDGE_CALLS.append(len(completions))

    async def one(c):
        async with _SEM:  # contended: binds the semaphore to the loop of its first use
            await asyncio.sleep(0.001)
            return float(len(c))
    return list(await asyncio.gather(*(one(c) for c in completions)))


def test_async_reward_keeps_its_event_loop_between_steps():
    """With a loop per call the second step's semaphore is 'bound to a different event loop': the batch call
    raised and the judge was re-run once per sample (4 calls for 3 completions instead of 1)."""
    _JUDGE_CALLS.clear()
    run = R.RewardRunner([judge], timeout=10)
    for _ in range(3):
        table, failed = run(["p"] * 3, ["a", "bb", "ccc"], [[1]] * 3, {})
        assert table == [[1.0], [2.0], [3.0]] and failed == [False] * 3
    assert _JUDGE_CALLS == [3, 3, 3]  # TRL: one call per step


async def blocks_its_loop(prompts, completions, **_):
    time.sleep(6.0)  # sync code in an async reward: the loop cannot run anything else meanwhile
    return [0.0] * len(completions)


def test_an_async_reward_that_blocks_the_loop_does_not_stall_the_next():
    slow = R.RewardRunner([blocks_its_loop], timeout=0.3)
    assert slow(["p"], ["x"], [[1]], {}) == ([[None]], [True])
    t0 = time.time()
    assert R.RewardRunner([judge], timeout=5)(["p"], ["ab"], [[1]], {}) == ([[2.0]], [False])
    assert time.time() - t0 < 4.0  # a fresh loop, not the blocked one (busy for 6 s)


def test_a_reward_that_blocks_its_loop_leaves_another_rewards_loop_alone():
    """Each async reward has its own loop: replacing the blocked one does not rebind the judge's semaphore (with one
    shared loop the judge failed from the next step on: 'bound to a different event loop', re-run per sample)."""
    run = R.RewardRunner([judge], timeout=5)
    assert run(["p"] * 3, ["a", "bb", "ccc"], [[1]] * 3, {}) == ([[1.0], [2.0], [3.0]], [False] * 3)
    assert R.RewardRunner([blocks_its_loop], timeout=0.3)(["p"], ["x"], [[1]], {}) == ([[None]], [True])
    _JUDGE_CALLS.clear()
    assert run(["p"] * 3, ["a", "bb", "ccc"], [[1]] * 3, {}) == ([[1.0], [2.0], [3.0]], [False] * 3)
    assert _JUDGE_CALLS == [3]


async def hangs_in_threads(prompts, completions, **_):
    await asyncio.gather(*(asyncio.to_thread(time.sleep, 3) for _ in range(64)))  # fills its loop's thread pool
    return [0.0] * len(completions)


async def uses_a_thread(prompts, completions, **_):
    return [await asyncio.to_thread(lambda: 1.0) for _ in completions]


def test_a_reward_that_fills_its_thread_pool_leaves_another_rewards_pool_alone():
    assert R.RewardRunner([hangs_in_threads], timeout=0.3)(["p"], ["x"], [[1]], {}) == ([[None]], [True])
    assert R.RewardRunner([uses_a_thread], timeout=2)(["p"], ["x"], [[1]], {}) == ([[1.0]], [False])


# ---- names: TRL's get_callable_name (partial: the wrapped function's name; a callable object: its class's)
def length_reward(prompts, completions, scale=1.0, **_):
    return [scale * len(c) for c in completions]


class Judge:
    def __call__(self, prompts, completions, **_):
        return [1.0] * len(completions)


class AsyncJudge:
    async def __call__(self, prompts, completions, **_):
        return [2.0] * len(completions)


def test_partials_and_callable_objects_are_named_as_trl_names_them():
    part = functools.partial(functools.partial(length_reward, scale=2.0))
    assert [R.reward_name(f) for f in (part, Judge(), AsyncJudge())] == ["length_reward", "Judge", "AsyncJudge"]
    run = R.RewardRunner([part, Judge(), AsyncJudge()], timeout=5)  # three rewards, none 'listed twice'
    assert run.names == ["length_reward", "Judge", "AsyncJudge"]
    assert run(["p"], ["abc"], [[1]], {}) == ([[6.0, 1.0, 2.0]], [False])
    with pytest.raises(ConfigError, match="would both log as 'length_reward'"):
        R.RewardRunner([part, functools.partial(length_reward, scale=3.0)])


# ---- a reward's arguments: TRL's rows are fresh per completion (a datasets row per index), so a reward that
# changes them in place changes no other completion, step or epoch
def extends_its_prompt(prompts, completions, meta=None, **_):
    out = []
    for p, c, m in zip(prompts, completions, meta):
        p += c  # the conversation so far, e.g. to send to a judge: extends the prompt's message list in place
        m["seen"].append(len(p))
        out.append(float(len(p)))
    return out


def test_a_reward_changing_its_arguments_in_place_changes_no_dataset_row():
    msgs = [{"role": "user", "content": "1+1?"}]
    rows = [{"prompt": [dict(m) for m in msgs], "meta": {"seen": []}}]
    before = json.dumps(rows)
    run = R.RewardRunner([extends_its_prompt], timeout=5)
    for _ in range(2):  # two steps over the same row
        prompts = [r["prompt"] for r in rows for _ in range(3)]
        table, failed = run(prompts, ["a", "b", "c"], [[1]] * 3, reward_columns(rows, 3, "answer"))
        assert table == [[2.0]] * 3 and failed == [False] * 3  # each completion's own prompt: 1 + 1 messages
    assert json.dumps(rows) == before


def test_a_retry_gets_the_arguments_the_failed_call_changed_afresh():
    """A batch call that changes its prompts in place and then raises is retried per sample on fresh copies."""
    calls = []

    def grows_then_fails(prompts, completions, **_):
        for p, c in zip(prompts, completions):
            p += c
        calls.append([len(p) for p in prompts])
        if len(prompts) > 1:
            raise RuntimeError("a bad batch")
        return [float(len(prompts[0]))]
    msgs = [{"role": "user", "content": "1+1?"}]
    table, failed = R.RewardRunner([grows_then_fails], timeout=5)([msgs, msgs], ["a", "b"], [[1], [2]], {})
    assert table == [[2.0], [2.0]] and failed == [False, False] and calls == [[2, 2], [2], [2]]


def test_grpo_rows_are_unchanged_by_a_reward_that_changes_its_prompts(tmp_path):
    t = H.grpo_trainer(tmp_path, "max_steps=1", reward_funcs=[lambda prompts, completions, **_: [
        float(len(p.__iadd__(c))) for p, c in zip(prompts, completions)]])
    before = json.dumps(t.train_rows)
    t.make_batch(0, t.rows_for(0)[0])
    assert json.dumps(t.train_rows) == before


# ---- return values: one finite real number or None per completion, else a RewardError naming the reward
@pytest.mark.parametrize("value, msg", [
    (np.array(1.0), "returned ndarray array(1.); a reward function must return a list"),
    (torch.tensor(0.5), "returned Tensor tensor(0.5000); a reward function must return a list"),
    ([np.complex128(1 + 2j), 1.0], "at index 0; expected a float or None"),  # not its real part
    ([torch.tensor(1 + 2j), 1.0], "at index 0; expected a float or None"),
    ([np.array("1"), 1.0], "at index 0; expected a float or None"),
])
def test_0d_and_complex_return_values_are_one_clear_error(value, msg):
    def bad_reward(prompts, completions, **_):
        return value
    with pytest.raises(R.RewardError) as e:
        R.RewardRunner([bad_reward], timeout=5)(["p", "q"], ["a", "b"], [[1], [2]], {})
    assert "reward 'bad_reward'" in str(e.value) and msg in str(e.value), str(e.value)


def test_0d_numbers_inside_the_list_still_pass():
    got = R.check_values("r", [np.array(1.5), torch.tensor(2), np.float32(0.25), True, None], 5)
    assert got == [1.5, 2.0, 0.25, 1.0, None]


# ---- prompt formats: TRL passes each completion in its prompt's format (conversational: [{"role": "assistant",
# "content": text}], standard: the text); a datasets column holds one format, a .jsonl dataset here may mix them
SEEN_PAIRS = []


def judge_input(prompts, completions, **_):
    """A reward that builds the judged conversation as TRL's docs do: prompt + completion."""
    SEEN_PAIRS.extend(p + c for p, c in zip(prompts, completions))
    return [float(len(p + c)) for p, c in zip(prompts, completions)]


@pytest.mark.parametrize("order", [("chat", "string"), ("string", "chat")])
def test_each_completion_comes_in_its_own_prompts_format(order):
    """The batch's first prompt decided the format of every completion: after a chat prompt first, a string
    prompt's completion came as messages (str + list: TypeError, the sample failed); after a string prompt first,
    a chat prompt's completion came as text."""
    prompt = {"chat": [{"role": "user", "content": "1+1?"}], "string": "1+1?"}
    want = {"chat": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], "string": "1+1?2"}
    SEEN_PAIRS.clear()
    table, failed = R.RewardRunner([judge_input], timeout=5)([prompt[k] for k in order], ["2", "2"], [[1], [2]], {})
    assert failed == [False, False] and SEEN_PAIRS == [want[k] for k in order]
    assert table == [[float(len(want[k]))] for k in order]
