"""Issue 13, items 4, 5, 6, 8, 11, 13: max_steps=0, TRL's conversational reward format, a step whose every
sample failed, reward return values, a hung reward vs process exit, clean config errors before any work,
and backend= on the torch-only MoE ops."""

import subprocess
import sys
import textwrap
import time

import pytest
import torch
import train_helpers as H

import r1kernels as rk
from r1train import rewards as R
from r1train.config import ConfigError, load_config
from r1train.data import DatasetError, load_rows


# ---- item 4: max_steps=0
@pytest.mark.parametrize("v", ["0", "-2"])
def test_max_steps_zero_or_below_minus_one_is_an_error(v):
    with pytest.raises(ConfigError, match=r"max_steps must be >= 1, or -1"):
        load_config(overrides=[f"max_steps={v}"])
    assert load_config(overrides=["max_steps=-1"]).max_steps == -1


# ---- item 5: TRL's conversational format; a step where every sample failed stops the run
SEEN = {}


def trl_docs_reward(completions, **kwargs):
    """A reward as TRL's docs write it for conversational data."""
    SEEN["prompt"], SEEN["completion"] = kwargs["prompts"][0], completions[0]
    return [float(len(c[0]["content"])) for c in completions]


def test_runner_passes_trl_conversational_format():
    run = R.RewardRunner([trl_docs_reward, "format"], timeout=5)
    msgs = [{"role": "user", "content": "1+1?"}]
    table, failed = run([msgs, msgs], ["ab", "<think>x</think><answer>2</answer>"], [[1], [2]], {})
    assert failed == [False, False] and [r[0] for r in table] == [2.0, 34.0] and table[1][1] == 1.0
    assert SEEN["completion"] == [{"role": "assistant", "content": "ab"}] and SEEN["prompt"] == msgs
    # string prompts: completions stay strings (TRL's standard format)
    table, failed = R.RewardRunner([R.format_reward], timeout=5)(["p"], ["x"], [[1]], {})
    assert failed == [False]


def test_grpo_trl_docs_reward_on_chat_prompts(tmp_path):
    """The built-in task's prompts are chat messages: a TRL-docs reward scores every sample."""
    SEEN.clear()
    t = H.grpo_trainer(tmp_path, "max_steps=1", reward_funcs=[trl_docs_reward])
    hist = t.train()
    assert hist[0]["rewards/failed"] == 0 and hist[0]["rewards/trl_docs_reward/mean"] > 0
    assert isinstance(SEEN["prompt"], list) and SEEN["prompt"][0]["role"] == "user"
    assert SEEN["completion"][0]["role"] == "assistant"


def string_only_reward(prompts, completions, **_):
    return [float(len(c.strip())) for c in completions]  # breaks on TRL's conversational completions


def test_step_where_every_sample_failed_stops_naming_the_reward(tmp_path):
    t = H.grpo_trainer(tmp_path, "max_steps=2", reward_funcs=[H.digit_share, string_only_reward])
    with pytest.raises(R.RewardError, match=r"every sample of the step \(8\) failed.*string_only_reward: "
                                            r"raised AttributeError"):
        t.train()


# ---- item 6: reward return values are checked
def _returns(value, name="bad_reward"):
    def bad_reward(prompts, completions, **_):
        return value() if callable(value) else value
    bad_reward.__name__ = name
    return bad_reward


@pytest.mark.parametrize("value, msg", [
    ([1.0, 1.0, 1.0], "returned 3 values for 2 completions"),
    ([1.0], "returned 1 values for 2 completions"),
    (1.0, "returned float 1.0"),
    (lambda: (x for x in [1.0, 1.0]), "returned generator"),
    ([float("inf"), 1.0], "returned inf at index 0; rewards must be finite"),
    ([float("nan"), float("nan")], "returned nan at index 0"),
    ([1.0, 1e39], "returned 1e+39 at index 1; rewards must lie within float32's range"),  # float32 inf in TRL
    ([-3.5e38, 1.0], "returned -3.5e+38 at index 0; rewards must lie within float32's range"),
    (["1", 1.0], "returned str '1' at index 0; expected a float or None"),
    ({"a": 1.0, "b": 2.0}, "returned dict"),
])
def test_bad_reward_return_values_are_one_clear_error(value, msg):
    run = R.RewardRunner([_returns(value)], timeout=5)
    with pytest.raises(R.RewardError) as e:
        run(["p", "q"], ["a", "b"], [[1], [2]], {})
    assert "reward 'bad_reward'" in str(e.value) and msg in str(e.value), str(e.value)


