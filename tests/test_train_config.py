"""Bad configs and bad dataset rows give clear errors naming the key / row; YAML + overrides precedence."""

import json

import pytest

from r1train.config import ConfigError, load_config
from r1train.data import DatasetError, load_rows


@pytest.mark.parametrize("override, msg", [
    ("lerning_rate=1e-5", "unknown config key 'lerning_rate' (did you mean learning_rate?)"),
    ("num_generations=abc", "num_generations: expected int, got str 'abc'"),
    ("learning_rate=fast", "learning_rate: expected float, got 'fast'"),
    ("loss_type=ppo", "loss_type: 'ppo' is not one of"),
    ("zero_stage=4", "zero_stage: 4 is not one of [0, 1, 2, 3]"),
    ("num_generations=1", "num_generations must be >= 2"),
    ("top_p=1.5", "top_p must be in (0, 1]"),
    ("bf16=maybe", "bf16: expected bool"),
    ("beta", "expected key=value"),
    ("reward_weights=1,x", "reward_weights: 'x' is not a number"),
    ("reward_funcs=[]", "reward_funcs must be a non-empty list"),
    ("adam_epsilon=0", "adam_epsilon must be > 0"),
])
def test_bad_override(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert msg in str(e.value)


def test_yaml_sections_and_precedence(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("learning_rate: 1e-5\nbeta: 0.04\nsft:\n  learning_rate: 3e-4\n"
                 "grpo:\n  num_generations: 4\n  reward_funcs: [accuracy, format, language]\n")
    c = load_config(str(p), ["beta=0.1"], section="grpo")
    assert (c.learning_rate, c.beta, c.num_generations) == (1e-5, 0.1, 4)
    assert c.reward_funcs == ["accuracy", "format", "language"]
    assert load_config(str(p), section="sft").learning_rate == 3e-4
    c = load_config(overrides=["scale_rewards=false", "reward_weights=1,0.5", "reward_funcs=accuracy,format"])
    assert c.scale_rewards == "none" and c.reward_weights == [1.0, 0.5]
    p.write_text("lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        load_config(str(p))
    p.write_text("reward_weights: [1, 2]\n")
    with pytest.raises(ConfigError, match="reward_weights has 2 entries but reward_funcs has 2|reward_weights"):
        load_config(str(p), ["reward_funcs=accuracy"])


def test_grpo_batch_not_multiple_of_g():
    from r1train.grpo import GRPOTrainer

    cfg = load_config(overrides=["per_device_train_batch_size=6", "num_generations=4"])
    with pytest.raises(ValueError, match="must be a multiple of num_generations = 4"):
        GRPOTrainer(cfg, None, None, [])


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("bad, msg", [
    ({"question": "hi"}, "row 2: missing column 'prompt'"),
    ({"prompt": ""}, "row 2: 'prompt' is an empty string"),
    ({"prompt": []}, "row 2: 'prompt' is an empty message list"),
    ({"prompt": [{"role": "user"}]}, "row 2: prompt message 0 must be"),
    ({"prompt": 7}, "row 2: 'prompt' must be a string or a list of chat messages"),
    ("{not json", "row 2 (line 3): invalid JSON"),
])
def test_bad_dataset_rows(tmp_path, bad, msg):
    good = {"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    path = _write_jsonl(tmp_path / "d.jsonl", [good, {"prompt": "2+2?", "answer": "4"}, bad])
    with pytest.raises(DatasetError) as e:
        load_rows(path)
    assert msg in str(e.value) and "d.jsonl" in str(e.value)


def test_parquet_rows_and_bad_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["1+1?", ""], "answer": ["2", "3"]}), path)
    with pytest.raises(DatasetError, match="row 1: 'prompt' is an empty string"):
        load_rows(path)


def test_hf_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "1+1?"}], "answer": "2"}] * 3)})
    d.save_to_disk(str(tmp_path / "hf"))
    rows = load_rows(str(tmp_path / "hf"), "train")
    assert len(rows) == 3 and rows[0]["answer"] == "2" and rows[0]["prompt"][0]["role"] == "user"
    with pytest.raises(DatasetError, match="no split 'test'"):
        load_rows(str(tmp_path / "hf"), "test")


def test_sft_rows_need_completion(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DatasetError, match="row 1: missing column 'completion'"):
        load_rows(path, required=("prompt", "completion"))


def test_cli_reports_config_errors(capsys, tmp_path):
    from r1train.cli import main, parse

    a = parse(["grpo", "--config", "x.yaml", "beta=0.1", "seed=3"])
    assert (a.command, a.config, a.overrides) == ("grpo", "x.yaml", ["beta=0.1", "seed=3"])
    y = tmp_path / "c.yaml"
    y.write_text("grpo:\n  num_generations: 1\n")
    assert main(["grpo", "--config", str(y), "seed=1"]) == 2
    assert "num_generations must be >= 2" in capsys.readouterr().err

    assert main(["grpo", "learning_rat=1"]) == 2
    assert "unknown config key 'learning_rat'" in capsys.readouterr().err
    assert main(["sft", "dataset_name=/nonexistent.jsonl"]) == 2
    assert "dataset file '/nonexistent.jsonl' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
def test_vespo_with_a_sequence_rollout_correction_mode_is_a_config_error(engine):
    """vespo folds token rollout-IS weights into its sequence weight; both rollout engines return the sampling
    log-probs the correction reads, so vespo with the default sequence_mask mode failed at step 1 (after
    writing metrics). Now a ConfigError naming the keys and the fix; the token modes, or no correction, load."""
    for mode in ("sequence_mask", "sequence_truncate"):
        with pytest.raises(ConfigError) as e:
            load_config(overrides=["loss_type=vespo", f"rollout_engine={engine}",
                                   f"vllm_importance_sampling_mode={mode}"])
        msg = str(e.value)
        assert all(k in msg for k in ("loss_type=vespo", "vllm_importance_sampling_mode", mode, "token_mask",
                                      "vllm_importance_sampling_correction=false"))
    with pytest.raises(ConfigError, match="vllm_importance_sampling_mode must be token_truncate or token_mask"):
        load_config(overrides=["loss_type=vespo", f"rollout_engine={engine}"])  # TRL's default mode
    for ok in (["vllm_importance_sampling_mode=token_mask"], ["vllm_importance_sampling_mode=token_truncate"],
               ["vllm_importance_sampling_correction=false"]):
        assert load_config(overrides=["loss_type=vespo", f"rollout_engine={engine}", *ok]).loss_type == "vespo"
