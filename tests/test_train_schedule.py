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


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear"])
def test_logged_learning_rate_is_the_one_the_step_used(tmp_path, name):
    """metrics' learning_rate was read after the step's scheduler step: the next step's rate (at step 1 of a
    warmup 1/warm x lr where the optimizer stepped at 0; at the last step of linear 0). transformers' Trainer
    logs the rate the optimizer step used ("get learning rate before update"): compared against the lr each
    optimizer step saw."""
    import train_helpers as H

    from r1train.loading import load_datasets, load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    lr, total = 0.01, 4
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", f"lr_scheduler_type={name}", "warmup_ratio=0.5",
                                          f"max_steps={total}", f"learning_rate={lr}"])
    model, tok = load_model_and_tokenizer(cfg)
    train, ev = load_datasets(cfg, sft=True)
    t = SFTTrainer(cfg, model, tok, train, ev)
    seen = []
    t.engine.basic_optimizer.register_step_pre_hook(lambda opt, *_: seen.append(float(opt.param_groups[0]["lr"])))
    hist = t.train()
    want = [lr * x for x in transformers_lrs(name, 0.5, total)]
    assert seen == pytest.approx(want, abs=1e-12)
    assert [h["learning_rate"] for h in hist] == pytest.approx(want, abs=1e-12)
