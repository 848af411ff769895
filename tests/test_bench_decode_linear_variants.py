"""bench_decode_linear_variants' experiment kernels compute what they time: the projection with its epilogue
operands loaded before or after the K loop, the split-K partials (their sum, not each) and sum_norm (the
residual plus the partials, then the RMSNorm of the new residual), against float64 at several shapes."""
import pytest
import torch

from benchmarks.bench_decode_linear_variants import sum_norm, variant
from r1kernels.reference.fused import rms_norm
from tests.conftest import TOLERANCES

CASES = [  # rows, N, K, splits, BLOCK_N, BLOCK_K (5 chunks over 4 splits: uneven ranges; 2 over 3: an empty one)
    (5, 48, 160, 4, 16, 32),
    (17, 32, 96, 2, 32, 32),
    (3, 16, 64, 3, 16, 32),
]
BF = torch.bfloat16


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("M,N,K,S,bn,bk", CASES)
def test_variants_equal_float64(M, N, K, S, bn, bk):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device="cpu").manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K, generator=g).to(dev, BF), (torch.randn(N, K, generator=g) / K ** 0.5).to(dev, BF)
    b, r = torch.randn(N, generator=g).to(dev, BF), torch.randn(M, N, generator=g).to(dev, BF)
    nw = (1 + 0.1 * torch.randn(N, generator=g)).to(dev, BF)
    y = x.double() @ w.double().t()
    tol = TOLERANCES[BF]
    kw = dict(block_n=bn, block_k=bk, stages=2)
    for preload, ws in ((False, False), (True, False), (True, True)):
        assert _rel(variant(x, w, bias_N=b, preload=preload, ws=ws, **kw), y + b.double()) < tol
        res = r.clone()
        variant(x, w, residual_MN=res, preload=preload, ws=ws, **kw)
        assert _rel(res, y + r.double()) < tol
    part = torch.full((S, M, N), float("nan"), device=dev)  # every element written, empty K ranges included
    variant(x, w, part_SMN=part, **kw)
    assert _rel(part.sum(0), y) < 1e-6
    res = r.clone()
    out = sum_norm(part, res, nw)
    assert _rel(res, y + r.double()) < tol
    assert _rel(out, rms_norm(res, nw).double()) < tol  # the norm of the rounded residual, as the step's
