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
@pytest.mark.parametrize("kind", ["bias", "residual", "silu_gate"])
def test_compile_fullgraph(kind, backend, device):
    """Every form traces under torch.compile(fullgraph=True) (eligibility: shapes, strides and dtypes only)."""
    x, w, w2, b, res = _inputs(5, 48, 64, device)
    kw = {"bias": dict(bias=b), "residual": dict(residual=res.clone()), "silu_gate": dict(up_weight=w2)}[kind]
    want = rk.decode_linear(x, w, backend=backend, **{k: v.clone() if k == "residual" else v for k, v in kw.items()})
    f = torch.compile(lambda x, w, kw: rk.decode_linear(x, w, backend=backend, **kw) * 2, fullgraph=True)
    torch.testing.assert_close(f(x, w, kw), want * 2, rtol=0, atol=0)


def test_opcheck(device):
    x, w, w2, b, res = _inputs(3, 24, 32, device)
    torch.library.opcheck(dops.decode_linear_op, (x, w, b, None))
    torch.library.opcheck(dops.decode_linear_op, (x, w, None, w2))
    torch.library.opcheck(dops.decode_linear_residual_op, (x, w, res.clone(), b))


def test_block_m_below_rows_is_refused():
    """A config's x tile of fewer rows than x (the benchmarks' BLOCK_M) would leave rows uncomputed: an error."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, _, _, _ = _inputs(20, 32, 64, dev)
    with pytest.raises(ValueError, match="BLOCK_M=16 is below the 20 rows"):
        dk.decode_linear(x, w, config={"BLOCK_M": 16})
    assert_close(dk.decode_linear(x, w, config={"BLOCK_M": 32}), x.double() @ w.double().t(), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(64, 2048, 1536), (37, 1536, 8960), (64, 17920, 1536), (1, 1536, 1536)])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 64, "BLOCK_K": 128, "STAGES": 3},
                                    {"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 4}])
def test_decode_shapes_gpu(M, N, K, config):
    """The production configs (CONFIGS) and others at Qwen2.5-1.5B's decode shapes, against float64."""
    x, w, w2, b, res = _inputs(M, N, K, "cuda")
    x64, w64 = x.double(), w.double()
    y = x64 @ w64.t()
    assert_close(dk.decode_linear(x, w, bias_N=b, config=config), y + b.double(), torch.bfloat16)
    r = res.clone()
    dk.decode_linear(x, w, residual_MN=r, config=config)
    assert_close(r, res.double() + y, torch.bfloat16)
    g = dk.decode_linear(x, w, w2_NK=w2, config=config)
    assert_close(g, F.silu(y) * (x64 @ w2.double().t()), torch.bfloat16)


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
@pytest.mark.parametrize("extra", [(), ("down_proj",)])
def test_engine_decode_forward_with_and_without_the_kernel(device, flat, extra, monkeypatch):
    _engine_decode_forward(device, flat, extra, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [(), ("down_proj",)])
def test_engine_decode_forward_gpu(extra, monkeypatch):
    """The same on the GPU: the compiled kernels."""
    _engine_decode_forward("cuda", True, extra, monkeypatch)


def _engine_decode_forward(device, flat, extra, monkeypatch):
    """The engine's decode forward (fused_decode_ops) of a tiny bf16 Qwen2 at 5 and 20 rows gives the same logits
    with q/k/v, o_proj and gate/up (extra: + down_proj) through rk.decode_linear's kernel as with DECODE_LINEAR
    empty (the cuBLAS forms and rk.rms_norm;
    flat: the stacked gate/up view of ZeRO 1/2's layout, else separate weights); the kernel runs from
    DECODE_LINEAR_MIN_ROWS rows of each projection (by default gate/up from 1 row, q/k/v from 17, o_proj from 33;
    then at 5 rows with every minimum at 1);
    prefills (several tokens a row), even of fewer than 64 token rows, call no kernel. Every RMSNorm runs
    rk.rms_norm."""
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

    def spy(x, w, bias=None, residual=None, up_weight=None):
        calls.append("silu_gate" if up_weight is not None else "residual" if residual is not None else "none")
        return real(x, w, bias, residual, up_weight)
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
    default = {"qkv": 17, "o_proj": 33, "gate_up": 1, "down_proj": 33}
    assert fz.DECODE_LINEAR_MIN_ROWS == default
    least_1 = dict.fromkeys(default, 1)
    # decode steps between the row minima, then at 5 rows with every minimum 1; prefills of 80 and 48 rows
    for rows, T, least in [(5, 1, default), (20, 1, default), (40, 1, default), (5, 1, least_1), (2, 40, least_1),
                           (2, 24, least_1)]:
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
        on = {p for p in ("qkv", "o_proj", "gate_up", *extra) if T == 1 and rows >= least[p]}  # prefill: cuBLAS
        want = {"none": L * ("qkv" in on), "residual": L * (("o_proj" in on) + ("down_proj" in on)),
                "silu_gate": L * ("gate_up" in on)}
        assert {e: calls.count(e) for e in set(calls)} == {e: n for e, n in want.items() if n}
        assert len(norms) == 2 * L + 1
        calls.clear()
        norms.clear()
        assert_close(got, ref.double(), torch.bfloat16, name=f"logits rows={rows} T={T}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["x", "weight", "bias", "residual", "up_weight"])
def test_an_input_that_requires_grad_is_an_error(backend, name, device):
    """Inference only: with grad mode on, an input that requires grad is a ValueError naming it (the torch path
    recorded a graph, the Triton one raised inside torch.library at backward, or with residual dropped it);
    under torch.no_grad the same call runs."""
    x, w, w2, b, res = _inputs(5, 48, 64, device)
    kw = dict(x=x, weight=w, **({"up_weight": w2} if name == "up_weight" else
                                {"bias": b, "residual": res.clone()} if name in ("bias", "residual") else {}))
    kw[name] = kw[name].detach().requires_grad_()
    with pytest.raises(ValueError, match=f"decode_linear is inference only.*{name} requires grad"):
        rk.decode_linear(backend=backend, **kw)
    with torch.no_grad():
        rk.decode_linear(backend=backend, **kw)
