"""rk.decode_linear (the decode step's projections: bias, residual and SiLU-gate epilogues): the Triton kernel
(interpreter on CPU) and the torch reference each against float64, at row counts below, at and past a tile,
N and K not multiples of the tiles; the generation engine's decode forward with the kernel against without."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import r1kernels as rk

pytest.importorskip("triton")
from r1kernels.ops import decode_linear as dops  # noqa: E402
from r1kernels.triton import decode_linear as dk  # noqa: E402

SHAPES = [(1, 33, 40), (5, 100, 96), (16, 48, 64), (64, 70, 200)]
BACKENDS = ["triton", "torch"]


def _inputs(M, N, K, device, dtype=torch.bfloat16):
    x = torch.randn(M, K, device=device).to(dtype)
    w, w2 = [(torch.randn(N, K, device=device) / K ** 0.5).to(dtype) for _ in range(2)]
    return x, w, w2, torch.randn(N, device=device).to(dtype), torch.randn(M, N, device=device).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_epilogues_match_float64(M, N, K, backend, device):
    x, w, w2, b, res = _inputs(M, N, K, device)
    x64, w64 = x.double(), w.double()
    y = x64 @ w64.t()
    out = rk.decode_linear(x, w, backend=backend)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert_close(out, y, torch.bfloat16, name="none")
    assert_close(rk.decode_linear(x, w, bias=b, backend=backend), y + b.double(), torch.bfloat16, name="bias")
    for bias in (None, b):
        r = res.clone()
        got = rk.decode_linear(x, w, bias=bias, residual=r, backend=backend)
        assert got is r
        want = res.double() + y + (0 if bias is None else b.double())
        assert_close(r, want, torch.bfloat16, name=f"residual bias={bias is not None}")
    g = rk.decode_linear(x, w, up_weight=w2, backend=backend)
    assert_close(g, F.silu(y) * (x64 @ w2.double().t()), torch.bfloat16, name="silu_gate")
    assert torch.equal(rk.decode_linear(x, w, up_weight=w2, backend=backend), g)  # deterministic


def _hf_rms_norm64(x, g, eps):
    """Hugging Face's RMSNorm in float64, with its one rounding of the normalized row to x's dtype."""
    h = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    return g.double() * h.to(x.dtype).double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_norm_weight_folds_the_rms_norm(M, N, K, backend, device):
    """norm_weight: x RMS-normalized first (the layer's norm folded into its projection), every epilogue, against
    float64 of Hugging Face's RMSNorm then the projection; rows of very different scales (the norm's sum of
    squares is per row) and an eps that matters for the smallest."""
    x, w, w2, b, res = _inputs(M, N, K, device)
    x = (x.float() * torch.logspace(-3, 2, M, device=device)[:, None]).to(torch.bfloat16)
    g = (torch.rand(K, device=device) + 0.5).to(torch.bfloat16)
    eps = 1e-5
    n64 = _hf_rms_norm64(x, g, eps)
    y = n64 @ w.double().t()
    assert_close(rk.decode_linear(x, w, bias=b, norm_weight=g, eps=eps, backend=backend), y + b.double(),
                 torch.bfloat16, name="norm + bias")
    r = res.clone()
    rk.decode_linear(x, w, residual=r, norm_weight=g, eps=eps, backend=backend)
    assert_close(r, res.double() + y, torch.bfloat16, name="norm + residual")
    got = rk.decode_linear(x, w, up_weight=w2, norm_weight=g, eps=eps, backend=backend)
    assert_close(got, F.silu(y) * (n64 @ w2.double().t()), torch.bfloat16, name="norm + silu_gate")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_and_up_as_halves_of_one_weight(backend, device):
    """gate/up as the two halves of one stacked [2I, K] weight (the engine's layout under ZeRO 1/2; the
    reference then runs one GEMM over both)."""
    x, w, w2, _, _ = _inputs(7, 24, 48, device)
    gu = torch.cat([w, w2])
    got = rk.decode_linear(x, gu[:24], up_weight=gu[24:], backend=backend)
    assert_close(got, F.silu(x.double() @ w.double().t()) * (x.double() @ w2.double().t()), torch.bfloat16)


def test_eligible():
    x, w, w2, b, res = _inputs(4, 24, 32, "cpu")
    ok = dops.decode_linear_triton.eligible
    assert ok(x, w) and ok(x, w, b) and ok(x, w, residual=res) and ok(x, w, up_weight=w2)
    assert not ok(torch.zeros(65, 32, dtype=torch.bfloat16), w)   # more rows than a tile
    assert not ok(x.float(), w.float())                           # fp32: the reference
    assert not ok(x, w.t().contiguous().t())                      # K not the unit stride
    assert not ok(x[:, :30].contiguous(), w[:, :30].contiguous())  # rows of 60 bytes: not 16-byte aligned
    assert not ok(torch.zeros(0, 32, dtype=torch.bfloat16), w)    # an empty axis
    assert ok(x, torch.cat([w, w2])[24:])                         # a 16-byte aligned offset view
    g = torch.ones(64, dtype=torch.bfloat16)
    assert ok(x, w, norm_weight=g[:32]) and not ok(x, w, norm_weight=g[::2])  # the norm weight: unit stride


def test_a_view_at_an_odd_offset(device):
    """x starting 2 bytes into its storage (no tensor descriptor over it: the op runs the reference), and
    weights as halves of one buffer: the same products."""
    buf = torch.randn(4 * 32 + 1, device=device).to(torch.bfloat16)
    x = buf[1:].view(4, 32)
    _, w, w2, b, res = _inputs(4, 24, 32, device)
    assert dops.decode_linear_triton.eligible(x, w)  # shapes and strides only
    want = x.double() @ w.double().t()
    assert_close(rk.decode_linear(x, w, bias=b), want + b.double(), torch.bfloat16)
    assert_close(rk.decode_linear(x, w, up_weight=w2), F.silu(want) * (x.double() @ w2.double().t()), torch.bfloat16)
    r = res.clone()
    rk.decode_linear(x, w, residual=r)
    assert_close(r, res.double() + want, torch.bfloat16)


def test_empty_and_fp32_inputs_run_the_reference(device):
    x, w, _, b, _ = _inputs(0, 8, 16, device)
    assert rk.decode_linear(x, w, bias=b).shape == (0, 8)
    x, w, _, b, _ = _inputs(3, 8, 16, device, torch.float32)
    assert_close(rk.decode_linear(x, w, bias=b), x.double() @ w.double().t() + b.double(), torch.float32)


def test_bad_arguments():
    x, w, w2, b, res = _inputs(4, 8, 16, "cpu")
    with pytest.raises(ValueError, match="weight"):
        rk.decode_linear(x, w[:, :15])
    with pytest.raises(ValueError, match="up_weight"):
        rk.decode_linear(x, w, up_weight=w2[:7])
    with pytest.raises(ValueError, match="up_weight"):
        rk.decode_linear(x, w, up_weight=w2, bias=b)
    with pytest.raises(ValueError, match="up_weight"):
        rk.decode_linear(x, w, up_weight=w2, residual=res)
    with pytest.raises(ValueError, match="bias"):
        rk.decode_linear(x, w, bias=b[:7])
    with pytest.raises(ValueError, match="residual"):
        rk.decode_linear(x, w, residual=res[:3])
    with pytest.raises(ValueError, match="dtype"):
        rk.decode_linear(x, w.float())
    with pytest.raises(ValueError, match="x"):
        rk.decode_linear(x[0], w)
    with pytest.raises(ValueError, match="backend"):
        rk.decode_linear(torch.zeros(65, 16, dtype=torch.bfloat16), w, backend="triton")
    g = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="norm_weight"):
        rk.decode_linear(x, w, norm_weight=g[:15])
    with pytest.raises(ValueError, match="norm_weight"):
        rk.decode_linear(x, w, norm_weight=g.float())
    with pytest.raises(ValueError, match="eps"):
        rk.decode_linear(x, w, norm_weight=g, eps=0.0)


def test_residual_that_overlaps_an_input_or_itself_is_an_error():
    """residual is written in place while x / weight are read: sharing memory would race in the kernel (and is
    wrong in the reference's bf16 addmm_); an expanded residual repeats memory."""
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    w = torch.randn(8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual .*share memory with x"):
        rk.decode_linear(x, w, residual=x)
    buf = torch.randn(8, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="residual .*share memory with x"):
        rk.decode_linear(buf[:4], w, residual=buf[2:6])
    with pytest.raises(ValueError, match="residual .*repeat memory"):
        rk.decode_linear(x, w, residual=torch.zeros(1, 8, dtype=torch.bfloat16).expand(4, 8))
    res = torch.randn(4, 8, dtype=torch.bfloat16)
    rk.decode_linear(buf[:4], w, residual=res)  # disjoint: fine


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["bias", "residual", "silu_gate", "norm"])
def test_compile_fullgraph(kind, backend, device):
    """Every form traces under torch.compile(fullgraph=True) (eligibility: shapes, strides and dtypes only)."""
    x, w, w2, b, res = _inputs(5, 48, 64, device)
    kw = {"bias": dict(bias=b), "residual": dict(residual=res.clone()), "silu_gate": dict(up_weight=w2),
          "norm": dict(up_weight=w2, norm_weight=torch.rand(64, device=device).to(x.dtype), eps=1e-5)}[kind]
    want = rk.decode_linear(x, w, backend=backend, **{k: v.clone() if k == "residual" else v for k, v in kw.items()})
    f = torch.compile(lambda x, w, kw: rk.decode_linear(x, w, backend=backend, **kw) * 2, fullgraph=True)
    if kind == "norm" and backend == "torch":  # inductor fuses the reference's RMSNorm: its own fp32 rounding
        assert_close(f(x, w, kw), want.double() * 2, torch.bfloat16)
    else:
        torch.testing.assert_close(f(x, w, kw), want * 2, rtol=0, atol=0)


def test_opcheck(device):
    x, w, w2, b, res = _inputs(3, 24, 32, device)
    torch.library.opcheck(dops.decode_linear_op, (x, w, b, None))
    torch.library.opcheck(dops.decode_linear_op, (x, w, None, w2))
    torch.library.opcheck(dops.decode_linear_residual_op, (x, w, res.clone(), b))
    g = torch.rand(32, device=device).to(x.dtype)
    torch.library.opcheck(dops.decode_linear_op, (x, w, b, None, g, 1e-5))
    torch.library.opcheck(dops.decode_linear_residual_op, (x, w, res.clone(), None, g, 1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(64, 2048, 1536), (37, 1536, 8960), (64, 17920, 1536), (1, 1536, 1536)])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 64, "BLOCK_K": 128, "STAGES": 3},
                                    {"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 4, "PREFETCH": 1 << 20}])
def test_decode_shapes_gpu(M, N, K, config):
    """The production configs (CONFIGS) and others (one prefetching whole weight rows into L2) at Qwen2.5-1.5B's
    decode shapes, against float64."""
    x, w, w2, b, res = _inputs(M, N, K, "cuda")
    x64, w64 = x.double(), w.double()
    y = x64 @ w64.t()
    assert_close(dk.decode_linear(x, w, bias_N=b, config=config), y + b.double(), torch.bfloat16)
    r = res.clone()
    dk.decode_linear(x, w, residual_MN=r, config=config)
    assert_close(r, res.double() + y, torch.bfloat16)
    g = dk.decode_linear(x, w, w2_NK=w2, config=config)
    assert_close(g, F.silu(y) * (x64 @ w2.double().t()), torch.bfloat16)
    # the RMSNorm folded in (norm_K): on the GPU the x tile goes through registers (x * g) before the wgmma
    nw = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
    n64 = _hf_rms_norm64(x, nw, 1e-6)
    assert_close(dk.decode_linear(x, w, bias_N=b, norm_K=nw, config=config), n64 @ w64.t() + b.double(),
                 torch.bfloat16, name="norm + bias")
    assert_close(dk.decode_linear(x, w, w2_NK=w2, norm_K=nw, config=config),
                 F.silu(n64 @ w64.t()) * (n64 @ w2.double().t()), torch.bfloat16, name="norm + silu_gate")


@pytest.mark.gpu
def test_one_wave_rule_gpu():
    """On a GPU the kernel takes a projection only when its programs fit one wave of the SMs (7B's q/k/v, 288
    programs of 16 rows, measured slower than cuBLAS): 1.5B's q/k/v (2048 rows, 128 programs) is taken where the
    GPU has >= 128 SMs."""
    from r1kernels.triton.device import sm_count

    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = lambda n: torch.empty(n, 256, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    sms = sm_count(x.device)
    assert dops.decode_linear_triton.eligible(x, w(16 * sms))
    assert not dops.decode_linear_triton.eligible(x, w(16 * sms + 1))
    assert not dops.decode_linear_triton.eligible(x, w(128 * sms + 1), up_weight=w(128 * sms + 1))


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("extra", [(), ("norm",), ("down_proj", "norm")])
def test_engine_decode_forward_with_and_without_the_kernel(device, flat, extra, monkeypatch):
    _engine_decode_forward(device, flat, extra, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [(), ("norm",), ("down_proj", "norm")])
def test_engine_decode_forward_gpu(extra, monkeypatch):
    """The same on the GPU: the compiled kernels (the folded norm's x tile through registers)."""
    _engine_decode_forward("cuda", True, extra, monkeypatch)


def _engine_decode_forward(device, flat, extra, monkeypatch):
    """The engine's decode forward (fused_decode_ops) of a tiny bf16 Qwen2 at 5 and 20 rows gives the same logits
    with q/k/v, o_proj and gate/up (extra: + down_proj; + the layers' RMSNorms folded into the q/k/v and gate/up
    kernels) through rk.decode_linear's kernel as with DECODE_LINEAR empty (the cuBLAS forms and rk.rms_norm;
    flat: the stacked gate/up view of ZeRO 1/2's layout, else separate weights); the kernel runs from
    DECODE_LINEAR_MIN_ROWS rows (5 rows: cuBLAS, as measured faster; then again with the minimum at 1);
    prefills (several tokens a row), even of fewer than 64 token rows, call no kernel and fold no norm."""
    from transformers import AutoModelForCausalLM

    from benchmarks.bench_rollout import flatten_parameters
    from r1train.generation import fused as fz
    from r1train.tasks.models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("tiny-qwen2", 97, hidden_size=64, num_layers=2, num_heads=4),
                                             dtype=torch.bfloat16).to(device).eval()
    if flat:
        flatten_parameters(model)
    calls = []
    real = dops.decode_linear_triton

    def spy(x, w, bias=None, residual=None, up_weight=None, norm_weight=None, eps=1e-6):
        epi = "silu_gate" if up_weight is not None else "residual" if residual is not None else "none"
        calls.append(epi + ("+norm" if norm_weight is not None else ""))
        return real(x, w, bias, residual, up_weight, norm_weight, eps)
    spy.eligible = real.eligible
    key = ("decode_linear", torch.device(device).type)
    monkeypatch.setitem(rk._backend._RUNS, key, [("triton", spy, spy.eligible)])
    norms = []
    real_norm = rk.rms_norm
    monkeypatch.setattr(rk, "rms_norm", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    if key[1] == "cpu":
        # the rotary embedding (the same op in ref and got, not what is compared) by the torch reference: under the
        # interpreter its Triton kernel (tested in test_fused_decode) took ~2/3 of this test's time
        monkeypatch.setitem(rk._backend._RUNS, ("apply_rotary", "cpu"), [])
    L = model.config.num_hidden_layers
    assert fz.DECODE_LINEAR_MIN_ROWS == 17
    # decode steps below and above the row minimum, then at 5 rows with a minimum of 1; prefills of 80 and 48 rows
    for rows, T, least in [(5, 1, 17), (20, 1, 17), (5, 1, 1), (2, 40, 1), (2, 24, 1)]:
        monkeypatch.setattr(fz, "DECODE_LINEAR_MIN_ROWS", least)
        ids = torch.randint(0, 97, (rows, T), device=device)
        with torch.no_grad():
            monkeypatch.setattr(fz, "DECODE_LINEAR", ())
            with fz.fused_decode_ops(model, buffers={}):
                ref = model(ids).logits
            assert calls == [] and len(norms) == 2 * L + 1
            norms.clear()
            monkeypatch.setattr(fz, "DECODE_LINEAR", ("qkv", "o_proj", "gate_up", *extra))
            with fz.fused_decode_ops(model, buffers={}):
                got = model(ids).logits
        fold = "+norm" if "norm" in extra else ""
        want = {"none" + fold: L, "residual": L * (2 if "down_proj" in extra else 1), "silu_gate" + fold: L}
        kernel = T == 1 and rows >= least  # prefill and steps of fewer rows: cuBLAS
        assert {e: calls.count(e) for e in set(calls)} == (want if kernel else {})
        assert len(norms) == (1 if kernel and fold else 2 * L + 1)  # folded: only the final norm runs alone
        calls.clear()
        norms.clear()
        assert_close(got, ref.double(), torch.bfloat16, name=f"logits rows={rows} T={T}")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [64, 7])
def test_dependent_launch_chain_in_a_graph_gpu(rows, monkeypatch):
    """The decode step's kernels launched with programmatic dependent launch (device.PDL, weight prefetch before
    the wait) in a replayed CUDA graph: a chain of 6 layers (rms_norm -> q/k/v -> attention writing this step's
    k/v -> o_proj + residual -> rms_norm -> gate/up + SiLU -> down + residual), each kernel consuming its
    predecessors' outputs, equals the same kernels launched without it bitwise (a kernel that started before its
    inputs were written would differ), over 4 replays with fresh inputs; q/k/v against float64 math."""
    from r1kernels.triton import device as kd

    H, Hq, Hkv, D, I, L = 1536, 12, 2, 128, 2048, 300
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2**31, ())))  # from the run's seed
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale).to(torch.bfloat16)  # noqa: E731
    layers = [dict(n1=rnd(H) + 1, wqkv=rnd((Hq + 2 * Hkv) * D, H, scale=H ** -0.5), b=rnd((Hq + 2 * Hkv) * D),
                   wo=rnd(H, Hq * D, scale=(Hq * D) ** -0.5), n2=rnd(H) + 1, wg=rnd(I, H, scale=H ** -0.5),
                   wu=rnd(I, H, scale=H ** -0.5), wd=rnd(H, I, scale=I ** -0.5), kc=rnd(rows, Hkv, L, D),
                   vc=rnd(rows, Hkv, L, D))
              for _ in range(6)]
    lens = torch.randint(1, L - 1, (rows,), device="cuda", generator=g)
    x_in = torch.empty(rows, H, device="cuda", dtype=torch.bfloat16)

    def step(ly_list):
        h = x_in.clone()
        outs = []
        for ly in ly_list:
            qkv = rk.decode_linear(rk.rms_norm(h, ly["n1"]), ly["wqkv"], bias=ly["b"])
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
            a = rk.decode_attention(q.view(rows, Hq, D), ly["kc"], ly["vc"], lens, k_new=k.view(rows, Hkv, D),
                                    v_new=v.view(rows, Hkv, D), check_lens=False)
            rk.decode_linear(a.reshape(rows, -1), ly["wo"], residual=h)
            m = rk.decode_linear(rk.rms_norm(h, ly["n2"]), ly["wg"], up_weight=ly["wu"])
            rk.decode_linear(m, ly["wd"], residual=h)
            outs.append(m)
        return h, outs

    def fresh_caches():
        return [{**ly, "kc": ly["kc"].clone(), "vc": ly["vc"].clone()} for ly in layers]

    monkeypatch.setattr(kd, "PDL", True)
    assert kd.pdl(x_in.device), "a GPU of compute capability >= 9 launches these kernels with PDL"
    live = fresh_caches()
    step(live)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h_g, outs_g = step(live)
    for _ in range(4):
        x_in.copy_(rnd(rows, H))
        for ly, lv in zip(layers, live):  # the caches as the capture's inputs (the step writes position lens)
            lv["kc"].copy_(ly["kc"])
            lv["vc"].copy_(ly["vc"])
        graph.replay()
        monkeypatch.setattr(kd, "PDL", False)
        h_ref, outs_ref = step(fresh_caches())
        monkeypatch.setattr(kd, "PDL", True)
        torch.cuda.synchronize()
        assert torch.equal(h_g, h_ref)
        for a, b in zip(outs_g, outs_ref):
            assert torch.equal(a, b)
    # the first layer's gate/up output against float64 math from the same inputs
    ly = layers[0]
    qkv = _hf_rms_norm64(x_in, ly["n1"], 1e-6) @ ly["wqkv"].double().t() + ly["b"].double()
    assert_close(rk.decode_linear(rk.rms_norm(x_in, ly["n1"]), ly["wqkv"], bias=ly["b"]), qkv, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_engine_with_dependent_launch_gpu(name, monkeypatch):
    """The engine's captured decode step on a bf16 model with programmatic dependent launch (off by default) and
    without: the same math, so the sampled and the greedy tokens and their log-probs are bitwise equal. 12 rows,
    with rk.decode_linear's kernel in the step (its row minimum set to 1: by default 12 rows keep cuBLAS)."""
    from transformers import AutoModelForCausalLM

    from r1kernels.triton import device as kd
    from r1train.generation import Engine, SamplingParams
    from r1train.generation import fused as fz
    from r1train.tasks.models import tiny_config

    monkeypatch.setattr(fz, "DECODE_LINEAR_MIN_ROWS", 1)

    model = AutoModelForCausalLM.from_config(tiny_config(name, 97, hidden_size=128, num_layers=3, num_heads=4,
                                                         max_position=256), dtype=torch.bfloat16).cuda().eval()
    B, P = 12, 9
    ids = torch.randint(3, 97, (B, P), device="cuda")
    mask = torch.ones_like(ids)
    eng = Engine(model, cuda_graphs=True)

    def run(sp):
        eng.reset()  # captured graphs keep the kernels (and launch options) they captured
        out = eng.generate(ids, mask, list(range(B)), sp, eos_id=-1, pad_id=0)
        assert eng.cuda_graphs and eng.stats["captures"] >= 1
        return out

    for sp in (SamplingParams(20, temperature=1.0), SamplingParams(20, greedy=True)):
        monkeypatch.setattr(kd, "PDL", False)
        tok, logp = run(sp)
        monkeypatch.setattr(kd, "PDL", True)
        tok_p, logp_p = run(sp)
        assert torch.equal(tok_p, tok) and torch.equal(logp_p, logp)
