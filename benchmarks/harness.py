"""Timing harness: device-event medians over rotated inputs, %-of-floor from measured ceilings, peak extra
memory, ratio to the best peer; a table on stdout, JSON (and a PNG when matplotlib is there) on disk.

A bench_<name>.py module defines `cases(device, quick) -> list[Case]`; each provider is a zero-argument
closure that runs the op once (forward, or forward+backward for "fwd+bwd" cases). A closure may raise
`Skip("why")`, or return nothing; its inputs should rotate among several sets (see `Rotating`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable

import torch


class Skip(Exception):
    """A provider that cannot run here (missing package, too much memory, ...)."""


@dataclasses.dataclass
class Case:
    op: str                                   # e.g. "token_logprobs fwd+bwd"
    shape: str                                # e.g. "N=8192 V=151936 bf16"
    providers: dict[str, Callable[[], Any]]   # name -> closure running the op once
    bytes: float = 0.0                        # fewest bytes the op must move (each input read once, output written)
    flops: float = 0.0                        # floating-point operations
    peers: tuple[str, ...] = ()               # providers from other projects / torch.compile, for the ratio
    setup: Callable[[], None] | None = None   # runs once before the providers (allocate inputs)
    info: dict[str, dict] = dataclasses.field(default_factory=dict)  # provider -> extra JSON fields of its row


class Rotating:
    """Cycles through several input sets so repeated runs do not measure a warm cache."""

    def __init__(self, make: Callable[[], Any], n: int = 3):
        self.sets = [make() for _ in range(n)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def graphed(fn):
    """Capture fn() once in a CUDA graph (after two warm-up calls on a side stream); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, *, warmup_ms: float = 50.0, rep_ms: float = 300.0, max_rep: int = 500) -> float:
    """Median milliseconds of fn() (device events on CUDA, perf_counter on CPU)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, min(int(warmup_ms / est), 100))):
        fn()
    n = max(3, min(int(rep_ms / est), max_rep))
    times = []
    if device == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_us(fn, iters: int = 10, host: bool = False) -> dict[str, float]:
    """torch.profiler over `iters` calls of fn (after 3 warm-up calls), CUDA only: {kernel name: mean device
    microseconds per call}, largest first; host=True: {op name: mean host (CPU self) microseconds per call},
    the top 12. One activity per run: with both on, each op's row repeats its kernels' device time."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU if host else ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in p.key_averages():
        if host:
            t = e.self_cpu_time_total
        else:
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
        if t:
            out[e.key[:90]] = round(t / iters, 2)
    top = sorted(out.items(), key=lambda kv: -kv[1])
    return dict(top[:12] if host else top)


def peak_extra_mb(fn, device: str) -> float | None:
    """Peak memory above what was allocated before one run of fn (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_CEILINGS: dict[str, float] = {}


def ceilings(device: str) -> dict[str, float]:
    """Measured copy bandwidth (GB/s, bytes read + written) and bf16 GEMM rate (TFLOP/s), once per run."""
    if _CEILINGS or device != "cuda":
        return _CEILINGS
    n = 1 << 30  # 1 GiB copied: 2 GiB moved
    a = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    b = torch.empty_like(a)
    _CEILINGS["copy_GBps"] = 2 * n / (time_ms(lambda: b.copy_(a), device) * 1e-3) / 1e9
    a = b = None
    m = 8192
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    _CEILINGS["gemm_bf16_TFLOPs"] = 2 * m**3 / (time_ms(lambda: x @ y, device) * 1e-3) / 1e12
    e = torch.empty(1, device=device)
    _CEILINGS["empty_launch_us"] = time_ms(lambda: e.add_(0), device) * 1e3
    torch.cuda.empty_cache()
    return _CEILINGS


def floor_ms(case: Case, device: str) -> float | None:
    c = ceilings(device)
    if not c:
        return None
    t = []
    if case.bytes:
        t.append(case.bytes / (c["copy_GBps"] * 1e9) * 1e3)
    if case.flops:
        t.append(case.flops / (c["gemm_bf16_TFLOPs"] * 1e12) * 1e3)
    return max(t) if t else None


def run_case(case: Case, device: str) -> list[dict]:
    if case.setup:
        case.setup()
    rows, floor = [], floor_ms(case, device)
    for name, fn in case.providers.items():
        row = {"op": case.op, "shape": case.shape, "provider": name, **case.info.get(name, {})}
        try:
            row["ms"] = time_ms(fn, device)
            row["peak_extra_MB"] = peak_extra_mb(fn, device)
        except Skip as e:
            row["skipped"] = str(e)
        except torch.cuda.OutOfMemoryError:
            row["skipped"] = "out of memory"
            torch.cuda.empty_cache()
        if "ms" in row:
            s = row["ms"] * 1e-3
            if case.bytes:
                row["GBps"] = case.bytes / s / 1e9
            if case.flops:
                row["TFLOPs"] = case.flops / s / 1e12
            if floor:
                row["x_floor"] = row["ms"] / floor
        rows.append(row)
    peer_ms = [r["ms"] for r in rows if r["provider"] in case.peers and "ms" in r]
    for r in rows:
        if peer_ms and "ms" in r:
            r["speedup_vs_best_peer"] = min(peer_ms) / r["ms"]
    return rows


def environment(device: str) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("R1K_COMMIT", commit), "torch": torch.__version__,
           "python": platform.python_version(), "device": device}
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["ceilings"] = ceilings(device)
    else:
        env["device_name"] = platform.processor() or "cpu"
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def format_table(rows: list[dict]) -> str:
    cols = ["op", "shape", "provider", "ms", "GBps", "TFLOPs", "x_floor", "peak_extra_MB", "speedup_vs_best_peer"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = [" | ".join(cols)]
    for r in rows:
        lines.append(" | ".join(fmt(r.get(c)) if c in r else (r.get("skipped", "") if c == "ms" else "")
                                for c in cols))
    return "\n".join(lines)


def run_cases(name: str, cases: list[Case], device: str, out_dir: str | None) -> list[dict]:
    rows = []
    for case in cases:
        rows += run_case(case, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n== {name} ({device})\n" + format_table(rows), flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"bench_{name}.json"), "w") as f:
            json.dump({"environment": environment(device), "results": rows}, f, indent=1)
        plot(rows, os.path.join(out_dir, f"bench_{name}.png"), f"{name} ({environment(device)['device_name']})")
    return rows


def plot(rows: list[dict], path: str, title: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    timed = [r for r in rows if "ms" in r]
    if not timed:
        return
    labels = [f"{r['op']} {r['shape']}\n{r['provider']}" for r in timed]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(timed) + 1))
    ax.barh(range(len(timed)), [r["ms"] for r in timed])
    ax.set_yticks(range(len(timed)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
