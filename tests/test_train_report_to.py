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
    metrics = [(st, d) for st, d in calls if "train/loss" in d]
    assert [st for st, _ in metrics] == [1, 2] and [d["train/global_step"] for _, d in metrics] == [1, 2]
    for (_, d), h in zip(metrics, hist):  # TRL's names on the backends (transformers' rewrite_logs)
        assert d["train/loss"] == h["loss"] and d["train/reward"] == h["reward"]
        assert d["train/entropy"] == h["entropy"]
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


def test_completions_rows_are_standard_json(tmp_path):
    """completions.jsonl holds standard JSON as metrics.jsonl does: a NaN / inf advantage or log_extra value is
    written as null (named under "nonfinite"), never as a bare NaN token; tensors / numpy scalars (a reward
    function's log_extra values) are written as numbers, not a TypeError after part of the step's rows."""
    import json

    import numpy as np
    import torch

    from r1train.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), report_to="none")
    log.log_completions(1, [{"prompt": "p", "completion": "c", "reward": None, "advantage": float("nan"),
                             "extra": 0.5},
                            {"prompt": "q", "completion": "d", "reward": 1.0, "advantage": 0.25,
                             "extra": np.float32(0.75)},
                            {"prompt": "r", "completion": "e", "reward": 0.0, "advantage": -0.25,
                             "extra": torch.tensor(float("inf"))}])

    def strict(c):
        raise ValueError(f"non-standard JSON constant {c}")

    rows = [json.loads(ln, parse_constant=strict) for ln in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert rows == [
        {"step": 1, "prompt": "p", "completion": "c", "reward": None, "advantage": None, "extra": 0.5,
         "nonfinite": {"advantage": "nan"}},
        {"step": 1, "prompt": "q", "completion": "d", "reward": 1.0, "advantage": 0.25, "extra": 0.75},
        {"step": 1, "prompt": "r", "completion": "e", "reward": 0.0, "advantage": -0.25, "extra": None,
         "nonfinite": {"extra": "inf"}}]


def test_resume_rewrite_keeps_the_logs_if_it_fails(tmp_path, monkeypatch):
    """A resume rewrites metrics.jsonl / completions.jsonl without the lines past the checkpoint: a failure
    while writing (disk full, a kill) must leave the earlier lines there, not an emptied or truncated file."""
    import builtins
    import errno
    import json

    import r1train.metrics as M

    full = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4))
    for name in ("metrics.jsonl", "completions.jsonl"):
        (tmp_path / name).write_text(full)

    class Full:  # a file whose writes fail part way: the first line goes out, then ENOSPC
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

        def write(self, s):
            self.fh.write(s[:5])
            self.fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def writelines(self, lines):
            self.write("".join(lines))

    def failing_open(path, mode="r", *a, **kw):
        fh = builtins.open(path, mode, *a, **kw)
        return Full(fh) if "w" in mode or "a" in mode else fh

    import r1train.durable as D

    for mod in (M, D):  # the logger's own writes and durable.write_replace's
        monkeypatch.setattr(mod, "open", failing_open, raising=False)
    with pytest.raises(OSError, match="No space"):
        M.MetricsLogger(str(tmp_path), resume_step=2, report_to="none")
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == full  # untouched: the next resume still has it all
    M.MetricsLogger(str(tmp_path), resume_step=2, report_to="none").log(3, {"loss": 0.5})
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5}]


