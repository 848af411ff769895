"""`r1train demo --stage zero|default|language|rejection|distill|all`: what each DeepSeek-R1 stage does, on
the built-in arithmetic task and tiny models, on a laptop CPU. Every stage prints its table (held-out
greedy and sampled accuracy, format, language mixing, length) and writes <stage>_results.json and
<stage>_curves.png under its output directory (outputs/demo/ for the default stage, outputs/demo/<stage>/
for the others; `output_dir=`, or an output_dir in the --config file, moves the root).
"""

from __future__ import annotations

import os

STAGES = ("zero", "default", "language", "rejection", "distill")
CHOICES = STAGES + ("all",)  # `--stage` (the CLI imports this module, so the stages load only in run())
ROOT = os.path.join("outputs", "demo")


def out_dir(stage: str, overrides) -> str:
    """The stage's directory under the root that the last `output_dir=` override names, read as load_config reads
    it (quotes removed, `output_dir = x` too)."""
    from ..config import fields, parse_override

    root = ROOT
    for o in overrides:
        k, _, raw = o.partition("=")
        if k.strip() == "output_dir":
            root = parse_override(next(x for x in fields() if x.name == "output_dir"), raw) or ROOT
    return root if stage == "default" else os.path.join(root, stage)


def run(stage: str = "default", overrides=(), ctx: dict | None = None, config: str | None = None) -> dict:
    """One stage, or every stage in order ("all"); returns {stage: results}. config: a YAML file replacing
    the default stage's demo.yaml (ctx["config"]; the other stages read ctx["<stage>_config"] if set)."""
    from . import stages

    if stage not in CHOICES:
        raise ValueError(f"--stage: {stage!r} is not one of {', '.join(CHOICES)}")
    ctx = {} if ctx is None else ctx
    if config is not None:  # the user's file, as given (relative to the working directory)
        from ..config import read_config_file

        ctx["config"] = os.path.abspath(config)
        root = read_config_file(config).get("output_dir")
        if root is not None:  # the file's output_dir names the root, as for any command; key=value ones win
            overrides = [f"output_dir={root}", *overrides]
    todo = STAGES if stage == "all" else (stage,)
    return {s: getattr(stages, s)(list(overrides), out_dir(s, overrides), ctx) for s in todo}
