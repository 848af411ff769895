"""ZeRO-Offload keys: offload_optimizer (stage >= 1) and offload_param (stage 3) run through DeepSpeed's own
offload paths and train the same as without offload; a stage that cannot offload is an error naming the key."""

import math
import os

import pytest
import train_helpers as H

from r1train.config import ConfigError, load_config
from r1train.engine import CONFIG_DIR

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