def test_tensorboard_resume_drops_the_killed_runs_later_steps(tmp_path):
    """A resume drops metrics.jsonl's lines past the checkpoint; TensorBoard must drop that run's events past it
    too (SummaryWriter's purge_step), not show the killed run's steps 3-4 beside the resumed run's step 3."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from r1train.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), report_to="tensorboard")
    for s in (1, 2, 3, 4):
        log.log(s, {"loss": float(s)})
    log.close()  # killed after step 4, resumed from checkpoint-2
    log = MetricsLogger(str(tmp_path), resume_step=2, report_to="tensorboard")
    log.log(3, {"loss": 30.0})
    log.close()
    ea = EventAccumulator(str(tmp_path / "runs"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "trackio"])
def test_backends_get_trls_metric_names(tmp_path, backend):
    """transformers' TensorBoard / W&B / Trackio callbacks send TRL's logs renamed (rewrite_logs): train/<name>,
    eval_<name> as eval/<name>, and (W&B, Trackio) train/global_step, the step. The backends got the bare names.
    metrics.jsonl keeps them bare, as TRL's log_history."""
    import json
    import random

    from r1train.metrics import MetricsLogger

    class Sink:
        def __init__(self):
            self.got = []

        def add_scalar(self, tag, value, step):
            self.got.append((step, {tag: value}))

        def log(self, data, step=None):
            self.got.append((step, data))

    log = MetricsLogger(str(tmp_path), report_to="none")
    sink = log.sinks[backend] = Sink()
    rng = random.Random()
    step = rng.randrange(1, 1000)
    values = {"loss": rng.random(), "rewards/accuracy/mean": rng.random(), "eval/accuracy": rng.random(),
              "eval_loss": rng.random(), "kl": float("nan")}
    log.log(step, values)
    got = {k: v for st, d in sink.got for k, v in d.items() if st == step}
    want = {"train/loss": values["loss"], "train/rewards/accuracy/mean": values["rewards/accuracy/mean"],
            "eval/accuracy": values["eval/accuracy"], "eval/loss": values["eval_loss"]}
    if backend != "tensorboard":
        want["train/global_step"] = step
    assert got == want and all(st == step for st, _ in sink.got)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": step, **values, "kl": None, "nonfinite": {"kl": "nan"}}


def test_completions_table_with_columns_that_differ_by_rank(tmp_path, monkeypatch):
    """log_extra's columns are each rank's own (grpo fills None only within a rank): rows gathered from a rank
    whose reward functions logged a column and from one whose did not still make one table (every column,
    empty where a row has none), not a KeyError on rank 0 at a logging step."""
    import r1train.metrics as M

    base = {"prompt": "p", "completion": "c", "reward": 1.0, "advantage": 0.5}
    rank0, rank1 = [dict(base, parse_error="no answer")], [dict(base), dict(base, tokens=7)]
    monkeypatch.setattr(M, "gather_rows", lambda rows: rank0 + rank1)  # rank 0's view after the gather

    class Board:
        texts = []

        def add_text(self, tag, text, step):
            self.texts.append((tag, text, step))

    log = M.MetricsLogger(str(tmp_path), report_to="none")
    log.sinks["tensorboard"] = Board()
    log.log_completions(2, rank0, to_backends=True)
    (tag, text, step), = Board.texts
    head, _, *body = text.splitlines()
    assert (tag, step) == ("completions", 2)
    assert head == "| step | prompt | completion | reward | advantage | parse_error | tokens |"
    assert body == ["| 2 | p | c | 1.0 | 0.5 | no answer | None |", "| 2 | p | c | 1.0 | 0.5 | None | None |",
                    "| 2 | p | c | 1.0 | 0.5 | None | 7 |"]


def _fake_wandb(monkeypatch):
    """A stand-in `wandb` module (installed as far as find_spec is concerned): records each init's arguments; a
    run records the steps it is sent. Its id and resume policy are wandb.init's: the argument, else the
    environment's WANDB_RUN_ID / WANDB_RESUME (wandb's settings: init arguments over environment variables), else
    a generated id / no resume."""
    import importlib.machinery
    import os
    import sys
    import types
    import uuid

    mod = types.ModuleType("wandb")
    mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    mod.inits = []

    class Run:
        def __init__(self, id, resume):
            self.id, self.resume, self.steps = id, resume, []

        def log(self, data, step=None):
            self.steps.append(step)

        def finish(self):
            pass

    def init(**kw):
        mod.inits.append(kw)
        run_id = kw.get("id") or os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:8]
        return Run(run_id, kw["resume"] if kw.get("resume") is not None else os.environ.get("WANDB_RESUME"))

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_wandb_resume_continues_the_run_and_a_fresh_run_starts_a_new_one(tmp_path, monkeypatch):
    """A resume in the same output_dir passes the id the first run got (kept in output_dir) with resume allow /
    must; a fresh run, in a new output_dir or over the old one (overwrite_output_dir), gets a new id."""
    from r1train.metrics import MetricsLogger

    wandb = _fake_wandb(monkeypatch)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    def run(output_dir, resume_step=0):
        MetricsLogger(output_dir, report_to=["wandb"], resume_step=resume_step, config={"seed": 1}).close()
        return wandb.inits[-1]

    first = run(a)
    assert isinstance(first["id"], str) and first["id"] and first["config"] == {"seed": 1}
    resumed = run(a, resume_step=2)
    assert resumed["id"] == first["id"] and resumed["resume"] in ("allow", "must")
    assert run(a, resume_step=4)["id"] == first["id"]  # resumed twice: still the first run
    other = run(b)["id"]
    fresh = run(a)["id"]  # a fresh run over the old one
    assert len({first["id"], other, fresh}) == 3
    assert run(a, resume_step=1)["id"] == fresh


