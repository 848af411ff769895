"""Metrics sinks: metrics.jsonl and completions.jsonl (every step), PNG curves, and the `report_to` backends
through each library's own client: TensorBoard (when installed), Weights & Biases, Trackio. Only rank 0
writes. The backends get the completions table when the trainer asks (TRL's log_completions)."""

from __future__ import annotations

import json
import logging
import math
import os
import time

from .durable import posix_fsync, write_replace

log = logging.getLogger("r1train")


BACKENDS = ("tensorboard", "wandb", "trackio")


def backend_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def resolve_report_to(report_to) -> list[str]:
    """report_to (a name, a list, 'all' = every installed backend, 'none') -> backend names."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if names == ["all"]:
        return [b for b in BACKENDS if backend_installed(b)]
    return [] if names == ["none"] else names


# The GRPO step's phases, in the order GRPOTrainer.train_step marks them (time/<phase> in its metrics)
STEP_PHASES = ("generate", "rewards", "logprobs", "forward", "backward", "optimizer")


class PhaseClock:
    """Seconds per phase of one step on the device's timeline. mark(phase) ends the running phase where the
    host has queued its work (a CUDA event on the current stream: no host sync) and starts `phase`; mark(None)
    ends the last one. seconds(), called after the step's metric read (which waits for the device), sums each
    phase's intervals. So a phase is charged the device time of the work queued inside it, not the host time of
    queuing it (host timers charged the reference log-probs' GPU work to whichever later call first waited).
    On CPU the work is synchronous: perf_counter."""

    def __init__(self, device):
        import torch  # here, not at import: reading and plotting metrics needs no torch

        self.cuda = torch.device(device).type == "cuda"
        self._event = torch.cuda.Event if self.cuda else None
        self.marks: list = []

    def mark(self, phase: str | None):
        if self.cuda:
            now = self._event(enable_timing=True)
            now.record()
        else:
            now = time.perf_counter()
        self.marks.append((phase, now))

    def seconds(self) -> dict[str, float]:
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        out: dict[str, float] = {}
        for (phase, a), (_, b) in zip(self.marks, self.marks[1:]):
            if phase is not None:
                out[phase] = out.get(phase, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


class MetricsLogger:
    def __init__(self, output_dir: str, *, rank: int = 0, report_to=(), resume_step: int = 0,
                 config: dict | None = None):
        self.dir, self.rank = output_dir, rank
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.comp_path = os.path.join(output_dir, "completions.jsonl")
        self.sinks: dict = {}
        if rank != 0:
            return
        os.makedirs(output_dir, exist_ok=True)
        # a resumed run continues the files: drop lines past the checkpoint (written after it, then lost), and a
        # line that does not parse (a run killed while writing it: its last line, past the checkpoint too)
        past = 0  # the last step metrics.jsonl held past the checkpoint (0: none)
        for p in (self.path, self.comp_path):
            keep = []
            for ln in _read(p) if resume_step else []:
                row = _parse(ln)
                if row is None:
                    log.warning("%s: dropped a line that is not a JSON object (a partly written line?): %r",
                                p, ln[:80])
                elif row.get("step", 0) <= resume_step:
                    keep.append(ln if ln.endswith("\n") else ln + "\n")
                elif p == self.path and isinstance(row.get("step"), int):
                    past = max(past, row["step"])
            # written beside it, then renamed over it: a failure or kill part way (disk full, SIGKILL) leaves the
            # old file whole (truncating it in place lost every earlier line)
            write_replace(p, "".join(keep))
        try:
            for name in resolve_report_to(report_to):
                sink = _open(name, output_dir, config or {}, resume_step=resume_step)
                if sink is not None:
                    self.sinks[name] = sink
        except BaseException:
            self.close()  # the backends opened before the one that failed
            raise
        if past and "wandb" in self.sinks:
            # wandb takes only increasing steps and its history rewind (wandb.init resume_from) is a private
            # preview: the run keeps what the run before the resume logged past the checkpoint
            log.warning("wandb run %s holds steps %d-%d from the run before this resume; wandb drops this run's "
                        "values at those steps (metrics.jsonl and TensorBoard hold this run's)",
                        getattr(self.sinks["wandb"], "id", "?"), resume_step + 1, past)

    def sync(self):
        """metrics.jsonl and completions.jsonl on disk (fsync; rank 0): a checkpoint published after this has every
        row up to its step on disk, so a power loss loses no row that a resume from it keeps."""
        if self.rank != 0:
            return
        for p in (self.path, self.comp_path):
            if os.path.exists(p):
                posix_fsync(p)

    def log(self, step: int, metrics: dict):
        if self.rank != 0:
            return
        row = _row(step, metrics)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
        nums = backend_names({k: v for k, v in row.items()
                              if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)})
        for name, sink in self.sinks.items():
            if name == "tensorboard":
                for k, v in nums.items():
                    sink.add_scalar(k, v, step)
            else:  # wandb and trackio share the call; TRL's x-axis key beside the metrics, as its callbacks send it
                sink.log({**nums, "train/global_step": step}, step=step)

    def log_once(self, step: int, metrics: dict):
        """log, unless metrics.jsonl already has a row at this step holding every key of metrics (an evaluation
        at the end of a stage that a rerun with resume_from_checkpoint=latest finds already finished)."""
        if self.rank == 0 and self.logged(step, metrics) is None:
            self.log(step, metrics)

    def logged(self, step: int, keys) -> dict | None:
        """metrics.jsonl's first row at `step` that holds every key of `keys` (None: there is none; on ranks
        other than 0 always None)."""
        if self.rank != 0:
            return None
        for ln in _read(self.path):
            row = _parse(ln)
            if row is not None and row.get("step") == step and all(k in row for k in keys):
                return row
        return None

    def log_completions(self, step: int, rows: list[dict], *, to_backends: bool = False):
        """completions.jsonl always; the backends (a table of step, prompt, completion, reward, advantage)
        when to_backends. Every rank calls it with its own rows: they are gathered to rank 0 in rank order (as
        TRL's gather_object), so the files and the table hold every process's completions (rank 0's only, before).
        """
        rows = gather_rows(rows)
        if self.rank != 0 or not rows:
            return
        # standard JSON as metrics.jsonl (a NaN advantage was a bare NaN token; a numpy / tensor log_extra value a
        # TypeError after part of the step's rows), every line built before the file is touched
        text = "".join(json.dumps(_row(step, r), allow_nan=False) + "\n" for r in rows)
        with open(self.comp_path, "a") as fh:
            fh.write(text)
        if not to_backends:
            return
        # every row's columns: log_extra's are each rank's own (a KeyError on rank 0 where rank 0 had one that
        # another rank's rows lack; a column only later ranks had was left out)
        cols = ["step", *dict.fromkeys(k for r in rows for k in r)]
        data = [[step, *(_py(r.get(k)) for k in cols[1:])] for r in rows]
        for name, sink in self.sinks.items():
            if name == "tensorboard":
                head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
                body = "".join("| " + " | ".join(str(x).replace("|", "\\|").replace("\n", " ") for x in d) + " |\n"
                               for d in data)
                sink.add_text("completions", head + body, step)
            else:
                table_cls = getattr(__import__(name), "Table", None)
                if table_cls is not None:
                    sink.log({"completions": table_cls(columns=cols, data=data)}, step=step)

    def close(self):
        for name, sink in self.sinks.items():
            if name == "tensorboard":
                sink.close()
            else:
                sink.finish()
        self.sinks = {}

    def plot(self, keys=("reward", "rewards/accuracy/mean", "eval/accuracy", "kl", "completions/mean_length"),
             name="curves.png"):
        """One panel per key found in metrics.jsonl (needs matplotlib; skipped quietly without it)."""
        if self.rank != 0:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = [json.loads(ln) for ln in _read(self.path)]
        keys = [k for k in keys if any(k in r for r in rows)]
        if not keys:
            return None
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_title(k)
            ax.set_xlabel("step")
        fig.tight_layout()
        out = os.path.join(self.dir, name)
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out


def backend_names(metrics: dict) -> dict:
    """metrics under the names the report_to backends get in TRL: transformers' TensorBoard, W&B and Trackio
    callbacks rename the logs (rewrite_logs) to eval/<name> for eval_<name>, test/<name> for test_<name> and
    train/<name> for every other key. r1train's evaluation keys, eval/<name>, already have their eval name and
    keep it. metrics.jsonl keeps the bare names (TRL's log_history)."""
    out = {}
    for k, v in metrics.items():
        prefix = next((p for p in ("eval", "test") if k.startswith((p + "_", p + "/"))), None)
        out[f"{prefix}/{k[len(prefix) + 1:]}" if prefix else f"train/{k}"] = v
    return out


def gather_rows(rows: list) -> list:
    """Every rank's rows, concatenated in rank order, on rank 0 ([] on the others); the rows themselves in one
    process. A collective: every rank of the process group calls it."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return list(rows)
    rank = dist.get_rank()
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(list(rows), parts, dst=0)
    return [r for part in parts for r in part] if rank == 0 else []


def _read(p):
    if not os.path.exists(p):
        return []
    with open(p) as fh:
        return [ln for ln in fh if ln.strip()]


def _parse(line: str) -> dict | None:
    """One line of metrics.jsonl / completions.jsonl as a dict; None if it is not one (e.g. cut by a kill)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _row(step: int, values: dict) -> dict:
    """{"step": step, **values} as standard JSON (_py): standard JSON has no NaN / inf, so such a value is written
    as null and named, with its value, under "nonfinite" (e.g. {"loss": "nan"}), so the row keeps what a
    diverged step logged."""
    row = {"step": step, **{k: _py(v) for k, v in values.items()}}
    bad = {k: str(_item(v)) for k, v in values.items() if row[k] is None and _item(v) is not None}
    if bad:
        row["nonfinite"] = bad
    return row


def _item(v):
    return v.item() if hasattr(v, "item") else v


def _py(v):
    """A metric value as standard JSON: tensors / numpy scalars as Python numbers, NaN / inf as None (also inside
    lists and dicts)."""
    v = _item(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_py(x) for x in v]
    if isinstance(v, dict):
        return {k: _py(x) for k, x in v.items()}
    return v


# WANDB_RUN_ID -> the output_dir whose fresh run took it in this process: one id names one run, so a pipeline's
# later stages (other output_dirs, steps from 1 again, which wandb would drop below the run's last step) get new ids
_ENV_RUN_IDS: dict[str, str] = {}


def _open(name: str, output_dir: str, config: dict, resume_step: int = 0):
    """The backend's client; a resumed training run continues the backend run it started (wandb: its id is
    kept in output_dir), a fresh one starts a new run: under the environment's WANDB_RUN_ID (and WANDB_RESUME)
    where the user set them, as wandb documents them, else under a new id."""
    if not backend_installed(name):  # named (not through 'all'): TrainConfig.validate says so before any work
        raise ImportError(f"report_to lists {name!r}, which is not installed (pip install {name})")
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        # resumed: hide the events that the killed run logged past the checkpoint (metrics.jsonl drops its lines
        # past it), else TensorBoard shows both runs' values at those steps
        return SummaryWriter(os.path.join(output_dir, "runs"), purge_step=resume_step + 1 if resume_step else None)
    resume = resume_step > 0
    mod = __import__(name)
    id_path = os.path.join(output_dir, f".{name}_run_id")
    run_name = os.path.basename(os.path.abspath(output_dir))
    project = os.environ.get(f"{name.upper()}_PROJECT", "r1train")
    if name == "wandb":
        import uuid

        stored = _stored_run_id(id_path) if resume else None
        env_id = os.environ.get("WANDB_RUN_ID", "").strip() or None  # empty: unset (wandb rejects id "")
        if stored is not None:  # a resume continues the stored run, whatever the environment says now
            if env_id is not None and env_id != stored:
                log.warning("WANDB_RUN_ID=%s is ignored: the resumed run continues wandb run %s (%s)", env_id,
                            stored, id_path)
            kw = dict(id=stored, resume="allow")
        elif env_id is not None and _ENV_RUN_IDS.setdefault(env_id, os.path.abspath(output_dir)) != \
                os.path.abspath(output_dir):  # a later stage of a pipeline: its steps restart at 1
            log.warning("WANDB_RUN_ID=%s names the wandb run of %s, started in this process; %s starts a new run",
                        env_id, _ENV_RUN_IDS[env_id], output_dir)
            kw = dict(id=uuid.uuid4().hex[:12], resume="allow")
        elif env_id is not None:  # the user's id and resume policy, passed on: wandb.init would read them from the
            # environment only at its first call in the process (its settings then stay for later runs)
            kw = dict(id=env_id)
            if os.environ.get("WANDB_RESUME", "").strip():
                kw["resume"] = os.environ["WANDB_RESUME"].strip()
        else:
            kw = dict(id=uuid.uuid4().hex[:12], resume="allow")
        run = _init(mod, name, project=project, name=run_name, dir=output_dir, config=config, **kw)
        run_id = getattr(run, "id", None) or kw["id"]  # the id wandb runs under, kept for a resume
    else:  # trackio: wandb-style init / log / finish
        run_id = None
        run = _init(mod, name, project=project, name=run_name, config=config)
    if run_id is not None:  # written beside it, then renamed over it: a kill part way leaves the old id whole
        write_replace(id_path, run_id)
    return run


def _init(mod, backend: str, **kw):
    """mod.init(**kw); its failure (wandb without a login, no network) is a ConfigError naming report_to: the CLI
    prints one line, not the client's traceback."""
    from .config import ConfigError

    try:
        return mod.init(**kw)
    except Exception as e:
        hint = " (log in with `wandb login` or WANDB_API_KEY, or set WANDB_MODE=offline)" if backend == "wandb" else ""
        raise ConfigError(f"report_to: {backend}.init failed: {type(e).__name__}: {e}{hint}") from e


def _stored_run_id(path: str) -> str | None:
    """The run id a resumed run continues (written by the run that made the checkpoint); None where there is
    none: no file (that run had no such backend), or an empty one (wandb rejects an empty id), with a warning."""
    try:
        with open(path) as fh:
            run_id = fh.read().strip()
    except FileNotFoundError:
        return None
    if not run_id:
        log.warning("%s is empty: the resumed run starts a new backend run", path)
    return run_id or None
