"""The learning-rate schedule (r1train.engine.lr_lambda) is transformers' get_scheduler for every
lr_scheduler_type r1train accepts, with TRL's warmup step count (ceil(warmup_ratio * total))."""

import dataclasses
import math

import pytest
import torch

from r1train.config import ConfigError, TrainConfig, load_config
from r1train.engine import lr_lambda

TYPES = next(x for x in dataclasses.fields(TrainConfig) if x.name == "lr_scheduler_type").metadata["choices"]


def transformers_lrs(name: str, ratio: float, total: int) -> list[float]:
    """The lr multipliers of transformers' own scheduler, step by step, on a dummy optimizer."""
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, opt, num_warmup_steps=math.ceil(ratio * total), num_training_steps=total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


RATIOS = [(0.0, 10), (0.1, 10), (0.05, 10), (0.25, 7), (0.5, 3), (1.0, 4), (0.03, 100)]
# constant with a warmup_ratio is a ConfigError (test_constant_with_warmup_ratio_is_an_error)
CASES = [(n, r, t) for n in TYPES for r, t in RATIOS if not (n == "constant" and r > 0)]


@pytest.mark.parametrize("name,ratio,total", CASES)
def test_schedule_matches_transformers(name, ratio, total):
    cfg = load_config(overrides=[f"lr_scheduler_type={name}", f"warmup_ratio={ratio}"])
    f = lr_lambda(cfg, total)
    ours = [f(s) for s in range(total)]
    assert ours == pytest.approx(transformers_lrs(name, ratio, total), abs=1e-12), (ours, name, ratio, total)


def test_constant_with_warmup_ratio_is_an_error():
    """transformers' `constant` ignores the warmup (r1train's warmed up): rather than drop it silently, the
    combination names constant_with_warmup."""
    with pytest.raises(ConfigError, match="warmup_ratio.*constant_with_warmup"):
        load_config(overrides=["lr_scheduler_type=constant", "warmup_ratio=0.1"])
    assert load_config(overrides=["lr_scheduler_type=constant_with_warmup", "warmup_ratio=0.1"]).warmup_ratio == 0.1
