"""Checkpoints and output directories that cannot silently go wrong (issue 13, items 1, 3, 9, 10): a
checkpoint reloads with its own tokenizer; a directory is locked by its run, a fresh run refuses another
run's outputs unless overwrite_output_dir=true, a resume refuses a checkpoint of other settings (GRPO: another
learning-rate schedule, its horizon, or loss; RUN_KEYS holds every loss option); a damaged
checkpoint is skipped by `latest` and an error when named; SIGTERM saves a checkpoint and exits cleanly."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import train_helpers as H

from r1train.checkpoint import RUN_KEYS, CheckpointError, write_manifest
from r1train.config import ConfigError, load_config
from r1train.grpo import loss_keys
from r1train.loading import load_datasets, load_model_and_tokenizer
from r1train.sft import SFTTrainer

SFT = H.FAST + ["save_steps=2"]


def _sft(out, *overrides):
    cfg = load_config(overrides=SFT + [f"output_dir={out}", *overrides])
    model, tok = load_model_and_tokenizer(cfg)
    train, ev = load_datasets(cfg, sft=True)
    return SFTTrainer(cfg, model, tok, train, ev)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished 4-step SFT run: checkpoint-2, checkpoint-4, metrics.jsonl (copied by each test)."""
    out = tmp_path_factory.mktemp("sft_run") / "run"
    t = _sft(out, "max_steps=4")
    t.train()
    t.finish()
    assert sorted(os.listdir(out / "checkpoint-4")) and (out / "checkpoint-2").is_dir()
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".r1train.lock"))
    return dst


# ---- item 1: a checkpoint reloads with its own tokenizer
def test_checkpoint_tokenizer_reloads_as_itself(sft_run):
    from transformers import AutoTokenizer

    from r1train.tasks import char_tokenizer

    text = "<|user|>What is 3 + 4 - 2?<|assistant|><think>3 + 4 = 7\n7 - 2 = 5</think>\n<answer>5</answer><|eos|>"
    want = char_tokenizer()(text, add_special_tokens=False)["input_ids"]
    tok = AutoTokenizer.from_pretrained(str(sft_run / "checkpoint-4"))
    got = tok(text, add_special_tokens=False)["input_ids"]
    assert got == want, (type(tok).__name__, len(got), len(want))
    assert tok.decode(got) == text
    assert (tok.pad_token_id, tok.eos_token_id, tok.padding_side) == (0, 2, "left")
    assert tok.apply_chat_template([{"role": "user", "content": "a b\nc"}], add_generation_prompt=True,
                                   tokenize=False) == "<|user|>a b\nc<|assistant|>"


# ---- item 3: one run per output_dir
def test_fresh_run_refuses_a_used_output_dir_unless_overwrite(sft_run, tmp_path):
    out = _copy(sft_run, tmp_path)
    with pytest.raises(ConfigError, match="overwrite_output_dir=true"):
        _sft(out, "max_steps=2")
    assert (out / "checkpoint-4").is_dir() and len(H.read_metrics(out)) == 4  # nothing touched
    t = _sft(out, "max_steps=2", "overwrite_output_dir=true")
    t.train()
    t.finish()
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    assert [r["step"] for r in H.read_metrics(out)] == [1, 2]


def test_resume_refuses_a_checkpoint_of_other_settings(sft_run, tmp_path):
    out = _copy(sft_run, tmp_path)
    with pytest.raises(ConfigError) as e:
        _sft(out, "max_steps=6", "resume_from_checkpoint=latest", "seed=7", "num_generations=2",
             "per_device_train_batch_size=4", "learning_rate=0.5", "use_peft=true", "task_eval_size=20",
             "completion_only_loss=false")
    msg = str(e.value)
    # learning_rate: the optimizer state would restore the old one; use_peft: the saved state has no adapter;
    # task_eval_size: the held-out problems are left out of the training rows
    for k in ("seed", "per_device_train_batch_size", "learning_rate", "use_peft", "task_eval_size",
              "completion_only_loss"):
        assert k in msg, msg
    assert "max_steps" not in msg and "num_generations" not in msg  # SFT's training never reads num_generations
    t = _sft(out, "max_steps=6", "resume_from_checkpoint=latest", "logging_steps=3")  # run-control keys may change
    assert t.step0 == 4


def test_resume_from_another_directory_refuses_a_used_output_dir(sft_run, tmp_path):
    """resume_from_checkpoint=<a checkpoint of another directory> into an output_dir holding a run's outputs: the
    resume cut that run's metrics.jsonl to the checkpoint's step (rows 3 and 4 lost) and would save over its
    checkpoints. Refused as a fresh run is, unless overwrite_output_dir=true; an empty output_dir takes it."""
    out = _copy(sft_run, tmp_path)
    other = tmp_path / "other" / "checkpoint-2"
    shutil.copytree(out / "checkpoint-2", other)
    with pytest.raises(ConfigError, match=r"holds a run.s outputs.*resume_from_checkpoint=.*another directory"
                                          r".*resume_from_checkpoint=latest"):
        _sft(out, "max_steps=4", f"resume_from_checkpoint={other}")
    assert [r["step"] for r in H.read_metrics(out)] == [1, 2, 3, 4]  # nothing touched
    assert _sft(out, "max_steps=4", f"resume_from_checkpoint={out / 'checkpoint-2'}").step0 == 2  # its own: fine
    assert _sft(tmp_path / "empty", "max_steps=4", f"resume_from_checkpoint={other}").step0 == 2
    t = _sft(out, "max_steps=4", f"resume_from_checkpoint={other}", "overwrite_output_dir=true")
    assert t.step0 == 2 and not any(n.startswith("checkpoint-") for n in os.listdir(out))


