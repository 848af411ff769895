"""Bad configs and bad dataset rows give clear errors naming the key / row; YAML + overrides precedence."""

import json
import os
import random

import pytest

from r1train.config import ConfigError, check_grpo_config, check_reward_weights, load_config
from r1train.data import DatasetError, load_rows


@pytest.mark.parametrize("override, msg", [
    ("lerning_rate=1e-5", "unknown config key 'lerning_rate' (did you mean learning_rate?)"),
    ("num_generations=abc", "num_generations: expected int, got str 'abc'"),
    ("learning_rate=fast", "learning_rate: expected float, got str 'fast'"),
    ("loss_type=ppo", "loss_type: 'ppo' is not one of"),
    ("zero_stage=4", "zero_stage: 4 is not one of [0, 1, 2, 3]"),
    ("num_generations=1", "__valid__"),  # `r1train sample` may draw one a prompt; GRPO refuses it (below)
    ("num_generations=0", "num_generations must be"),
    ("loss_type=nll", "SFT always minimizes the NLL, TRL SFTConfig's loss_type=nll: leave it unset for sft"),
    ("top_p=1.5", "top_p must be in (0, 1]"),
    ("bf16=maybe", "bf16: expected bool"),
    ("beta", "expected key=value"),
    ("reward_weights=1,x", "reward_weights: 'x' is not a number"),
    ("reward_funcs=accuracy,format reward_weights=1,-1e39", "reward_weights must be finite numbers within float32's"),
    ("reward_funcs=[]", "reward_funcs must be a non-empty list"),
    ("adam_epsilon=0", "adam_epsilon must be > 0"),
    ("seed=18446744073709551616", "seed must be in [0, 2**63)"),
    ("seed=-1", "seed must be in [0, 2**63)"),
    ("sync_ref_model=true", "sync_ref_model: with beta 0 there is no reference model"),
    ("model_hidden_size=1", "model_hidden_size must be a multiple of 8"),
    ("model_hidden_size=36", "model_hidden_size must be a multiple of 8"),
    ("model_name_or_path=tiny-deepseek-v3 model_hidden_size=24", "model_hidden_size must be a multiple of 16"),
    ("output_dir=2024-01-01", "__ok__"),
    ("temperature=0", "temperature must be > 0"),
    ("temperature=1e-40", "temperature must be >= 1e-05"),
    ("eval_temperature=1e-7", "eval_temperature must be >= 1e-05"),
    ("rejection_num_samples=2 rejection_max_per_prompt=3", "rejection_max_per_prompt (3) must be <= rejection_num"),
    ("rejection_num_samples=3 rejection_max_per_prompt=3", "__valid__"),
])
def test_bad_override(override, msg):
    if msg == "__valid__":
        load_config(overrides=override.split())
        return
    if msg == "__ok__":  # a string key keeps the text as typed, whatever YAML would read it as
        k, _, v = override.partition("=")
        assert getattr(load_config(overrides=[override]), k) == v
        return
    with pytest.raises(ConfigError) as e:
        load_config(overrides=override.split(" "))
    assert msg in str(e.value)


def test_grpo_needs_two_generations_a_prompt(tmp_path):
    """num_generations < 2 is refused where GRPO runs (its command's check, the trainer), not at load: `r1train
    sample` may draw one completion a prompt."""
    import train_helpers as H

    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_datasets, load_model_and_tokenizer

    cfg = load_config(overrides=H.FAST + ["num_generations=1", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="num_generations must be >= 2 for group advantages, got 1"):
        check_grpo_config(cfg)
    model, tok = load_model_and_tokenizer(cfg)
    with pytest.raises(ConfigError, match="num_generations must be >= 2 for group advantages, got 1"):
        GRPOTrainer(cfg, model, tok, load_datasets(cfg)[0], reward_funcs=[H.digit_share])


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
    p.write_text("1: 2\n")
    with pytest.raises(ConfigError, match="unknown config key '1'"):
        load_config(str(p))
    p.write_text("reward_weights: [1, 2]\n")  # the count is checked against the functions GRPO runs
    c = load_config(str(p), ["reward_funcs=accuracy"])
    with pytest.raises(ConfigError, match="reward_weights has 2 entries but reward_funcs has 1"):
        check_reward_weights(c)


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


def test_eval_set_is_read_from_its_test_split(tmp_path):
    """eval_dataset_name with train/test splits: the held-out rows are dataset_test_split's ("test", TRL's name
    and default), not the training split (which dataset_split names)."""
    datasets = pytest.importorskip("datasets")
    from r1train.loading import load_datasets

    d = str(tmp_path / "dd")
    datasets.DatasetDict({s: datasets.Dataset.from_list([{"prompt": f"{s} {i}", "answer": str(i)} for i in range(n)])
                          for s, n in (("train", 5), ("test", 3), ("validation", 2))}).save_to_disk(d)
    train, ev = load_datasets(load_config(overrides=[f"dataset_name={d}", f"eval_dataset_name={d}"]))
    assert [r["prompt"] for r in train] == [f"train {i}" for i in range(5)]
    assert [r["prompt"] for r in ev] == [f"test {i}" for i in range(3)]
    _, ev = load_datasets(load_config(overrides=[f"dataset_name={d}", f"eval_dataset_name={d}",
                                                 "dataset_test_split=validation"]))
    assert [r["prompt"] for r in ev] == ["validation 0", "validation 1"]
    one = str(tmp_path / "one")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "p", "answer": "1"}])}).save_to_disk(one)
    with pytest.raises(DatasetError, match=r"no split 'test' \(has \['train'\]; dataset_test_split names the split"):
        load_datasets(load_config(overrides=[f"dataset_name={d}", f"eval_dataset_name={one}"]))


@pytest.mark.parametrize("sft", [False, True])
def test_eval_rows_without_the_answer_column_are_an_error(tmp_path, sft):
    """Evaluation scores against answer_column: a held-out set without it would score 0 on every row."""
    from r1train.loading import load_datasets

    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1+1?", "answer": "2", "solution": "2", "completion": "2"}])
    ev = _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "2+2?", "solution": "4"}] * 2)
    with pytest.raises(DatasetError, match="answer_column='answer': no row of eval_dataset_name="):
        load_datasets(load_config(overrides=[f"dataset_name={train}", f"eval_dataset_name={ev}"]), sft=sft)
    _, rows = load_datasets(load_config(overrides=[f"dataset_name={train}", f"eval_dataset_name={ev}",
                                                   "answer_column=solution"]), sft=sft)
    assert rows[0]["solution"] == "4"


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


