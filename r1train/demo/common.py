"""What every demo stage shares: its configs, its data, the held-out evaluation (greedy and sampled), the
stage table, and the JSON + PNG outputs.

Held-out metrics (computed from the completion texts by `text_metrics`, so a test can recompute them):
accuracy (the accuracy reward: the last <answer> equals the gold answer), format (the format reward: exactly
<think>...</think><answer>...</answer>), mixing (share of completions whose chain of thought has a word
outside the target language, i.e. language reward < 1) and length (completion tokens, eos included).
"""

from __future__ import annotations

import json
import os
import time

import torch

from .. import pipeline
from ..config import CONFIG_DIR, TrainConfig, task_spec
from ..engine import setup_distributed
from ..grpo import GRPOTrainer
from ..rewards import accuracy_reward, format_reward, language_consistency_reward
from ..rollout import sample_rows
from ..sft import SFTTrainer
from ..tasks import arith


def configs(yaml_name: str, overrides, out_dir: str, sections: dict) -> list[TrainConfig]:
    """The stage's base config and one per section (section -> output subdirectory), loaded and checked before
    any work by the recipe's loader (pipeline.stage_configs: errors name the [section]; a section cannot change the
    model keys); output_dir is the stage's directory (key=value overrides of output_dir name the root).
    yaml_name: a file name in r1train/configs/, or a path (demo.run makes the user's --config absolute)."""
    path = yaml_name if os.sep in yaml_name else os.path.join(CONFIG_DIR, yaml_name)
    ov = [o for o in overrides if o.partition("=")[0].strip() != "output_dir"] + [f"output_dir={out_dir}"]
    return pipeline.stage_configs(path, ov, sections)


def problems(cfg: TrainConfig):
    """(train, held-out) problems of the stage's task spec; held-out expressions never appear in training."""
    return arith.split(cfg.task_train_size, cfg.task_eval_size, cfg.seed, task_spec(cfg))


# ---- metrics from texts
def _mixed(texts, language="en") -> list[float]:
    return [0.0 if v is None else float(v < 1.0) for v in language_consistency_reward(None, texts, language=language)]


def text_metrics(texts: list[str], answers: list[str], lengths: list[int], language: str = "en") -> dict:
    """accuracy, format, mixing and mean length over completions (answers[i] is texts[i]'s gold answer)."""
    n = max(len(texts), 1)
    return {"accuracy": sum(accuracy_reward(None, texts, answer=answers)) / n,
            "format": sum(format_reward(None, texts)) / n,
            "mixing": sum(_mixed(texts, language)) / n,
            "length": sum(lengths) / n}


@torch.no_grad()
def evaluate(model, tok, rows, cfg: TrainConfig, *, temperature: float | None = None, samples: int | None = None,
             batch_size: int = 100) -> dict:
    """Held-out metrics of greedy decoding and of sampling (pass@1 over `samples` draws at `temperature`):
    keys greedy/<m> and sampled/<m> for m in accuracy, format, mixing, length."""
    setup_distributed()
    was_training = model.training
    model.eval()
    temperature = cfg.eval_temperature if temperature is None else temperature
    samples = cfg.eval_num_samples if samples is None else samples
    out = {}
    for name, greedy, k in (("greedy", True, 1), ("sampled", False, samples)):
        texts, answers, lengths = [], [], []
        for _, chunk, ro, tx in sample_rows(model, tok, rows, num_samples=k, cfg=cfg, seed_key=(cfg.seed, "demo-eval"),
                                            greedy=greedy, temperature=temperature, batch_size=batch_size):
            texts += tx
            answers += [r["answer"] for r in chunk for _ in range(k)]
            lengths += ro.completion_mask_BT.sum(1).tolist()
        out.update({f"{name}/{m}": v for m, v in text_metrics(texts, answers, lengths, cfg.language).items()})
    out["eval_temperature"] = temperature
    model.train(was_training)
    return out


# ---- training on explicit rows
def sft(cfg: TrainConfig, model, tok, rows, source_rows=None):
    """source_rows: the prompts sampled rows were drawn from (a resume matches them; Trainer's docstring)."""
    t = SFTTrainer(cfg, model, tok, rows, [], source_rows=source_rows)
    t.train()
    t.finish()
    return t


def _curve_point(m: dict) -> dict:
    """`evaluate`'s metrics under the trainer's eval keys."""
    return {"eval/accuracy": m["sampled/accuracy"], "eval/accuracy_greedy": m["greedy/accuracy"]}


def grpo(cfg: TrainConfig, model, tok, rows, eval_rows, before: dict):
    """GRPO from `model`, whose held-out metrics are `before` (from `evaluate`) -> (trainer, metrics after).
    The accuracy curve's first and last points are these two evaluations, so each model is evaluated once;
    the points between come from the trainer's eval_steps."""
    t = GRPOTrainer(cfg, model, tok, rows, eval_rows)
    if cfg.eval_steps:  # once: a resumed stage finds it logged
        t.logger.log_once(0, _curve_point(before))
    t.train()
    t.save_final()  # before the evaluation: a stop there keeps every trained step
    after = evaluate(t.model, tok, eval_rows, cfg)
    t.logger.log_once(t.max_steps, _curve_point(after))
    t.finish()
    return t, after


def read_metrics(d: str) -> list[dict]:
    p = os.path.join(d, "metrics.jsonl")
    if not os.path.exists(p):
        return []
    with open(p) as fh:
        return [json.loads(x) for x in fh if x.strip()]


def curve(rows: list[dict], key: str) -> list[list[float]]:
    return [[r["step"], r[key]] for r in rows if isinstance(r.get(key), (int, float))]


# ---- report
COLUMNS = (("greedy/accuracy", "greedy acc"), ("sampled/accuracy", "pass@1"), ("greedy/format", "format"),
           ("sampled/format", "fmt@T"), ("greedy/mixing", "mixing"), ("sampled/mixing", "mix@T"),
           ("sampled/length", "length@T"))


def table(title: str, rows: list[tuple[str, dict]], notes: list[str] = ()) -> str:
    """The stage table: one line per model, held-out greedy/sampled accuracy, format, mixing, length."""
    w = max(len(r[0]) for r in rows) + 2
    head = f"{'':{w}}" + "".join(f"{c:>11}" for _, c in COLUMNS)
    lines = [f"== {title} ==", head]
    for name, m in rows:
        cells = []
        for k, _ in COLUMNS:
            v = m.get(k)
            cells.append(f"{'-':>11}" if v is None else f"{v:>11.1f}" if k.endswith("length") else f"{100 * v:>10.1f}%")
        lines.append(f"{name:{w}}" + "".join(cells))
    return "\n".join(lines + list(notes))


def plot(path: str, panels: dict[str, dict[str, list]]):
    """One panel per title, each a dict of label -> [[step, value], ...] (needs matplotlib; else skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = {t: s for t, s in panels.items() if any(s.values())}
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, pts in series.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_json(path: str, obj) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
    return path


class Clock:
    """Wall seconds per named phase."""

    def __init__(self):
        self.t0 = self.last = time.time()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.time()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self.last, 1)
        self.last = now
        return self.phases[name]

    def total(self) -> float:
        return round(time.time() - self.t0, 1)