def test_resume_refuses_an_sft_checkpoint_that_cut_prompts(sft_run, tmp_path):
    """An SFT checkpoint written before SFT kept whole prompts (no sft_whole_prompts in its trainer_state.json)
    trained on each prompt's last max_prompt_length tokens: resuming it where a training prompt is longer would
    train that row on other tokens, a CheckpointError naming it; where every prompt fits, and from a checkpoint of
    this version, the resume goes on."""
    out = _copy(sft_run, tmp_path)
    ckpt = out / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state.pop("sft_whole_prompts") is True

    def resume(cut, whole=False):
        (ckpt / "trainer_state.json").write_text(json.dumps({**state, "config": {**state["config"],
                                                                                  "max_prompt_length": cut},
                                                               **({"sft_whole_prompts": True} if whole else {})}))
        write_manifest(str(ckpt))  # the edited file is the checkpoint's (else `latest` skips it as damaged)
        return _sft(out, "max_steps=6", f"resume_from_checkpoint={ckpt}", f"max_prompt_length={cut}")

    with pytest.raises(CheckpointError, match=r"before SFT kept whole prompts.*max_prompt_length=2 tokens, and "
                                              r"train row \d+'s prompt has \d+"):
        resume(2)  # every prompt is longer than 2 tokens
    assert resume(4096).step0 == 4  # every prompt fits: both rules tokenize alike
    assert resume(2, whole=True).step0 == 4  # a checkpoint of this version: nothing to check