def test_wandb_resume_through_the_trainer(tmp_path, monkeypatch, caplog):
    """The trainer's resume (resume_from_checkpoint=latest) continues the killed run's wandb run from the step
    after its checkpoint, with a warning that wandb keeps the killed run's values at the steps it logged past it."""
    wandb = _fake_wandb(monkeypatch)
    t = H.grpo_trainer(tmp_path, "max_steps=2", "save_steps=1", "report_to=wandb", reward_funcs=[H.digit_share])
    run = t.logger.sinks["wandb"]
    t.train()  # "killed" after step 2: checkpoint-1 is its last checkpoint
    t.logger.close()
    from r1train.checkpoint import unlock_output_dir

    unlock_output_dir(str(tmp_path))
    assert run.steps == [1, 2]
    with caplog.at_level("WARNING", logger="r1train"):
        t = H.grpo_trainer(tmp_path, "max_steps=2", "save_steps=1", "report_to=wandb",
                           "resume_from_checkpoint=latest", reward_funcs=[H.digit_share])
    assert t.step0 == 1
    assert [r.getMessage() for r in caplog.records if "holds steps" in r.getMessage()] == [
        f"wandb run {run.id} holds steps 2-2 from the run before this resume; wandb drops this run's values at "
        "those steps (metrics.jsonl and TensorBoard hold this run's)"]
    resumed = t.logger.sinks["wandb"]
    assert resumed.id == run.id and wandb.inits[-1]["resume"] in ("allow", "must")
    t.train()
    t.finish(save=False)
    assert resumed.steps == [2]


def test_wandb_resume_with_an_empty_run_id_file_starts_a_new_run(tmp_path, monkeypatch, caplog):
    """An empty .wandb_run_id (a write cut short) was passed to wandb.init as id "", which wandb rejects
    ("Run ID cannot be empty"): the resume failed. Now a new run, with a warning naming the file."""
    from r1train.metrics import MetricsLogger

    wandb = _fake_wandb(monkeypatch)
    (tmp_path / ".wandb_run_id").write_text("\n")
    MetricsLogger(str(tmp_path), report_to=["wandb"], resume_step=2).close()
    run_id = wandb.inits[-1]["id"]
    assert run_id and (tmp_path / ".wandb_run_id").read_text() == run_id
    assert ".wandb_run_id is empty" in caplog.text
    assert not (tmp_path / ".wandb_run_id.tmp").exists()


def test_wandb_run_id_from_the_environment(tmp_path, monkeypatch, caplog):
    """wandb documents WANDB_RUN_ID as setting the run id (and WANDB_RESUME the resume policy): a fresh run takes
    the user's (r1train passed its own id, which wandb.init puts over the environment's), keeps it in output_dir,
    and a resume continues it, whatever WANDB_RUN_ID says then (a different one: a warning naming both)."""
    import r1train.metrics as M
    from r1train.metrics import MetricsLogger

    wandb = _fake_wandb(monkeypatch)
    monkeypatch.setattr(M, "_ENV_RUN_IDS", {}, raising=False)
    out = str(tmp_path / "a")

    def run(resume_step=0):
        log = MetricsLogger(out, report_to=["wandb"], resume_step=resume_step)
        sink = log.sinks["wandb"]
        log.close()
        return sink

    monkeypatch.setenv("WANDB_RUN_ID", "users-run-7")
    monkeypatch.setenv("WANDB_RESUME", "never")
    fresh = run()
    assert (fresh.id, fresh.resume) == ("users-run-7", "never")
    assert (tmp_path / "a" / ".wandb_run_id").read_text() == "users-run-7"
    resumed = run(resume_step=3)
    assert resumed.id == "users-run-7" and resumed.resume in ("allow", "must")
    monkeypatch.delenv("WANDB_RUN_ID")
    monkeypatch.delenv("WANDB_RESUME")
    assert run(resume_step=4).id == "users-run-7"  # the stored id, not a new one
    monkeypatch.setenv("WANDB_RUN_ID", "another-run")
    caplog.clear()
    resumed = run(resume_step=5)
    assert resumed.id == "users-run-7" and resumed.resume in ("allow", "must")
    assert "WANDB_RUN_ID" in caplog.text and "another-run" in caplog.text and "users-run-7" in caplog.text
    fresh = run()  # a fresh run over the old output_dir: the environment's id again
    assert fresh.id == "another-run" and (tmp_path / "a" / ".wandb_run_id").read_text() == "another-run"
    monkeypatch.setenv("WANDB_RUN_ID", "")  # empty: unset (wandb rejects an empty id)
    fresh = run()
    assert fresh.id and fresh.id != "another-run" and (tmp_path / "a" / ".wandb_run_id").read_text() == fresh.id
    monkeypatch.delenv("WANDB_RUN_ID")
    assert len({run().id, run().id, fresh.id}) == 3  # no WANDB_RUN_ID: a new id per fresh run
    # a resume with no stored id (the run before had no wandb): the environment's id, as a fresh run
    (tmp_path / "a" / ".wandb_run_id").unlink()
    monkeypatch.setenv("WANDB_RUN_ID", "env-on-resume")
    assert run(resume_step=2).id == "env-on-resume"
    assert (tmp_path / "a" / ".wandb_run_id").read_text() == "env-on-resume"
    assert len(wandb.inits) == 9


