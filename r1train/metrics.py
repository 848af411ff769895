"""Metrics sinks: metrics.jsonl (every step), TensorBoard when installed, completions.jsonl, PNG curves.
Only rank 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os

log = logging.getLogger("r1train")


class MetricsLogger:
    def __init__(self, output_dir: str, *, rank: int = 0, report_to: str = "tensorboard", resume_step: int = 0):
        self.dir, self.rank = output_dir, rank
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.comp_path = os.path.join(output_dir, "completions.jsonl")
        self.tb = None
        if rank != 0:
            return
        os.makedirs(output_dir, exist_ok=True)
        # a resumed run continues the files: drop lines past the checkpoint (written after it, then lost)
        for p in (self.path, self.comp_path):
            keep = [ln for ln in _read(p) if json.loads(ln).get("step", 0) <= resume_step] if resume_step else []
            with open(p, "w") as fh:
                fh.writelines(keep)
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "runs"))
            except ImportError:
                log.info("tensorboard not installed; metrics go to metrics.jsonl only")

    def log(self, step: int, metrics: dict):
        if self.rank != 0:
            return
        row = {"step": step, **{k: _py(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def log_completions(self, step: int, rows: list[dict]):
        if self.rank != 0 or not rows:
            return
        with open(self.comp_path, "a") as fh:
            for r in rows:
                fh.write(json.dumps({"step": step, **r}) + "\n")

    def close(self):
        if self.tb is not None:
            self.tb.close()

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


def _read(p):
    if not os.path.exists(p):
        return []
    with open(p) as fh:
        return [ln for ln in fh if ln.strip()]


def _py(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