def test_use_peft_without_peft_is_an_error_when_the_config_loads(tmp_path, monkeypatch, capsys):
    """use_peft=true with peft missing failed only when the trainer was built (apply_lora): now the config's
    validation says so, naming use_peft and the package; the CLI's sft / grpo exit 2 before any model loads."""
    import sys

    from r1train import loading
    from r1train.cli import main

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    msg = "use_peft=true needs peft, which is not installed: pip install peft"
    with pytest.raises(ConfigError, match=msg):
        load_config(overrides=["use_peft=true"])
    assert not load_config().use_peft  # without use_peft peft is not needed

    def no_model(*a, **kw):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", no_model)
    for cmd in ("sft", "grpo"):
        assert main([cmd, "use_peft=true", f"output_dir={tmp_path}"]) == 2
        assert f"r1train: error: {msg}" in capsys.readouterr().err


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


def test_deepspeed_file_is_checked_before_any_model_load(tmp_path, capsys):
    """A missing, malformed or non-object `deepspeed` file is a ConfigError naming the key when the config loads
    (it was a FileNotFoundError / JSONDecodeError after the model had loaded); its ZeRO stage is checked against
    the offload keys there too."""
    from r1train.cli import main

    bad = tmp_path / "ds.json"
    cases = [("/nonexistent/ds.json", None, "deepspeed: cannot read /nonexistent/ds.json"),
             (str(bad), "{not json", "is not valid JSON"),
             (str(bad), b"\xff\xfe{}", "is not valid JSON"),
             (str(bad), "[1, 2]", "must hold a JSON object")]
    for path, text, msg in cases:
        if text is not None:
            bad.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError, match="^deepspeed: ") as e:
            load_config(overrides=[f"deepspeed={path}"])
        assert msg in str(e.value)
    assert main(["sft", "deepspeed=/nonexistent/ds.json", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "r1train: error: deepspeed: cannot read" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="offload_param needs ZeRO stage 3"):
        load_config(overrides=[f"deepspeed={bad}", "offload_param=true"])
    assert load_config(overrides=[f"deepspeed={bad}", "offload_optimizer=true"]).offload_optimizer


def test_bad_tokenizer_path_names_the_key(tmp_path):
    from r1train.loading import load_model_and_tokenizer

    with pytest.raises(ConfigError, match="tokenizer_name_or_path: '/nonexistent/tok' is not a directory"):
        load_config(overrides=["tokenizer_name_or_path=/nonexistent/tok"])
    (tmp_path / "empty").mkdir()  # a directory, but no tokenizer in it: transformers' error, naming the key
    cfg = load_config(overrides=[f"tokenizer_name_or_path={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match="tokenizer_name_or_path: cannot load a tokenizer from"):
        load_model_and_tokenizer(cfg)


def test_model_directories_that_cannot_train_name_the_key(tmp_path):
    """A tokenizer with more tokens than the model's embedding (an IndexError mid-run before), a LoRA adapter
    checkpoint given as the model (a raw OSError from the Hub client), a directory with a broken config."""
    from r1train.loading import load_model_and_tokenizer
    from r1train.tasks import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model_dir, big_tok = tmp_path / "m", tmp_path / "tok"
    tiny_model("tiny-qwen2", tok, hidden_size=32, num_layers=1).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = load_config(overrides=[f"model_name_or_path={model_dir}", "model_hidden_size=100"])  # ignored here
    model, _ = load_model_and_tokenizer(cfg)  # the model's own tokenizer fits
    big = char_tokenizer()
    big.add_tokens(["<extra>"])
    big.save_pretrained(big_tok)
    cfg = load_config(overrides=[f"model_name_or_path={model_dir}", f"tokenizer_name_or_path={big_tok}"])
    n = model.get_input_embeddings().num_embeddings
    with pytest.raises(ConfigError, match=rf"tokenizer_name_or_path: the tokenizer has {n + 1} tokens, the model's "
                                          rf"embedding {n} rows"):
        load_model_and_tokenizer(cfg)
    adapter = tmp_path / "checkpoint-3"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="model_name_or_path: .* holds LoRA adapters .*r1train merge"):
        load_model_and_tokenizer(load_config(overrides=[f"model_name_or_path={adapter}"]))
    (model_dir / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ConfigError, match="model_name_or_path: cannot load a model from"):
        load_model_and_tokenizer(load_config(overrides=[f"model_name_or_path={model_dir}"]))


def test_unreadable_data_files_name_the_file(tmp_path):
    """Malformed .json, non-UTF-8 .json/.jsonl, a bad parquet file and a directory that holds no saved dataset
    are DatasetErrors naming the key and file (they were raw JSONDecodeError / UnicodeDecodeError /
    FileNotFoundError tracebacks)."""
    p = tmp_path / "train.json"
    p.write_text('[{"prompt": "a", "answer": "1"},\n {"prompt": "b" "answer": "2"}]')
    with pytest.raises(DatasetError, match=r"train.json is not valid JSON: Expecting ',' delimiter: line 2 column 17"):
        load_rows(str(p))
    p.write_bytes(b'[{"prompt": "caf\xe9", "answer": "1"}]')
    with pytest.raises(DatasetError, match=r"train.json is not valid JSON: 'utf-8' codec can't decode byte 0xe9"):
        load_rows(str(p))
    q = tmp_path / "train.jsonl"
    q.write_bytes(b'{"prompt": "a", "answer": "1"}\n\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DatasetError, match=r"train.jsonl: row 1 \(line 3\): not UTF-8 text"):
        load_rows(str(q))
    r = tmp_path / "train.parquet"
    r.write_text("not parquet")
    pytest.importorskip("pyarrow")
    with pytest.raises(DatasetError, match=r"dataset_name: .*train.parquet is not a readable parquet file"):
        load_rows(str(r), key="dataset_name")
    pytest.importorskip("datasets")
    with pytest.raises(DatasetError, match=r"eval_dataset_name: cannot load '.*' as a directory saved by datasets"):
        load_rows(str(tmp_path), key="eval_dataset_name")


def test_eval_dataset_dir_error_from_the_cli(tmp_path, capsys):
    pytest.importorskip("datasets")
    from r1train.cli import main

    (tmp_path / "notads").mkdir()
    assert main(["grpo", f"eval_dataset_name={tmp_path / 'notads'}", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "r1train: error: eval_dataset_name: cannot load" in capsys.readouterr().err


def test_demo_stage_choices(capsys):
    from r1train.cli import parse

    assert parse(["demo", "--stage", "rejection"]).stage == "rejection"
    with pytest.raises(SystemExit) as e:
        parse(["demo", "--stage", "bogus"])
    assert e.value.code == 2 and "argument --stage: invalid choice: 'bogus'" in capsys.readouterr().err


# defaults that differ from TRL 1.16's on purpose; each is listed, with its reason, in r1train.config's docstring
DEVIATIONS = {"bf16", "lr_scheduler_type", "learning_rate", "loss_type"}


@pytest.mark.parametrize("trl_config", ["GRPOConfig", "SFTConfig"])
def test_defaults_are_trl_except_the_documented_deviations(tmp_path, trl_config):
    """Every key TRL's config also has defaults to TRL's value (read from the installed TRL), except DEVIATIONS,
    each documented in the config module's docstring (max_completion_length, num_train_epochs, report_to and
    completion_only_loss differed without a reason)."""
    import dataclasses
    import warnings

    trl = pytest.importorskip("trl")
    import r1train.config as C

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(trl, trl_config)(output_dir=str(tmp_path), use_cpu=True)
    ours = C.TrainConfig()
    differ = {}
    for x in dataclasses.fields(C.TrainConfig):
        if x.name != "output_dir" and hasattr(theirs, x.name):
            t = getattr(theirs, x.name)
            t = getattr(t, "value", t)  # transformers' enums (lr_scheduler_type)
            if getattr(ours, x.name) != t and not {getattr(ours, x.name), t} <= {0, None}:  # 0 / None: off
                differ[x.name] = (getattr(ours, x.name), t)
    assert set(differ) <= DEVIATIONS, differ
    for k in differ:
        assert f"\n- {k} " in C.__doc__, k


def test_deepspeed_file_values_must_match_the_config(tmp_path):
    """A `deepspeed` file's fixed value for a key r1train fills from its config (micro-batch, GA, clipping,
    bf16.enabled) that differs from the config's is a ConfigError naming both, at load (as transformers'
    fill_match): DeepSpeed ran with the file's GA 4 over the config's 1, 3 steps and no optimizer step.
    "auto" or an equal value loads; bf16.enabled=false with bf16=true is the bf16-weights layout."""
    from r1train.engine import ds_config

    path = tmp_path / "ds.json"
    base = ["per_device_train_batch_size=8", "gradient_accumulation_steps=1", "max_grad_norm=1.0", "bf16=false"]
    for ds_key, value, key in (("train_micro_batch_size_per_gpu", 4, "per_device_train_batch_size"),
                               ("gradient_accumulation_steps", 4, "gradient_accumulation_steps"),
                               ("gradient_accumulation_steps", "4", "gradient_accumulation_steps"),
                               ("gradient_clipping", 0.5, "max_grad_norm")):
        path.write_text(json.dumps({ds_key: value}))
        with pytest.raises(ConfigError, match=f"^deepspeed: .*{ds_key}=.*{key}="):
            load_config(overrides=base + [f"deepspeed={path}"])
    path.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="bf16.enabled=True but the config has bf16=False"):
        load_config(overrides=base + [f"deepspeed={path}"])
    same = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1,
            "bf16": {"enabled": False}}
    path.write_text(json.dumps(same))
    cfg = load_config(overrides=base + [f"deepspeed={path}"])
    dsc = ds_config(cfg, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
    assert {k: dsc[k] for k in same} == same
    path.write_text(json.dumps({"gradient_accumulation_steps": "auto", "bf16": {"enabled": False}}))
    cfg = load_config(overrides=["bf16=true", "gradient_accumulation_steps=2", f"deepspeed={path}"])
    assert ds_config(cfg, 8, 2)["gradient_accumulation_steps"] == 2
    # a config changed after load (as a pipeline stage's) is checked again where the engine's config is built
    path.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    cfg = load_config(overrides=["gradient_accumulation_steps=2", f"deepspeed={path}"])
    cfg.gradient_accumulation_steps = 1
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=2 but the config has gradient_acc"):
        ds_config(cfg, 8, 1)


def test_token_budget_is_checked_against_the_trainers_longest_row(tmp_path):
    """max_tokens_per_batch's floor is the longest row of the trainer's rows: GRPO's max_prompt_length +
    max_completion_length; SFT's max_length, or below it the longest training row (tokenized before any work).
    SFT was checked against GRPO's bound, so a budget below its rows loaded and failed mid-training, and one
    above max_length (512, max_length 64) was rejected."""
    import train_helpers as H

    from r1train.data import sft_tokens
    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_datasets, load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    def trainer(cls, out, *ov):
        cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / out}", "padding_free=true", *ov])
        model, tok = load_model_and_tokenizer(cfg)
        if cls is SFTTrainer:
            return SFTTrainer(cfg, model, tok, load_datasets(cfg, sft=True)[0])
        return GRPOTrainer(cfg, model, tok, load_datasets(cfg)[0], reward_funcs=[H.digit_share])

    sft = ["max_length=64", "max_prompt_length=32", "max_steps=1"]
    # SFT: the longest training row, counted here as training tokenizes it (prompt + completion + eos)
    cfg = load_config(overrides=H.FAST + sft)
    _, tok = load_model_and_tokenizer(cfg)
    rows = load_datasets(cfg, sft=True)[0]
    longest = max(sum(map(len, sft_tokens(tok, r, i, completion_column=cfg.completion_column, max_length=64)))
                  for i, r in enumerate(rows))
    assert 40 < longest < 64  # the budgets below lie between the GRPO bound (40) and max_length
    with pytest.raises(ConfigError, match=rf"max_tokens_per_batch must be >= the longest SFT row's tokens .*"
                                          rf"= {longest}, got {longest - 1}"):
        trainer(SFTTrainer, "sft_small", *sft, f"max_tokens_per_batch={longest - 1}")
    assert not (tmp_path / "sft_small").exists()  # before any work
    assert len(trainer(SFTTrainer, "sft_fits", *sft, f"max_tokens_per_batch={longest}").train()) == 1
    # SFT: 512 >= max_length although < max_prompt_length + max_completion_length: loads and trains
    t = trainer(SFTTrainer, "sft_ok", "max_length=64", "max_steps=1", "max_tokens_per_batch=512")
    assert t.cfg.max_prompt_length + t.cfg.max_completion_length > 512 >= t.cfg.max_length
    assert len(t.train()) == 1
    # SFT: a budget that holds its rows though below both GRPO's bound and max_length (it was refused at load,
    # the message's "or the longest training row" notwithstanding)
    big = ["max_length=128", "max_prompt_length=120", "max_steps=1", f"max_tokens_per_batch={longest}"]
    load_config(overrides=H.FAST + big + ["padding_free=true"])
    assert len(trainer(SFTTrainer, "sft_below_both", *big).train()) == 1
    # GRPO: below prompt + completion, above max_length (an SFT key): at the grpo command's check, before a model
    # loads, and at the trainer's init
    small = H.FAST + ["max_prompt_length=32", "max_length=16", "padding_free=true", "max_tokens_per_batch=39"]
    msg = (r"max_tokens_per_batch must be >= max_prompt_length \+ max_completion_length \(the longest GRPO row\) "
           r"= 40, got 39")
    with pytest.raises(ConfigError, match=msg):
        check_grpo_config(load_config(overrides=small))
    with pytest.raises(ConfigError, match=msg):
        trainer(GRPOTrainer, "grpo_small", "max_prompt_length=32", "max_length=16", "max_tokens_per_batch=39")


@pytest.mark.parametrize("column", ["completions", "completion_ids", "trainer_state", "log_metric"])
def test_a_column_named_like_a_reward_argument_is_an_error(tmp_path, column):
    """Reward functions get the columns by name beside their own arguments: such a column would replace one. A
    completion_ids column is not forwarded (TRL drops it, rewards.NOT_FORWARDED): it loads."""
    from r1train.loading import load_datasets

    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "1+1?", "answer": "2", column: "x"}])
    if column == "completion_ids":
        assert load_datasets(load_config(overrides=[f"dataset_name={train}"]))[0][0][column] == "x"
        return
    with pytest.raises(DatasetError, match=rf"column\(s\) \['{column}'\] have the name of an argument"):
        load_datasets(load_config(overrides=[f"dataset_name={train}"]))


