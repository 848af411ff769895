"""Markdown table of committed GPU results: python -m benchmarks.table benchmarks/results/*.json"""
from __future__ import annotations

import json
import sys


def rows_of(path: str):
    data = json.load(open(path))
    benches = data.values() if "results" not in data else [data]
    for b in benches:
        env = b["environment"]
        for r in b["results"]:
            yield env, r


def _fmt(row, key, fmt):
    return fmt.format(row[key]) if row.get(key) is not None else ""


def main(paths):
    print("| op | shape | provider | ms | GB/s | x floor | peak extra MB | vs best peer |")
    print("|---|---|---|---|---|---|---|---|")
    envs = set()
    for p in paths:
        for env, r in rows_of(p):
            envs.add((env.get("device_name"), env.get("date", "")[:10], env.get("commit", "")[:8]))
            ms = _fmt(r, "ms", "{:.4g}") if "ms" in r else f"skipped: {r.get('skipped', '')}"
            cells = [r["op"], r["shape"], r["provider"], ms, _fmt(r, "GBps", "{:.0f}"), _fmt(r, "x_floor", "{:.2f}"),
                     _fmt(r, "peak_extra_MB", "{:.0f}"), _fmt(r, "speedup_vs_best_peer", "{:.2f}x")]
            print("| " + " | ".join(cells) + " |")
    for dev, date, commit in sorted(envs):
        print(f"\n{dev}, {date}, commit {commit}")


if __name__ == "__main__":
    main(sys.argv[1:])
