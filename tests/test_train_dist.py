"""DeepSpeed under torchrun: ZeRO-2 with two processes sees the same first steps as one process with
gradient accumulation (same prompts, same samples, same global-batch normalization); ZeRO-3 runs."""

import math

import pytest
import train_helpers as H

ARGS = H.FAST + ["reward_funcs=train_helpers:digit_share", "max_steps=2", "num_generations=4",
                 "per_device_train_batch_size=8", "task_eval_size=4", "learning_rate=0.003", "num_iterations=2"]


DYNAMIC = ["dynamic_sampling=true", "max_dynamic_sampling_rounds=4", "reward_funcs=train_helpers:half_constant"]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """start(args) -> wait(): the one-process run of these arguments, started in the background (H.BackgroundCLI,
    beside the caller's two-process run) once per module (plain and accelerate_launch compare with the same one);
    wait() -> its output_dir once it has exited cleanly."""
    runs = {}

    def start(args):
        key = tuple(args)
        if key not in runs:
            out = tmp_path_factory.mktemp("one")
            runs[key] = (out, H.BackgroundCLI([*args, f"output_dir={out}"], out.parent / f"{out.name}.stderr"))
        out, run = runs[key]

        def wait():
            run.wait()
            return out
        return wait
    yield start
    for _, run in runs.values():
        run.stop()


@pytest.mark.slow
@pytest.mark.parametrize("extra,launcher", [([], "torchrun"), (DYNAMIC, "torchrun"), ([], "accelerate")],
                         ids=["plain", "dynamic_sampling", "accelerate_launch"])