def test_a_key_repeated_in_a_yaml_file_is_an_error(tmp_path):
    """YAML itself keeps the last of two equal keys: the first value was dropped without a word."""
    p = tmp_path / "r.yaml"
    p.write_text("learning_rate: 1e-5\nbeta: 0.04\nlearning_rate: 3e-4\n")
    with pytest.raises(ConfigError, match=r"--config: .*r.yaml is not valid YAML: .*duplicate key 'learning_rate'"):
        load_config(str(p))
    p.write_text("grpo:\n  num_generations: 4\n  beta: 0.1\n  num_generations: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'num_generations'"):
        load_config(str(p), section="grpo")
    p.write_text("beta: 0.1\ngrpo:\n  beta: 0.2\nsft:\n  beta: 0.3\n")  # one key per mapping: no error
    assert load_config(str(p), section="grpo").beta == 0.2
    p.write_text("sft: &s\n  beta: 0.3\n  seed: 3\ngrpo:\n  <<: *s\n  beta: 0.2\n")  # a merge key's keys
    assert (load_config(str(p), section="grpo").beta, load_config(str(p), section="grpo").seed) == (0.2, 3)


@pytest.mark.parametrize("raw", ["runs #1", "@scratch/run", "*run", "%run", "[a", "!x"])
def test_a_string_override_keeps_its_text(raw):
    """key=value of a string key is the text as typed: YAML read `runs #1` as `runs` (a comment) and
    rejected text it cannot parse (`@...`, `*...`) although any text is a valid name."""
    assert load_config(overrides=[f"output_dir={raw}"]).output_dir == raw
    assert load_config(overrides=[f"eval_dataset_name={raw}"]).eval_dataset_name == raw


