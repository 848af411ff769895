"""`python -m benchmarks` (make bench): each whole-run benchmark gets arguments its own parser accepts, one
benchmark that fails -- by an exception or by argparse's SystemExit -- leaves the others running, and on a GPU
the memory benchmark (minutes of training) runs only when named."""
import types

import pytest
import torch

from benchmarks import __main__ as runner


def _fake_benches(monkeypatch, mods: dict):
    """The runner finds exactly `mods` ({"benchmarks.bench_<name>": module}) as its benchmarks."""
    monkeypatch.setattr(runner.pkgutil, "iter_modules",
                        lambda path: [types.SimpleNamespace(name=n.split(".")[-1]) for n in mods])
    monkeypatch.setattr(runner.importlib, "import_module", lambda n: mods[n])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_memory_bench_accepts_the_runner_arguments(device, tmp_path, capsys):
    from benchmarks import bench_memory

    argv = bench_memory.runner_argv(device, str(tmp_path), named=True)
    assert argv[argv.index("--out") + 1] == str(tmp_path / "bench_memory.json")
    assert ("--cpu-smoke" in argv) == (device == "cpu")
    bench_memory.main([*argv, "--list"])  # parses the runner's arguments, then only lists (no SystemExit)
    assert "1.5b-lora64" in capsys.readouterr().out.split()


def test_a_failing_bench_does_not_stop_the_others(monkeypatch, tmp_path):
    ran = []

    def whole_run(name, exc):
        def main(argv):
            ran.append((name, argv))
            if exc is not None:
                raise exc
        return types.SimpleNamespace(main=main)

    mods = {"benchmarks.bench_a": whole_run("a", SystemExit(2)), "benchmarks.bench_b": whole_run("b", ValueError("x")),
            "benchmarks.bench_c": whole_run("c", None)}
    _fake_benches(monkeypatch, mods)
    assert runner.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    assert [n for n, _ in ran] == ["a", "b", "c"]
    assert ran[2][1] == ["--device", "cpu", "--out", str(tmp_path)]


@pytest.mark.parametrize("device,only,runs", [("cpu", "", True), ("cuda", "", False), ("cuda", "memory", True)])
def test_memory_bench_on_a_gpu_only_by_name(device, only, runs, monkeypatch, tmp_path):
    ran = []
    from benchmarks import bench_memory

    mods = {"benchmarks.bench_memory": types.SimpleNamespace(main=lambda argv: ran.append(argv),
                                                             runner_argv=bench_memory.runner_argv)}
    _fake_benches(monkeypatch, mods)
    assert runner.main(["--device", device, "--out", str(tmp_path), *(["--only", only] if only else [])]) == 0
    assert bool(ran) == runs


def test_graph_timeline_stats_split_replays_gaps_and_overlap():
    from benchmarks.bench_rollout import timeline_stats

    # replay 1: a [0, 10], b [12, 20] (gap 2), c [18, 30] (overlaps b by 2), d [31, 35] (gap 1): span 35,
    # busy 10 + 18 + 4 = 32, gap 3, overlap (10 + 8 + 12 + 4) - 32 = 2
    r1 = [("a", 0, 10), ("b", 12, 20), ("c", 18, 30), ("d", 31, 35)]
    # replay 2 (starts 1000 us later): a [0, 10], b [15, 20]: span 20, busy 15, gap 5, no overlap
    r2 = [("a", 1000, 1010), ("b", 1015, 1020)]
    # replay 3: one kernel nested in another: span 40, busy 40, overlap 10
    r3 = [("x", 2000, 2040), ("y", 2010, 2020)]
    got = timeline_stats(r2 + r3 + r1)  # any order
    assert got["replays"] == 3 and got["spans_us"] == [35, 20, 40]
    assert (got["span_us"], got["busy_us"], got["gap_us"], got["overlap_us"], got["kernels"]) == (35, 32, 3, 2, 4)
    assert got["gap_count"] == 2
    assert got["top_gaps"] == [{"us": 2, "after": "a", "before": "b"}, {"us": 1, "after": "c", "before": "d"}]
    assert {(p["after"], p["before"], p["count"], p["us"]) for p in got["gap_by_pair"]} == {("a", "b", 1, 2),
                                                                                         ("c", "d", 1, 1)}
    assert timeline_stats([]) == {"replays": 0}
    # a gap is named after the kernel that ended last before it (a), not the last one to start (b, nested in a)
    got = timeline_stats([("a", 0, 30), ("b", 5, 10), ("c", 40, 50)])
    assert got["top_gaps"] == [{"us": 10, "after": "a", "before": "c"}] and got["overlap_us"] == 5


def test_rollout_bench_reports_each_workloads_own_captures():
    """The engine's capture counters run over its life (one engine per model): run_workload reports only the
    captures of its own calls (on the CPU: none), not those of earlier workloads or A/B variants."""
    from benchmarks import bench_rollout as br
    from r1train.generation import engine_for

    model = br._model("cpu", tiny=True)
    eng = engine_for(model)
    eng.stats.update(captures=5, capture_seconds=1.5)  # as after earlier workloads on a GPU
    r = br.run_workload("fixed", model, "cpu", n_prompts=2, G=2, P=8, T=4, lens=None, with_compile=False, reps=1,
                        skip_peers=True)
    ours = r["providers"]["r1train engine"]
    assert (ours["captures"], ours["capture_seconds"]) == (0, 0.0)
    assert ours["tokens_generated"] == 2 * 2 * 4


