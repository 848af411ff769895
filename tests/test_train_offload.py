"""ZeRO-Offload keys: offload_optimizer (stage >= 1) and offload_param (stage 3) run through DeepSpeed's own
offload paths and train the same as without offload; a stage that cannot offload is an error naming the key."""

import dataclasses
import math
import os

import pytest
import train_helpers as H

from r1train.config import CONFIG_DIR, ConfigError, load_config

_UNPINNED = "deepspeed=" + os.path.join(CONFIG_DIR, "ds_zero2_offload.json")


@pytest.mark.parametrize("stage,extra", [(2, ["offload_optimizer=true"]),
                                         (3, ["offload_optimizer=true", "offload_param=true", "beta=0.04"]),
                                         (2, [_UNPINNED])])
def test_offload_trains_like_no_offload(tmp_path, stage, extra):
    hist = {}
    for name, ov in (("plain", []), ("offload", extra)):
        keep = [x for x in extra if x.startswith("beta")]
        t = H.grpo_trainer(tmp_path / name, f"zero_stage={stage}", "max_steps=2", "num_iterations=2",
                           "gradient_accumulation_steps=2", "per_device_train_batch_size=4", *keep, *ov,
                           reward_funcs=[H.digit_share])
        if name == "offload":
            assert t.engine.zero_offload_optimizer()
            if ov == [_UNPINNED]:  # the file's own offload section (pin_memory=false) is kept
                assert t.engine.optimizer.cpu_offload_pin_memory is False
            if stage == 3:
                assert t.engine.zero_offload_param()
        hist[name] = t.train()
    for a, b in zip(hist["plain"], hist["offload"]):
        assert math.isfinite(a["loss"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-9)


@pytest.mark.parametrize("ov,key", [(["offload_optimizer=true", "zero_stage=0"], "offload_optimizer"),
                                    (["offload_param=true", "zero_stage=2"], "offload_param")])
def test_offload_needs_its_stage(ov, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=ov)


def test_deepspeed_train_batch_size_must_match(tmp_path):
    """A `deepspeed` file's train_batch_size was dropped silently, also when it contradicted micro-batch x
    gradient accumulation x processes (transformers' integration raises a mismatch): now a ConfigError naming
    `deepspeed` and the keys, when the config loads and again at engine setup; "auto" and the consistent value
    keep working."""
    import json

    from r1train.engine import ds_config

    path = tmp_path / "ds.json"
    base = ["per_device_train_batch_size=8", "gradient_accumulation_steps=2", "max_grad_norm=1.0"]
    for bad in (64, 8, "16", True):
        path.write_text(json.dumps({"train_batch_size": bad, "zero_optimization": {"stage": 2}}))
        with pytest.raises(ConfigError, match=r"^deepspeed: .*train_batch_size=.*per_device_train_batch_size.*"
                                              r"gradient_accumulation_steps"):  # when the config loads
            load_config(overrides=base + [f"deepspeed={path}"])
        cfg = load_config(overrides=base)
        cfg.deepspeed = str(path)  # a config changed after it loaded
        with pytest.raises(ConfigError, match=r"^deepspeed: .*train_batch_size="):  # and at engine setup
            ds_config(cfg, 8, 2)
    for ok in (16, "auto"):
        path.write_text(json.dumps({"train_batch_size": ok, "zero_optimization": {"stage": 2}}))
        cfg = load_config(overrides=base + [f"deepspeed={path}"])
        dsc = ds_config(cfg, 8, 2)
        assert "train_batch_size" not in dsc and dsc["gradient_accumulation_steps"] == 2


def test_deepspeed_optimizer_and_scheduler_sections(tmp_path):
    """A `deepspeed` file's optimizer / scheduler sections were ignored silently (DeepSpeed takes r1train's
    optimizer and LambdaLR over them): optimizer.params.lr=1e-3 trained at the config's learning_rate. Now a
    value that would not hold is a ConfigError naming `deepspeed` and both keys; "auto" or equal values (as
    transformers' fill_match) keep working, and a Trainer built on such a file steps at the config's lr."""
    import json

    import train_helpers as H

    from r1train.engine import ds_config

    path = tmp_path / "ds.json"
    base = ["learning_rate=0.01", "weight_decay=0.1", "adam_beta1=0.8", "adam_beta2=0.99", "adam_epsilon=1e-8"]
    for section, match in (({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
                            r"optimizer\.params\.lr=0\.001 but the config has learning_rate=0\.01"),
                           ({"optimizer": {"params": {"betas": [0.9, 0.999]}}},
                            r"optimizer\.params\.betas=.*adam_beta1"),
                           ({"optimizer": {"params": {"weight_decay": 0.0}}}, r"weight_decay=0\.0 but the config"),
                           ({"optimizer": {"type": "Lion", "params": {}}}, r"optimizer\.type='Lion'"),
                           ({"optimizer": {"params": {"amsgrad": True}}}, r"optimizer\.params\.amsgrad"),
                           ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}},
                            r"scheduler.*lr_scheduler_type")):
        path.write_text(json.dumps({"zero_optimization": {"stage": 1}, **section}))
        with pytest.raises(ConfigError, match=r"^deepspeed: .*" + match):  # when the config loads
            load_config(overrides=base + [f"deepspeed={path}"])
        with pytest.raises(ConfigError, match=r"^deepspeed: .*" + match):  # a config changed after it loaded
            ds_config(dataclasses.replace(load_config(overrides=base), deepspeed=str(path)), 8, 1)
    ok = {"type": "AdamW", "params": {"lr": "auto", "betas": [0.8, 0.99], "eps": 1e-8, "weight_decay": "auto"}}
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "optimizer": ok}))
    t = H.grpo_trainer(tmp_path / "run", *base, f"deepspeed={path}", "max_steps=1", "beta=0.04",
                       reward_funcs=[H.digit_share])
    assert float(t.engine.get_lr()[0]) == 0.01
    assert math.isfinite(t.train()[0]["loss"])