def test_zero2_two_processes_match_one(tmp_path, extra, launcher, one_process_run):
    """Dynamic sampling too: a batch slot lives on one rank and redraws from (seed, step, round, slot);
    `accelerate launch` starts the same two processes as torchrun."""
    two = tmp_path / "two"
    wait_one = one_process_run(["grpo", *ARGS, *extra, "zero_stage=2", "gradient_accumulation_steps=2"])
    r2 = H.run_cli(["grpo", *ARGS, *extra, "zero_stage=2", "gradient_accumulation_steps=1", f"output_dir={two}"],
                   nproc=2, launcher=launcher)
    one = wait_one()
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
def test_packed_two_processes_match_padded_one(tmp_path, one_process_run):
    """padding_free with a token budget under ZeRO-2 on two processes (each rank plans its own packs, the
    count agreed by an all-reduce) logs the losses of one padded process with gradient accumulation (bnpo:
    the per-micro-batch token normalization)."""
    two = tmp_path / "two"
    args = [*ARGS, "max_prompt_length=20", "max_completion_length=8", "loss_type=bnpo", "zero_stage=2"]
    wait_one = one_process_run(["grpo", *args, "gradient_accumulation_steps=2"])
    r2 = H.run_cli(["grpo", *args, "gradient_accumulation_steps=1", "padding_free=true", "max_tokens_per_batch=30",
                    f"output_dir={two}"], nproc=2)
    one = wait_one()
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = H.read_metrics(one), H.read_metrics(two)
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert a["completions/mean_length"] == pytest.approx(b["completions/mean_length"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (a, b)
        for k in ("min", "mean", "max"):  # rollout-correction weights, reduced over ranks
            k = f"sampling/importance_sampling_ratio/{k}"
            assert a[k] == pytest.approx(b[k], abs=1e-5), k


def _rejection_worker(out_dir):
    """One process of test_rejection_sampling_splits_prompts_across_ranks: rejection sampling of 11 prompts with
    the tiny model, every generate call's rows counted. The real completions are wrapped into a well-formed
    answer that depends on their text (a random model writes none), so which samples are kept follows the
    completions themselves."""
    import json
    import os
    import zlib

    import torch.distributed as dist

    from r1train import pipeline, rollout
    from r1train.config import load_config
    from r1train.loading import load_model_and_tokenizer

    calls, real_generate, real_sample_rows = [], rollout.generate, pipeline.sample_rows

    def counted(model, prompt_ids_BP, *a, **kw):
        calls.append(prompt_ids_BP.shape[0])
        return real_generate(model, prompt_ids_BP, *a, **kw)

    def wrapped(*a, **kw):
        for s, chunk, ro, texts in real_sample_rows(*a, **kw):
            yield s, chunk, ro, [f"<think>{t!r}</think><answer>{zlib.crc32(t.encode()) % 2}</answer>" for t in texts]

    rollout.generate, pipeline.sample_rows = counted, wrapped
    cfg = load_config(overrides=H.FAST + ["seed=7", f"output_dir={out_dir}"])
    model, tok = load_model_and_tokenizer(cfg)
    rows = [{"prompt": f"What is {i}+{2 * i}?", "answer": str(i % 2), "id": i} for i in range(11)]
    stats = {}
    kept = pipeline.rejection_sample(cfg, model, tok, rows, num_samples=3, keep=2, batch_size=4, stats=stats)
    rank = dist.get_rank()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump({"world": dist.get_world_size(), "calls": calls, "kept": kept, "stats": stats}, fh)
    from r1train.engine import teardown_distributed

    teardown_distributed()


@pytest.mark.slow
def test_rejection_sampling_splits_prompts_across_ranks(tmp_path):
    """Rejection sampling (recipe stage 3, distill) sampled every prompt on every rank. Now rank r samples
    rows[r::world], each row still seeded by its index in rows, and the kept rows and counts are gathered: two
    processes keep the same rows, in the same order, with the same stats as one, and each rank generated only
    its half of the prompts (6 and 5 of 11, 3 samples each)."""
    import json
    import subprocess
    import sys

    from r1train.engine import free_port

    script = [__file__, "_rejection_worker"]
    res = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        launch = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                        f"--master_port={free_port()}"]
        r = subprocess.run([sys.executable, *launch, *script, str(out)], env=H.env(), cwd=H.ROOT,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        res[nproc] = [json.loads((out / f"rank{k}.json").read_text()) for k in range(nproc)]
    (one,), two = res[1], res[2]
    assert one["world"] == 1 and [t["world"] for t in two] == [2, 2]
    assert sum(one["calls"]) == 11 * 3
    assert one["stats"]["kept"] > 0 and one["stats"]["prompts_kept"] < 11  # some samples kept, some prompts not
    for t in two:
        assert t["kept"] == one["kept"]  # same rows, same completions, same order, on every rank
        assert t["stats"] == one["stats"]
    assert [sum(t["calls"]) for t in two] == [6 * 3, 5 * 3]  # each rank its own half of the prompts


@pytest.mark.slow
def test_sample_splits_rows_across_ranks_and_writes_once(tmp_path):
    """`r1train sample` under torchrun: every rank sampled and scored every row, and each opened samples.jsonl
    with "w" (the work repeated, the ranks racing on one file). Now rank r samples rows[r::world], each row seeded
    by its index in the rows (sample_rows: a completion depends on model, prompt and seed), and rank 0 writes
    the gathered samples once: two processes write the one-process file, every sample scored once, each rank
    its own share (4 and 3 of 7 prompts, 3 samples each)."""
    import json
    import subprocess

    args = ["sample", *H.FAST, "max_steps=7", "num_generations=3", "reward_funcs=accuracy,train_helpers:scored_where"]
    runs = {}
    for nproc in (1, 2):  # side by side
        out, scored = tmp_path / f"n{nproc}", tmp_path / f"scored{nproc}"
        scored.mkdir()
        runs[nproc] = (out, scored, subprocess.Popen(
            H.cli_cmd([*args, f"output_dir={out}"], nproc), env={**H.env(), "R1_TEST_SCORED": str(scored)},
            cwd=H.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    res = {}
    for nproc, (out, scored, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        assert stdout.count("wrote 21 samples") == 1, stdout  # rank 0 alone
        res[nproc] = ((out / "samples.jsonl").read_text(),
                      {p.name: p.read_text().splitlines() for p in sorted(scored.iterdir())})
    (one, _), (two, scored_by) = res[1], res[2]
    assert two == one and len(one.splitlines()) == 21
    prompts = [json.dumps(json.loads(ln)["prompt"]) for ln in one.splitlines()]
    assert sorted(scored_by) == ["rank0.jsonl", "rank1.jsonl"]
    assert sorted(scored_by["rank0.jsonl"] + scored_by["rank1.jsonl"]) == sorted(prompts)  # each sample once
    assert [len(scored_by[f"rank{k}.jsonl"]) for k in (0, 1)] == [4 * 3, 3 * 3]
    assert not [p.name for p in (tmp_path / "n2").iterdir() if p.name != "samples.jsonl"]  # no temporary file left


@pytest.mark.slow
def test_a_reward_error_on_one_rank_stops_every_rank(tmp_path):
    """A reward's bad output found on one rank (here rank 1's reward returns one value too few) raised there while
    the other rank went on into the step's next collective: it failed there with the transport's error (gloo: the
    peer closed the connection) or waited until the launcher killed it (NCCL), never naming the cause. Now every
    rank stops at that rollout with a RewardError: rank 1 the reward's, rank 0 naming rank 1 and it."""
    import subprocess

    args = ["grpo", *H.FAST, "max_steps=2", "num_generations=2", "per_device_train_batch_size=2",
            "reward_funcs=train_helpers:bad_on_rank1", f"output_dir={tmp_path / 'out'}"]
    r = subprocess.run(H.cli_cmd(args, 2), env=H.env(), cwd=H.ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "rank 1 stopped on its rewards: reward 'bad_on_rank1' returned" in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("reward 'bad_on_rank1' returned") >= 2, r.stderr[-3000:]  # rank 1's own error too


def test_cli_run_tears_down_its_process_group(tmp_path, capsys):
    """A finished CLI run destroys the process group it made (torch asks for destroy_process_group before a
    process exits; r1train left it to interpreter shutdown), so a second run in the same process builds a new
    one and trains the same; a group the caller made is left to the caller."""
    import json

    import torch.distributed as dist

    from r1train.cli import main

    args = ["grpo", *H.FAST, "max_steps=1", "seed=3", "eval_steps=0"]
    res = []
    for i in range(2):
        assert main([*args, f"output_dir={tmp_path / str(i)}"]) == 0
        assert not dist.is_initialized()
        res.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert res[0] == res[1]
    from r1train.engine import setup_distributed

    setup_distributed()
    assert main([*args, f"output_dir={tmp_path / 'own'}"]) == 0
    assert dist.is_initialized()  # conftest's fixture destroys it


def test_teardown_survives_a_failed_barrier(monkeypatch, caplog):
    """A rank whose end-of-run barrier fails (it timed out while rank 0 uploaded to wandb) still destroys its
    group and ends with a warning: the run's results are saved, so the exit is not a failure."""
    import torch.distributed as dist

    from r1train.engine import setup_distributed, teardown_distributed

    setup_distributed()

    def failed(*a, **k):
        raise dist.DistError("barrier timed out")
    monkeypatch.setattr(dist, "barrier", failed)
    with caplog.at_level("WARNING", logger="r1train"):
        teardown_distributed()
    assert not dist.is_initialized()
    assert "barrier failed" in caplog.text


def test_train_batch_size_checked_against_a_group_made_before_the_config(tmp_path, monkeypatch):
    """A process group made before the config loads (mp.spawn, a notebook) without WORLD_SIZE in the
    environment: the deepspeed file's train_batch_size is checked against that group's size, not 1."""
    import json

    from r1train.config import ConfigError, check_train_batch_size, load_config

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 2}}))
    cfg = load_config(overrides=["per_device_train_batch_size=8", "gradient_accumulation_steps=2"])
    cfg.deepspeed = str(path)
    check_train_batch_size(cfg, {"train_batch_size": 16})  # no group: the launch's 1 process
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda *a: 2)
    with pytest.raises(ConfigError, match=r"train_batch_size=16 .* = 8 x 2 x 2 = 32"):
        check_train_batch_size(cfg, {"train_batch_size": 16})
    check_train_batch_size(cfg, {"train_batch_size": 32})


if __name__ == "__main__":  # a worker process of the tests above: test_train_dist.py <worker> <args>
    import sys

    globals()[sys.argv[1]](*sys.argv[2:])