def test_a_string_override_still_unquotes_and_reads_null():
    assert load_config(overrides=["output_dir='a #b'"]).output_dir == "a #b"
    assert load_config(overrides=['output_dir="x"']).output_dir == "x"
    assert load_config(overrides=["eval_dataset_name=null"]).eval_dataset_name is None
    assert load_config(overrides=["eval_dataset_name=~"]).eval_dataset_name is None
    assert load_config(overrides=["eval_dataset_name="]).eval_dataset_name is None
    with pytest.raises(ConfigError, match="output_dir: None is not allowed"):
        load_config(overrides=["output_dir=null"])


@pytest.mark.parametrize("body, msg, offload", [
    ({"bf16": True}, "bf16", False), ({"bf16": "auto"}, "bf16", False),
    ({"zero_optimization": {"stage": "2"}}, "zero_optimization.stage", True),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", False),
])
def test_deepspeed_file_bf16_and_stage_are_checked_at_load(tmp_path, body, msg, offload):
    """A non-object bf16 or a ZeRO stage that is not 0-3 loaded, then building the engine's config (after the
    model loaded) raised AttributeError / TypeError, or DeepSpeed rejected the stage."""
    from r1train.engine import ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    ov = [f"deepspeed={path}", "bf16=true", f"offload_optimizer={offload}"]
    with pytest.raises(ConfigError, match=f"^deepspeed: .*{msg}"):
        cfg = load_config(overrides=ov)
        ds_config(cfg, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)


@pytest.mark.parametrize("argv", [["grpo", "--stage", "zero"], ["sft", "--stage", "all"],
                                  ["pipeline", "--config", "r.yaml", "--stage", "zero"]])
def test_stage_with_a_command_that_ignores_it_is_an_error(argv, capsys):
    """--stage picks a demo stage; other commands (and pipeline with --config) ran without a word about it."""
    from r1train.cli import parse

    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2 and "--stage" in capsys.readouterr().err
    assert parse(["pipeline", "--stage", "zero"]).stage == "zero"
    assert parse(["demo", "--config", "r.yaml", "--stage", "default"]).stage == "default"


