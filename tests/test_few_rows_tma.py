"""benchmarks/few_rows_tma (the descriptor-load few-row GEMM experiment bench_decode_gemm --few-rows times):
each epilogue against float64 at row counts below, at and past a tile, N and K not multiples of the tiles."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

pytest.importorskip("triton")
from benchmarks.few_rows_tma import few_rows_linear  # noqa: E402

SHAPES = [(1, 33, 40), (5, 100, 96), (16, 48, 64), (64, 70, 200)]


def _inputs(M, N, K, device):
    bf = torch.bfloat16
    x = torch.randn(M, K, device=device).to(bf)
    w, w2 = [(torch.randn(N, K, device=device) / K ** 0.5).to(bf) for _ in range(2)]
    return x, w, w2, torch.randn(N, device=device).to(bf), torch.randn(M, N, device=device).to(bf)


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_epilogues_match_float64(M, N, K, device):
    x, w, w2, b, res = _inputs(M, N, K, device)
    x64, w64, w264 = x.double(), w.double(), w2.double()
    out = few_rows_linear(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert_close(out, x64 @ w64.t(), torch.bfloat16, name="none")
    assert_close(few_rows_linear(x, w, bias_N=b), x64 @ w64.t() + b.double(), torch.bfloat16, name="bias")
    r = res.clone()
    got = few_rows_linear(x, w, epilogue="residual", out_MN=r)
    assert got.data_ptr() == r.data_ptr()
    assert_close(r, res.double() + x64 @ w64.t(), torch.bfloat16, name="residual")
    assert_close(few_rows_linear(x, w, epilogue="silu_gate", w2_NK=w2), F.silu(x64 @ w64.t()) * (x64 @ w264.t()),
                 torch.bfloat16, name="silu_gate")


def test_stacked_halves_are_views(device):
    """gate/up as the two halves of one stacked [2I, K] weight (the engine's layout under ZeRO 1/2)."""
    x, w, w2, _, _ = _inputs(7, 24, 48, device)
    gu = torch.cat([w, w2])
    got = few_rows_linear(x, gu[:24], w2_NK=gu[24:], epilogue="silu_gate")
    assert_close(got, F.silu(x.double() @ w.double().t()) * (x.double() @ w2.double().t()), torch.bfloat16)


def test_bad_arguments():
    x, w, w2, _, res = _inputs(4, 8, 16, "cpu")
    with pytest.raises(ValueError, match="epilogue"):
        few_rows_linear(x, w, epilogue="gelu")
    with pytest.raises(ValueError, match="x_MK"):
        few_rows_linear(torch.zeros(65, 16, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="w2_NK"):
        few_rows_linear(x, w, epilogue="silu_gate")
    with pytest.raises(ValueError, match="w2_NK"):
        few_rows_linear(x, w, w2_NK=w2)
    with pytest.raises(ValueError, match="out_MN"):
        few_rows_linear(x, w, epilogue="residual")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(64, 2048, 1536), (37, 1536, 8960), (64, 8960, 1536)])
@pytest.mark.parametrize("cfg", [None, {"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 3},
                                 {"BLOCK_N": 128, "BLOCK_K": 64, "STAGES": 5}])
def test_decode_shapes_gpu(M, N, K, cfg):
    x, w, w2, b, res = _inputs(M, N, K, "cuda")
    x64, w64 = x.double(), w.double()
    assert_close(few_rows_linear(x, w, bias_N=b, config=cfg), x64 @ w64.t() + b.double(), torch.bfloat16)
    r = res.clone()
    few_rows_linear(x, w, epilogue="residual", out_MN=r, config=cfg)
    assert_close(r, res.double() + x64 @ w64.t(), torch.bfloat16)
    assert_close(few_rows_linear(x, w, epilogue="silu_gate", w2_NK=w2, config=cfg),
                 F.silu(x64 @ w64.t()) * (x64 @ w2.double().t()), torch.bfloat16)