def test_wandb_environments_run_id_names_one_run_per_process(tmp_path, monkeypatch, caplog):
    """A pipeline runs its stages in one process, each a fresh run in its own output_dir whose steps start at 1:
    WANDB_RUN_ID names the first stage's run; a later stage starts a new run (with a warning), as it would with
    WANDB_RUN_ID unset, rather than logging its steps into the first stage's run (wandb drops steps below the
    run's last)."""
    import r1train.metrics as M

    _fake_wandb(monkeypatch)
    monkeypatch.setattr(M, "_ENV_RUN_IDS", {}, raising=False)
    monkeypatch.setenv("WANDB_RUN_ID", "recipe-run")
    ids = {}
    for stage in ("sft", "grpo", "sft"):
        log = M.MetricsLogger(str(tmp_path / stage), report_to=["wandb"])
        ids.setdefault(stage, []).append(log.sinks["wandb"].id)
        log.close()
    assert ids["sft"] == ["recipe-run", "recipe-run"] and ids["grpo"][0] != "recipe-run"
    assert (tmp_path / "grpo" / ".wandb_run_id").read_text() == ids["grpo"][0]
    assert "WANDB_RUN_ID=recipe-run names the wandb run of" in caplog.text
    log = M.MetricsLogger(str(tmp_path / "grpo"), report_to=["wandb"], resume_step=2)  # resumed: its own run
    assert log.sinks["wandb"].id == ids["grpo"][0]
    log.close()


def test_wandb_offline_takes_the_environments_run_id(tmp_path, monkeypatch):
    """The real client (offline): WANDB_RUN_ID is the run's id, and the one kept for a resume."""
    pytest.importorskip("wandb")
    from r1train.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_RUN_ID", "r1k-env-id-1")
    monkeypatch.setattr("r1train.metrics._ENV_RUN_IDS", {}, raising=False)
    log = MetricsLogger(str(tmp_path), report_to=["wandb"])
    try:
        assert log.sinks["wandb"].id == "r1k-env-id-1"
    finally:
        log.close()
    assert (tmp_path / ".wandb_run_id").read_text() == "r1k-env-id-1"


def test_a_backend_that_fails_to_start_is_a_config_error(tmp_path, monkeypatch):
    """wandb.init raising (no login, no network: wandb's UsageError) is a ConfigError naming report_to and the
    client's message (the CLI prints it as one line, exit 2), and a backend opened before it is closed."""
    import sys
    import types

    import r1train.metrics as M

    wandb = _fake_wandb(monkeypatch)

    def init(**kw):
        raise RuntimeError("api_key not configured (no-tty)")

    wandb.init = init
    with pytest.raises(ConfigError, match=r"report_to: wandb.init failed: RuntimeError: api_key not configured.*"
                                          r"WANDB_MODE=offline") as e:
        M.MetricsLogger(str(tmp_path), report_to=["wandb"])
    assert isinstance(e.value.__cause__, RuntimeError)
    finished = []
    trackio = types.ModuleType("trackio")
    trackio.init = lambda **kw: types.SimpleNamespace(finish=lambda: finished.append(kw["project"]))
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    monkeypatch.setattr(M, "backend_installed", lambda name: True)
    with pytest.raises(ConfigError, match="wandb.init failed"):
        M.MetricsLogger(str(tmp_path), report_to=["trackio", "wandb"])
    assert finished == ["r1train"]
