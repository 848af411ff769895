"""DeepSpeed under torchrun: ZeRO-2 with two processes sees the same first steps as one process with
gradient accumulation (same prompts, same samples, same global-batch normalization); ZeRO-3 runs."""

import math

import pytest
import train_helpers as H

ARGS = H.FAST + ["reward_funcs=train_helpers:digit_share", "max_steps=2", "num_generations=4",
                 "per_device_train_batch_size=8", "task_eval_size=4", "learning_rate=0.003", "num_iterations=2"]


DYNAMIC = ["dynamic_sampling=true", "max_dynamic_sampling_rounds=4", "reward_funcs=train_helpers:half_constant"]


@pytest.mark.slow
@pytest.mark.parametrize("extra,launcher", [([], "torchrun"), (DYNAMIC, "torchrun"), ([], "accelerate")],
                         ids=["plain", "dynamic_sampling", "accelerate_launch"])
def test_zero2_two_processes_match_one(tmp_path, extra, launcher):
    """Dynamic sampling too: a batch slot lives on one rank and redraws from (seed, step, round, slot);
    `accelerate launch` starts the same two processes as torchrun."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = H.run_cli(["grpo", *ARGS, *extra, "zero_stage=2", "gradient_accumulation_steps=2", f"output_dir={one}"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = H.run_cli(["grpo", *ARGS, *extra, "zero_stage=2", "gradient_accumulation_steps=1", f"output_dir={two}"],
                   nproc=2, launcher=launcher)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = H.read_metrics(one), H.read_metrics(two)
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        for k in ("dynamic_sampling/drop_rate", "dynamic_sampling/rounds"):
            assert (k in a) == (k in b) == bool(extra)
            if extra:
                assert a[k] == pytest.approx(b[k], abs=1e-9), k
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["completions/mean_length"] == pytest.approx(b["completions/mean_length"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b)
        for k in ("min", "mean", "max"):  # rollout-correction weights, reduced over ranks
            k = f"sampling/importance_sampling_ratio/{k}"
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
    assert abs(m1[0]["loss"]) > 1e-6 and math.isfinite(m1[1]["loss"])  # mu=2: the 2nd pass has ratios != 1
    # completions.jsonl holds every rank's completions, gathered to rank 0 (it kept rank 0's half before)
    c1, c2 = _completions(one), _completions(two)
    assert sorted(c1) == sorted(c2) == [1, 2]
    for step in c1:
        assert len(c2[step]) == len(c1[step]) == 8 * 2, step  # per_device_train_batch_size * GA of one process
        assert sorted(c2[step]) == sorted(c1[step]), step  # the same (prompt, completion) pairs


def _completions(output_dir) -> dict:
    """completions.jsonl as {step: [(prompt, completion), ...]}."""
    import json

    out: dict = {}
    with open(output_dir / "completions.jsonl") as fh:
        for ln in fh:
            r = json.loads(ln)
            out.setdefault(r["step"], []).append((r["prompt"], r["completion"]))
    return out


@pytest.mark.slow
def test_zero3_two_processes_with_reference(tmp_path):
    out = tmp_path / "z3"
    r = H.run_cli(["grpo", *ARGS, "zero_stage=3", "beta=0.04", "sync_ref_model=true", "ref_model_sync_steps=1",
                   "save_steps=1", f"output_dir={out}"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    m = H.read_metrics(out)
    assert len(m) == 2 and all(math.isfinite(x["loss"]) and math.isfinite(x["kl"]) for x in m)
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out / "checkpoint-2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (out / "checkpoint-2" / "ref_model.pt").exists()


@pytest.mark.slow
def test_packed_two_processes_match_padded_one(tmp_path):
    """padding_free with a token budget under ZeRO-2 on two processes (each rank plans its own packs, the
    count agreed by an all-reduce) logs the losses of one padded process with gradient accumulation (bnpo:
    the per-micro-batch token normalization)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*ARGS, "max_prompt_length=20", "max_completion_length=8", "loss_type=bnpo", "zero_stage=2"]
    r1 = H.run_cli(["grpo", *args, "gradient_accumulation_steps=2", f"output_dir={one}"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = H.run_cli(["grpo", *args, "gradient_accumulation_steps=1", "padding_free=true", "max_tokens_per_batch=30",
                    f"output_dir={two}"], nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = H.read_metrics(one), H.read_metrics(two)
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert a["completions/mean_length"] == pytest.approx(b["completions/mean_length"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b)
        for k in ("min", "mean", "max"):  # rollout-correction weights, reduced over ranks
            k = f"sampling/importance_sampling_ratio/{k}"
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