@pytest.mark.parametrize("flag", ["--local_rank", "--local-rank"])
def test_launchers_local_rank_flag_in_either_spelling(flag):
    """deepspeed's launcher passes --local_rank=N and torch.distributed.launch --local-rank=N: both parse, before or
    after the command's key=value (the hyphenated one was an error, exit 2)."""
    from r1train.cli import parse

    rank = random.randrange(8)
    a = parse([f"{flag}={rank}", "grpo", "seed=1"])
    assert (a.command, a.local_rank, a.overrides) == ("grpo", rank, ["seed=1"])
    a = parse(["sft", "seed=1", flag, str(rank), "beta=0"])
    assert (a.command, a.local_rank, a.overrides) == ("sft", rank, ["seed=1", "beta=0"])
    assert parse(["sft"]).local_rank is None


@pytest.mark.parametrize("env", [None, "0"])
def test_local_rank_flag_sets_the_device_rank_when_the_launcher_sets_no_env(env, monkeypatch):
    """The device is cuda:LOCAL_RANK (engine.init_distributed): a launcher passing only the flag sets it; a
    LOCAL_RANK already in the env wins. (The run stops at its config error, before any model.)"""
    from r1train import cli

    rank = random.randint(1, 7)
    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so the test's change is undone
    if env is None:
        monkeypatch.delenv("LOCAL_RANK")
    else:
        monkeypatch.setenv("LOCAL_RANK", env)
    assert cli.main([f"--local-rank={rank}", "sft", "no_such_key=1"]) != 0
    assert os.environ["LOCAL_RANK"] == (str(rank) if env is None else env)


def test_sample_does_not_overwrite_earlier_samples(tmp_path, capsys):
    """`r1train sample` replaced output_dir/samples.jsonl (an earlier run's samples) without a word; now it
    needs overwrite_output_dir=true, and says so before any model loads."""
    import train_helpers as H

    from r1train.cli import main

    out = tmp_path / "o"
    out.mkdir()
    (out / "samples.jsonl").write_text('{"earlier": 1}\n')
    ov = [*H.FAST, f"output_dir={out}", "max_steps=1", "num_generations=2", "max_completion_length=2"]
    assert main(["sample", *ov]) == 2
    assert "overwrite_output_dir" in capsys.readouterr().err
    assert (out / "samples.jsonl").read_text() == '{"earlier": 1}\n'
    assert main(["sample", *ov, "overwrite_output_dir=true"]) == 0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2


def test_sample_keeps_dataset_columns_named_like_its_fields(tmp_path):
    """`r1train sample` writes each sample's completion, rewards and reward_failed beside the row's columns: a
    dataset column of one of those names (a prompt-completion dataset's reference completion) was overwritten;
    it is kept as dataset_<name>."""
    import json
    import random

    import train_helpers as H

    from r1train.cli import main

    rng = random.Random()
    rows = [{"prompt": f"{i}+1?", "answer": str(i + 1), "completion": f"ref {rng.random()}", "rewards": i,
             "dataset_rewards": -i} for i in range(2)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "o"
    ov = [*H.FAST, f"output_dir={out}", f"dataset_name={data}", "max_steps=2", "num_generations=2",
          "max_completion_length=2"]
    assert main(["sample", *ov]) == 0
    got = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [(g["dataset_completion"], g["dataset_dataset_rewards"], g["dataset_rewards"]) for g in got] == \
        [(r["completion"], r["rewards"], r["dataset_rewards"]) for r in rows for _ in range(2)]
    assert all(isinstance(g["rewards"], dict) and isinstance(g["completion"], str) for g in got)


def test_sample_checks_output_dir_before_any_model_loads(tmp_path, monkeypatch, capsys):
    """`r1train sample` wrote output_dir/samples.jsonl only after sampling every row: an output_dir that is a
    regular file failed there, the work lost. It is an error naming output_dir (exit 2) before the model loads;
    a missing one is created."""
    import train_helpers as H

    from r1train import loading
    from r1train.cli import main

    loads = []
    real = loading.load_model_and_tokenizer
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **kw: loads.append(1) or real(*a, **kw))
    f = tmp_path / "a_file"
    f.write_text("not a directory")
    ov = [*H.FAST, "max_steps=1", "num_generations=2", "max_completion_length=2"]
    assert main(["sample", *ov, f"output_dir={f}"]) == 2
    err = capsys.readouterr().err
    assert "r1train: error: output_dir" in err and str(f) in err and not loads
    assert f.read_text() == "not a directory"
    out = tmp_path / "new" / "dir"
    assert main(["sample", *ov, f"output_dir={out}"]) == 0 and loads
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2


def test_sample_writes_columns_json_lacks(tmp_path):
    """A dataset column JSON has no type for (a parquet file's dates and times, decimals) failed json.dumps after
    sampling every row: nothing written. Every sample is written, such a value as its str, a NaN as null, as
    metrics.jsonl writes its rows."""
    import datetime
    import decimal
    import random

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    import train_helpers as H

    from r1train.cli import main

    rng = random.Random()
    n = 3
    when = [datetime.datetime(2020, 1, 1) + datetime.timedelta(seconds=rng.randrange(10**8)) for _ in range(n)]
    price = [decimal.Decimal(f"{rng.randrange(10**6)}.{rng.randrange(100):02d}") for _ in range(n)]
    score = [float("nan") if i == 1 else rng.random() for i in range(n)]
    data = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": [f"{i}+1?" for i in range(n)], "answer": [str(i + 1) for i in range(n)],
                             "when": when, "price": pa.array(price, pa.decimal128(12, 2)), "score": score}), data)
    out = tmp_path / "o"
    ov = [*H.FAST, f"output_dir={out}", f"dataset_name={data}", "max_steps=-1", "num_generations=2",
          "max_completion_length=2"]
    assert main(["sample", *ov]) == 0
    got = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [(g["when"], g["price"], g["score"]) for g in got] == \
        [(str(w), str(p), None if s != s else s) for w, p, s in zip(when, price, score) for _ in range(2)]


@pytest.mark.parametrize("given,want", [("true", "latest"), ("True", "latest"), ("false", None), ("False", None),
                                        ("latest", "latest"), ("runs/x/checkpoint-4", "runs/x/checkpoint-4")])
def test_resume_from_checkpoint_true_and_false_as_in_hf(tmp_path, given, want):
    """HF Trainer's resume_from_checkpoint=True / False: the newest checkpoint / no resume, from key=value and
    from YAML booleans (a directory named `true` is still that directory)."""
    assert load_config(None, [f"resume_from_checkpoint={given}"]).resume_from_checkpoint == want
    if given in ("true", "false"):
        f = tmp_path / "c.yaml"
        f.write_text(f"resume_from_checkpoint: {given}\n")
        assert load_config(str(f)).resume_from_checkpoint == want