def test_none_is_the_only_not_applicable_and_numeric_types_pass():
    run = R.RewardRunner([_returns([None, 0.5], "a"), _returns(torch.tensor([1.0, 2.0]), "b")], timeout=5)
    table, failed = run(["p", "q"], ["a", "b"], [[1], [2]], {})
    assert table == [[None, 1.0], [0.5, 2.0]] and failed == [False, False]
    f32max = torch.finfo(torch.float32).max  # the largest reward the float32 table holds
    assert R.check_values("r", [f32max, -f32max], 2) == [f32max, -f32max]


# ---- item 8: a hung sync reward never keeps the process alive
def hang_reward(prompts, completions, **_):
    time.sleep(600)


def test_hung_sync_reward_is_abandoned_and_process_exits():
    code = textwrap.dedent("""
        import time
        from r1train.rewards import RewardRunner
        def hang(prompts, completions, **_):
            time.sleep(600)
        t0 = time.time()
        print(RewardRunner([hang], timeout=0.5)(["p"], ["x"], [[1]], {}), round(time.time() - t0, 1))
    """)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code], env=H.env(), cwd=H.ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("([[None]], [True])") and time.time() - t0 < 30


def test_cli_run_with_hung_reward_exits(tmp_path):
    """`r1train grpo` with a reward that sleeps: it times out, the step has no scored sample, the run stops
    with an error naming the reward, and the process exits (it used to wait for the sleeping thread)."""
    t0 = time.time()
    p = H.run_cli(["grpo", *H.FAST, "max_steps=1", "reward_timeout=1", "task_eval_size=1",
                   "reward_funcs=test_train_reliability_rewards:hang_reward", f"output_dir={tmp_path}"],
                  timeout=240)
    assert p.returncode == 2 and "hang_reward: timed out after 1s" in p.stderr, p.stderr[-2000:]
    assert "r1train: error:" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert time.time() - t0 < 200


# ---- item 11: clean config errors before any work
@pytest.mark.parametrize("overrides, msg", [
    (["epsilon=-0.1"], "epsilon must be >= 0"),
    (["epsilon_high=-1"], "epsilon_high must be >= 0"),
    (["learning_rate=-1e-5"], "learning_rate must be >= 0"),
    (["reward_funcs=accuracy", "reward_weights=nan"], "reward_weights must be a list of finite numbers"),
    (["eval_num_samples=0"], "eval_num_samples must be >= 1"),
    (["temperature=inf"], "temperature must be a finite number"),
    (["warmup_ratio=1.5"], "warmup_ratio must be in [0, 1]"),
    (["max_grad_norm=-1"], "max_grad_norm must be >= 0"),
    (["epsilon_high=0.28", "delta=1.2"], "delta must be > 1 + epsilon_high = 1.28"),
    (["delta=1.1"], "delta must be > 1 + epsilon_high = 1.2"),
    (["eval_steps=-1"], "eval_steps must be >= 0"),
    (["ref_model_mixup_alpha=1.5"], "ref_model_mixup_alpha must be in [0, 1]"),
    (["ref_model_mixup_alpha=-0.1"], "ref_model_mixup_alpha must be in [0, 1]"),
    (["reward_timeout=0"], "reward_timeout must be > 0"),
    (["reward_timeout=-3"], "reward_timeout must be > 0"),
    (["save_total_limit=0"], "save_total_limit must be >= 1"),
    (["reward_funcs=accuracy,format,accuracy"], "reward_funcs: 'accuracy' is listed twice"),
    (["reward_funcs=accuarcy"], "reward_funcs: unknown reward 'accuarcy'"),
    (["reward_funcs=no_such_module_xyz:f"], "reward_funcs: cannot import 'no_such_module_xyz:f'"),
    (["reward_funcs=r1train.rewards:REGISTRY"], "reward_funcs: 'r1train.rewards:REGISTRY' is not callable"),
    (["reward_funcs=r1train.rewards:nope"], "reward_funcs: cannot import 'r1train.rewards:nope'"),
    (["kernel_backend=cuda"], "kernel_backend='cuda': r1kernels has no cuda kernel for"),
    (["max_completion_length=8", "overlong_buffer_len=16", "reward_funcs=overlong"],
     "reward_funcs: 'overlong': overlong_buffer_len must be in [0, 8]"),
])
def test_bad_values_are_config_errors(overrides, msg):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert msg in str(e.value), str(e.value)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    from r1kernels import _backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    with pytest.raises(ConfigError, match="kernel_backend='triton'"):
        load_config(overrides=["kernel_backend=triton"])
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", True)
    if _backend.HAS_TRITON:
        assert load_config(overrides=["kernel_backend=triton"]).kernel_backend == "triton"