@pytest.mark.parametrize("lens", [None, "varied"])
def test_rollout_breakdown_accounts_for_the_rollout(lens):
    """step_breakdown's parts (prefill, steps by bucket, steps after the last eos, compactions, idle, tail) add up
    to the marked span inside the measured wall time; one step per drawn token after the first until the done-check
    that sees every row finished, each at a bucket the engine runs; the steps' floor equals floor_seconds less
    the first token's share (every weight once + each prompt's keys/values)."""
    import random

    from benchmarks import bench_rollout as br
    from r1train.generation import engine_for
    from r1train.generation.engine import buckets

    model = br._model("cpu", tiny=True)
    eng = engine_for(model, backend="torch")  # run_workload's engine_for(model) returns this one
    n, G, P, T = 2, 4, random.randint(3, 9), 20
    lens = [random.randint(2, T) for _ in range(n * G)] if lens else None
    r = br.run_workload("w", model, "cpu", n_prompts=n, G=G, P=P, T=T, lens=lens, with_compile=False, reps=1,
                        skip_peers=True, breakdown=True)
    lens_B = lens or [T] * (n * G)
    assert r["providers"]["r1train engine"]["tokens_generated"] == sum(lens_B) == r["tokens_generated"]
    b = r["breakdown"]
    parts = (b["prefill_and_first_token_ms"] + b["steps_ms"] + b["steps_after_done_ms"] + b["compaction_ms"]
             + b["idle_between_ms"] + b["tail_ms"])
    assert 0 < parts <= b["wall_ms"] + 1e-6
    c = eng.check_every
    end = T if lens is None else min(T, -(-max(lens_B) // c) * c)  # the steps counter when the rollout stops
    assert sum(x["steps"] for x in b["buckets"].values()) == max(lens_B) - 1
    assert b["steps_after_done"] == end - max(lens_B)
    rows = {x["rows"] for x in b["buckets"].values()}
    assert rows <= set(buckets(n * G)) and b["compactions"] == len(rows) - 1
    w_bytes, kv_tok = br._step_bytes(model)
    first = (w_bytes + len(lens_B) * P * kv_tok) / br.copy_bandwidth("cpu")
    assert b["steps_floor_ms"] == pytest.approx((br.floor_seconds(model, P, lens_B) - first) * 1e3, rel=1e-9)


def test_generated_tokens_counts_through_the_first_eos():
    """Each row's tokens through its first eos, all T without one, whatever token ids (the pad id 0 included)
    come before or after it."""
    from benchmarks.bench_rollout import generated_tokens

    B, T, eos = 6, 9, 1
    tok = torch.randint(0, 4, (B, T))
    tok[tok == eos] = 0
    want = 0
    for b in range(B):
        j = int(torch.randint(0, T + 1, ()))  # T: no eos in this row
        if j < T:
            tok[b, j] = eos
            tok[b, j + 1:] = torch.randint(0, 4, (T - j - 1,))  # anything after it, eos included
        want += j + 1 if j < T else T
    assert generated_tokens(tok, eos) == want


def test_rollout_ab_variants_set_and_restore_the_engine_switches():
    """Each bench_rollout --ab change sets its switch inside the context and every switch is back after it, also
    when the body raises (dl_all_rows: every decode_linear row minimum 1; dl_64: the 64-row x tile)."""
    from benchmarks import bench_rollout as br
    from r1train.generation import engine as ge
    from r1train.generation import fused as fz

    cuda = torch.cuda.is_available()

    from r1kernels.triton import decode_linear as dl

    def state():
        return (fz.DECODE_LINEAR, dict(fz.DECODE_LINEAR_MIN_ROWS), ge.STEP_FUSIONS, repr(dl.CONFIGS),
                torch.backends.cuda.preferred_blas_library() if cuda else None)

    before = state()
    with br.ab_variant("dl_all_rows+cublas"):
        assert (set(fz.DECODE_LINEAR_MIN_ROWS.values()), fz.DECODE_LINEAR) == ({1}, ())
    with br.ab_variant("dl_64"):
        assert set(fz.DECODE_LINEAR_MIN_ROWS.values()) == {17}
        assert {c["BLOCK_M"] for c in dl.CONFIGS.values()} == {64}
    assert state() == before
    for change in br.AB:
        if change == "cublaslt" and not cuda:  # torch's BLAS choice exists only with CUDA
            with pytest.raises(ValueError, match="cublaslt"), br.ab_variant(change):
                pass
            assert state() == before
            continue
        with pytest.raises(KeyError), br.ab_variant(change):
            assert state() != before or change in ("emit", "rope_table")  # on by default
            raise KeyError
        assert state() == before, change


def test_runner_runs_patch_generate_small_on_cpu_and_reports_both_models(tmp_path):
    """python -m benchmarks --only patch_generate on CPU runs the tiny model through runner_argv (it built the
    1.5B-shaped model there and ran for minutes): every variant generates in every timed round, the host times
    of every forward of both modules are positive numbers, and the shipped HOST_BOUND_ROWS is restored."""
    import json

    from benchmarks import bench_patch_generate as bp
    from benchmarks.__main__ import main
    from r1kernels.patch import layers

    assert "--tiny" in bp.runner_argv("cpu", None, True) and "--tiny" not in bp.runner_argv("cuda", None, True)
    assert main(["--only", "patch_generate", "--device", "cpu", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_patch_generate.json").read_text())
    assert len(res["generate_s"]) == 3 and "unpatched" in res["generate_s"]
    assert layers.HOST_BOUND_ROWS == 512
    assert all(len(v["runs"]) == 2 and all(t > 0 for t in v["runs"]) for v in res["generate_s"].values())
    assert len(res["host_us_per_call_rows_x_1"]) == 6 and all(v > 0 for v in res["host_us_per_call_rows_x_1"].values())
    assert res["rows"] == 8 and res["new_tokens"] == 3
    tm = res["train_micro_batch_ms"]
    assert all(len(tm[k]) == 2 and all(v > 0 for r in tm[k] for v in r.values()) for k in ("unpatched", "fused"))