@pytest.mark.parametrize("given,root", [('output_dir="runs #1"', "runs #1"), ("output_dir = runs/a", "runs/a"),
                                        ("output_dir=runs/b", "runs/b")])
def test_demo_output_dir_is_read_as_the_config_reads_it(given, root):
    """The demo writes its tables under the directory its training runs use: the output_dir override read as
    load_config reads it (a quoted value, spaces around =)."""
    import os

    from r1train.demo import out_dir
    from r1train.demo.common import configs

    assert out_dir("default", ["seed=3", given]) == root
    assert out_dir("zero", [given]) == os.path.join(root, "zero")
    cfg = configs("demo.yaml", [given], out_dir("default", [given]), {})[0]
    assert cfg.output_dir == root


@pytest.mark.parametrize("override,key", [("task_min_terms=1", "task_min_terms"),
                                          ("task_max_terms=2", "task_max_terms"),
                                          ("task_max_operand=0", "task_max_operand"), ("task_ops=*", "task_ops")])
def test_task_settings_checked_at_load_naming_the_key(override, key):
    """The built-in task's settings: a bad one is a ConfigError when the config loads, naming its key."""
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


@pytest.mark.parametrize("blank", [None, "", "  ", float("nan")])
def test_an_answer_column_with_no_value_is_an_error(tmp_path, blank):
    """A column present on every row but holding no gold answer (None, blank, NaN: what the accuracy reward
    treats as missing) gives GRPO no accuracy signal: an error naming answer_column, as a missing column is."""
    from r1train.loading import load_datasets

    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"{i}+1?", "answer": blank} for i in range(3)])
    with pytest.raises(DatasetError, match=r"answer_column='answer': no row of .* has a value"):
        load_datasets(load_config(overrides=[f"dataset_name={train}"]))
    ok = _write_jsonl(tmp_path / "u.jsonl", [{"prompt": "1+1?", "answer": blank}, {"prompt": "2+1?", "answer": "3"}])
    assert len(load_datasets(load_config(overrides=[f"dataset_name={ok}"]))[0]) == 2


# ---- YAML 1.1's octal and base-60 numbers (PyYAML): read as YAML 1.2 does
@pytest.mark.parametrize("text", ["017", "0017", "+017", "010", "0_17", "00", "07"])
def test_leading_zero_ints_read_as_decimal(tmp_path, text):
    """`seed: 017` was octal 15 (YAML 1.1); a config means 17, as YAML 1.2 reads it: in the file, in a section
    and as a key=value override (both parse numbers with the same loader)."""
    want = int(text.replace("_", ""), 10)
    p = tmp_path / "c.yaml"
    p.write_text(f"seed: {text}\ngrpo:\n  logging_steps: {text}\n")
    c = load_config(str(p), section="grpo")
    assert (c.seed, c.logging_steps) == (want, want)
    assert load_config(overrides=[f"seed={text}"]).seed == want


def test_negative_leading_zero_int_reads_as_decimal():
    from r1train.config import fields, parse_override

    seed = next(x for x in fields() if x.name == "seed")
    assert parse_override(seed, "-017") == -int("17")


@pytest.mark.parametrize("key,text,msg", [("seed", "1:30", "seed: expected int, got str '1:30'"),
                                          ("max_steps", "1:00:00", "max_steps: expected int, got str '1:00:00'"),
                                          ("learning_rate", "1:30.5",
                                           "learning_rate: expected float, got str '1:30.5'")])
