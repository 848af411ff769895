"""The benchmark harness runs and reports on CPU (the GPU run uses the same code)."""
import torch

import r1kernels as rk
from benchmarks.harness import Case, run_cases


def test_harness_smoke_on_cpu():
    x = torch.randn(64, 33)
    y = torch.randint(0, 33, (64,))
    rows = run_cases("smoke", [Case("token_logprobs", "N=64 V=33", {"torch": lambda: rk.token_logprobs(x, y)},
                                    bytes=x.numel() * 4.0)], "cpu", None)
    assert rows[0]["ms"] > 0 and rows[0]["GBps"] > 0