def test_yaml_errors_inactive_sections_and_comma_lists(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rate: [1e-5\nbeta: 0.1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(y))
    y.write_text("sft:\n  lerning_rate: 1e-4\ngrpo:\n  beta: 0.1\n")
    with pytest.raises(ConfigError, match=r"section 'sft': unknown config key 'lerning_rate' \(did you mean "
                                          r"learning_rate\?\)"):
        load_config(str(y), section="grpo")
    y.write_text("reward_funcs: accuracy, format\nreward_weights: 1, 0.5\ngrpo:\n  reward_funcs: format\n")
    c = load_config(str(y))
    assert c.reward_funcs == ["accuracy", "format"] and c.reward_weights == [1.0, 0.5]
    c = load_config(str(y), ["reward_weights=2"], section="grpo")
    assert c.reward_funcs == ["format"] and c.reward_weights == [2.0]
    c = load_config(overrides=["reward_funcs=accuracy, format"])
    assert c.reward_funcs == ["accuracy", "format"]


def test_empty_dataset_is_a_dataset_error(tmp_path, capsys):
    from r1train.cli import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="empty.jsonl': the dataset has no rows"):
        load_rows(str(empty))
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(DatasetError, match="has no rows"):
        load_rows(str(tmp_path / "e.json"))
    with pytest.raises(ConfigError, match="task_train_size must be >= 1"):
        load_config(overrides=["task_train_size=0"])
    assert main(["grpo", *H.FAST, f"dataset_name={empty}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert f"dataset_name='{empty}': the dataset has no rows" in capsys.readouterr().err  # the key and the file


def test_cli_grpo_batch_and_distill_errors(tmp_path, capsys):
    from r1train.cli import main

    assert main(["grpo", *H.FAST, "per_device_train_batch_size=6", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "r1train: error: num_generations: per_device_train_batch_size * gradient_accumulation_steps = 6" in err
    assert main(["distill", *H.FAST, f"output_dir={tmp_path}"]) == 2
    assert "r1train: error: teacher_model: distill needs teacher_model=" in capsys.readouterr().err


def test_pipeline_checks_every_stage_before_the_first_runs(tmp_path):
    """A bad value in the last stage's section is an error before cold-start SFT starts."""
    from r1train import pipeline

    y = tmp_path / "r.yaml"
    y.write_text("\n".join(o.replace("=", ": ", 1) for o in H.FAST) + f"\noutput_dir: {tmp_path / 'out'}\n"
                 "grpo2:\n  num_generations: 3\n")
    with pytest.raises(ConfigError, match="must be a multiple of num_generations = 3"):
        pipeline.recipe(str(y))
    assert not (tmp_path / "out").exists()
    y.write_text(y.read_text().replace("grpo2:\n  num_generations: 3\n", "grpo:\n  epsilon: -1\n"))
    with pytest.raises(ConfigError, match="epsilon must be >= 0"):
        pipeline.demo(str(y))
    assert not (tmp_path / "out").exists()


def test_top_k_min_p_rollout_engine_still_accepted():
    c = load_config(overrides=["top_k=5", "min_p=0.1", "rollout_engine=transformers"])
    assert (c.top_k, c.min_p, c.rollout_engine) == (5, 0.1, "transformers")


# ---- item 13: backend= on the torch-only MoE ops
def test_moe_update_bias_and_sequence_aux_loss_take_backend():
    bias, counts = torch.zeros(4), torch.tensor([5, 1, 1, 1])
    for b in ("auto", "torch"):
        rk.moe.update_bias(bias, counts, rate=0.1, backend=b)
    assert torch.allclose(bias, torch.tensor([-0.2, 0.2, 0.2, 0.2]))
    logits = torch.randn(6, 4)
    ref = rk.moe.sequence_aux_loss(logits, None, seq_len=3, top_k=2)
    assert torch.equal(rk.moe.sequence_aux_loss(logits, None, seq_len=3, top_k=2, backend="torch"), ref)
    for b in ("triton", "cuda", "cpp"):
        with pytest.raises(ValueError, match=f"backend='{b}' is not available for update_bias: it has no {b} "
                                             "kernel, only the torch implementation"):
            rk.moe.update_bias(bias, counts, backend=b)
        with pytest.raises(ValueError, match="not available for sequence_aux_loss"):
            rk.moe.sequence_aux_loss(logits, None, seq_len=3, top_k=2, backend=b)
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.moe.update_bias(bias, counts, backend="fast")