def test_base_60_numbers_are_an_error_naming_the_key(tmp_path, key, text, msg):
    """`1:30` was 90 (base 60 in YAML 1.1): a string in YAML 1.2, so a numeric key is a ConfigError naming it,
    from the file and from a key=value override alike."""
    p = tmp_path / "c.yaml"
    p.write_text(f"{key}: {text}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert msg in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"{key}={text}"])
    assert msg in str(e.value)


def test_base_60_text_of_a_string_key_is_kept(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: 1:30\n")
    assert load_config(str(p)).output_dir == "1:30"  # was int 90: a type error


def test_other_yaml_values_parse_as_before(tmp_path):
    """Booleans, floats written 1e-6 (a string to YAML 1.1, a float to the config), hex / underscored ints, null
    and lists: what PyYAML's safe_load reads (the independent reading), after the config's float conversion."""
    import yaml

    text = ("bf16: false\nlearning_rate: 1e-6\nbeta: 0.04\nsave_steps: 0x20\nmax_completion_length: 1_024\n"
            "resume_from_checkpoint: null\nreward_funcs: [accuracy, format]\nreward_weights: [1, 0.5]\n"
            "top_k: 0\nmax_steps: -1\n")
    p = tmp_path / "c.yaml"
    p.write_text(text)
    c = load_config(str(p))
    for k, v in yaml.safe_load(text).items():
        want = [float(w) for w in v] if k == "reward_weights" else float(v) if k in ("learning_rate", "beta") else v
        assert getattr(c, k) == want, k
    over = load_config(overrides=[f"{k}={v}" for k, v in (ln.split(": ", 1) for ln in text.splitlines())])
    assert all(getattr(over, k) == getattr(c, k) for k in yaml.safe_load(text)), "overrides read as the file"


def _trl_reading(key: str, text: str, tmp_path):
    """TRL's reading of `key: text` in a --config YAML file (TrlParser over a dataclass with TrainConfig's type of
    the key): the value, or None where TRL's parser rejects it."""
    import dataclasses
    import typing

    from r1train.config import TrainConfig

    trl = pytest.importorskip("trl")
    D = dataclasses.make_dataclass("D", [(key, typing.get_type_hints(TrainConfig)[key], None)])
    p = tmp_path / "trl.yaml"
    p.write_text(f"{key}: {text}\n")
    try:
        (d,) = trl.TrlParser(D).parse_args_and_config(["--config", str(p)])
    except SystemExit:  # argparse's error: the key's type does not read the text
        return None
    return getattr(d, key)


# YAML 1.1 surprises: 018 / 09 (no octal digit: strings to PyYAML), 1e-5 (no dot: a string), quoted numbers,
# yes/no/on/off and string_to_bool's y/n/t/f
@pytest.mark.parametrize("key,text", [
    ("seed", "018"), ("seed", "09"), ("seed", "'42'"), ("max_steps", "' 5'"), ("max_steps", "1_000"),
    ("save_total_limit", "'3'"), ("save_total_limit", "null"),
    ("learning_rate", "1e-5"), ("learning_rate", "'3e-4'"), ("epsilon_high", "2E-1"),
    ("bf16", "yes"), ("bf16", "no"), ("bf16", "on"), ("bf16", "off"), ("bf16", "y"), ("bf16", "N"),
    ("bf16", "'true'"), ("bf16", "T"), ("bf16", "1"), ("bf16", "0"), ("completion_only_loss", "'no'"),
    ("seed", "1e3"), ("seed", "0o17"), ("max_steps", "'five'"), ("learning_rate", "'fast'"), ("bf16", "maybe"),
    ("bf16", "'on'"),
])
def test_typed_values_read_as_trl_reads_them(tmp_path, key, text):
    """An int / float / bool key's value, in the YAML file and as a key=value override, is what TRL's TrlParser
    reads from the same YAML (a string through the key's type: `seed: 018` was a ConfigError while `seed: 017` was
    17, `bf16: y` an error); where TRL rejects the text, a ConfigError naming the key (never another value)."""
    want = _trl_reading(key, text, tmp_path)
    p = tmp_path / "c.yaml"
    p.write_text(f"{key}: {text}\n")
    for load in (lambda: load_config(str(p)), lambda: load_config(overrides=[f"{key}={text}"])):
        if want is None and text != "null":
            with pytest.raises(ConfigError, match=f"^{key}: expected "):
                load()
            continue
        got = getattr(load(), key)
        assert got == want and type(got) is (type(want) if key != "bf16" else bool), (got, want)


def test_deepspeed_train_batch_size_is_checked_at_load(tmp_path, monkeypatch, capsys):
    """A `deepspeed` file's train_batch_size must be "auto" or per_device_train_batch_size x
    gradient_accumulation_steps x processes (the launcher's WORLD_SIZE): a ConfigError naming train_batch_size
    and the product when the config loads, before any model (it was raised building the engine's config, after
    the model had loaded)."""
    from r1train.cli import main

    path = tmp_path / "ds.json"
    base = ["per_device_train_batch_size=8", "gradient_accumulation_steps=2", f"deepspeed={path}"]
    for world in (1, 4):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        want = 8 * 2 * world
        for bad in (want * 2, want // 2, str(want), True, None):
            path.write_text(json.dumps({"train_batch_size": bad}))
            with pytest.raises(ConfigError, match=rf"^deepspeed: .*train_batch_size={bad!r} .* = 8 x 2 x {world} "
                                                  rf"= {want} \(per_device_train_batch_size"):
                load_config(overrides=base)
        for ok in (want, float(want), "auto"):
            path.write_text(json.dumps({"train_batch_size": ok}))
            assert load_config(overrides=base).deepspeed == str(path)
    monkeypatch.setenv("WORLD_SIZE", "1")
    path.write_text(json.dumps({"train_batch_size": 64}))
    assert main(["sft", *base, f"output_dir={tmp_path / 'o'}"]) == 2
    assert "r1train: error: deepspeed: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing ran
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        load_config(overrides=base)


# ---- list keys: every item is type-checked when the config loads

def _list_keys():
    import dataclasses
    import typing

    from r1train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return [x.name for x in dataclasses.fields(TrainConfig) if hints[x.name] in (list, typing.Optional[list])]


def test_the_list_keys_are_the_ones_tested_here():
    """A new list key must join LIST_BAD below (its items then checked by a test)."""
    assert sorted(_list_keys()) == sorted(LIST_BAD)


# key -> YAML values whose items are wrong (a number, a nested list, null, a mapping, a bool, an empty name)
LIST_BAD = {
    "lora_target_modules": ["[q_proj, 3]", "[[q_proj, v_proj]]", "[q_proj, null]", "[{q: 1}]", "[true]", "['']",
                            "3", "[]"],
    "lora_modules_to_save": ["[lm_head, 1.5]", "[[lm_head]]", "[null]", "[lm_head, '  ']", "[false]"],
    "report_to": ["[1]", "[[wandb]]", "[null]", "[{wandb: 1}]", "[true]", "3"],
    "reward_funcs": ["[accuracy, 3]", "[[accuracy, format]]", "[accuracy, null]", "[{accuracy: 1}]", "[true]"],
    "reward_weights": ["[1, [2]]", "[[1, 2]]", "[1, null]", "[1, {a: 1}]", "[1, true]", "[1, .nan]", "[1, .inf]"],
}


@pytest.mark.parametrize("key,text", [(k, t) for k, ts in LIST_BAD.items() for t in ts], ids=repr)
@pytest.mark.parametrize("peft", [False, True], ids=["", "use_peft"])
def test_list_key_items_are_type_checked(tmp_path, key, text, peft):
    """A bad item in a list key (YAML or key=value) is a ConfigError naming the key when the config loads, with or
    without use_peft (it crashed inside peft, or passed silently: `lora_target_modules: []` ran peft's every
    linear layer)."""
    p = tmp_path / "c.yaml"
    p.write_text(f"{key}: {text}\n" + ("use_peft: true\n" if peft else ""))
    for load in (lambda: load_config(str(p)),
                 lambda: load_config(overrides=[f"{key}={text}"] + (["use_peft=true"] if peft else []))):
        with pytest.raises(ConfigError, match=f"^{key}[: ]"):
            load()


@pytest.mark.parametrize("key,text,want", [
    ("lora_target_modules", "[q_proj, v_proj]", ["q_proj", "v_proj"]),
    ("lora_target_modules", "q_proj,v_proj", ["q_proj", "v_proj"]),
    ("lora_target_modules", "null", None),
    ("lora_modules_to_save", "[lm_head]", ["lm_head"]),
    ("lora_modules_to_save", "[]", []),
    ("report_to", "[]", []),
    ("report_to", "none", ["none"]),
    ("reward_funcs", "[accuracy, format]", ["accuracy", "format"]),
    ("reward_weights", "[1, 0.5]", [1.0, 0.5]),
    ("reward_weights", "[1, '2']", [1.0, 2.0]),
], ids=repr)
def test_good_list_keys_still_load(tmp_path, key, text, want):
    p = tmp_path / "c.yaml"
    p.write_text(f"{key}: {text}\nuse_peft: true\n")
    for cfg in (load_config(str(p)), load_config(overrides=[f"{key}={text}", "use_peft=true"])):
        assert getattr(cfg, key) == want


def test_chat_template_kwargs_key(tmp_path):
    """chat_template_kwargs (TRL GRPOConfig's dict key): a YAML mapping on the command line or in a file, or its
    JSON text (as TRL parses a dict key given as a string); anything else, or a keyword the prompt rendering sets
    itself, is a ConfigError naming the key."""
    assert load_config(overrides=["chat_template_kwargs={enable_thinking: false}"]).chat_template_kwargs == \
        {"enable_thinking": False}
    assert load_config(overrides=['chat_template_kwargs={"a": [1, 2]}']).chat_template_kwargs == {"a": [1, 2]}
    p = tmp_path / "c.yaml"
    p.write_text("chat_template_kwargs: '{\"enable_thinking\": true, \"x\": \"y\"}'\n")
    assert load_config(str(p)).chat_template_kwargs == {"enable_thinking": True, "x": "y"}
    assert load_config().chat_template_kwargs is None
    for bad, msg in (("chat_template_kwargs={a: 1", "chat_template_kwargs"), ("chat_template_kwargs=[1, 2]", "dict"),
                     ("chat_template_kwargs='[1]'", "dict"), ("chat_template_kwargs={1: 2}", "string keys"),
                     ("chat_template_kwargs={tokenize: false}", "sets itself")):
        with pytest.raises(ConfigError, match=msg):
            load_config(overrides=[bad])


def test_chat_template_kwargs_render_sampled_prompts(monkeypatch):
    """rollout.sample_rows (evaluation, `r1train sample`, rejection sampling) renders conversational prompts with
    cfg.chat_template_kwargs: the prompt ids it samples from are the tokenizer's own apply_chat_template with
    those keywords."""
    import torch

    from r1train import rollout
    from r1train.tasks import char_tokenizer

    class Sampled(Exception):
        pass

    def fake_sample(model, ids, mask, **_):
        raise Sampled([[t for t, m in zip(r, k) if m] for r, k in zip(ids.tolist(), mask.tolist())])

    monkeypatch.setattr(rollout, "sample", fake_sample)
    tok = char_tokenizer()
    tok.chat_template = "{% if think %}<think>{% endif %}" + tok.chat_template
    prompt = [{"role": "user", "content": "2+3?"}]
    for kw in ({"think": True}, None):
        cfg = load_config(overrides=[f"chat_template_kwargs={json.dumps(kw)}"])
        with pytest.raises(Sampled) as got:
            next(rollout.sample_rows(torch.nn.Linear(1, 1), tok, [{"prompt": prompt}], num_samples=1, cfg=cfg))
        want = tok.apply_chat_template([prompt], add_generation_prompt=True, tokenize=True, return_dict=True,
                                       **(kw or {}))["input_ids"]
        assert got.value.args[0] == want and tok.decode(want[0]).startswith("<think>") == bool(kw)


@pytest.mark.parametrize("command", ["sft", "grpo", "sample", "distill"])
def test_keys_the_command_never_reads_are_one_warning(tmp_path, monkeypatch, caplog, command):
    """`r1train sft ... num_generations=3 beta=0.5` ran without a word about keys SFT never reads (and `grpo`
    about SFT's keys; `sample` and `distill` about any). One warning names those set away from their defaults; the
    run goes on (one YAML may hold every stage's keys). Keys the command reads (of `sample`, GRPO's sampling and
    reward keys; of `distill`, its teacher's rejection-sampling keys), and keys at their defaults, are not named."""
    import logging
    import random

    import torch

    from r1train import cli, config, loading, pipeline, rollout
    from r1train.config import fields

    names = {x.name for x in fields()}
    assert config.SFT_ONLY_KEYS | config.GRPO_ONLY_KEYS | config.OTHER_COMMANDS_KEYS <= names
    assert config.SAMPLE_READS | config.DISTILL_READS <= names
    # stand-ins for the models and the work: the commands' configs and warnings are real
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **kw: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", lambda *a, **kw: (None, None))
    monkeypatch.setattr(pipeline, "run_sft", lambda *a, **kw: (None, {}))
    monkeypatch.setattr(pipeline, "run_grpo", lambda *a, **kw: (None, {}, {}))
    monkeypatch.setattr(pipeline, "rejection_sample", lambda *a, **kw: [{"prompt": "1+1?", "completion": "2"}])
    monkeypatch.setattr(rollout, "sample_rows", lambda *a, **kw: iter(()))
    rng = random.Random()
    g, beta, n = rng.choice([2, 4]), round(rng.uniform(0.01, 0.5), 3), rng.randrange(64, 512)
    others = ["adapter_path=x", f"task_slip_share={rng.uniform(0, 0.5):.3f}"]
    unread = {"sft": [f"num_generations={g}", f"beta={beta}", "temperature=0.7", "rejection_num_samples=4"],
              "grpo": [f"max_length={n}", "completion_only_loss=false", "rejection_num_samples=4"],
              "sample": [f"beta={beta}", "loss_type=grpo", "log_completions=true", f"max_length={n}",
                         "rejection_num_samples=4"],
              "distill": [f"num_generations={g}", f"beta={beta}", "reward_timeout=5", "log_completions=true"]
              }[command] + others
    read = [f"learning_rate={rng.uniform(1e-6, 1e-3):.2e}", "max_completion_length=16", "max_prompt_length=512",
            f"output_dir={tmp_path}"]
    read += {"sft": [f"max_length={n}"], "grpo": [f"num_generations={g}", "temperature=0.7"],
             "sample": [f"num_generations={g}", "temperature=0.7", "language=zh", "reward_timeout=5",
                        "max_steps=2", "overwrite_output_dir=true"],
             "distill": ["teacher_model=tiny-qwen2", "rejection_num_samples=4", "temperature=0.7", "language=zh",
                         f"max_length={n}", "task_train_size=8", "task_eval_size=2"]}[command]
    with caplog.at_level(logging.WARNING, logger="r1train"):
        assert cli.main([command, *read, *sorted(unread, key=lambda _: rng.random())]) == 0
    said = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"`r1train {command}` does not read ")
    named = {k.partition("=")[0] for k in said[0].split("read ")[1].split(": ")[0].split(", ")}
    assert named == {k.partition("=")[0] for k in unread}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="r1train"):
        assert cli.main([command, *read]) == 0
    assert not [r for r in caplog.records if "does not read" in r.getMessage()]
