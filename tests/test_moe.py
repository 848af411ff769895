"""MoE routing kernels (CUDA, Triton, C++ CPU op) against the reference: ids exactly, weights and gradients
within tolerance; permute / unpermute; custom-op registration (opcheck, torch.compile)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

import r1kernels as rk
from r1kernels import _backend
from r1kernels.ops import moe as moe_ops
from r1kernels.reference import moe as ref

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
BACKENDS = [b for b in ("cuda", "triton") if b in _backend.available("route", DEV)]
HAS_CPP = _backend.HAS_EXTENSION and hasattr(torch.ops.r1kernels, "moe_route")
needs_kernel = pytest.mark.skipif(not BACKENDS, reason="no MoE kernel runs here")
# (E, n_group, topk_group, top_k): V3 (256, 8, 4, 8), V2-Lite-like, no grouping, odd group sizes
CONFIGS = [(256, 8, 4, 8), (64, 4, 2, 6), (32, 1, 1, 4), (12, 3, 1, 2), (128, 8, 3, 5)]


def _logits(T, E, mode, dtype=torch.float32):
    if mode == "ties":  # few distinct values: many exact ties between experts and between groups
        x = torch.randint(-6, 7, (T, E)).float() / 4
    else:
        x = torch.randn(T, E) * 2
    return x.to(dtype).to(DEV)


def _backends_for(E, n_group, top_k, dtype=torch.float32):
    x = torch.empty(1, E, dtype=dtype)
    out = []
    for b in BACKENDS:
        fn = dict(_backend._LOADED["route"])[b]
        if fn.eligible(x, None, top_k, n_group, 1):
            out.append(b)
    return out


def _route_case(backend, E, n_group, topk_group, top_k, T, mode, dtype=torch.float32, norm=True):
    x = _logits(T, E, mode, dtype)
    bias = (torch.randint(-4, 5, (E,)).float() / 64 if mode == "ties" else torch.randn(E) * 0.05).to(DEV)
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=norm)
    xk = x.clone().requires_grad_()
    w, ids = rk.moe.route(xk, bias, backend=backend, **kw)
    xr = x.double().requires_grad_()
    w_ref, ids_ref = ref.route(x.float(), bias, top_k, n_group, topk_group, 2.5, norm)  # ids: same fp32 math
    w64, _ = _route64(xr, bias, ids_ref, 2.5, norm)
    return xk, w, ids, xr, w64, ids_ref, w_ref


def _route64(x64, bias, ids, scale, norm):
    s = torch.sigmoid(x64).gather(1, ids)
    if norm:
        s = s / (s.sum(-1, keepdim=True) + 1e-20)
    return s * scale, ids


@needs_kernel
@pytest.mark.parametrize("mode", ["random", "ties"])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_route_ids_exact_weights_grads(cfg, mode):
    E, n_group, topk_group, top_k = cfg
    for backend in _backends_for(E, n_group, top_k):
        xk, w, ids, xr, w64, ids_ref, w_ref = _route_case(backend, E, n_group, topk_group, top_k, 33, mode)
        assert ids.dtype == torch.int64 and w.dtype == torch.float32
        assert torch.equal(ids, ids_ref), f"{backend}: ids differ from the reference"
        assert_close(w, w64, name=f"{backend} weights")
        g = torch.randn_like(w)
        (w * g).sum().backward()
        (w64 * g.double()).sum().backward()
        assert_close(xk.grad, xr.grad, name=f"{backend} grad")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_low_precision_logits_and_no_norm(dtype):
    E, n_group, topk_group, top_k = 64, 4, 2, 6
    for backend in _backends_for(E, n_group, top_k, dtype):
        xk, w, ids, xr, w64, ids_ref, _ = _route_case(backend, E, n_group, topk_group, top_k, 17, "random", dtype,
                                                      norm=False)
        assert torch.equal(ids, ids_ref)
        assert_close(w, w64, name="weights")
        w.sum().backward()
        w64.sum().backward()
        assert xk.grad.dtype == dtype
        assert_close(xk.grad, xr.grad, dtype, name="grad")


@needs_kernel
def test_route_single_token_and_empty():
    for backend in BACKENDS:
        x = torch.randn(1, 32, device=DEV)
        w, ids = rk.moe.route(x, torch.zeros(32, device=DEV), top_k=3, n_group=4, topk_group=2, backend=backend)
        assert torch.equal(ids, ref.route(x, torch.zeros(32, device=DEV), 3, 4, 2)[1])
        w, ids = rk.moe.route(torch.randn(0, 32, device=DEV), torch.zeros(32, device=DEV), top_k=3, n_group=4,
                              topk_group=2, backend=backend)
        assert w.shape == (0, 3) and ids.shape == (0, 3)


def _nan_logit_routes(cfg, norm, dev):
    """A NaN router logit makes its token's weights NaN (some with norm_topk_prob=False, as the reference and
    transformers) on every backend of dev, so the layer's output and the loss show it; the other tokens are routed
    as without it. The Triton kernel ranked the NaN below -inf and returned finite weights."""
    E, n_group, topk_group, top_k = cfg
    x, bias = (torch.randn(5, E) * 2).to(dev), torch.randn(E, device=dev) * 0.1
    bad = x.clone()
    bad[2, torch.randint(0, E, ()).item()] = math.nan
    # the kernels eligible for this shape (the CUDA kernel takes E = 12 in no config it was built for)
    backends = [b for b, _, ok in _backend._runnable("route", dev) if ok is None or ok(bad, bias, top_k, n_group,
                                                                                          topk_group)]
    for backend in [*backends, "torch"]:
        w, ids = rk.moe.route(bad, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                              routed_scaling_factor=1.5, norm_topk_prob=norm, backend=backend)
        w0, ids0 = rk.moe.route(x, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                                routed_scaling_factor=1.5, norm_topk_prob=norm, backend=backend)
        assert torch.isnan(w[2]).any(), backend
        rows = [0, 1, 3, 4]
        assert torch.equal(ids[rows], ids0[rows]) and torch.equal(w[rows], w0[rows]), backend
    if HAS_CPP and dev == "cpu":
        w, _, _ = torch.ops.r1kernels.moe_route(bad, bias, top_k, n_group, topk_group, 1.5, norm)
        assert torch.isnan(w[2]).any()


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("norm", [True, False])
def test_route_nan_logit_gives_nan_weights_on_every_backend(cfg, norm):
    _nan_logit_routes(cfg, norm, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [True, False])
def test_gpu_route_nan_logit_gives_nan_weights(norm):
    for cfg in CONFIGS:
        _nan_logit_routes(cfg, norm, "cuda")


@pytest.mark.skipif(not HAS_CPP, reason="r1kernels._C has no MoE ops")
@pytest.mark.parametrize("cfg", CONFIGS)
def test_cpp_cpu_route_is_the_reference(cfg):
    E, n_group, topk_group, top_k = cfg
    x, bias = torch.randn(21, E), torch.randn(E) * 0.1
    w, ids, s = torch.ops.r1kernels.moe_route(x, bias, top_k, n_group, topk_group, 2.5, True)
    w_ref, ids_ref = ref.route(x, bias, top_k, n_group, topk_group, 2.5, True)
    assert torch.equal(ids, ids_ref) and torch.equal(w, w_ref)


def _route_vs_hf(E, n_group, topk_group, top_k, backend):
    tf = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    cfg = tf.DeepseekV3Config(hidden_size=24, moe_intermediate_size=8, intermediate_size=16, n_routed_experts=E,
                              n_group=n_group, topk_group=topk_group, num_experts_per_tok=top_k,
                              routed_scaling_factor=2.5, norm_topk_prob=True)
    moe = m.DeepseekV3MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 24 ** -0.5)
        moe.gate.e_score_correction_bias.uniform_(0.01, 0.06)  # positive biased scores (older HF masks with 0)
    out = moe.gate(torch.randn(40, 24))
    if not (isinstance(out, tuple) and len(out) == 3):
        pytest.skip("transformers' router API differs")
    logits, w_hf, ids_hf = out
    w, ids = rk.moe.route(logits.detach().to(DEV), moe.gate.e_score_correction_bias.to(DEV), top_k=top_k,
                          n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, backend=backend)
    # tokens whose choice is a near-tie in float64 (4th vs 5th group score, or k-th vs k+1-th expert score in
    # the kept groups, within 1e-5) may go either way in two float32 computations: compared only where clear
    T = len(logits)
    s_TGe = (logits.detach().double().sigmoid() + moe.gate.e_score_correction_bias.double()).view(T, n_group, -1)
    grp_TG = s_TGe.topk(2, -1).values.sum(-1)
    g_sorted = torch.cat([grp_TG.sort(-1, descending=True).values, grp_TG.new_full((T, 1), -math.inf)], 1)
    top_g = grp_TG.topk(topk_group, -1).indices
    kept = s_TGe.gather(1, top_g[..., None].expand(-1, -1, s_TGe.shape[-1])).flatten(1)
    kept = torch.cat([kept.sort(-1, descending=True).values, kept.new_full((T, 1), -math.inf)], 1)
    clear = (g_sorted[:, topk_group - 1] - g_sorted[:, topk_group] > 1e-5) & \
        (kept[:, top_k - 1] - kept[:, top_k] > 1e-5)
    assert clear.sum() >= len(clear) * 3 // 4, "too many near-ties to test"
    a, b = ids.cpu()[clear].sort(-1), ids_hf[clear].sort(-1)
    assert torch.equal(a.values, b.values)
    torch.testing.assert_close(w.cpu()[clear].gather(1, a.indices), w_hf.detach().float()[clear].gather(1, b.indices))


@needs_kernel
@pytest.mark.parametrize("cfg", [(256, 8, 4, 8), (32, 4, 2, 4)])
def test_route_kernels_match_transformers(cfg):
    for backend in _backends_for(cfg[0], cfg[1], cfg[3]):
        _route_vs_hf(*cfg, backend)


@pytest.mark.gpu
def test_cuda_rejects_unsupported_and_auto_falls_back():
    x, b = torch.randn(4, 12, device="cuda"), torch.zeros(12, device="cuda")
    if "cuda" in BACKENDS:
        with pytest.raises(ValueError):
            rk.moe.route(x, b, top_k=2, n_group=3, topk_group=1, backend="cuda")
    w, ids = rk.moe.route(x, b, top_k=2, n_group=3, topk_group=1)
    assert torch.equal(ids, ref.route(x, b, 2, 3, 1)[1])


# ---------------------------------------------------------------- permute / unpermute
PERMUTE_BACKENDS = [b for b in ("cuda", "triton") if b in _backend.available("permute", DEV)]


@pytest.mark.skipif(not PERMUTE_BACKENDS, reason="no permute kernel runs here")
@pytest.mark.parametrize("T,K,H,E,dtype", [(13, 3, 40, 8, torch.float32), (7, 2, 16, 5, torch.bfloat16),
                                           (1, 1, 8, 3, torch.float32), (33, 4, 24, 6, torch.float16),
                                           (9, 11, 24, 16, torch.float32)])  # K > 8: two chunks in CUDA's bwd
def test_permute_unpermute_match_reference(T, K, H, E, dtype):
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(DEV)
    for backend in PERMUTE_BACKENDS:
        hidden = torch.randn(T, H, device=DEV, dtype=dtype, requires_grad=True)
        permuted, row_map, counts = rk.moe.permute(hidden, ids, E, backend=backend)
        p_ref, rm_ref, c_ref = ref.permute(hidden.detach(), ids, E)
        assert torch.equal(row_map, rm_ref) and torch.equal(counts, c_ref) and torch.equal(permuted, p_ref)
        w = torch.rand(T, K, device=DEV, requires_grad=True)
        x = torch.randn(T * K, H, device=DEV, dtype=dtype, requires_grad=True)
        out = rk.moe.unpermute(x, row_map, w, backend=backend)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        out64 = ref.unpermute(x64, row_map, w64)
        assert out.dtype == dtype
        assert_close(out, out64, dtype, lowp=ref.unpermute(x.detach(), row_map, w.detach()), name="unpermute")
        g = torch.randn(T, H, device=DEV, dtype=dtype)
        out.backward(g)
        out64.backward(g.double())
        assert_close(x.grad, x64.grad, dtype, name="grad expert_out")
        assert_close(w.grad, w64.grad, dtype, name="grad weights")
        permuted.backward(x.detach())  # grad of permute: the sum of each token's K rows
        assert_close(hidden.grad, ref.unpermute(x.detach().double(), row_map, torch.ones(T, K, device=DEV,
                                                                                       dtype=torch.float64)),
                     dtype, name="grad hidden")


@pytest.mark.skipif(not PERMUTE_BACKENDS, reason="no permute kernel runs here")
def test_identity_experts_reproduce_weighted_sum():
    T, K, H, E = 10, 4, 32, 16
    hidden, ids = torch.randn(T, H, device=DEV), torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(DEV)
    w = torch.rand(T, K, device=DEV)
    for backend in PERMUTE_BACKENDS:
        permuted, row_map, counts = rk.moe.permute(hidden, ids, E, backend=backend)
        offs = counts.cumsum(0)
        experts_of_rows = torch.searchsorted(offs, torch.arange(T * K, device=DEV), right=True)
        assert torch.equal(experts_of_rows[row_map], ids.flatten())  # row_map lands in the expert's segment
        out = rk.moe.unpermute(permuted, row_map, w, backend=backend)
        torch.testing.assert_close(out, hidden * w.sum(1, keepdim=True))


# ---------------------------------------------------------------- registration
@pytest.mark.skipif(not HAS_CPP, reason="r1kernels._C has no MoE ops")
def test_opcheck_cpp_ops():
    """The C++ ops are plain (non-differentiable) ops with fakes; autograd is the Functions' (next test)."""
    ops = torch.ops.r1kernels
    dev = DEV if "cuda" in BACKENDS else "cpu"
    x, b = torch.randn(9, 32, device=dev), torch.randn(32, device=dev)
    torch.library.opcheck(ops.moe_route.default, (x, b, 4, 4, 2, 2.5, True))
    _, ids, s = ops.moe_route(x, b, 4, 4, 2, 2.5, True)
    torch.library.opcheck(ops.moe_route_backward.default, (torch.randn(9, 4, device=dev), ids, s, 32, 2.5, True,
                                                           torch.bfloat16))
    ids = torch.stack([torch.randperm(8)[:3] for _ in range(5)]).to(dev)
    torch.library.opcheck(ops.moe_permute_index.default, (ids, 8))
    row_map, _ = ops.moe_permute_index(ids, 8)
    torch.library.opcheck(ops.moe_permute.default, (torch.randn(5, 16, device=dev), row_map, 3))
    xe, w = torch.randn(15, 16, device=dev), torch.rand(5, 3, device=dev)
    torch.library.opcheck(ops.moe_unpermute.default, (xe, row_map, w, 3))
    torch.library.opcheck(ops.moe_unpermute.default, (xe, row_map, None, 3))
    torch.library.opcheck(ops.moe_unpermute_backward.default, (torch.randn(5, 16, device=dev), xe, row_map, w))


