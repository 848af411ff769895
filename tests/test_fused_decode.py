"""r1kernels.triton.fused (rms_norm, apply_rotary, silu_mul) against r1kernels.reference.fused and against the
Hugging Face code they replace: Qwen2RMSNorm, apply_rotary_pos_emb with Qwen2RotaryEmbedding's cos/sin,
ACT2FN["silu"](gate) * up; their backwards against torch autograd of the reference in fp64. Triton
interpreter on CPU."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from r1kernels.ops import fused as fops
from r1kernels.reference import fused as ref

qwen2 = pytest.importorskip("transformers.models.qwen2.modeling_qwen2")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]


def _check(out, ref64, dtype, lowp=None, name="output"):
    assert out.dtype == (lowp.dtype if lowp is not None else out.dtype)
    assert out.shape == ref64.shape
    assert_close(out, ref64, dtype, lowp=lowp, name=name)


# ------------------------------------------------------------------------------------------------ rms_norm

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 72), (2, 3, 100), (1, 1, 64), (17, 40)])
def test_rms_norm(device, dtype, shape):
    H = shape[-1]
    eps = 1e-6
    norm = qwen2.Qwen2RMSNorm(H, eps=eps).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(H))
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    with torch.no_grad():
        hf = norm(x)
    out = fops.rms_norm_triton(x, norm.weight.detach(), eps)
    w64 = norm.weight.detach().double()
    x64 = x.double()
    ref64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    _check(out, ref64, dtype, lowp=hf, name="rms_norm vs fp64")
    _check(out, hf.double(), dtype, name="rms_norm vs HF")
    _check(out, ref.rms_norm(x, norm.weight.detach(), eps).double(), dtype, name="rms_norm vs reference")
    if dtype == torch.float32:
        torch.testing.assert_close(out, hf, rtol=1e-5, atol=1e-5)


def test_rms_norm_noncontiguous_and_promotion(device):
    """A non-contiguous row view, and an fp32 weight over bf16 input (HF promotes the output to fp32)."""
    H = 48
    base = torch.randn(5, 2 * H, device=device).to(torch.bfloat16)
    x = base[:, H:]
    w = torch.randn(H, device=device)
    out = fops.rms_norm_triton(x, w, 1e-5)
    assert out.dtype == torch.float32
    r = ref.rms_norm(x, w, 1e-5)
    assert r.dtype == torch.float32
    # h is rounded to bf16 inside: one bf16 ulp apart where rsqrt differs in its last bits, or where the
    # Triton interpreter's fp32 -> bf16 casts truncate (the GPU rounds to nearest).
    torch.testing.assert_close(out, r, rtol=8e-3, atol=1e-5)
    xt = torch.randn(H, 4, device=device).t()  # last dim strided
    torch.testing.assert_close(fops.rms_norm_triton(xt, w, 1e-6), ref.rms_norm(xt, w, 1e-6), rtol=1e-5,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------------ rotary

def _hf_qk(B, T, Hq, Hk, D, dtype, device, fused_qkv=False):
    """q, k as Qwen2Attention makes them: projection output [B, T, H * D] -> .view(B, T, -1, D).transpose(1, 2)."""
    if fused_qkv:  # slices of one wide projection: row stride larger than H * D
        qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=device).to(dtype)
        qp, kp = qkv[..., :Hq * D], qkv[..., Hq * D:(Hq + Hk) * D]
    else:
        qp = torch.randn(B, T, Hq * D, device=device).to(dtype)
        kp = torch.randn(B, T, Hk * D, device=device).to(dtype)
    return qp.view(B, T, -1, D).transpose(1, 2), kp.view(B, T, -1, D).transpose(1, 2)


def _hf_cos_sin(B, T, Hq, Hk, D, dtype, device, batch_pos=True):
    cfg = Qwen2Config(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk,
                      max_position_embeddings=4096)
    rope = qwen2.Qwen2RotaryEmbedding(cfg).to(device)
    pos = torch.randint(0, 4000, (B if batch_pos else 1, T), device=device)
    x = torch.empty(1, device=device, dtype=dtype)
    return rope(x, pos)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hk,D,fused_qkv,batch_pos", [
    (2, 1, 4, 2, 16, False, True),
    (3, 3, 6, 2, 32, True, True),
    (1, 3, 3, 1, 64, False, False),
    (4, 1, 5, 5, 32, True, False),
])
def test_apply_rotary(device, dtype, B, T, Hq, Hk, D, fused_qkv, batch_pos):
    q, k = _hf_qk(B, T, Hq, Hk, D, dtype, device, fused_qkv)
    cos, sin = _hf_cos_sin(B, T, Hq, Hk, D, dtype, device, batch_pos)
    assert cos.shape == (B if batch_pos else 1, T, D) and cos.dtype == dtype
    hq, hk = qwen2.apply_rotary_pos_emb(q, k, cos, sin)
    assert fops.apply_rotary_triton.eligible(q, k, cos, sin)
    oq, ok = fops.apply_rotary_triton(q, k, cos, sin)
    rq, rk = ref.apply_rotary(q, k, cos, sin)
    fq, fk = ref.apply_rotary(q.double(), k.double(), cos.double(), sin.double())
    for out, hf, r, f, nm in ((oq, hq, rq, fq, "q"), (ok, hk, rk, fk, "k")):
        assert out.shape == hf.shape and out.dtype == hf.dtype
        _check(out, f, dtype, lowp=hf, name=f"rotary {nm} vs fp64")
        _check(out, hf.double(), dtype, name=f"rotary {nm} vs HF")
        torch.testing.assert_close(out, r, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
        if dtype == torch.float32:
            torch.testing.assert_close(out, hf, rtol=1e-5, atol=1e-5)


def test_apply_rotary_contiguous_inputs(device):
    """Contiguous [B, H, T, D] q/k and a non-unit last stride (copied)."""
    B, T, Hq, Hk, D = 2, 3, 2, 1, 16
    q = torch.randn(B, Hq, T, D, device=device)
    k = torch.randn(B, Hk, T, 2 * D, device=device)[..., ::2]
    cos, sin = _hf_cos_sin(B, T, Hq, Hk, D, torch.float32, device)
    oq, ok = fops.apply_rotary_triton(q, k, cos, sin)
    hq, hk = qwen2.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(oq, hq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ok, hk, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ silu_mul

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 72), (2, 1, 100), (5, 1000), (1, 7)])
def test_silu_mul(device, dtype, shape):
    gate = (torch.randn(shape, device=device) * 4).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    out = fops.silu_mul_triton(gate, up)
    hf = ACT2FN["silu"](gate) * up
    ref64 = torch.nn.functional.silu(gate.double()) * up.double()
    assert out.dtype == dtype and out.shape == gate.shape
    _check(out, ref64, dtype, lowp=hf, name="silu_mul vs fp64")
    _check(out, hf.double(), dtype, name="silu_mul vs HF")
    torch.testing.assert_close(out, ref.silu_mul(gate, up), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 40), (5, 1000), (2, 3, 7)])
def test_silu_mul_halves_of_one_projection(device, dtype, shape):
    """gate and up as the two halves of one [.., 2C] GEMM output (row stride 2C), read in place."""
    C = shape[-1]
    gu = (torch.randn(*shape[:-1], 2 * C, device=device) * 3).to(dtype)
    gate, up = gu[..., :C], gu[..., C:]
    out = fops.silu_mul_triton(gate, up)
    ref64 = torch.nn.functional.silu(gate.double()) * up.double()
    assert out.shape == gate.shape and out.is_contiguous()
    _check(out, ref64, dtype, lowp=ACT2FN["silu"](gate) * up, name="silu_mul halves vs fp64")


# ------------------------------------------------------------------------------------------------ backward

def _grads(fn, inputs, dys):
    """Gradients of sum(out * dy) over the outputs with respect to each input (None where not required)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(outs, leaves, [dy.to(o.dtype) for o, dy in zip(outs, dys)])
    return list(got)