def test_deepspeed_fp16_is_an_error(tmp_path):
    """fp16 is not supported (the bf16 key's help), yet a `deepspeed` file's fp16.enabled=true trained the model
    in float16 under DeepSpeed's loss scaling without a word; now a ConfigError naming `deepspeed` and fp16.
    fp16.enabled false or "auto" (transformers fills it from its fp16 key, false here) keeps working."""
    import json

    from r1train.engine import ds_config

    path = tmp_path / "ds.json"
    for bad in ({"enabled": True}, {"enabled": 1}, {"enabled": "true"}, True):
        path.write_text(json.dumps({"fp16": bad, "zero_optimization": {"stage": 1}}))
        with pytest.raises(ConfigError, match=r"^deepspeed: .*fp16"):  # when the config loads
            load_config(overrides=[f"deepspeed={path}"])
        with pytest.raises(ConfigError, match=r"^deepspeed: .*fp16"):  # a config changed after it loaded
            ds_config(dataclasses.replace(load_config(), deepspeed=str(path)), 8, 1)
    for ok in ({"enabled": False}, {"enabled": "auto", "loss_scale": 0}, {}):
        path.write_text(json.dumps({"fp16": ok, "zero_optimization": {"stage": 1}}))
        cfg = load_config(overrides=[f"deepspeed={path}"])
        assert ds_config(cfg, 8, 1)["fp16"]["enabled"] is False


def test_deepspeed_unmanaged_gradient_accumulation_is_an_error(tmp_path):
    """DeepSpeed's managed_gradient_accumulation=false makes each engine.step() an optimizer step; r1train calls
    step() after every micro-batch, so with gradient_accumulation_steps=4 the optimizer would step at each one
    (DeepSpeed 0.19.8's is_gradient_accumulation_boundary: in that mode step() is the boundary). Now a ConfigError
    naming `deepspeed` and the key; true works."""
    import json

    from r1train.engine import ds_config

    path = tmp_path / "ds.json"
    for bad in (False, 0, None):  # what DeepSpeed reads as unmanaged (`if not managed_gradient_accumulation()`)
        path.write_text(json.dumps({"managed_gradient_accumulation": bad, "zero_optimization": {"stage": 1}}))
        with pytest.raises(ConfigError, match=r"^deepspeed: .*managed_gradient_accumulation"):
            load_config(overrides=[f"deepspeed={path}"])
        with pytest.raises(ConfigError, match=r"^deepspeed: .*managed_gradient_accumulation"):
            ds_config(dataclasses.replace(load_config(), deepspeed=str(path)), 8, 4)
    for ok in (True, 1):
        path.write_text(json.dumps({"managed_gradient_accumulation": ok, "zero_optimization": {"stage": 1}}))
        assert ds_config(load_config(overrides=[f"deepspeed={path}"]), 8, 4)["managed_gradient_accumulation"] == ok


@pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
def test_offload_key_against_a_file_section_that_turns_it_off(tmp_path, key):
    """offload_optimizer / offload_param=true with a `deepspeed` file whose section says device "none": the file's
    section was kept over the key's, so the run went without the offload the key asked for, silently. Now a
    ConfigError naming `deepspeed` and the key; the file's own cpu section (pin_memory=false) is still kept."""
    import json

    from r1train.engine import ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, key: {"device": "none"}}}))
    with pytest.raises(ConfigError, match=rf"^deepspeed: .*{key}\.device='none'.*{key}=true"):
        load_config(overrides=[f"deepspeed={path}", f"{key}=true"])  # when the config loads, before any model
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, key: {"device": "cpu", "pin_memory": False}}}))
    cfg = load_config(overrides=[f"deepspeed={path}", f"{key}=true"])
    assert ds_config(cfg, 8, 1)["zero_optimization"][key] == {"device": "cpu", "pin_memory": False}
