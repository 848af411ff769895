"""python -m benchmarks [--quick] [--only a,b] [--out DIR]: runs every benchmarks/bench_*.py that imports.
On CPU, --quick (the default there) runs small shapes as a smoke test; on CUDA, DESIGN.md's shapes. A whole-run
benchmark (a main(argv), no cases()) gets --device and --out DIR, or what its runner_argv(device, out_dir, named)
returns (None: skipped)."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import torch

from .harness import run_cases


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
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            if hasattr(mod, "cases"):
                run_cases(name, mod.cases(a.device, quick), a.device, a.out)
            else:  # whole-run benchmarks (seconds per call) time themselves and write their own JSON
                argv = mod.runner_argv(a.device, a.out, name in only) if hasattr(mod, "runner_argv") else \
                    ["--device", a.device, *(["--out", a.out] if a.out else [])]
                if argv is None:
                    print(f"bench_{name}: skipped here; runs when named (--only {name})", file=sys.stderr)
                    continue
                mod.main(argv)
        except (Exception, SystemExit) as e:  # one broken bench (argparse exits) must not hide the others' numbers
            print(f"bench_{name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
