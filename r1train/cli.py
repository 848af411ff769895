"""`r1train {demo,sft,grpo,sample,distill,pipeline,merge} [--config x.yaml] [key=value ...]`.

Config precedence: defaults < YAML top level < the YAML section of the command (sft:, grpo:, ...) <
key=value. `r1train <command> --help-config` lists every key with its default and meaning.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from .demo import CHOICES

COMMANDS = {
    "demo": "the R1 stages on the built-in task and tiny models (--stage zero|default|language|rejection|distill|"
            "all; default: cold-start SFT then GRPO); prints each stage's held-out table",
    "sft": "supervised fine-tuning (prompt-completion rows)",
    "grpo": "GRPO reinforcement learning with rule rewards",
    "sample": "sample num_generations completions per prompt (the first max_steps prompts; -1: all), score "
              "them, write output_dir/samples.jsonl",
    "distill": "SFT a student on a teacher's correct samples (teacher_model=...)",
    "pipeline": "the R1 recipe: cold-start SFT -> RL -> rejection-sampling SFT -> RL (with --config); with no "
                "--config, every demo stage (= demo --stage all)",
    "merge": "merge a LoRA checkpoint (adapter_path=...) into model_name_or_path; save to output_dir",
}

def parse(argv):
    p = argparse.ArgumentParser(prog="r1train", description="GRPO / SFT trainer on DeepSpeed with r1kernels")
    p.add_argument("command", nargs="?", choices=sorted(COMMANDS),
                   help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    p.add_argument("--config", default=None, help="YAML file of config keys (see --help-config)")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    p.add_argument("--stage", default=None, choices=CHOICES, help="demo: " + " | ".join(CHOICES))
    # the launcher's: deepspeed passes --local_rank, torch.distributed.launch --local-rank
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_intermixed_args(argv)  # `cmd --config x.yaml k=v` and `cmd k=v --config x.yaml`
    if a.command is None and not a.help_config:
        p.error(f"a command is required: one of {', '.join(sorted(COMMANDS))}")
    if a.stage is not None and not a.help_config and not (
            a.command == "demo" or (a.command == "pipeline" and a.config is None)):
        p.error(f"--stage picks a demo stage: it applies to demo (and pipeline without --config), not to "
                f"{a.command}{' --config' if a.command == 'pipeline' else ''}")
    return a


def cmd_sample(args):
    """Under N processes rank r samples and scores rows[r::N] (each row seeded by its index in rows, as rejection
    sampling: the samples of one process); rank 0 writes every row's samples, in the rows' order, once."""
    import torch
    import torch.distributed as dist

    from .config import ConfigError, load_config, warn_unread_keys
    from .engine import device, setup_distributed
    from .loading import load_datasets, load_model_and_tokenizer
    from .rewards import RewardRunner
    from .rollout import sample_rows

    cfg = load_config(args.config, args.overrides, section="grpo")
    warn_unread_keys("sample", cfg)
    path = os.path.join(cfg.output_dir, "samples.jsonl")
    if os.path.isfile(path) and os.path.getsize(path) and not cfg.overwrite_output_dir:
        raise ConfigError(f"output_dir: {path} holds earlier samples; set overwrite_output_dir=true to replace "
                          "them, or choose another output_dir")
    _check_writable_dir(cfg.output_dir)  # before the model loads: the samples are written only at the end
    rank, world = setup_distributed()
    model, tok = load_model_and_tokenizer(cfg)
    model = model.to(device())
    rows, _ = load_datasets(cfg)
    rows = rows[:cfg.max_steps] if cfg.max_steps > 0 else rows
    runner = RewardRunner(cfg.reward_funcs, cfg, timeout=cfg.reward_timeout)
    mine = []  # per row of rows[rank::world]: its samples' output rows
    with torch.no_grad():
        for _, chunk, ro, texts in sample_rows(model, tok, rows[rank::world], num_samples=cfg.num_generations,
                                               cfg=cfg, seed_key=(cfg.seed,), batch_size=16,
                                               index=lambda i: rank + i * world):
            mine += _sample_records(runner, cfg, tok, chunk, ro, texts)
    if world > 1:  # rank 0: every rank's rows; row g sits at position g // world of rank g % world's list
        every = [None] * world if rank == 0 else None
        dist.gather_object(mine, every, dst=0)
        if rank != 0:
            return
        mine = [every[g % world][g // world] for g in range(len(rows))]
    _write_jsonl(path, [s for samples in mine for s in samples])
    print(f"wrote {len(rows) * cfg.num_generations} samples to {path}")


def _sample_records(runner, cfg, tok, chunk, ro, texts) -> list[list[dict]]:
    """Per row of chunk, its num_generations samples scored by runner: the row's columns, then completion,
    rewards and reward_failed (a dataset column of one of these names is kept as dataset_<name>)."""
    from .data import reward_columns

    G = cfg.num_generations
    ids_list = [[t for t, k in zip(a, b) if k] for a, b in zip(ro.completion_ids_BT.tolist(),
                                                                ro.completion_mask_BT.tolist())]
    cols = reward_columns(chunk, G, cfg.answer_column)
    prompts = [r["prompt"] for r in chunk for _ in range(G)]
    table, failed = runner(prompts, texts, ids_list, cols, prompts_text=ro.prompt_texts)
    out = [[] for _ in chunk]
    for i, t in enumerate(texts):
        own = {"completion": t, "rewards": dict(zip(runner.names, table[i])), "reward_failed": failed[i]}
        row = dict(chunk[i // G])
        for k in own:
            if k in row:  # dataset_<k>, or dataset_dataset_<k> ... until the name is free
                name = f"dataset_{k}"
                while name in row or name in own:
                    name = f"dataset_{name}"
                row[name] = row.pop(k)
        row.update(own)
        out[i // G].append(row)
    return out


def _check_writable_dir(d: str):
    """d is a directory this process can write a file in (created if missing); else a ConfigError naming
    output_dir."""
    import tempfile

    from .config import ConfigError

    try:
        os.makedirs(d, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir: cannot write to {d!r}: {e}") from e


def _write_jsonl(path: str, records):
    """path: one line of standard JSON per record (as metrics.jsonl's rows: numpy / torch numbers as numbers, NaN
    and inf as null; any other value JSON lacks, e.g. a dataset's dates, as its str), replaced whole
    (durable.write_replace)."""
    from .durable import write_replace
    from .metrics import _py

    write_replace(path, "".join(json.dumps(_py(r), allow_nan=False, default=str) + "\n" for r in records))


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError, TrainConfig, check_grpo_config, launch_rank, load_config, warn_unread_keys
    from .data import DatasetError
    from .rewards import RewardError

    if args.help_config:
        print(TrainConfig().help())
        return 0
    if args.local_rank is not None:  # the device comes from LOCAL_RANK (engine.init_distributed); the env wins
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import torch.distributed as dist

    from . import pipeline
    from .checkpoint import TrainingInterrupted
    from .engine import TrainingDiverged

    owns_group = not dist.is_initialized()  # the run's process group, torn down after a run every rank finished
    # SIGTERM outside the training loop (loading, evaluation): stop like Ctrl-C, with no traceback. Inside
    # the loop, the first SIGINT / SIGTERM saves a checkpoint after the current step (checkpoint.StopOnSignal);
    # after the last step the final checkpoint is saved before the final evaluation (Trainer.finish_stage).
    catch_term = _main_thread() and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    prev_term = signal.signal(signal.SIGTERM, _raise_interrupted) if catch_term else None
    try:
        if args.command == "demo" or (args.command == "pipeline" and args.config is None):
            from . import demo

            stage = args.stage or ("all" if args.command == "pipeline" else "default")
            if args.config is not None and stage != "default":
                raise ConfigError("--config: only the default demo stage takes a config file (the others read "
                                  "r1train/configs/demo_<stage>.yaml); override keys with key=value")
            demo.run(stage, args.overrides, config=args.config)
        elif args.command == "pipeline":
            print(json.dumps(pipeline.recipe(args.config, args.overrides), indent=1))
        elif args.command == "distill":
            print(json.dumps(pipeline.distill(args.config, args.overrides), indent=1))
        elif args.command == "sample":
            cmd_sample(args)
        elif args.command == "merge":
            from .loading import merge_lora

            print(merge_lora(load_config(args.config, args.overrides)))
        else:
            from .loading import load_model_and_tokenizer

            cfg = load_config(args.config, args.overrides, section=args.command)
            warn_unread_keys(args.command, cfg)
            if args.command == "grpo":  # before the model loads
                check_grpo_config(cfg)
            model, tok = load_model_and_tokenizer(cfg)
            if args.command == "sft":
                _, res = pipeline.run_sft(cfg, model, tok)
            else:
                _, before, res = pipeline.run_grpo(cfg, model, tok, eval_before=True)
                res = {**{f"before/{k}": v for k, v in before.items()}, **res}
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(json.dumps(res))
        if owns_group:
            from .engine import teardown_distributed

            teardown_distributed()
    except (ConfigError, DatasetError, RewardError) as e:
        print(f"r1train: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"r1train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # TrainingInterrupted (a signal; maybe a checkpoint saved) or Ctrl-C
        signum = e.signum if isinstance(e, TrainingInterrupted) else signal.SIGINT
        if launch_rank() == 0:
            print(f"r1train: {e if isinstance(e, TrainingInterrupted) else 'interrupted (SIGINT)'}", file=sys.stderr)
        return 128 + signum
    finally:
        if prev_term is not None:
            signal.signal(signal.SIGTERM, prev_term)
    return 0


def _raise_interrupted(signum, frame):
    from .checkpoint import TrainingInterrupted

    raise TrainingInterrupted(signum)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
