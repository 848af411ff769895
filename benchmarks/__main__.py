"""python -m benchmarks [--quick] [--only a,b] [--out DIR]: runs every benchmarks/bench_*.py that imports.
On CPU, --quick (the default there) runs small shapes as a smoke test; on CUDA, DESIGN.md's shapes."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import torch

from .harness import run_cases


def _whole_run_argv(name: str, device: str, out: str | None) -> list[str]:
    """A whole-run benchmark's arguments. bench_memory trains in a child process per configuration, on its own
    device (the GPU, where the runner starts it only by name; on CPU its --cpu-smoke run of one configuration),
    and writes one JSON file."""
    if name == "memory":
        smoke = ["--cpu-smoke", "--max-steps", "1", "--configs", "1.5b-lora64"] if device == "cpu" else []
        return [*smoke, *(["--out", os.path.join(out, "bench_memory.json")] if out else [])]
    return ["--device", device, *(["--out", out] if out else [])]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    p.add_argument("--quick", action="store_true", help="small shapes (always on for CPU)")
    p.add_argument("--only", default="", help="comma-separated bench names, e.g. logprob,grpo")
    p.add_argument("--out", default=None, help="directory for bench_<name>.json / .png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    quick = a.quick or a.device == "cpu"
    only = {s for s in a.only.split(",") if s}
    import benchmarks
    names = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__)
                   if m.name.startswith("bench_"))
    failed = []
    for name in names:
        if only and name not in only:
            continue
        if name == "memory" and not only and a.device != "cpu":  # minutes of training: asked for by name only
            print("bench_memory: skipped (a GRPO run per configuration, up to its 540 s budget): --only memory "
                  "or benchmarks/gpu_memory_run.sh", file=sys.stderr)
            continue
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            if hasattr(mod, "cases"):
                run_cases(name, mod.cases(a.device, quick), a.device, a.out)
            else:  # whole-run benchmarks (seconds per call) time themselves and write their own JSON
                mod.main(_whole_run_argv(name, a.device, a.out))
        except (Exception, SystemExit) as e:  # one broken bench (argparse exits) must not hide the others' numbers
            print(f"bench_{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
