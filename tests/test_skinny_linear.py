"""The few-row GEMMs of a decode step (rk.linear, rk.swiglu, rk.linear_residual_; r1kernels.triton.skinny)
against float64 computations, with K split over several programs (the counter fixup), ragged M/N/K, a
bias, in-place residuals, bitwise determinism across calls and the counters left at zero. Triton
interpreter on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import r1kernels as rk
from r1kernels.reference import fused as ref
from r1kernels.triton import skinny

DTYPES = [torch.float32, torch.bfloat16]
# (M, N, K): one row; ragged everything; K a multiple of the split; more rows than one M tile
SHAPES = [(1, 40, 64), (5, 37, 100), (16, 64, 160), (33, 24, 96)]
# programs: the default; one (every tile whole); more than tiles (tiles cut between up to K / BK programs,
# ranges inside one tile); more than units (empty ranges)
CFGS = [None, dict(BN=16, BK=32, PROGRAMS=1, num_warps=1, num_stages=1),
        dict(BN=16, BK=16, PROGRAMS=7, num_warps=1, num_stages=1),
        dict(BN=32, BK=32, PROGRAMS=64, num_warps=1, num_stages=1)]


def _inputs(device, dtype, M, N, K):
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    return x, w


def _counters_zero(device):
    c = skinny._COUNTERS.get(torch.device(device))
    assert c is None or int(c.abs().sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", CFGS)
def test_linear(device, dtype, shape, cfg):
    M, N, K = shape
    x, w = _inputs(device, dtype, M, N, K)
    b = torch.randn(N, device=device).to(dtype)
    out = skinny.linear(x, w, b, cfg=cfg)
    ref64 = F.linear(x.double(), w.double(), b.double())
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out, ref64, dtype, lowp=F.linear(x, w, b), name="linear")
    assert torch.equal(out, skinny.linear(x, w, b, cfg=cfg))  # deterministic, counters reset
    _counters_zero(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", CFGS)
def test_swiglu(device, dtype, shape, cfg):
    M, N, K = shape
    x, wg = _inputs(device, dtype, M, N, K)
    wu = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    out = skinny.swiglu(x, wg, wu, cfg=cfg)
    g, u = F.linear(x.double(), wg.double()), F.linear(x.double(), wu.double())
    ref64 = g * torch.sigmoid(g) * u
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out, ref64, dtype, lowp=ref.swiglu(x, wg, wu), name="swiglu")
    assert torch.equal(out, skinny.swiglu(x, wg, wu, cfg=cfg))
    _counters_zero(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", CFGS)
def test_linear_residual(device, dtype, shape, cfg):
    M, N, K = shape
    x, w = _inputs(device, dtype, M, N, K)
    res = torch.randn(M, N, device=device).to(dtype)
    ref64 = res.double() + F.linear(x.double(), w.double())
    lowp = ref.linear_residual_(x, w, res.clone())
    r = res.clone()
    out = skinny.linear_residual_(x, w, r, cfg=cfg)
    assert out is r
    assert_close(r, ref64, dtype, lowp=lowp, name="linear_residual_")
    r2 = res.clone()
    skinny.linear_residual_(x, w, r2, cfg=cfg)
    assert torch.equal(r, r2)
    _counters_zero(device)


def test_batched_leading_dims_and_public_api(device):
    """[B, 1, K] inputs (the decode step's hidden states) through the public API, same as the reference."""
    x = torch.randn(3, 1, 48, device=device)
    wg, wu = torch.randn(20, 48, device=device), torch.randn(20, 48, device=device)
    res = torch.randn(3, 1, 20, device=device)
    backend = "triton" if device == "cuda" or skinny.INTERPRET else "torch"
    with torch.no_grad():
        assert_close(rk.linear(x, wg, backend=backend), F.linear(x, wg).double(), name="rk.linear")
        assert_close(rk.swiglu(x, wg, wu, backend=backend), ref.swiglu(x, wg, wu).double(), name="rk.swiglu")
        r = res.clone()
        assert rk.linear_residual_(x, wg, r, backend=backend) is r
        assert_close(r, (res + F.linear(x, wg)).double(), name="rk.linear_residual_")


def test_many_rows_use_reference(device):
    """More rows than a decode step: not eligible for the kernel; auto runs the reference, quietly."""
    from r1kernels.ops import fused as fops

    x = torch.randn(skinny.MAX_M + 1, 32, device=device)
    w = torch.randn(8, 32, device=device)
    assert not fops.linear_triton.eligible(x, w)
    assert fops.linear_triton.eligible(x[: skinny.MAX_M], w)
    with torch.no_grad():
        assert torch.equal(rk.linear(x, w), F.linear(x, w))


def test_bad_arguments(device):
    x = torch.randn(2, 16, device=device)
    with pytest.raises(ValueError, match="weight"):
        rk.linear(x, torch.randn(8, 15, device=device))
    with pytest.raises(ValueError, match="w_up"):
        rk.swiglu(x, torch.randn(8, 16, device=device), torch.randn(9, 16, device=device))
    with pytest.raises(ValueError, match="residual"):
        rk.linear_residual_(x, torch.randn(8, 16, device=device), torch.randn(2, 9, device=device))
    with pytest.raises(ValueError, match="bias"):
        rk.linear(x, torch.randn(8, 16, device=device), torch.randn(7, device=device))
    w = torch.randn(8, 16, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="inference-only"):
        rk.linear(x, w)


# (M, N, K) of a Qwen2.5-1.5B decode step: q/k/v, o_proj, gate/up, down_proj
GPU_SHAPES = [(64, 2048, 1536), (64, 1536, 1536), (64, 8960, 1536), (64, 1536, 8960), (1, 1536, 8960),
              (24, 8960, 1536)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_real_shapes(shape):
    M, N, K = shape
    dtype = torch.bfloat16
    x, w = _inputs("cuda", dtype, M, N, K)
    w2 = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda").to(dtype)
    assert_close(skinny.linear(x, w, b), F.linear(x.double(), w.double(), b.double()), dtype,
                 lowp=F.linear(x, w, b), name="linear")
    g, u = F.linear(x.double(), w.double()), F.linear(x.double(), w2.double())
    assert_close(skinny.swiglu(x, w, w2), g * torch.sigmoid(g) * u, dtype, lowp=ref.swiglu(x, w, w2),
                 name="swiglu")
    res = torch.randn(M, N, device="cuda").to(dtype)
    r = res.clone()
    skinny.linear_residual_(x, w, r)
    assert_close(r, res.double() + F.linear(x.double(), w.double()), dtype,
                 lowp=ref.linear_residual_(x, w, res.clone()), name="linear_residual_")
    _counters_zero("cuda")


@pytest.mark.gpu
def test_gpu_graph_replay_deterministic():
    """Captured in a CUDA graph and replayed: the same bits every replay (split-K fixup order is fixed)."""
    M, N, K = 64, 1536, 8960
    x, w = _inputs("cuda", torch.bfloat16, M, N, K)
    w2 = torch.randn_like(w)
    skinny.swiglu(x, w, w2)  # compile and allocate the counters outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = skinny.swiglu(x, w, w2)
    outs = []
    for _ in range(3):
        g.replay()
        outs.append(y.clone())
    torch.cuda.synchronize()
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(outs[0], skinny.swiglu(x, w, w2))
    _counters_zero("cuda")
