"""benchmarks/bench_memory.py on the CPU (--cpu-smoke: tiny model, fp32): each configuration in its own
subprocess, r1train and TRL, results merged by name into one JSON, a child that runs out of memory recorded
as "oom" (not a crash), configurations past the budget recorded as skipped."""

import json
import os

import pytest
import train_helpers as H

from benchmarks import bench_memory as B


def test_config_names_and_selection():
    assert "7b-full-offload-gc" in B.CONFIGS and "1.5b-trl-lora64-gc" in B.CONFIGS
    assert B.select("7b-trl-*") == ["7b-trl-full", "7b-trl-full-gc", "7b-trl-lora64", "7b-trl-lora64-gc"]
    with pytest.raises(SystemExit, match="matches none"):
        B.select("13b-full")
    assert B.QWEN25_7B["hidden_size"] == 3584 and B.QWEN25_7B["vocab_size"] == 152064


def test_cpu_smoke_runs_r1train_and_trl_and_records_oom(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    out = str(tmp_path / "mem.json")
    monkeypatch.setenv("R1K_BENCH_FAKE_OOM", "7b-full")
    monkeypatch.setenv("PYTHONPATH", H.env()["PYTHONPATH"])
    B.main(["--out", out, "--cpu-smoke", "--max-steps", "1", "--configs", "1.5b-full-offload-gc,7b-full"])
    B.main(["--out", out, "--cpu-smoke", "--max-steps", "2", "--configs", "1.5b-trl-lora64-gc,1.5b-lora64",
            "--budget-s", "600", "--min-start-s", "599"])  # the second starts with < 599 s left: skipped
    with open(out) as fh:
        res = json.load(fh)["results"]
    full, trl = res["1.5b-full-offload-gc"], res["1.5b-trl-lora64-gc"]
    assert full["status"] == "ok", full
    assert full["reference_model"] and full["trainable_params"] == full["params"] and len(full["step_seconds"]) == 1
    assert res["7b-full"]["status"] == "oom"
    assert trl["status"] == "ok", trl
    assert not trl["reference_model"] and 0 < trl["trainable_params"] < trl["params"]
    assert len(trl["step_seconds"]) == 2 and trl["median_step_seconds"] == trl["step_seconds"][1]
    assert res["1.5b-lora64"]["status"] == "skipped (budget)"
    assert not os.path.exists(out + ".tmp")
    merged = str(tmp_path / "merged.json")
    B.main(["--out", merged, "--merge", out])
    with open(merged) as fh:
        assert json.load(fh)["results"] == res


def _ev(action, addr, size, *frames):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": f"/site/{f}", "line": i + 1, "name": "fn"} for i, f in enumerate(frames)]}


def test_peak_composition_replays_the_trace():
    """An independent count: base 100 bytes (a pre-recording block of 40 of them freed first), then blocks 1-3
    alive at the peak, 4 allocated after 1 and 2 are freed (lower than the peak)."""
    trace = [_ev("free_completed", 9, 40),       # allocated before recording: leaves the untraced part
             _ev("alloc", 1, 50, "torch/nn/linear.py", "r1train/grpo.py"),
             _ev("alloc", 2, 30, "r1kernels/ops/x.py", "trl/trainer.py"),
             _ev("free_requested", 1, 50),       # not yet free
             _ev("alloc", 3, 25, "deepspeed/zero.py"),  # peak: 100 + 50 + 30 - 40 + 25 = 165
             _ev("free_completed", 1, 50), _ev("free_completed", 2, 30),
             _ev("alloc", 4, 60, "r1train/grpo.py")]  # 145 < 165
    r = B.peak_composition(trace, 100, unit=1)
    assert r["peak"] == 165 and r["untraced"] == 60 and r["traced_live"] == 105
    assert r["sites"] == [["torch/nn/linear.py:1 fn", 50], ["r1kernels/ops/x.py:1 fn", 30],
                          ["deepspeed/zero.py:1 fn", 25]]
    assert dict(r["callers"]) == {"r1train/grpo.py:2 fn": 50, "trl/trainer.py:2 fn": 30, "other": 25}
    assert r["at"]["site"] == "deepspeed/zero.py:1 fn" and r["at"]["size"] == 25