def test_resume_refuses_training_rows_that_changed(tmp_path, caplog):
    """A local dataset edited under the same name between the interruption and the resume would resume on other
    rows: their sha256 (trainer_state.json) differs from the checkpoint's, a CheckpointError naming the dataset and
    both hashes. The same rows resume; a checkpoint that records no rows' sha256 resumes unchecked (a warning)."""
    rows, _ = load_datasets(load_config(overrides=SFT), sft=True)
    data, out = tmp_path / "train.jsonl", tmp_path / "run"

    def write(edit=False):
        data.write_text("".join(json.dumps({**r, "completion": r["completion"] + " "} if edit and i == 5 else r) + "\n"
                                for i, r in enumerate(rows)))

    def resume():
        return _sft(out, "max_steps=4", f"dataset_name={data}", "resume_from_checkpoint=latest")

    write()
    t = _sft(out, "max_steps=2", f"dataset_name={data}")
    t.train()
    t.finish()
    write(edit=True)
    named = re.escape(f"other training rows: the rows of dataset_name={str(data)!r} ")
    with pytest.raises(CheckpointError, match=named + r".*sha256 [0-9a-f]{12} in the checkpoint, [0-9a-f]{12} now.*"
                                                      r"another output_dir, or overwrite_output_dir=true"):
        resume()
    write()
    assert resume().step0 == 2
    ckpt = out / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["train_rows_sha256"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(str(ckpt))
    write(edit=True)
    with caplog.at_level(logging.WARNING, logger="r1train"):
        assert resume().step0 == 2
    assert "records no fingerprint of its training rows" in caplog.text


# ---- item 9: a damaged checkpoint is skipped by `latest` (with a warning), an error when named
DAMAGE = {
    "truncated rng state": lambda d: _truncate(d / "rng_state_0.pth"),
    "missing DeepSpeed state": lambda d: os.remove(next((d / "ds").glob("*.pt"))),
    "garbage trainer_state": lambda d: (d / "trainer_state.json").write_text('{"global_step": 4, "max_steps": 9}'),
    "no manifest (save did not finish)": lambda d: os.remove(d / "manifest.json"),
}


def _truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_falls_back(sft_run, tmp_path, caplog, damage):
    out = _copy(sft_run, tmp_path)
    if damage.startswith("no manifest") and not (out / "checkpoint-4" / "manifest.json").exists():
        pytest.fail("checkpoints carry no manifest.json")
    DAMAGE[damage](out / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="r1train"):
        t = _sft(out, "max_steps=6", "resume_from_checkpoint=latest")
    assert t.step0 == 2
    assert any("checkpoint-4" in r.getMessage() for r in caplog.records), caplog.text
    with pytest.raises(ValueError, match="checkpoint-4"):
        _sft(out, "max_steps=6", f"resume_from_checkpoint={out / 'checkpoint-4'}")
    t.train()  # the fallback run goes on and replaces the damaged checkpoint-4 with a complete one
    t.finish()
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert _sft(out, "max_steps=8", "resume_from_checkpoint=latest").step0 == 6


def test_save_total_limit_keeps_the_resumed_runs_checkpoints(sft_run, tmp_path):
    """A resume that skipped a damaged newer checkpoint: save_total_limit prunes among the checkpoints up to
    the step just saved, so the resumed run's own (its last included) stay loadable."""
    out = _copy(sft_run, tmp_path)
    DAMAGE["truncated rng state"](out / "checkpoint-4")
    t = _sft(out, "max_steps=3", "save_steps=1", "save_total_limit=1", "resume_from_checkpoint=latest")
    assert t.step0 == 2
    t.train()
    t.finish()
    assert not (out / "checkpoint-2").exists() and (out / "checkpoint-4").exists()  # limit 1 below step 3
    assert _sft(out, "max_steps=5", "resume_from_checkpoint=latest").step0 == 3


# ---- items 3 (lock) and 10 (SIGTERM): a CLI run, a second run into its directory, SIGTERM, resume
ARGS = H.FAST + ["reward_funcs=accuracy,format", "per_device_train_batch_size=4",
                 "task_eval_size=4", "save_steps=1000"]


@pytest.mark.slow
def test_lock_sigterm_checkpoint_and_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(H.cli_cmd(["grpo", *ARGS, "max_steps=100000", f"output_dir={run}"]), env=H.env(),
                            cwd=H.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while len(H.read_metrics(run) if (run / "metrics.jsonl").exists() else []) < 2:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline
            time.sleep(0.2)
        # a second run into the same directory (fresh or resuming) is refused while the first one runs
        r = H.run_cli(["grpo", *ARGS, "max_steps=3", f"output_dir={run}", "overwrite_output_dir=true"])
        assert r.returncode == 2, r.stderr[-3000:]
        assert "in use by another run" in r.stderr and str(proc.pid) in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    ckpts = sorted(int(d[11:]) for d in os.listdir(run) if d.startswith("checkpoint-"))
    assert len(ckpts) == 1 and ckpts[0] >= 2, ckpts
    n = ckpts[0]
    assert f"checkpoint-{n}" in err, err[-2000:]
    from r1train.checkpoint import checkpoint_problem

    assert checkpoint_problem(str(run / f"checkpoint-{n}")) is None
    assert [r["step"] for r in H.read_metrics(run)][:n] == list(range(1, n + 1))
    r = H.run_cli(["grpo", *ARGS, f"max_steps={n + 2}", f"output_dir={run}", "resume_from_checkpoint=latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in H.read_metrics(run)] == list(range(1, n + 3))


# ---- item 11: a failed save (full disk) is a clean error; no partial checkpoint is published
def test_full_disk_during_save_is_a_checkpoint_error(sft_run, tmp_path, monkeypatch):
    import errno

    import torch

    from r1train.checkpoint import CheckpointError

    out = _copy(sft_run, tmp_path)
    t = _sft(out, "max_steps=6", "resume_from_checkpoint=latest")
    real_save = torch.save

    def full(obj, f, *a, **k):
        if "rng_state" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="checkpoint-6.*No space left"):
        t.save(6)
    names = os.listdir(out)
    assert "checkpoint-6" not in names and not any(n.startswith("tmp-checkpoint") for n in names)
    assert (out / "checkpoint-4" / "manifest.json").is_file()


def test_output_dir_that_is_a_file_is_a_clean_error(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a directory")
    p = H.run_cli(["sft", *SFT, "max_steps=1", f"output_dir={f}"], timeout=300)
    assert p.returncode == 2 and "r1train: error: output_dir" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_diverged_run_stops_with_an_error_before_saving(tmp_path, capsys, command):
    """learning_rate 1e10: the loss turns NaN / inf within a few steps; the run stops with an error naming the
    step (exit 1), metrics.jsonl keeps that step's row (the non-finite values as null, named with their value
    under "nonfinite"), and no checkpoint of a diverged step is written."""
    from safetensors.torch import load_file

    from r1train.cli import main

    out = tmp_path / "run"
    extra = ["reward_funcs=train_helpers:digit_share"] if command == "grpo" else []  # rewards that vary in a group
    rc = main([command, *H.FAST, *extra, "learning_rate=1e10", "max_steps=6", "save_steps=1", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 1 and "training diverged at step" in err, err
    step = int(err.split("training diverged at step ")[1].split()[0])
    assert 1 <= step < 6
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["step"] == step and (last["loss"] is None or last.get("grad_norm") is None)
    assert set(last["nonfinite"]) == {k for k, v in last.items() if v is None}
    assert all(v in ("nan", "inf", "-inf") for v in last["nonfinite"].values())
    assert all("nonfinite" not in r for r in rows[:-1])
    saved = sorted(int(d.name.split("-")[1]) for d in out.iterdir() if d.name.startswith("checkpoint-"))
    assert saved == list(range(1, step))
    for s in saved:  # every checkpoint on disk holds finite weights
        sd = load_file(str(out / f"checkpoint-{s}" / "model.safetensors"))
        assert all(v.isfinite().all() for v in sd.values())


def test_resume_past_max_steps_is_an_error(sft_run, tmp_path):
    """A checkpoint past this run's max_steps: the run would train no step and finish() would save the
    checkpoint's weights as checkpoint-<max_steps>, over the real one. It is an error naming max_steps."""
    from r1train.checkpoint import CheckpointError

    out = _copy(sft_run, tmp_path)
    before = (out / "checkpoint-2" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"max_steps.*checkpoint-4|checkpoint-4.*max_steps"):
        _sft(out, "max_steps=2", "resume_from_checkpoint=latest")
    assert (out / "checkpoint-2" / "model.safetensors").read_bytes() == before
    assert _sft(out, "max_steps=4", "resume_from_checkpoint=latest").step0 == 4  # max_steps = its step: fine


def test_resume_with_another_zero_stage_from_a_deepspeed_file_is_refused(sft_run, tmp_path):
    """`deepspeed` overrides zero_stage: a ZeRO-0 checkpoint resumed under a ZeRO-2 file failed deep in
    DeepSpeed (a missing zero_pp_rank_* file); the effective stage is checked like zero_stage."""
    from r1train.checkpoint import CheckpointError
    from r1train.config import CONFIG_DIR

    out = _copy(sft_run, tmp_path)
    resume = ["max_steps=6", "resume_from_checkpoint=latest"]
    with pytest.raises(CheckpointError, match="ZeRO stage.*checkpoint 0, now 2"):
        _sft(out, *resume, f"deepspeed={os.path.join(CONFIG_DIR, 'ds_zero2.json')}")
    t = _sft(out, *resume, f"deepspeed={os.path.join(CONFIG_DIR, 'ds_zero0.json')}")
    assert t.step0 == 4


@pytest.mark.parametrize("saved,now", [("ds_zero0.json", "ds_zero0_bf16.json"),
                                       ("ds_zero2.json", "ds_zero2_bf16.json")])
def test_resume_with_another_deepspeed_precision_is_refused(tmp_path, saved, now):
    """bf16=true under DeepSpeed's mixed precision (fp32 master weights and optimizer states) resumed under a
    `deepspeed` file of the same ZeRO stage that keeps them in bf16 (or steps bf16 weights with no master copy):
    ZeRO-0 failed deep in DeepSpeed (KeyError 'param_groups'), ZeRO-2 resumed silently in bf16, another run than
    the checkpoint's. A CheckpointError naming the precision; the checkpoint's own file resumes."""
    from r1train.config import CONFIG_DIR

    out = tmp_path / "run"
    t = _sft(out, "max_steps=2", "bf16=true", f"deepspeed={os.path.join(CONFIG_DIR, saved)}")
    t.train()
    t.finish()
    resume = ["max_steps=4", "bf16=true", "resume_from_checkpoint=latest"]
    with pytest.raises(CheckpointError, match=r"DeepSpeed mixed precision.*checkpoint \{'bf16': True, "
                                              r"'bf16_master_weights_and_grads': False"):
        _sft(out, *resume, f"deepspeed={os.path.join(CONFIG_DIR, now)}")
    assert _sft(out, *resume, f"deepspeed={os.path.join(CONFIG_DIR, saved)}").step0 == 2


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_train_reliability_ckpt import _sft
t = _sft({out!r}, "max_steps=6", "resume_from_checkpoint=latest")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
try:
    t.save(6)
except Exception as e:
    print("RAISED", type(e).__name__, e)
"""


def test_real_write_failure_during_save_is_a_checkpoint_error(sft_run, tmp_path):
    """A write that really fails (torch.save and safetensors raise RuntimeError / SafetensorError, not
    OSError): a CheckpointError naming the step, and no tmp-checkpoint left behind."""
    out = _copy(sft_run, tmp_path)
    code = FULL_DISK.format(tests=os.path.dirname(__file__), out=str(out))
    p = subprocess.run([sys.executable, "-c", code], env=H.env(), cwd=H.ROOT, capture_output=True, text=True,
                       timeout=300)
    assert "RAISED" in p.stdout, p.stderr[-3000:]
    assert "RAISED CheckpointError saving checkpoint-6" in p.stdout, p.stdout[-2000:]
    names = os.listdir(out)
    assert "checkpoint-6" not in names and not any(n.startswith("tmp-checkpoint") for n in names), names
    assert (out / "checkpoint-4" / "manifest.json").is_file()


def test_killed_while_replacing_a_checkpoint_keeps_one(sft_run, tmp_path, monkeypatch):
    """A resumed run saves a step that has a checkpoint already (here: resumed from checkpoint-2, it saves
    checkpoint-4 again). A kill while the old copy is deleted left a damaged checkpoint-4 and the complete new
    one under tmp-checkpoint-4, which the next start deletes: both lost. One complete copy survives."""
    import r1train.checkpoint as C

    out = _copy(sft_run, tmp_path)
    t = _sft(out, "max_steps=4", f"resume_from_checkpoint={out / 'checkpoint-2'}")
    t.train()
    real = shutil.rmtree

    def killed_midway(path, *a, **k):  # the first removal of a complete checkpoint is cut short
        if os.path.isfile(os.path.join(path, "manifest.json")):
            monkeypatch.setattr(C.shutil, "rmtree", real)
            os.remove(os.path.join(path, "manifest.json"))
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(C.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        t.finish()
    monkeypatch.setattr(C.shutil, "rmtree", real)
    assert _sft(out, "max_steps=6", "resume_from_checkpoint=latest").step0 == 4


def test_killed_between_the_renames_of_a_replaced_checkpoint_keeps_one(sft_run, tmp_path, monkeypatch):
    """Replacing checkpoint-4 renames it to tmp-checkpoint-4-replaced, then tmp-checkpoint-4 (the new copy,
    complete) to checkpoint-4. A kill between the two renames left no checkpoint-4, and the next start deleted
    both tmp-* copies: the step was lost (latest fell back to checkpoint-2). The next start publishes the new copy."""
    import r1train.checkpoint as C

    out = _copy(sft_run, tmp_path)
    t = _sft(out, "max_steps=4", f"resume_from_checkpoint={out / 'checkpoint-2'}")
    t.train()
    real = os.replace

    def killed_midway(src, dst, *a, **k):  # killed before the new copy is renamed into place
        if os.path.basename(src) == "tmp-checkpoint-4" and os.path.basename(dst) == "checkpoint-4":
            raise KeyboardInterrupt
        return real(src, dst, *a, **k)

    monkeypatch.setattr(C.os, "replace", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        t.finish()
    monkeypatch.setattr(C.os, "replace", real)
    assert not (out / "checkpoint-4").exists() and (out / "tmp-checkpoint-4-replaced").is_dir()
    want = (out / "tmp-checkpoint-4" / "model.safetensors").read_bytes()  # the resumed run's copy
    assert _sft(out, "max_steps=6", "resume_from_checkpoint=latest").step0 == 4
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == want
    assert not any(n.startswith("tmp-checkpoint") for n in os.listdir(out))


def test_resume_from_checkpoint_true_picks_the_latest(sft_run, tmp_path):
    """HF Trainer's resume_from_checkpoint=True: the newest checkpoint in output_dir, as `latest`."""
    out = _copy(sft_run, tmp_path)
    assert _sft(out, "max_steps=6", "resume_from_checkpoint=true").step0 == 4
    assert _sft(out, "max_steps=6", "resume_from_checkpoint=True").step0 == 4


# ---- RUN_KEYS: a run of a linear schedule with warmup, saved at its last step (2)
BASE = ["lr_scheduler_type=linear", "warmup_ratio=0.5", "max_steps=2"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_run") / "run"
    t = H.grpo_trainer(out, *BASE)
    t.train()
    t.finish()
    return out / "checkpoint-2"


def _resume(ckpt, tmp_path, *overrides):
    return H.grpo_trainer(tmp_path / "out", *BASE, f"resume_from_checkpoint={ckpt}", *overrides)


CHANGED = [(["lr_scheduler_type=cosine"], "lr_scheduler_type (checkpoint 'linear', now 'cosine')"),
           (["warmup_ratio=0.25"], "warmup_ratio (checkpoint 0.5, now 0.25)"),
           (["epsilon=0.3"], "epsilon (checkpoint 0.2, now 0.3)"),
           (["epsilon_high=0.28"], "epsilon_high (checkpoint None, now 0.28)"),
           (["entropy_coef=0.01"], "entropy_coef (checkpoint 0.0, now 0.01)"),
           (["max_grad_norm=0.5"], "max_grad_norm (checkpoint 1.0, now 0.5)")]


@pytest.mark.parametrize("over,named", CHANGED, ids=[c[0][0] for c in CHANGED])
def test_resume_refuses_another_schedule_or_loss(grpo_run, tmp_path, over, named):
    with pytest.raises(CheckpointError, match="other settings") as e:
        _resume(grpo_run, tmp_path, *over)
    assert named in str(e.value), str(e.value)


def test_resume_refuses_another_horizon_of_a_decaying_schedule(grpo_run, tmp_path):
    """The linear schedule's rate at a step depends on max_steps: resuming for 4 steps would continue with
    another schedule than the checkpoint's (constant rates do not: other tests resume those with more steps)."""
    with pytest.raises(CheckpointError, match=r"max_steps.*checkpoint's run has 2 steps, this one 4"):
        _resume(grpo_run, tmp_path, "max_steps=4")
    assert _resume(grpo_run, tmp_path).step0 == 2  # the same settings resume


def test_checkpoint_without_the_new_keys_still_resumes(grpo_run, tmp_path):
    """A checkpoint written before a key joined RUN_KEYS lacks it in its saved config: not compared."""
    ckpt = tmp_path / "old" / "checkpoint-2"
    shutil.copytree(grpo_run, ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for k in ("lr_scheduler_type", "warmup_ratio", "epsilon", "epsilon_high", "entropy_coef", "max_grad_norm"):
        del state["config"][k]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    os.remove(ckpt / "manifest.json")
    write_manifest(str(ckpt))
    t = _resume(ckpt, tmp_path, "epsilon=0.3", "max_grad_norm=0.5")
    assert t.step0 == 2


def test_every_loss_option_is_a_run_key():
    """The config keys the GRPO loss is called with (GRPOTrainer._loss_kw) define the run, so a loss option
    added later joins RUN_KEYS (kernel_backend aside: a kernel choice, not the objective)."""
    core = ("beta", "epsilon", "epsilon_high", "delta", "loss_type", "importance_sampling_level", "kl_estimator",
            "temperature", "max_completion_length", "entropy_coef")
    assert set(core) | set(loss_keys(load_config())) <= set(RUN_KEYS)


def test_checkpoint_whose_deepspeed_state_is_gone_is_an_error(sft_run, tmp_path):
    """A checkpoint whose manifest matches but whose ds/ states are gone (the manifest rewritten without them):
    DeepSpeed only warns that it found nothing, and the run would go on from the base weights."""
    from r1train.checkpoint import CheckpointError, write_manifest

    out = _copy(sft_run, tmp_path)
    shutil.rmtree(out / "checkpoint-4" / "ds")
    write_manifest(str(out / "checkpoint-4"))
    with pytest.raises(CheckpointError, match="DeepSpeed loaded nothing"):
        _sft(out, "max_steps=6", "resume_from_checkpoint=latest")


# ---- durability: a checkpoint is on disk (fsync) before anything older is deleted
def _record_disk_ops(monkeypatch):
    """Record os.fsync (the synced path), os.replace and shutil.rmtree calls, in order, as real paths."""
    events, fsync, replace, rmtree = [], os.fsync, os.replace, shutil.rmtree

    def synced(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def replaced(src, dst, *a, **k):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return replace(src, dst, *a, **k)

    def removed(path, *a, **k):
        events.append(("rmtree", os.path.realpath(path)))
        return rmtree(path, *a, **k)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", replaced)
    monkeypatch.setattr(shutil, "rmtree", removed)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsync'd descriptor through /proc")
def test_checkpoint_is_on_disk_before_older_ones_are_deleted(sft_run, tmp_path, monkeypatch):
    """A power loss after a save must not leave a checkpoint whose manifest is on disk but whose files are not,
    once the older checkpoints are gone. So every file of the checkpoint (DeepSpeed's and safetensors' too) and
    every directory of it is fsynced before the manifest, the manifest before the rename that publishes it,
    and output_dir (the renames) before save_total_limit or the replacement of a step deletes anything."""
    out = _copy(sft_run, tmp_path)
    # resumed from checkpoint-2, the run saves checkpoint-4 again (the old copy is deleted) and save_total_limit=1
    # deletes checkpoint-2
    t = _sft(out, "max_steps=4", "save_total_limit=1", f"resume_from_checkpoint={out / 'checkpoint-2'}")
    t.train()
    events = _record_disk_ops(monkeypatch)
    t.finish()
    real = os.path.realpath(out)
    tmp, final = os.path.join(real, "tmp-checkpoint-4"), os.path.join(real, "checkpoint-4")
    publish = events.index(("replace", tmp, final))
    synced = [e[1] for e in events[:publish] if e[0] == "fsync"]
    manifest = synced.index(os.path.join(tmp, "manifest.json.tmp"))
    for root, _, names in os.walk(final):
        rel = os.path.relpath(root, final)
        want = os.path.normpath(os.path.join(tmp, rel))
        assert want in synced[:manifest], f"directory {rel} of the checkpoint was not fsynced before its manifest"
        for n in names:
            if n != "manifest.json":
                assert os.path.join(want, n) in synced[:manifest], f"{os.path.join(rel, n)} was not fsynced"
    assert synced[-1] == tmp  # after the manifest's rename into it
    # the run's rows up to the step (metrics.jsonl: every step logged; a resume from it keeps them) before it
    assert os.path.join(real, "metrics.jsonl") in synced[:manifest]
    deleted = [i for i, e in enumerate(events) if e[0] == "rmtree" and i > publish]
    assert {events[i][1] for i in deleted} >= {os.path.join(real, "checkpoint-2"),
                                               os.path.join(real, "tmp-checkpoint-4-replaced")}
    assert ("fsync", real) in events[publish:deleted[0]], "output_dir was not fsynced before a deletion"
    assert not (out / "checkpoint-2").exists() and _sft(out, "max_steps=6", "resume_from_checkpoint=latest").step0 == 4


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fsync'd descriptor through /proc")
def test_restored_replaced_checkpoint_is_on_disk_before_the_other_copy_is_deleted(sft_run, tmp_path, monkeypatch):
    """A start after a kill between the renames of a replaced checkpoint (both copies under tmp-*) renames the
    complete copy to checkpoint-<step>, then deletes the other tmp-*: output_dir is fsynced between the two."""
    from r1train.checkpoint import prepare_output_dir, unlock_output_dir

    out = _copy(sft_run, tmp_path)
    os.rename(out / "checkpoint-4", out / "tmp-checkpoint-4-replaced")
    shutil.copytree(out / "tmp-checkpoint-4-replaced", out / "tmp-checkpoint-4")
    cfg = load_config(overrides=SFT + [f"output_dir={out}", "resume_from_checkpoint=latest"])
    events = _record_disk_ops(monkeypatch)
    prepare_output_dir(cfg)
    unlock_output_dir(cfg.output_dir)
    real = os.path.realpath(out)
    restore = events.index(("replace", os.path.join(real, "tmp-checkpoint-4"), os.path.join(real, "checkpoint-4")))
    deleted = events.index(("rmtree", os.path.join(real, "tmp-checkpoint-4-replaced")))
    assert ("fsync", real) in events[restore:deleted]
    assert (out / "checkpoint-4" / "manifest.json").is_file()


def test_zero_stage_of_reads_the_file_the_engine_is_built_from(tmp_path):
    """zero_stage_of (the stage a resume must keep) reads deepspeed_file, as engine.ds_config: r1train's
    ds_zero<N>.json holds stage N, and a `deepspeed` file's stage overrides zero_stage."""
    from r1train.checkpoint import zero_stage_of

    for n in range(4):
        assert zero_stage_of(load_config(overrides=[f"zero_stage={n}"])) == n
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert zero_stage_of(load_config(overrides=["zero_stage=1", f"deepspeed={f}"])) == 2


def test_ds_precision_of_reads_the_bf16_the_engine_is_built_with(tmp_path):
    """ds_precision_of (the precision a resume must keep) and engine.ds_config resolve bf16.enabled by one rule
    (config.ds_bf16_enabled): the file's value, "auto" or none filled from bf16. Over every bf16 section a
    config loads with, both give the rule's result, and the bf16_* options count only with DeepSpeed's bf16 on."""
    from r1train.checkpoint import ds_precision_of
    from r1train.engine import ds_config

    f = tmp_path / "ds.json"
    opts = {"bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    for bf16 in (False, True):
        for section in (None, {}, {"enabled": "auto"}, {"enabled": False}, {"enabled": True},
                        {"enabled": "auto", **opts}, {"enabled": False, **opts}, {"enabled": True, **opts}):
            if section is not None and section.get("enabled") is True and not bf16:
                continue  # a ConfigError at load (test_deepspeed_file_values_must_match_the_config)
            f.write_text(json.dumps({} if section is None else {"bf16": section}))
            cfg = load_config(overrides=[f"bf16={str(bf16).lower()}", f"deepspeed={f}"])
            on = bf16 if (section or {}).get("enabled", "auto") == "auto" else section["enabled"]
            assert ds_config(cfg, 8, 1)["bf16"]["enabled"] is on
            assert ds_precision_of(cfg) == {"bf16": on, **{k: on and k in (section or {}) for k in opts}}


def test_sft_resume_ignores_keys_only_grpo_training_reads(tmp_path):
    """A recipe's GRPO keys (beta, num_generations, the loss's) changed while its SFT stage was interrupted blocked
    resuming the SFT run, whose training never reads them; they still block a GRPO resume. Keys an SFT run does
    read still block both: learning_rate, and the sampling keys (the rejection-sampling SFT stage and distill
    sample their rows again when they resume: temperature, chat_template_kwargs, distill's teacher_model)."""
    import dataclasses

    from r1train.checkpoint import GRPO_ONLY_RUN_KEYS, RUN_KEYS, check_resume_config
    from r1train.config import load_config

    cfg = load_config(overrides=["report_to=none"])
    grpo_only = {"beta": 0.1, "num_generations": 4, "loss_type": "grpo", "epsilon": 0.3}
    assert set(grpo_only) <= GRPO_ONLY_RUN_KEYS < set(RUN_KEYS)
    sft_reads = {"learning_rate": cfg.learning_rate * 2, "temperature": 0.7,
                 "chat_template_kwargs": {"enable_thinking": False}, "rejection_num_samples": 2,
                 "teacher_model": "/another/teacher"}
    assert not set(sft_reads) & GRPO_ONLY_RUN_KEYS and set(sft_reads) <= set(RUN_KEYS)
    for trainer in ("SFTTrainer", "GRPOTrainer"):
        ckpt = tmp_path / trainer
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps(
            {"config": json.loads(json.dumps(vars(cfg), default=str)), "trainer": trainer, "world_size": 1}))
        changed = dataclasses.replace(cfg, **grpo_only)
        if trainer == "SFTTrainer":
            assert check_resume_config(str(ckpt), changed, trainer, 1)["trainer"] == trainer
        else:
            with pytest.raises(CheckpointError, match="num_generations.*beta|beta.*num_generations"):
                check_resume_config(str(ckpt), changed, trainer, 1)
        for k, v in sft_reads.items():
            with pytest.raises(CheckpointError, match=rf"{k} \(checkpoint"):
                check_resume_config(str(ckpt), dataclasses.replace(cfg, **{k: v}), trainer, 1)


def test_packing_keys_block_a_resume_only_with_an_entropy_quantile(tmp_path):
    """padding_free / max_tokens_per_batch make the micro-batches over which top_entropy_quantile < 1 takes its
    threshold: a change trains other tokens (an audit's resume drifted 3e-3 in loss at its first step), so a GRPO
    resume refuses it there (in the checkpoint's run or this one); with quantile 1, or in SFT, it may change."""
    import dataclasses

    from r1train.checkpoint import PACKING_RUN_KEYS, check_resume_config
    from r1train.config import load_config

    cfg = load_config(overrides=["report_to=none"])
    changes = {"padding_free": not cfg.padding_free, "max_tokens_per_batch": 4096}
    assert set(changes) == set(PACKING_RUN_KEYS)
    for trainer in ("GRPOTrainer", "SFTTrainer"):
        for q_saved, q_now in ((1.0, 1.0), (0.5, 0.5), (1.0, 0.8), (0.2, 1.0)):
            ckpt = tmp_path / f"{trainer}_{q_saved}_{q_now}"
            ckpt.mkdir()
            saved = dataclasses.replace(cfg, top_entropy_quantile=q_saved)
            (ckpt / "trainer_state.json").write_text(json.dumps(
                {"config": json.loads(json.dumps(vars(saved), default=str)), "trainer": trainer, "world_size": 1}))
            for k, v in changes.items():
                now = dataclasses.replace(cfg, top_entropy_quantile=q_now, **{k: v})
                if trainer == "GRPOTrainer" and min(q_saved, q_now) < 1:
                    with pytest.raises(CheckpointError, match=rf"{k} \(checkpoint"):
                        check_resume_config(str(ckpt), now, trainer, 1)
                else:
                    assert check_resume_config(str(ckpt), now, trainer, 1)["trainer"] == trainer


def test_resume_true_without_a_checkpoint_names_true(tmp_path):
    """resume_from_checkpoint=true (HF Trainer's True) with no checkpoint: the error names the value set, not the
    `latest` it stands for."""
    from r1train.checkpoint import resolve_checkpoint

    with pytest.raises(CheckpointError, match=r"resume_from_checkpoint=true: no checkpoint-<step>"):
        resolve_checkpoint("true", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"resume_from_checkpoint=latest: no checkpoint-<step>"):
        resolve_checkpoint("latest", str(tmp_path))


def test_rows_sha256_is_one_value_per_rows_in_every_process():
    """The rows' fingerprint a resume compares: the same in processes with other hash seeds (a set's order follows
    PYTHONHASHSEED), defined for any row (non-string keys, bytes, arrays, tensors, objects), and it sees an edit
    in the middle of a large array (whose repr elides it)."""
    import numpy as np
    import torch

    from r1train.checkpoint import rows_sha256

    code = ("from r1train.checkpoint import rows_sha256; "  # an object key: its repr is its address
            "print(rows_sha256([{'tags': {'alpha', 'beta', 'gamma', 'delta'}, 'prompt': 'p', object(): 1}]))")
    seen = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in (1, 2, 3)}
    assert len(seen) == 1
    arr = np.arange(5000)
    rows = [{1: "int key", "x": 2}, {(1, 2): b"\x00\xff", "a": arr, "t": torch.arange(3000.0), "o": object()}]
    base = rows_sha256(rows)
    assert base == rows_sha256([dict(reversed(list(r.items()))) for r in rows])  # key order does not count
    arr[2500] = -1
    assert rows_sha256(rows) != base
    arr[2500] = 2500
    rows[1]["t"][1500] = 0.5
    assert rows_sha256(rows) != base
    a, b = object(), object()  # two keys of one canonical form: no value is lost to the other's
    assert rows_sha256([{a: 1, b: 2}]) != rows_sha256([{a: 2, b: 2}])
    assert rows_sha256([{a: 1, b: 2}]) == rows_sha256([{b: 2, a: 1}])


def test_latest_after_a_rewind_continues_the_rewound_run(sft_run, tmp_path, caplog):
    """A resume from checkpoint-2 of a run that reached checkpoint-4 (a rewind), killed after it saved step 3:
    resume_from_checkpoint=latest took the left-behind checkpoint-4 (the other run's state, its metrics cut at
    step 2) instead of this run's checkpoint-3. Once this run saves step 4 itself, latest takes that."""
    out = _copy(sft_run, tmp_path)
    left = json.loads((out / "checkpoint-4" / "manifest.json").read_text())
    with caplog.at_level("WARNING"):
        t = _sft(out, "max_steps=3", "save_steps=1", f"resume_from_checkpoint={out / 'checkpoint-2'}")
    assert "checkpoint-4, newer, belong to the run this one leaves" in caplog.text
    t.train()
    t.finish()  # checkpoint-3 (as a run killed after saving its step 3 leaves it)
    t = _sft(out, "max_steps=4", "save_steps=1", "resume_from_checkpoint=latest")
    assert t.step0 == 3
    t.train()
    t.finish()  # this run's checkpoint-4 replaces the left-behind one
    assert json.loads((out / "checkpoint-4" / "manifest.json").read_text()) != left
    assert _sft(out, "max_steps=6", "resume_from_checkpoint=latest").step0 == 4
    assert [r["step"] for r in H.read_metrics(out)] == [1, 2, 3, 4]


def test_a_refused_rewind_leaves_nothing_behind(sft_run, tmp_path):
    """A resume from checkpoint-2 that load refuses (past this run's max_steps) rewinds nothing: checkpoint-4 was
    listed as left behind all the same, and latest fell back to checkpoint-2."""
    from r1train.checkpoint import ABANDONED, CheckpointError, resolve_checkpoint

    out = _copy(sft_run, tmp_path)
    with pytest.raises(CheckpointError, match="past this run's max_steps"):
        _sft(out, "max_steps=1", f"resume_from_checkpoint={out / 'checkpoint-2'}")
    assert not (out / ABANDONED).exists()
    assert resolve_checkpoint("latest", str(out)) == str(out / "checkpoint-4")


def test_two_saves_of_a_step_have_distinct_manifests(tmp_path):
    """The left-behind record names a save by its manifest's sha256; files past HASH_MAX_BYTES are listed by size
    only, so two runs of the same settings saving the same step could write the same manifest, and latest then
    skipped the rewound run's own save. Each manifest carries its save's own id."""
    from r1train.checkpoint import _manifest_sha, checkpoint_problem, write_manifest

    d = tmp_path / "checkpoint-4"
    d.mkdir()
    (d / "trainer_state.json").write_text("{}")
    shas = set()
    for _ in range(2):
        write_manifest(str(d))
        assert checkpoint_problem(str(d)) is None
        shas.add(_manifest_sha(str(d)))
    assert len(shas) == 2


def test_save_total_limit_does_not_count_left_behind_checkpoints(sft_run, tmp_path):
    """Rewound to checkpoint-2 with checkpoint-4 left behind, the run saves step 5 with save_total_limit=2:
    the left-behind checkpoint-4 counted as one of the two newest, and this run's checkpoint-2 was deleted (latest
    then had nothing of this run's to fall back on)."""
    from r1train.checkpoint import resolve_checkpoint

    out = _copy(sft_run, tmp_path)
    t = _sft(out, "max_steps=5", "save_steps=5", "save_total_limit=2", f"resume_from_checkpoint={out / 'checkpoint-2'}")
    t.train()
    t.finish()
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-5").is_dir()
    shutil.rmtree(out / "checkpoint-5")
    assert resolve_checkpoint("latest", str(out)) == str(out / "checkpoint-2")


@pytest.mark.parametrize("text", ['["checkpoint-4"]', '{"checkpoint-4": "abc"}', "{not json"])
def test_a_malformed_left_behind_record_is_a_clear_error(sft_run, tmp_path, text):
    from r1train.checkpoint import ABANDONED, CheckpointError, resolve_checkpoint

    out = _copy(sft_run, tmp_path)
    (out / ABANDONED).write_text(text)
    with pytest.raises(CheckpointError, match=f"{ABANDONED} is unreadable or not a"):
        resolve_checkpoint("latest", str(out))


def test_resume_keeps_the_stage_of_a_deepspeed_file_whatever_zero_stage_says(sft_run, tmp_path):
    """A `deepspeed` file overrides zero_stage: a resume under a file of the checkpoint's stage was refused when
    zero_stage differed (a key the run does not use); the stage the run uses is what must match."""
    import random

    from r1train.config import CONFIG_DIR

    out = _copy(sft_run, tmp_path)
    stage = random.choice([1, 2, 3])
    zero0 = os.path.join(CONFIG_DIR, "ds_zero0.json")
    t = _sft(out, "max_steps=6", "resume_from_checkpoint=latest", f"zero_stage={stage}", f"deepspeed={zero0}")
    assert t.step0 == 4