@pytest.mark.skipif(not HAS_CPP, reason="r1kernels._C has no MoE ops")
@pytest.mark.parametrize("T,cfg,H", [(19, (32, 4, 2, 4), 24), (1, (12, 3, 1, 2), 8), (40, (64, 4, 2, 6), 40)])
def test_cpp_autograd_path_on_cpu(T, cfg, H):
    """route_cuda / permute_cuda / unpermute_cuda are one autograd.Function each over the C++ ops; on CPU
    tensors they run the C++ CPU ops through that same path: values and gradients match the reference,
    eagerly and under torch.compile(fullgraph=True)."""
    E, n_group, topk_group, top_k = cfg
    x, bias = torch.randn(T, E), torch.randn(E) * 0.05
    hidden, g = torch.randn(T, H), torch.randn(T, H)

    def layer(x, hidden):
        w, ids = moe_ops.route_cuda(x, bias, top_k, n_group, topk_group, 2.5, True)
        p, row_map, counts = moe_ops.permute_cuda(hidden, ids, E)
        return moe_ops.unpermute_cuda(p * 1.5, row_map, w), ids, counts

    def layer_ref(x, hidden):
        w, ids = ref.route(x, bias, top_k, n_group, topk_group, 2.5, True)
        p, row_map, counts = ref.permute(hidden, ids, E)
        return ref.unpermute(p * 1.5, row_map, w), ids, counts

    x64, h64 = x.double().requires_grad_(), hidden.double().requires_grad_()
    out64, ids_ref, counts_ref = layer_ref(x64, h64)
    gx64, gh64 = torch.autograd.grad((out64 * g.double()).sum(), (x64, h64))
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        xk, hk = x.clone().requires_grad_(), hidden.clone().requires_grad_()
        out, ids, counts = fn(xk, hk)
        assert torch.equal(ids, ids_ref) and torch.equal(counts, counts_ref)
        assert_close(out, out64, name="layer output")
        gx, gh = torch.autograd.grad((out * g).sum(), (xk, hk))
        assert_close(gx, gx64, name="grad logits")
        assert_close(gh, gh64, name="grad hidden")


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton")
def test_opcheck_triton_ops():
    x, b = torch.randn(5, 32, device=DEV, requires_grad=True), torch.randn(32, device=DEV)
    torch.library.opcheck(torch.ops.r1kernels.moe_route_triton.default, (x, b, 4, 4, 2, 2.5, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    xe, w = torch.randn(6, 8, device=DEV, requires_grad=True), torch.rand(3, 2, device=DEV, requires_grad=True)
    row_map = torch.randperm(6, device=DEV)
    torch.library.opcheck(torch.ops.r1kernels.moe_unpermute_triton.default, (xe, row_map, w, 2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_kernel
def test_compile_fullgraph_route_permute_unpermute():
    backend = BACKENDS[0]
    if backend == "triton" and not CUDA and not _backend.TRITON_INTERPRET:
        pytest.skip("triton needs the interpreter on CPU")

    def layer(x, bias, hidden):
        w, ids = rk.moe.route(x, bias, top_k=4, n_group=4, topk_group=2, backend=backend)
        p, row_map, counts = rk.moe.permute(hidden, ids, 32, backend=backend)
        return rk.moe.unpermute(p * 2, row_map, w, backend=backend), counts

    x = torch.randn(6, 32, device=DEV, requires_grad=True)
    bias, hidden = torch.randn(32, device=DEV) * 0.1, torch.randn(6, 16, device=DEV, requires_grad=True)
    out, counts = torch.compile(layer, fullgraph=True, backend="aot_eager" if not CUDA else "inductor")(
        x, bias, hidden)
    out_e, counts_e = layer(x, bias, hidden)
    torch.testing.assert_close(out, out_e)
    assert torch.equal(counts, counts_e)
    g = torch.autograd.grad(out.sum(), (x, hidden))
    g_e = torch.autograd.grad(out_e.sum(), (x, hidden))
    for a, b in zip(g, g_e):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- real shapes on the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096, 16384])
def test_gpu_v3_gate_real_shape(T):
    x, bias = torch.randn(T, 256, device="cuda"), torch.randn(256, device="cuda") * 0.05
    w_ref, ids_ref = ref.route(x, bias, 8, 8, 4, 2.5, True)
    x64 = x.double().requires_grad_()
    w64, _ = _route64(x64, bias, ids_ref, 2.5, True)
    g = torch.randn_like(w_ref)
    (w64 * g.double()).sum().backward()
    for backend in BACKENDS:
        xk = x.clone().requires_grad_()
        w, ids = rk.moe.route(xk, bias, top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                              backend=backend)
        assert torch.equal(ids, ids_ref), f"{backend}: {(ids != ids_ref).any(1).sum()} tokens differ"
        assert_close(w, w64, name=f"{backend} weights")
        (w * g).sum().backward()
        assert_close(xk.grad, x64.grad, name=f"{backend} grad")
    xb = x.bfloat16()
    ids_b = ref.route(xb, bias, 8, 8, 4, 2.5, True)[1]
    for backend in BACKENDS:
        assert torch.equal(rk.moe.route(xb, bias, top_k=8, n_group=8, topk_group=4, backend=backend)[1], ids_b)


@pytest.mark.gpu
def test_gpu_permute_real_shape():
    T, K, H, E = 4096, 8, 7168, 256
    ids = ref.route(torch.randn(T, E, device="cuda"), torch.zeros(E, device="cuda"), K, 8, 4)[1]
    hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(T, K, device="cuda")
    p_ref, rm_ref, c_ref = ref.permute(hidden, ids, E)
    for backend in PERMUTE_BACKENDS:
        p, rm, c = rk.moe.permute(hidden, ids, E, backend=backend)
        assert torch.equal(rm, rm_ref) and torch.equal(c, c_ref) and torch.equal(p, p_ref)
        out = rk.moe.unpermute(p, rm, w, backend=backend)
        ref64 = ref.unpermute(p.double(), rm, w.double())
        assert_close(out, ref64, torch.bfloat16, lowp=ref.unpermute(p, rm, w), name=f"{backend} unpermute")


@pytest.mark.gpu
def test_gpu_unpermute_int32_row_map_past_2_31_elements():
    """An int32 row_map (accepted) whose rows reach r * H >= 2^31 elements (T = 37450, K = 8, H = 7168: rows from
    299594): the Triton unpermute read and its backward wrote the wrong rows (r * H in int32); forward and gradients
    now equal those of the same int64 row_map (the CUDA kernels widen it in their binding)."""
    T, K, H = 37450, 8, 7168
    x = torch.randn(T * K, H, device="cuda", dtype=torch.bfloat16)
    rm = torch.randperm(T * K, device="cuda")
    w = torch.rand(T, K, device="cuda")
    g = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    for backend in PERMUTE_BACKENDS:
        outs = []
        for row_map in (rm, rm.int()):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            out = rk.moe.unpermute(xr, row_map, wr, backend=backend)
            out.backward(g)
            outs.append((out.detach(), xr.grad, wr.grad))
            del xr, wr, out
        for a, b, name in zip(*outs, ("out", "grad expert_out", "grad topk_weights")):
            assert torch.equal(a, b), f"{backend} {name}"
        rows = rm.view(T, K)[-4:]  # the last tokens' rows (most past 2^31 / H) against a direct float64 sum
        want = (w[-4:, :, None].double() * x[rows].double()).sum(1)
        assert_close(outs[1][0][-4:], want, torch.bfloat16, name=f"{backend} last tokens")
        del outs
    torch.cuda.empty_cache()


def test_update_bias_all_reduce_single_rank(tmp_path):
    import torch.distributed as dist
    bias, counts = torch.zeros(4), torch.tensor([1, 2, 3, 6])
    with pytest.raises(ValueError, match="process group"):
        rk.moe.update_bias(bias, counts, all_reduce=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        rk.moe.update_bias(bias, counts, rate=0.5, all_reduce=True)
    finally:
        dist.destroy_process_group()
    assert bias.tolist() == [0.5, 0.5, 0.0, -0.5] and counts.tolist() == [1, 2, 3, 6]


def test_router_fp32_and_bf16_gemm():
    T, H, E_ = 24, 40, 32
    hidden = torch.randn(T, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(E_, H, device=DEV) * H ** -0.5)
    bias = torch.randn(E_, device=DEV) * 0.05
    kw = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    logits, w, ids = rk.moe.router(hidden, weight, bias, **kw)
    ref_logits = torch.nn.functional.linear(hidden.detach().float(), weight.detach())
    torch.testing.assert_close(logits, ref_logits)
    assert torch.equal(ids, ref.route(ref_logits, bias, 4, 4, 2, 2.5)[1])
    logits_b, w_b, ids_b = rk.moe.router(hidden, weight, bias, gemm_dtype=torch.bfloat16, **kw)
    assert logits_b.dtype == torch.float32
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = h64 @ w64.bfloat16().double().t()  # bf16 operands, exact sums; gradient straight through the cast
    torch.testing.assert_close(logits_b, exact.float().detach(), atol=1e-4, rtol=1e-4)
    g = torch.randn_like(w_b)
    gh, gw = torch.autograd.grad((w_b * g).sum(), (hidden, weight))
    ((_route64(exact, bias, ids_b, 2.5, True)[0] * g.double()).sum()).backward()
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    assert_close(gw, w64.grad, torch.bfloat16, name="grad gate weight (bf16 GEMM)")
    assert_close(gh, h64.grad, torch.bfloat16, name="grad hidden (bf16 GEMM)")
    with pytest.raises(ValueError, match="gemm_dtype"):
        rk.moe.router(hidden, weight, bias, gemm_dtype=torch.float16, **kw)
    with pytest.raises(ValueError, match="gate_weight"):
        rk.moe.router(hidden, weight[:, :-1], bias, **kw)


# ---------------------------------------------------------------- audit regressions
@pytest.mark.parametrize("backend", ["torch"] + PERMUTE_BACKENDS)
def test_unpermute_rejects_row_map_that_is_not_a_permutation(backend):
    """A row_map with a repeated row (in range, so it passed) gave the kernels' backward uninitialised memory
    as the gradient of the rows no slot wrote (-2.5e29 under the Triton interpreter)."""
    T, K, H = 3, 2, 4
    x, w = torch.randn(T * K, H, device=DEV), torch.rand(T, K, device=DEV)
    with pytest.raises(ValueError, match="row_map"):
        rk.moe.unpermute(x, torch.zeros(T * K, dtype=torch.long, device=DEV), w, backend=backend)
    row_map = torch.randperm(T * K, device=DEV)  # a permutation still runs
    out = rk.moe.unpermute(x, row_map, w, backend=backend)
    torch.testing.assert_close(out, ref.unpermute(x, row_map, w))


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_permute_unpermute_empty_batch_and_no_expert_per_token(backend):
    """T = 0 (reference unpermute: a RuntimeError from view(0, K, -1)) and K = 0, tokens routed to no expert
    (kernels: ZeroDivisionError forward and in permute's backward): [T, H] zeros, zero gradients."""
    H, E = 4, 5
    for T, K in ((0, 2), (3, 0)):
        hidden = torch.randn(T, H, device=DEV, requires_grad=True)
        ids = torch.zeros(T, K, dtype=torch.long, device=DEV)
        permuted, row_map, counts = rk.moe.permute(hidden, ids, E, backend=backend)
        assert permuted.shape == (T * K, H) and row_map.shape == (T * K,) and counts.tolist() == [0] * E
        w = torch.rand(T, K, device=DEV, requires_grad=True)
        out = rk.moe.unpermute(permuted * 2, row_map, w, backend=backend)
        assert out.shape == (T, H) and not out.any()
        out.sum().backward()
        assert hidden.grad.shape == (T, H) and not hidden.grad.any()
        assert w.grad.shape == (T, K)


@pytest.mark.parametrize("cfg", [(32, 4, 2, 4), (12, 3, 1, 2), (64, 1, 1, 6)])
@pytest.mark.parametrize("backend", ["torch", "auto"] + BACKENDS)
def test_route_rejects_non_bool_norm_topk_prob_and_non_finite_bias(cfg, backend, monkeypatch):
    """norm_topk_prob was bool()-converted: the string "false" (a config value read as text) normalized silently;
    now anything but a bool is an error naming it. A NaN or inf e_score_correction_bias selected arbitrary experts
    silently; now an error naming it, through rk.moe.router too (on a GPU a ValueError under R1K_SYNC_CHECKS=1,
    else a device assert). Valid inputs still route as the reference."""
    monkeypatch.setattr(rk._checks, "SYNC_CHECKS", True)
    E, n_group, topk_group, top_k = cfg
    T = int(torch.randint(1, 20, ()))
    x, bias = _logits(T, E, "random"), (torch.randn(E) * 0.05).to(DEV)
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, backend=backend)
    for bad in ("false", "true", 0, 1, None, torch.tensor(False)):
        with pytest.raises(ValueError, match="norm_topk_prob must be a bool"):
            rk.moe.route(x, bias, norm_topk_prob=bad, **kw)
    for norm in (True, False):
        w, ids = rk.moe.route(x, bias, norm_topk_prob=norm, **kw)
        w_ref, ids_ref = ref.route(x, bias, top_k, n_group, topk_group, 1.0, norm)
        assert torch.equal(ids, ids_ref)
        assert_close(w, w_ref, name=f"weights norm={norm}")
    hidden, gate = torch.randn(T, 8, device=DEV), torch.randn(E, 8, device=DEV)
    for v in (float("nan"), float("inf"), -float("inf")):
        b = bias.clone()
        b[int(torch.randint(0, E, ()))] = v
        with pytest.raises(ValueError, match="e_score_correction_bias contains NaN or inf"):
            rk.moe.route(x, b, **kw)
        with pytest.raises(ValueError, match="e_score_correction_bias"):
            rk.moe.router(hidden, gate, b, **kw)


def test_cuda_permute_eligible_only_for_its_expert_range(monkeypatch):
    """The CUDA permute index kernel takes 1..1024 experts (csrc/cuda/moe_launch.cpp); its eligibility said yes to
    any count, so backend auto on CUDA with more experts raised there instead of falling back. Now it is
    ineligible past 1024: auto picks another kernel or the reference, backend="cuda" is a ValueError naming the
    backend. Triton's sort-based index has no such bound."""
    T, K = int(torch.randint(1, 9, ())), int(torch.randint(1, 4, ()))
    hidden, ids = torch.randn(T, 8), torch.randint(0, 4, (T, K))
    assert moe_ops.CUDA_PERMUTE_MAX_EXPERTS == 1024
    for E, ok in ((1, True), (4, True), (1024, True), (1025, False), (int(torch.randint(1025, 5000, ())), False)):
        assert moe_ops._permute_cuda_eligible(hidden, ids, E) is ok, E
        assert moe_ops._permute_eligible(hidden, ids, E)  # the shared conditions hold: the count alone decides
    assert not moe_ops._permute_cuda_eligible(hidden, ids[:, :0], 8)  # K = 0: the reference, as before
    if not HAS_CPP:
        return
    assert moe_ops.permute_cuda.eligible is moe_ops._permute_cuda_eligible
    # backend selection with the CUDA kernel as the only candidate (no GPU needed: pick reads the eligibility)
    monkeypatch.setitem(_backend._RUNS, ("permute", "cuda"), [("cuda", moe_ops.permute_cuda,
                                                               moe_ops.permute_cuda.eligible)])
    dev = torch.device("cuda")
    assert _backend.kernel("permute", "auto", dev, hidden, ids, 1024) is moe_ops.permute_cuda
    assert _backend.kernel("permute", "auto", dev, hidden, ids, 1025) is None
    with pytest.raises(ValueError, match="backend='cuda' for permute does not support these inputs"):
        _backend.pick("permute", "cuda", dev, hidden, ids, 2048)