def _leaf(t, dtype=None, grad=True):
    return (t if dtype is None else t.to(dtype)).detach().requires_grad_(grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,frozen_w", [((3, 72), False), ((2, 5, 100), False), ((17, 40), True),
                                            ((1, 1, 64), False)])
def test_rms_norm_backward(device, dtype, shape, frozen_w):
    """dx and dweight of the Triton op vs autograd of the reference in fp64 (the lowp bound: the reference's
    own autograd in the same dtype); a frozen weight gets no gradient and costs no partial sums."""
    H, eps = shape[-1], 1e-6
    x0 = torch.randn(shape, device=device) * 2
    w0 = 1 + 0.5 * torch.randn(H, device=device)
    dy = torch.randn(shape, device=device)
    got = _grads(lambda x, w: fops.rms_norm_triton(x, w, eps), (_leaf(x0, dtype), _leaf(w0, dtype, not frozen_w)), [dy])
    x64, w64 = _leaf(x0, torch.float64), _leaf(w0, torch.float64, not frozen_w)
    want = _grads(lambda x, w: ref.rms_norm(x, w, eps), (x64, w64), [dy.double()])
    lowp = _grads(lambda x, w: ref.rms_norm(x, w, eps), (_leaf(x0, dtype), _leaf(w0, dtype, not frozen_w)), [dy])
    assert len(got) == (1 if frozen_w else 2)
    for g, r, lp, nm in zip(got, want, lowp, ("dx", "dweight")):
        assert g.dtype == dtype and g.shape == r.shape
        _check(g, r, dtype, lowp=lp if dtype != torch.float32 else None, name=f"rms_norm {nm}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hk,D,fused_qkv,generic", [(2, 3, 4, 2, 16, False, False),
                                                           (1, 5, 3, 1, 32, True, False),
                                                           (2, 2, 2, 1, 16, False, True)])
