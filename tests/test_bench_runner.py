"""`python -m benchmarks` (make bench): each whole-run benchmark gets arguments its own parser accepts, one
benchmark that fails -- by an exception or by argparse's SystemExit -- leaves the others running, and on a GPU
the memory benchmark (minutes of training) runs only when named."""
import types

import pytest

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
