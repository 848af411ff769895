"""sync_ref_model counts optimizer steps as TRL's SyncRefModelCallback (state.global_step % ref_model_sync_steps
at each optimizer step's end), not GRPO steps; a resume refuses a checkpoint of another learning-rate schedule
or loss (its RUN_KEYS, and the schedule's horizon where the schedule depends on it)."""

import json
import os

import pytest
import torch
import train_helpers as H

from r1train.checkpoint import CheckpointError, write_manifest


def test_ref_sync_counts_optimizer_steps_as_trl(tmp_path):
    """3 GRPO steps of num_iterations 2 (gradient accumulation 2): 6 optimizer steps, so ref_model_sync_steps=3
    syncs after optimizer steps 3 and 6 (TRL), each time ref <- alpha * policy + (1 - alpha) * ref with the
    policy of that moment. Counting GRPO steps synced once, after step 3 (optimizer step 6)."""
    t = H.grpo_trainer(tmp_path, "max_steps=3", "num_iterations=2", "gradient_accumulation_steps=2",
                       "per_device_train_batch_size=4", "beta=0.04", "sync_ref_model=true", "ref_model_sync_steps=3",
                       "ref_model_mixup_alpha=0.5")
    alpha, real = 0.5, t.sync_ref
    want = {n: p.detach().clone() for n, p in t.ref.module.named_parameters()}
    synced_at = []

    def spy(a):
        synced_at.append(t.engine.global_steps)  # DeepSpeed's count of optimizer steps taken
        for n, p in t.engine.module.named_parameters():
            want[n].mul_(1 - alpha).add_(p.detach(), alpha=alpha)
        real(a)

    t.sync_ref = spy
    t.train()
    assert t.engine.global_steps == 6
    assert synced_at == [3, 6]
    for n, r in t.ref.module.named_parameters():
        torch.testing.assert_close(r, want[n], rtol=0, atol=0, msg=n)


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
    import shutil

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
    from r1train.checkpoint import RUN_KEYS
    from r1train.config import load_config
    from r1train.grpo import loss_keys

    core = ("beta", "epsilon", "epsilon_high", "delta", "loss_type", "importance_sampling_level", "kl_estimator",
            "temperature", "max_completion_length", "entropy_coef")
    assert set(core) | set(loss_keys(load_config())) <= set(RUN_KEYS)
