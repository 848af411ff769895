"""report_to: a list of backends through their own clients (wandb offline here), the completions table at
logging steps with log_completions, 'all' / 'none', and bad values naming the key."""

import math

import pytest
import train_helpers as H

from r1train.config import ConfigError, load_config
from r1train.metrics import resolve_report_to


def test_wandb_offline_gets_metrics_and_completions(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = H.grpo_trainer(tmp_path, "max_steps=2", "report_to=wandb", "log_completions=true", "logging_steps=2",
                       reward_funcs=[H.digit_share])
    run = t.logger.sinks["wandb"]
    calls, log = [], run.log
    run.log = lambda data, step=None, **kw: (calls.append((step, data)), log(data, step=step, **kw))[1]
    hist = t.train()
    metrics = [(st, d) for st, d in calls if "loss" in d]
    assert [st for st, _ in metrics] == [1, 2]
    for (_, d), h in zip(metrics, hist):
        assert d["loss"] == h["loss"] and d["reward"] == h["reward"] and d["entropy"] == h["entropy"]
    tables = [(st, d["completions"]) for st, d in calls if "completions" in d]
    assert [st for st, _ in tables] == [2]  # logging_steps=2
    tab = tables[0][1]
    assert isinstance(tab, wandb.Table) and tab.columns == ["step", "prompt", "completion", "reward", "advantage"]
    assert len(tab.data) == t.prompts_per_rank * t.cfg.num_generations and all(r[0] == 2 for r in tab.data)
    run_id = (tmp_path / ".wandb_run_id").read_text()
    assert run.id == run_id and any(p.name.startswith("offline-run-") for p in (tmp_path / "wandb").iterdir())
    t.finish(save=False)
    assert not t.logger.sinks and wandb.run is None
    assert all(math.isfinite(h["loss"]) for h in hist)


def test_resolve_and_bad_values(monkeypatch):
    import r1train.metrics as M

    assert resolve_report_to("none") == [] and resolve_report_to(["none"]) == []
    assert resolve_report_to(["wandb", "tensorboard"]) == ["wandb", "tensorboard"]
    assert set(resolve_report_to("all")) <= {"tensorboard", "wandb", "trackio"}
    monkeypatch.setattr(M, "backend_installed", lambda name: True)
    assert load_config(overrides=["report_to=wandb,tensorboard"]).report_to == ["wandb", "tensorboard"]
    for bad in ("mlflow", "none,wandb", "all,wandb"):
        with pytest.raises(ConfigError, match="report_to"):
            load_config(overrides=[f"report_to={bad}"])


def test_missing_backend_is_an_error(tmp_path, monkeypatch):
    import r1train.metrics as M

    monkeypatch.setattr(M, "backend_installed", lambda name: name == "wandb")
    for name in ("trackio", "tensorboard"):  # tensorboard was skipped with an INFO line the CLI does not show
        with pytest.raises(ImportError, match=f"report_to lists '{name}'"):
            M.MetricsLogger(str(tmp_path), report_to=[name])
        with pytest.raises(ConfigError, match=rf"report_to lists \['{name}'\], not installed"):  # before any work
            load_config(overrides=[f"report_to=wandb,{name}"])
    assert load_config(overrides=["report_to=all"]).report_to == ["all"]


def test_metrics_rows_are_standard_json(tmp_path):
    """NaN / inf (plain, tensor, nested in a list or dict) are written as null, never as a bare NaN token, and
    the top-level ones are named with their value under "nonfinite"."""
    import json

    import torch

    from r1train.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), report_to="none")
    log.log(1, {"loss": torch.tensor(float("nan")), "grad_norm": float("inf"), "ok": 0.5,
                "per_reward": [1.0, float("-inf")], "by_name": {"a": float("nan"), "b": 2}})
    log.log(2, {"loss": 0.25})
    line, line2 = (tmp_path / "metrics.jsonl").read_text().splitlines()

    def strict(c):
        raise ValueError(f"non-standard JSON constant {c}")

    row = json.loads(line, parse_constant=strict)
    assert row == {"step": 1, "loss": None, "grad_norm": None, "ok": 0.5, "per_reward": [1.0, None],
                   "by_name": {"a": None, "b": 2}, "nonfinite": {"loss": "nan", "grad_norm": "inf"}}
    assert json.loads(line2, parse_constant=strict) == {"step": 2, "loss": 0.25}
    assert not math.isnan(row["ok"])


def test_log_once_skips_a_row_already_written(tmp_path):
    """log_once (the end-of-stage evaluation) appends a row unless one at that step already holds every key: a
    recipe rerun that resumes a finished stage does not write its evaluation twice; other keys or steps append."""
    import json
    import random

    from r1train.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), report_to="none")
    step, acc = random.randint(1, 50), random.random()
    log.log(step, {"loss": 0.5})
    log.log_once(step, {"eval/accuracy": acc})
    log.log_once(step, {"eval/accuracy": acc})  # the rerun's evaluation
    log.log_once(step + 1, {"eval/accuracy": acc})
    log.log_once(step, {"eval/accuracy": acc, "eval/accuracy_greedy": 1.0})  # a key not yet at that step
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": step, "loss": 0.5}, {"step": step, "eval/accuracy": acc},
                    {"step": step + 1, "eval/accuracy": acc},
                    {"step": step, "eval/accuracy": acc, "eval/accuracy_greedy": 1.0}]
