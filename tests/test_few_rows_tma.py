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


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_epilogues_match_float64(M, N, K, split_k, device):
    """split_k 3: K's 32-wide blocks (the interpreter's) in 3 ranges, some empty at small K."""
    import benchmarks.few_rows_tma as FR

    cfg = {"SPLIT_K": split_k}
    x, w, w2, b, res = _inputs(M, N, K, device)
    x64, w64, w264 = x.double(), w.double(), w2.double()
    out = few_rows_linear(x, w, config=cfg)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert_close(out, x64 @ w64.t(), torch.bfloat16, name="none")
    assert_close(few_rows_linear(x, w, bias_N=b, config=cfg), x64 @ w64.t() + b.double(), torch.bfloat16,
                 name="bias")
    r = res.clone()
    got = few_rows_linear(x, w, epilogue="residual", out_MN=r, config=cfg)
    assert got.data_ptr() == r.data_ptr()
    assert_close(r, res.double() + x64 @ w64.t(), torch.bfloat16, name="residual")
    g = few_rows_linear(x, w, epilogue="silu_gate", w2_NK=w2, config=cfg)
    assert_close(g, F.silu(x64 @ w64.t()) * (x64 @ w264.t()), torch.bfloat16, name="silu_gate")
    assert torch.equal(few_rows_linear(x, w, epilogue="silu_gate", w2_NK=w2, config=cfg), g)  # deterministic
    assert all(int(c.abs().sum()) == 0 for c in FR._COUNTERS.values())  # the tile counters reset themselves


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_rms_norm_prologue_matches_float64(M, N, K, device):
    """norm_K: rms_norm(x) @ W^T with the RMSNorm folded in (x * g in the operand, the rsqrt on the accumulators)."""
    x, w, w2, b, res = _inputs(M, N, K, device)
    x = x * 3  # rows of rms ~3: the rsqrt matters
    g = (1 + 0.5 * torch.randn(K, device=device)).to(torch.bfloat16)
    x64 = x.double()
    n64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * g.double()
    w64, w264 = w.double(), w2.double()
    assert_close(few_rows_linear(x, w, bias_N=b, norm_K=g, eps=1e-5), n64 @ w64.t() + b.double(), torch.bfloat16)
    assert_close(few_rows_linear(x, w, w2_NK=w2, epilogue="silu_gate", norm_K=g, eps=1e-5),
                 F.silu(n64 @ w64.t()) * (n64 @ w264.t()), torch.bfloat16)
    r = res.clone()
    few_rows_linear(x, w, epilogue="residual", out_MN=r, norm_K=g, eps=1e-5)
    assert_close(r, res.double() + n64 @ w64.t(), torch.bfloat16)


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
    with pytest.raises(ValueError, match="norm_K"):
        few_rows_linear(x, w, norm_K=torch.ones(15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="norm_K"):
        few_rows_linear(x, w, norm_K=torch.ones(16, dtype=torch.bfloat16), config={"SPLIT_K": 2})


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(64, 2048, 1536), (37, 1536, 8960), (64, 8960, 1536)])
@pytest.mark.parametrize("cfg", [None, {"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 3},
                                 {"BLOCK_N": 128, "BLOCK_K": 64, "STAGES": 5},
                                 {"BLOCK_N": 32, "BLOCK_K": 128, "STAGES": 4, "SPLIT_K": 4}])
def test_decode_shapes_gpu(M, N, K, cfg):
    x, w, w2, b, res = _inputs(M, N, K, "cuda")
    x64, w64 = x.double(), w.double()
    assert_close(few_rows_linear(x, w, bias_N=b, config=cfg), x64 @ w64.t() + b.double(), torch.bfloat16)
    r = res.clone()
    few_rows_linear(x, w, epilogue="residual", out_MN=r, config=cfg)
    assert_close(r, res.double() + x64 @ w64.t(), torch.bfloat16)
    g = few_rows_linear(x, w, epilogue="silu_gate", w2_NK=w2, config=cfg)
    assert_close(g, F.silu(x64 @ w64.t()) * (x64 @ w2.double().t()), torch.bfloat16)
    if (cfg or {}).get("SPLIT_K", 1) == 1:
        nw = (1 + 0.5 * torch.randn(K, device="cuda")).to(torch.bfloat16)
        n64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
        assert_close(few_rows_linear(x, w, w2_NK=w2, epilogue="silu_gate", norm_K=nw, config=cfg),
                     F.silu(n64 @ w64.t()) * (n64 @ w2.double().t()), torch.bfloat16)
    for _ in range(3):  # split-K partials are summed in split order whichever program arrives last
        assert torch.equal(few_rows_linear(x, w, epilogue="silu_gate", w2_NK=w2, config=cfg), g)


@pytest.mark.parametrize("flat,fuse_norms,only", [(True, False, None), (False, False, None), (True, True, None),
                                                   (True, False, "silu_gate")])
def test_engine_patch_keeps_the_decode_forward(device, flat, fuse_norms, only):
    """bench_rollout --few-rows: the engine's decode forward (fused_decode_ops) of a tiny bf16 Qwen2 at 5 rows
    gives the same logits with every q/k/v, o_proj, gate/up and down_proj GEMM through few_rows_linear (flat:
    the stacked gate/up view of ZeRO 1/2's layout; else separate weights), and prefill rows stay on cuBLAS."""
    from transformers import AutoModelForCausalLM

    import benchmarks.few_rows_tma as FR
    from benchmarks.bench_rollout import flatten_parameters
    from r1train.generation.fused import fused_decode_ops
    from r1train.tasks.models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("tiny-qwen2", 97, hidden_size=64, num_layers=2, num_heads=4),
                                             dtype=torch.bfloat16).to(device).eval()
    if flat:
        flatten_parameters(model)
    calls, norms = [], []
    real = FR.few_rows_linear
    FR.few_rows_linear = lambda *a, **k: calls.append(k.get("epilogue", "none")) or norms.append(
        k.get("norm_K") is not None) or real(*a, **k)
    try:
        for rows, T in [(5, 1), (2, 40)]:  # a decode step; a prefill of 80 rows
            ids = torch.randint(0, 97, (rows, T), device=device)
            with torch.no_grad():
                with fused_decode_ops(model, buffers={}):
                    ref = model(ids).logits
                calls.clear()
                norms.clear()
                # the patch binds at fused_decode_ops's entry
                c = model.config  # only: the one projection with a config, the others stay on cuBLAS
                listed = {} if only is None else {("silu_gate", 2 * c.intermediate_size, c.hidden_size): {}}
                with FR.engine_patch(listed, fuse_norms=fuse_norms, only_listed=only is not None), \
                        fused_decode_ops(model, buffers={}):
                    got = model(ids).logits
            n_layers = c.num_hidden_layers
            expect = {"none": n_layers, "residual": 2 * n_layers, "silu_gate": n_layers} if rows * T <= 64 else {}
            expect = {k: v for k, v in expect.items() if only in (None, k)}
            assert {e: calls.count(e) for e in set(calls)} == expect
            assert sum(norms) == (2 * n_layers if fuse_norms and rows * T <= 64 else 0)
            assert not any("_r1k_norm" in m.__dict__ for m in model.modules())
            assert_close(got, ref.double(), torch.bfloat16, name=f"logits rows={rows} T={T}")
    finally:
        FR.few_rows_linear = real


