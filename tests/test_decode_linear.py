"""rk.decode_linear: the reference (CPU) and the CUDA few-row GEMM (gpu) against a float64 product of the same
bf16 inputs, for the three epilogues, row counts 1..64, tails of N, every kernel configuration family; the
in-place residual, split-K determinism and self-resetting counters, CUDA-graph replay; bad arguments."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import r1kernels as rk

BF = torch.bfloat16


def _expected(x, w, b, res, gated):
    """float64 product of the bf16 inputs with the spec's roundings (gated: g and u rounded to bf16 first)."""
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    if res is not None:
        return res.double() + y
    if gated:
        n = w.shape[0] // 2
        g, u = y[:, :n].to(BF).double(), y[:, n:].to(BF).double()
        return F.silu(g) * u
    return y


def _inputs(M, N, K, mode, device):
    x = torch.randn(M, K, device=device, dtype=BF)
    w = (torch.randn(2 * N if mode == "gated" else N, K, device=device) / K ** 0.5).to(BF)
    b = torch.randn(N, device=device, dtype=BF) if mode == "bias" else None
    res = torch.randn(M, N, device=device, dtype=BF) if mode == "residual" else None
    return x, w, b, res


@pytest.mark.parametrize("mode", ["plain", "bias", "residual", "gated"])
@pytest.mark.parametrize("M,N,K", [(1, 24, 64), (7, 40, 192), (64, 96, 128)])
def test_reference_matches_float64(mode, M, N, K):
    x, w, b, res = _inputs(M, N, K, mode, "cpu")
    want = _expected(x, w, b, res, mode == "gated")
    got = rk.decode_linear(x, w, b, residual=res, gated=mode == "gated", backend="torch")
    assert got.dtype == BF and got.shape == want.shape
    if res is not None:
        assert got is res
    assert_close(got, want, BF)


def test_bad_arguments():
    x, w = torch.randn(4, 64, dtype=BF), torch.randn(32, 64, dtype=BF)
    with pytest.raises(ValueError, match="weight"):
        rk.decode_linear(x, torch.randn(32, 48, dtype=BF))
    with pytest.raises(ValueError, match="gated"):
        rk.decode_linear(x, torch.randn(31, 64, dtype=BF), gated=True)
    with pytest.raises(ValueError, match="residual"):
        rk.decode_linear(x, w, residual=torch.randn(4, 31, dtype=BF))
    with pytest.raises(ValueError, match="bias"):
        rk.decode_linear(x, w, torch.randn(31, dtype=BF))
    with pytest.raises(ValueError, match="config"):
        rk.decode_linear(x, w, config=(8, 1, 4, 1))
    with pytest.raises(ValueError, match="config"):
        rk.decode_linear(x, w, config=(32, 1, 4, 2))  # K = 64 has one k-step: at most 1 split
    with pytest.raises(ValueError, match="x"):
        rk.decode_linear(torch.randn(64, dtype=BF), w)


CONFIGS = [(16, 1, 4, 1), (32, 2, 4, 1), (16, 4, 6, 2), (32, 4, 4, 3), (32, 1, 6, 5), (16, 2, 4, 5)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["plain", "bias", "residual", "gated"])
@pytest.mark.parametrize("M,N,K", [(1, 16, 320), (9, 200, 320), (16, 72, 640), (40, 1000, 384), (64, 2048, 1536)])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_gpu_kernel_matches_float64(mode, M, N, K, cfg):
    x, w, b, res = _inputs(M, N, K, mode, "cuda")
    want = _expected(x, w, b, res, mode == "gated")
    lowp = rk.decode_linear(x, w, b, residual=None if res is None else res.clone(), gated=mode == "gated",
                            backend="torch")
    got = rk.decode_linear(x, w, b, residual=res, gated=mode == "gated", config=cfg, backend="cuda")
    assert got.shape == want.shape and got.dtype == BF
    if res is not None:
        assert got is res
    assert_close(got, want, BF, lowp=lowp)


@pytest.mark.gpu
def test_gpu_split_k_deterministic_and_counters_reset():
    from r1kernels.ops import linear as L
    x, w, _, _ = _inputs(64, 1536, 8960, "plain", "cuda")
    outs = [rk.decode_linear(x, w, config=(32, 2, 4, 11), backend="cuda") for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert int(L._COUNTERS[torch.cuda.current_device()].abs().sum()) == 0
    assert_close(outs[0], _expected(x, w, None, None, False), BF, lowp=F.linear(x, w))


@pytest.mark.gpu
def test_gpu_graph_replay_follows_new_inputs():
    x, w, _, res = _inputs(64, 512, 1536, "residual", "cuda")
    res0 = res.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        rk.decode_linear(x, w, residual=res, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        rk.decode_linear(x, w, residual=res, backend="cuda")
    x.copy_(torch.randn_like(x))
    res.copy_(res0)
    g.replay()
    torch.cuda.synchronize()
    assert_close(res, _expected(x, w, None, res0, False), BF, lowp=res0.clone().addmm_(x, w.t()))


@pytest.mark.gpu
def test_gpu_auto_takes_the_kernel_only_where_eligible():
    from r1kernels.ops.linear import decode_linear_cuda
    x, w, _, _ = _inputs(64, 256, 512, "plain", "cuda")
    assert decode_linear_cuda.eligible(x, w)
    assert not decode_linear_cuda.eligible(torch.randn(65, 512, device="cuda", dtype=BF), w)  # > 64 rows
    assert not decode_linear_cuda.eligible(x[:, :500], w[:, :500].contiguous())  # K % 64
    assert not decode_linear_cuda.eligible(x.float(), w.float())
    big = torch.randn(200, 512, device="cuda", dtype=BF)
    assert_close(rk.decode_linear(big, w), _expected(big, w, None, None, False), BF, lowp=F.linear(big, w))
