"""TRL's GRPOTrainer on the work of benchmarks/train_gpu.py: the same Qwen2.5-1.5B-shaped model (random
init, bf16), prompts, lengths, beta, num_iterations, micro-batches and reward -> seconds per generation
batch and peak memory, JSON. Gradient checkpointing off on both sides unless --gradient-checkpointing (TRL's
default is on; train_gpu.py's runs have it off). TRL runs its own defaults otherwise (transformers generate, no
vLLM; bf16 AdamW states under bf16=True, so its numerics are not ours; with num_iterations > 1 its old log-probs
come from one more no-grad forward of the batch, where r1train reuses the first iteration's; entropy computed in
every loss forward, as r1train's log_entropy default).

One r1train step = one generation batch = num_iterations optimizer steps; TRL counts optimizer steps, so
each generation batch here is num_iterations of TRL's steps, timed together.

    python benchmarks/train_trl_gpu.py results/train_trl_h200.json     # on the GPU (needs trl, datasets)
    python benchmarks/train_trl_gpu.py /tmp/trl_tiny.json --tiny       # CPU smoke test
    python benchmarks/train_trl_gpu.py out.json --use-r1kernels        # the same trainer on our kernels + engine
    python benchmarks/train_trl_gpu.py out.json --use-r1kernels --rollout-engine transformers  # TRL's generate
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.train_gpu import QWEN25_15B, TINY, _commit, checksum_reward, prompt_rows, random_model  # noqa: E402


def step_clock(marks: list):
    """A TrainerCallback appending the (device-synchronized) time at the end of each optimizer step."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
    return Clock()


PHASES = {"generate": "_generate", "logprobs (old, ref)": "_get_per_token_logps_and_entropies",
          "loss forward": "compute_loss"}


def phase_timers(trainer, events: list):
    """Wrap the trainer's generation, log-prob and loss methods and the accelerator's backward: each call
    appends (phase, start, seconds), device-synchronized. Log-prob calls made inside the loss count as loss."""
    import functools

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    inside = []

    def timed(phase, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if inside:
                return fn(*args, **kwargs)
            sync()
            t = time.perf_counter()
            inside.append(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                inside.pop()
                sync()
                events.append((phase, t, time.perf_counter() - t))
        return run
    for phase, name in PHASES.items():
        setattr(trainer, name, timed(phase, getattr(trainer, name)))
    trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)


def per_batch_phases(events, ends, num_iterations) -> list[dict]:
    """Seconds per phase in each generation batch (batch i spans ends[i * k] .. ends[(i + 1) * k])."""
    out = []
    for i in range(0, len(ends) - 1, num_iterations):
        lo, hi = ends[i], ends[min(i + num_iterations, len(ends) - 1)]
        d = {p: 0.0 for p in (*PHASES, "backward")}
        for phase, t, dt in events:
            if lo <= t < hi:
                d[phase] += dt
        out.append(d)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=4,
                   help="generation batches (the first is warm-up; the median of the rest, as train_gpu.py's)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--completion-length", type=int, default=512)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--num-iterations", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="TRL's default (True); off unless given, as in train_gpu.py's runs (the same work)")
    p.add_argument("--use-r1kernels", action="store_true",
                   help="wrap the trainer in r1kernels.integrations.trl.use_r1kernels (the one-line switch)")
    p.add_argument("--rollout-engine", default="r1train", choices=("transformers", "r1train"),
                   help="use_r1kernels' rollout_engine (with --use-r1kernels; its default r1train)")
    a = p.parse_args(argv)
    if a.tiny:
        a.prompt_length, a.completion_length, a.steps = 16, 16, 2

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from r1train.tasks import char_tokenizer

    shape = TINY if a.tiny else QWEN25_15B
    tok = char_tokenizer(vocab_size=shape["vocab_size"])
    model = random_model(shape, tok, torch.float32 if a.tiny else torch.bfloat16)
    # TRL builds its reference model from a path: save the random model and hand TRL the directory
    model_dir = os.path.splitext(a.out)[0] + "_trl_model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    n = a.prompts * a.num_generations
    rows = prompt_rows(a.prompts * (a.steps + 1), a.prompt_length)
    args = GRPOConfig(
        output_dir=os.path.splitext(a.out)[0] + "_trl_run", per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=n // a.micro_batch, num_generations=a.num_generations,
        max_completion_length=a.completion_length, beta=a.beta, num_iterations=a.num_iterations,
        max_steps=a.steps * a.num_iterations, learning_rate=1e-6, bf16=not a.tiny, logging_steps=1,
        report_to="none", save_strategy="no", temperature=1.0, use_cpu=a.tiny, disable_tqdm=True,
        gradient_checkpointing=a.gradient_checkpointing,
        model_init_kwargs={"dtype": "float32" if a.tiny else "bfloat16"})
    marks = []
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[checksum_reward], args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[step_clock(marks)])
    if a.use_r1kernels:
        from r1kernels.integrations.trl import use_r1kernels
        trainer = use_r1kernels(trainer, rollout_engine=a.rollout_engine)
    events = []
    phase_timers(trainer, events)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    ends = [t0] + marks
    per_batch = [ends[i + a.num_iterations] - ends[i] for i in range(0, len(marks), a.num_iterations)]
    timed = per_batch[1:] if len(per_batch) > 1 else per_batch
    phases = per_batch_phases(events, ends, a.num_iterations)
    phases_timed = phases[1:] if len(phases) > 1 else phases
    res = {"benchmark": "train_trl_gpu", "trl": __import__("trl").__version__, "use_r1kernels": a.use_r1kernels,
           "rollout_engine": a.rollout_engine if a.use_r1kernels else "transformers",
           "model": "tiny" if a.tiny else "Qwen2.5-1.5B-shaped (random init)",
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": _commit(), "torch": torch.__version__, "args": vars(a), "completions_per_batch": n,
           "seconds_per_generation_batch": per_batch, "median_seconds": statistics.median(timed),
           # device-synchronized phase totals per generation batch (medians over the timed batches)
           "median_phase_seconds": {p: statistics.median(d[p] for d in phases_timed) for p in phases[0]},
           "phase_seconds_per_generation_batch": phases,
           "log": [h for h in trainer.state.log_history if "loss" in h],
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print("TRL seconds per generation batch:", per_batch, "median", res["median_seconds"], "peak GiB",
          res["peak_memory_gib"], "phases", json.dumps(res["median_phase_seconds"]))
    return res


if __name__ == "__main__":
    main()