def test_best_configs_picks_the_fastest_correct_config():
    from benchmarks.few_rows_tma import best_configs

    def key(bn, sk):
        return f"few_rows BLOCK_N={bn},BLOCK_K=128,STAGES=4,num_warps=4,SPLIT_K={sk}"

    sweep = {"results": [
        {"op": "gate_up", "N": 17920, "K": 1536, "us": {"engine (cuBLAS)": 20.0, key(32, 1): 16.0, key(64, 1): 15.5,
                                                         key(16, 1): "wrong: relative difference 0.5"}},
        {"op": "down", "N": 1536, "K": 8960, "us": {"engine (cuBLAS)": 12.0, key(16, 4): 9.0, key(32, 2): 9.5}},
        {"op": "qkv", "N": 2048, "K": 1536, "us": {"engine (cuBLAS)": 6.0, key(16, 1): "OutOfResources"}},
        {"op": "o_proj", "N": 1536, "K": 1536, "us": {"engine (cuBLAS)": 5.0, key(16, 2): 6.0}}]}
    cfg = {"BLOCK_K": 128, "STAGES": 4, "num_warps": 4}
    winners = {("silu_gate", 17920, 1536): {"BLOCK_N": 64, **cfg, "SPLIT_K": 1},
               ("residual", 1536, 8960): {"BLOCK_N": 16, **cfg, "SPLIT_K": 4}}
    assert best_configs(sweep, winners_only=True) == winners
    assert best_configs(sweep) == {**winners, ("residual", 1536, 1536): {"BLOCK_N": 16, **cfg, "SPLIT_K": 2}}
