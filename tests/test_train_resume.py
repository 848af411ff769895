"""Kill -9 a run after its first checkpoint, resume from it: the continuation's metrics equal those of
an uninterrupted run (the adaptive entropy coefficient included). Checkpoints appear atomically (never a
checkpoint-N without its trainer_state)."""

import os
import signal
import subprocess
import time

import pytest
import train_helpers as H

ARGS = H.FAST + ["reward_funcs=train_helpers:digit_share,format", "num_generations=4",
                 "per_device_train_batch_size=4", "gradient_accumulation_steps=2", "learning_rate=0.003",
                 "task_eval_size=4", "beta=0.02", "num_iterations=2", "save_steps=3"]


@pytest.mark.slow
# LoRA (the adapters and lm_head's saved copy) and the adaptive entropy coefficient resume in one run (two
# runs of ~20 s each before)
@pytest.mark.parametrize("extra", [[], ["use_peft=true", "lora_modules_to_save=lm_head", "use_adaptive_entropy=true",
                                        "entropy_coef=0.01", "entropy_target=100.0"]],
                         ids=["full", "lora-adaptive-entropy"])
def test_kill_and_resume_identical(tmp_path, extra):
    if "use_peft=true" in extra:
        pytest.importorskip("peft")
    args = ARGS + extra
    ref, run = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted run alongside the killed and the resumed one
    with H.BackgroundCLI(["grpo", *args, "max_steps=6", f"output_dir={ref}"], tmp_path / "ref.stderr") as ref_run:
        _kill_after_step_3_and_resume(args, run)
        ref_run.wait()
    a, b = H.strip_timing(H.read_metrics(ref)), H.strip_timing(H.read_metrics(run))
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5, 6]
    assert b[3:] == a[3:]
    assert b[:3] == a[:3]


