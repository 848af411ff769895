"""Shared bits of the trainer tests: small configs, a dense reward that random models can climb, and a
subprocess runner (torchrun / killable runs) with a fresh port and the kernel backend pinned to torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny + fast: 1 layer, short completions; the reference kernels (tests set TRITON_INTERPRET=1, which
# would otherwise route CPU tensors through the slow Triton interpreter)
FAST = ["model_hidden_size=32", "model_num_layers=1", "max_completion_length=8", "num_generations=4",
        "per_device_train_batch_size=8", "gradient_accumulation_steps=1", "learning_rate=0.01",
        "disable_tqdm=true", "report_to=none", "kernel_backend=torch", "task_train_size=64",
        "task_eval_size=8", "logging_steps=0", "save_steps=0"]


def digit_share(prompts, completions, completion_ids=None, **_):
    """Share of characters that are digits: random tiny models start near 10%; GRPO pushes it up.
    (Chat-message prompts give TRL's conversational completions: [{"role": "assistant", "content": ...}].)"""
    from r1train.rewards import completion_text

    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in texts]


def half_constant(prompts, completions, completion_ids=None, **kw):
    """digit_share, except for prompts with an even checksum, which get 0.5 whatever the completion: their
    groups carry no learning signal (what dynamic sampling drops)."""
    import zlib

    from r1train.rewards import completion_text

    ds = digit_share(prompts, completions, completion_ids)
    return [0.5 if zlib.crc32(completion_text(p).encode()) % 2 == 0 else d for p, d in zip(prompts, ds)]


def scored_where(prompts, completions, completion_ids=None, **_):
    """0 for every sample; appends each prompt it scores (as JSON) to $R1_TEST_SCORED/rank<RANK>.jsonl: which
    process scored which samples."""
    path = os.path.join(os.environ["R1_TEST_SCORED"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in prompts)
    return [0.0] * len(completions)


def bad_on_rank1(prompts, completions, completion_ids=None, **_):
    """0 for every sample on rank 0; on rank 1 one value too few (a RewardError of that rank alone)."""
    n = len(completions) - (os.environ.get("RANK") == "1")
    return [0.0] * n


def env():
    e = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        e.pop(k, None)
    e["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"
    return e


def cli_cmd(args, nproc: int = 1, launcher: str = "torchrun"):
    from r1train.engine import free_port

    if nproc == 1:
        cmd = [sys.executable, "-m", "r1train", *args]
    elif launcher == "accelerate":
        # --multi_gpu is accelerate's torchrun mode (it starts the processes on CPU too; --cpu starts one)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={nproc}", "--multi_gpu",
               "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
               f"--main_process_port={free_port()}", "-m", "r1train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "r1train", *args]
    return cmd


def run_cli(args, nproc: int = 1, timeout: int = 600, launcher: str = "torchrun", **kw):
    cmd = cli_cmd(args, nproc, launcher)
    return subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)


class BackgroundCLI:
    """A one-process CLI run started in the background, beside the caller's own run (each CLI process runs one
    thread: two share the CI machine's 2 cores instead of taking turns); stderr goes to err_path. wait() asserts
    it exited cleanly; leaving the `with` block (or stop()) kills it if it still runs."""

    def __init__(self, args, err_path):
        self.err = open(err_path, "w+")
        self.proc = subprocess.Popen(cli_cmd(args), env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.err)

    def wait(self, timeout: int = 600):
        rc = self.proc.wait(timeout=timeout)
        self.err.seek(0)
        assert rc == 0, self.err.read()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def read_metrics(output_dir):
    """Training rows of metrics.jsonl (the eval-only rows that GRPO's CLI adds are left out)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(ln) for ln in fh if ln.strip()]
    return [r for r in rows if "loss" in r]


def is_timing(key: str) -> bool:
    """step_time and every time/<phase>: metrics that differ between runs of the same work."""
    return key == "step_time" or key.startswith("time/")


def strip_timing(rows):
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in rows]


def grpo_trainer(output_dir, *overrides, reward_funcs=None):
    """An in-process GRPOTrainer on the FAST tiny config (overrides after it win)."""
    from r1train.config import load_config
    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_datasets, load_model_and_tokenizer

    cfg = load_config(overrides=FAST + [f"output_dir={output_dir}", *overrides])
    model, tok = load_model_and_tokenizer(cfg)
    train, ev = load_datasets(cfg)
    return GRPOTrainer(cfg, model, tok, train, ev, reward_funcs=reward_funcs)