def test_apply_rotary_backward(device, dtype, B, T, Hq, Hk, D, fused_qkv, generic):
    """dq, dk of the Triton op vs autograd of the reference in fp64, q/k laid out as HF's attention makes them;
    `generic`: random cos/sin (halves not equal, unlike HF's)."""
    q0, k0 = _hf_qk(B, T, Hq, Hk, D, torch.float32, device, fused_qkv)
    cos, sin = _hf_cos_sin(B, T, Hq, Hk, D, dtype, device)
    if generic:
        cos, sin = torch.randn_like(cos), torch.randn_like(sin)
    dys = [torch.randn(B, Hq, T, D, device=device), torch.randn(B, Hk, T, D, device=device)]
    got = _grads(lambda q, k: fops.apply_rotary_triton(q, k, cos, sin), (_leaf(q0, dtype), _leaf(k0, dtype)), dys)
    want = _grads(lambda q, k: ref.apply_rotary(q, k, cos.double(), sin.double()),
                  (_leaf(q0, torch.float64), _leaf(k0, torch.float64)), [d.double() for d in dys])
    for g, r, nm in zip(got, want, ("dq", "dk")):
        assert g.dtype == dtype and g.shape == r.shape
        _check(g, r, dtype, name=f"rotary {nm}")
    # only q's output used: dk is the gradient of nothing (zeros), dq unchanged
    q, k = _leaf(q0, dtype), _leaf(k0, dtype)
    gq, gk = torch.autograd.grad(fops.apply_rotary_triton(q, k, cos, sin)[0], (q, k), dys[0].to(dtype))
    assert torch.equal(gq, got[0]) and not gk.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,halves", [((3, 72), False), ((2, 4, 100), False), ((5, 1000), True), ((1, 7), True)])
def test_silu_mul_backward(device, dtype, shape, halves):
    """dgate, dup of the Triton op vs autograd of the reference in fp64; `halves`: gate and up are the two
    halves of one projection's output (strided rows)."""
    g0, u0 = torch.randn(shape, device=device) * 3, torch.randn(shape, device=device)
    dy = torch.randn(shape, device=device)
    if halves:
        gu = _leaf(torch.cat([g0, u0], -1), dtype)
        C = shape[-1]
        got = _grads(lambda t: fops.silu_mul_triton(t[..., :C], t[..., C:]), (gu,), [dy])[0].split(C, -1)
    else:
        got = _grads(fops.silu_mul_triton, (_leaf(g0, dtype), _leaf(u0, dtype)), [dy])
    want = _grads(ref.silu_mul, (_leaf(g0, torch.float64), _leaf(u0, torch.float64)), [dy.double()])
    lowp = _grads(ref.silu_mul, (_leaf(g0, dtype), _leaf(u0, dtype)), [dy])
    for g, r, lp, nm in zip(got, want, lowp, ("dgate", "dup")):
        assert g.dtype == dtype and g.shape == r.shape
        _check(g, r, dtype, lowp=lp if dtype != torch.float32 else None, name=f"silu_mul {nm}")