def _kill_after_step_3_and_resume(args, run):
    # the run with a long horizon (constant lr: the horizon changes nothing), killed after step 3, then resumed
    proc = subprocess.Popen(H.cli_cmd(["grpo", *args, "max_steps=100000", f"output_dir={run}"]), env=H.env(),
                            cwd=H.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoint-3").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for d in os.listdir(run):
        if d.startswith("checkpoint-"):
            assert (run / d / "trainer_state.json").exists(), d
    r = H.run_cli(["grpo", *args, "max_steps=6", f"output_dir={run}",
                   f"resume_from_checkpoint={run / 'checkpoint-3'}"])
    assert r.returncode == 0, r.stderr[-3000:]


def test_resume_drops_a_partly_written_last_line(tmp_path, caplog):
    """A run killed while writing metrics.jsonl / completions.jsonl leaves a partial last line: the resume
    (MetricsLogger truncating the files to the checkpoint's step) raised JSONDecodeError on it; it is dropped
    with a warning, the lines up to the checkpoint are kept, and the next line starts on a line of its own."""
    import json

    from r1train.metrics import MetricsLogger

    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    full = "".join(json.dumps(r) + "\n" for r in rows)
    for name in ("metrics.jsonl", "completions.jsonl"):
        (tmp_path / name).write_text(full + json.dumps({"step": 4, "loss": 0.25})[:9])
    with caplog.at_level("WARNING", logger="r1train"):
        logger = MetricsLogger(str(tmp_path), resume_step=2, report_to="none")
    assert "partly written" in caplog.text
    logger.log(3, {"loss": 0.5})
    logger.log_completions(3, [{"prompt": "p", "completion": "c"}])
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == rows[:2] + [{"step": 3, "loss": 0.5}]
    lines = [json.loads(ln) for ln in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert lines == rows[:2] + [{"step": 3, "prompt": "p", "completion": "c"}]
    # a complete last line without its newline (killed between the two writes) is kept, and ended
    (tmp_path / "metrics.jsonl").write_text(full[:-1])
    MetricsLogger(str(tmp_path), resume_step=3, report_to="none").log(4, {"loss": 0.25})
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == rows + [{"step": 4, "loss": 0.25}]


def test_resumed_cli_run_does_not_evaluate_before_training_again(tmp_path, capsys):
    """`r1train grpo` evaluates before training (metrics.jsonl's row at step 0) and after. A resumed run
    evaluated "before" again, at its checkpoint's step: a second before row, in the middle of the run, printed as
    the run's before/ values. As HF Trainer, a resume does not evaluate before training: its metrics are the
    uninterrupted run's, and it prints the before/ values of the row at step 0."""
    import json

    from r1train.cli import main

    out = tmp_path / "run"
    args = ["grpo", *H.FAST, "max_steps=2", "save_steps=1", f"output_dir={out}"]

    def printed():
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert main(args) == 0
    first = printed()
    assert main(args + [f"resume_from_checkpoint={out / 'checkpoint-1'}"]) == 0
    resumed = printed()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss" in r) for r in rows] == [(0, False), (1, True), (2, True), (2, False)]
    assert "before/eval/accuracy" in first
    assert {k: v for k, v in resumed.items() if k.startswith("before/")} == \
        {k: v for k, v in first.items() if k.startswith("before/")}


@pytest.mark.parametrize("stop_in", ["evaluate", "_save"])
def test_sigterm_after_the_last_step_keeps_the_trained_model(tmp_path, monkeypatch, capsys, stop_in):
    """SIGTERM after the last step, in the final evaluation or the final save, outside the training loop's
    StopOnSignal: the CLI stopped with no checkpoint (with save_steps=0 the whole run lost: nothing to resume, and
    a fresh run refuses the directory, whose metrics.jsonl holds the steps). Now the final checkpoint is saved
    before the final evaluation, and a signal during that save waits for it: the run stops (exit 143) naming the
    checkpoint, and a rerun with resume_from_checkpoint=latest ends as the uninterrupted run did: the same
    metrics.jsonl (the evaluation's row once) and the same weights."""
    import json

    import torch
    from safetensors.torch import load_file

    from r1train.checkpoint import checkpoint_problem
    from r1train.cli import main
    from r1train.sft import SFTTrainer

    args = ["sft", *H.FAST, "max_steps=3", "save_steps=0"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, f"output_dir={ref}"]) == 0
    real, real_save = getattr(SFTTrainer, stop_in), SFTTrainer._save

    def terminated(self, *a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before the next line, in this thread
        return real(self, *a, **kw)

    monkeypatch.setattr(SFTTrainer, stop_in, terminated)
    capsys.readouterr()
    assert main([*args, f"output_dir={run}"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert checkpoint_problem(str(run / "checkpoint-3")) is None, err
    assert "checkpoint-3" in err and "resume_from_checkpoint=latest" in err, err
    monkeypatch.setattr(SFTTrainer, stop_in, real)
    assert main([*args, f"output_dir={run}", "resume_from_checkpoint=latest"]) == 0
    # the resume found checkpoint-3 complete: it trained no step and kept that checkpoint, not wrote it again
    saves = []
    monkeypatch.setattr(SFTTrainer, "_save", lambda self, step: saves.append(step) or real_save(self, step))
    assert main([*args, f"output_dir={run}", "resume_from_checkpoint=latest"]) == 0 and saves == []
    monkeypatch.setattr(SFTTrainer, "_save", real_save)

    def rows(d):
        return H.strip_timing([json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()])

    assert rows(run) == rows(ref) and [r["step"] for r in rows(ref)] == [1, 2, 3, 3]
    wa, wb = (load_file(d / "checkpoint-3" / "model.safetensors") for d in (ref, run))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_reward_functions_in_the_config(tmp_path, monkeypatch):
    """cfg.reward_funcs may hold functions (a config built in code, as TRL takes reward_funcs): trainer_state.json
    kept their repr, whose address differs in the next process, so every resume was refused as another
    reward_funcs. A function is kept by its qualified name: the same function imported again (another object,
    another address, as in a new process) resumes; another function is still refused, naming reward_funcs."""
    import dataclasses
    import importlib
    import random

    from r1train.checkpoint import CheckpointError
    from r1train.config import load_config
    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_datasets, load_model_and_tokenizer

    name = f"r1_test_rewards_{random.randrange(10**9)}"
    (tmp_path / f"{name}.py").write_text(
        "def shaped(completions, **kw):\n    return [float(len(str(c)) % 3) for c in completions]\n\n\n"
        "def other(completions, **kw):\n    return [0.0 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(name)
    out = tmp_path / "run"
    cfg = load_config(overrides=H.FAST + ["max_steps=1", "save_steps=1", f"output_dir={out}"])
    train, ev = load_datasets(cfg)

    def trainer(fns, **kw):
        c = dataclasses.replace(cfg, reward_funcs=fns, **kw)
        model, tok = load_model_and_tokenizer(c)
        return GRPOTrainer(c, model, tok, train, ev)

    first = mod.shaped
    t = trainer([first, "format"])
    t.train()
    t.finish()
    mod = importlib.reload(mod)  # new function objects of the same names
    assert mod.shaped is not first and repr(mod.shaped) != repr(first)
    resume = dict(max_steps=2, resume_from_checkpoint="latest")
    for fns in ([mod.other, "format"], [mod.shaped, "accuracy"], ["format", mod.shaped]):
        with pytest.raises(CheckpointError, match=r"reward_funcs \(checkpoint \['[\w.]*shaped', 'format'\]"):
            trainer(fns, **resume)
    assert trainer([mod.shaped, "format"], **resume).step0 == 1