def test_public_ops_are_differentiable(device):
    """rk.rms_norm / apply_rotary / silu_mul take inputs that require grad on every backend (the kernels'
    gradients equal the reference's), and cos/sin that require grad take the reference (eligible says no)."""
    import r1kernels as rk

    x, w = torch.randn(4, 24, device=device, requires_grad=True), torch.randn(24, device=device, requires_grad=True)
    g = [torch.autograd.grad(rk.rms_norm(x, w, backend=b).square().sum(), (x, w)) for b in ("auto", "torch")]
    for a, r in zip(*g):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    q, k = _hf_qk(1, 2, 2, 1, 8, torch.float32, device)
    cos, sin = _hf_cos_sin(1, 2, 2, 1, 8, torch.float32, device)
    cos.requires_grad_(True)
    assert not fops.apply_rotary_triton.eligible(q, k, cos, sin)
    oq, _ = rk.apply_rotary(q, k, cos, sin)
    assert torch.autograd.grad(oq.sum(), cos)[0].shape == cos.shape


# ------------------------------------------------------------------------------------------------ opcheck / edge

@pytest.mark.parametrize("grad", [False, True])
def test_opcheck(device, grad):
    """Schemas, fakes and (grad=True) the autograd registration of every op, backwards included."""
    x = torch.randn(3, 20, device=device, requires_grad=grad)
    w = torch.randn(20, device=device, requires_grad=grad)
    torch.library.opcheck(fops.rms_norm_op, (x, w, 1e-6))
    q, k = _hf_qk(2, 1, 2, 1, 16, torch.float32, device)
    cos, sin = _hf_cos_sin(2, 1, 2, 1, 16, torch.float32, device)
    torch.library.opcheck(fops.apply_rotary_op, (q.requires_grad_(grad), k.requires_grad_(grad), cos, sin))
    g, u = (torch.randn(2, 9, device=device, requires_grad=grad) for _ in range(2))
    torch.library.opcheck(fops.silu_mul_op, (g, u))
    if grad:
        dy = torch.randn(3, 20, device=device)
        torch.library.opcheck(fops.rms_norm_backward_op, (dy, x.detach(), w.detach(), 1e-6, True))
        torch.library.opcheck(fops.silu_mul_backward_op, (torch.randn(2, 9, device=device), g.detach(), u.detach()))


def test_empty(device):
    x = torch.randn(0, 16, device=device)
    assert fops.rms_norm_triton(x, torch.ones(16, device=device)).shape == (0, 16)
    assert fops.silu_mul_triton(x, x).shape == (0, 16)
    q = torch.randn(0, 2, 1, 16, device=device)
    oq, ok = fops.apply_rotary_triton(q, q[:, :1], torch.randn(0, 1, 16), torch.randn(0, 1, 16))
    assert oq.shape == q.shape and ok.shape == (0, 1, 1, 16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 0), (2, 4, 0), (0, 0), (1, 0)])
def test_rms_norm_zero_width(device, backend, dtype, shape):
    """H = 0: an empty [.., 0] output in the promoted dtype and empty gradients, as the float64 reference gives on
    every backend (the Triton path's reshape(-1, 0) raised, forward and backward)."""
    import r1kernels as rk

    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    w = torch.randn(0, device=device, requires_grad=True)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out = rk.rms_norm(x, w, backend=backend)
    want = ref.rms_norm(x64, w64)
    assert out.shape == want.shape == shape and out.dtype == torch.promote_types(dtype, torch.float32)
    out.sum().backward()
    want.sum().backward()
    assert x.grad.shape == shape and x.grad.dtype == dtype and w.grad.shape == (0,)
    if backend == "torch":
        return
    dx, dw = fops.rms_norm_backward_op(torch.randn(shape, device=device).to(out.dtype), x.detach(), w.detach(),
                                       1e-6, True)
    assert dx.shape == shape and dw.shape == (0,)


def test_eligible():
    x = torch.randn(2, 8)
    assert fops.rms_norm_triton.eligible(x, torch.ones(8), 1e-6)
    assert not fops.rms_norm_triton.eligible(x, torch.ones(9), 1e-6)
    assert not fops.rms_norm_triton.eligible(x.long(), torch.ones(8), 1e-6)
    assert fops.silu_mul_triton.eligible(x, x)
    assert not fops.silu_mul_triton.eligible(x, x[:, :4])
    q = torch.randn(1, 2, 3, 8)
    c = torch.randn(1, 3, 8)
    assert fops.apply_rotary_triton.eligible(q, q, c, c)
    assert not fops.apply_rotary_triton.eligible(q, q, c[..., :4], c[..., :4])
