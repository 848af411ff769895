"""decode_attention: the Triton flash-decoding kernel (interpreter on CPU) vs the float64 reference and an
independent per-row scaled_dot_product_attention on each row's valid prefix."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import r1kernels as rk
from r1kernels.reference import decode_attention as ref_attention

triton = pytest.importorskip("triton")
from r1kernels.ops import decode_attention as da_ops  # noqa: E402
from r1kernels.triton import decode_attention as da_k  # noqa: E402


def _sdpa_rows(q, k, v, lens, scale):
    """float64 softmax(q k^T) v per row over its first lens[b] positions, GQA by repeat_interleave."""
    B, Hq, _ = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros(B, Hq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        kk = k[b, :, :n].double().cpu().repeat_interleave(G, 0)
        vv = v[b, :, :n].double().cpu().repeat_interleave(G, 0)
        out[b] = F.scaled_dot_product_attention(q[b, :, None].double().cpu(), kk, vv, scale=scale)[:, 0]
    return out


def _inputs(B, Hq, Hkv, L, Dk, Dv, dtype, device="cpu"):
    q = torch.randn(B, Hq, Dk, device=device).to(dtype)
    k = torch.randn(B, Hkv, L, Dk, device=device).to(dtype)
    v = torch.randn(B, Hkv, L, Dv, device=device).to(dtype)
    return q, k, v


def _check(q, k, v, lens, dtype, scale=None):
    out = rk.decode_attention(q, k, v, lens, scale=scale, backend="triton")
    assert out.dtype == q.dtype and out.shape == (q.shape[0], q.shape[1], v.shape[-1])
    s = q.shape[-1] ** -0.5 if scale is None else scale
    ref = ref_attention(q.double(), k.double(), v.double(), lens, s)
    lowp = ref_attention(q, k, v, lens, s) if dtype != torch.float32 else None
    assert_close(out, ref, dtype, lowp=lowp, name="vs reference")
    assert_close(out, _sdpa_rows(q, k, v, lens, s), dtype, lowp=lowp, name="vs per-row sdpa")
    return out


# (B, Hq, Hkv, L, Dk, Dv): G = 1, 2, 6; L not a multiple of the interpreter's BLOCK_N (16); Dk != Dv.
SHAPES = [(3, 6, 1, 37, 24, 16), (3, 4, 2, 50, 32, 32), (3, 2, 2, 20, 8, 8), (2, 12, 2, 33, 16, 24)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(shape, dtype):
    B, Hq, Hkv, L, Dk, Dv = shape
    q, k, v = _inputs(B, Hq, Hkv, L, Dk, Dv, dtype)
    lens = torch.tensor([L, 1, 0][:B], dtype=torch.int32)
    _check(q, k, v, lens, dtype)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_splits_agree(splits):
    """The direct path (S == 1) and the combine path (S > 1, some splits empty) agree with the reference."""
    q, k, v = _inputs(4, 4, 2, 45, 16, 16, torch.float32)
    lens = torch.tensor([45, 7, 0, 30])
    out = da_k.decode_attention_fwd(q, k, v, lens, 0.3, splits=splits)
    ref = ref_attention(q.double(), k.double(), v.double(), lens, 0.3)
    assert_close(out, ref, torch.float32, name=f"splits={splits}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_new_token_is_stored_and_attended(shape, dtype, splits):
    """k_new / v_new: stored at position lens[b] of rows with lens[b] < L (cache dtype, in place; other
    positions untouched) and attended with the cache's first lens[b] positions; a row with lens >= L stores
    nothing. Independent check: write by hand, then attend to lens + 1 positions without the new token."""
    B, Hq, Hkv, L, Dk, Dv = shape
    q, k, v = _inputs(B, Hq, Hkv, L, Dk, Dv, dtype)
    k_new, v_new = torch.randn(B, Hkv, Dk).to(dtype), torch.randn(B, Hkv, Dv).to(dtype)
    lens = torch.tensor([L - 1, 0, L, 5][:B])
    k_exp, v_exp, n = k.clone(), v.clone(), lens.clone()
    for b in range(B):
        if lens[b] < L:
            k_exp[b, :, lens[b]], v_exp[b, :, lens[b]], n[b] = k_new[b], v_new[b], lens[b] + 1
    s = Dk ** -0.5
    ref = ref_attention(q.double(), k_exp.double(), v_exp.double(), n, s)
    lowp = ref_attention(q, k_exp, v_exp, n, s) if dtype != torch.float32 else None
    kc, vc = k.clone(), v.clone()
    if splits is None:
        out = rk.decode_attention(q, kc, vc, lens, k_new=k_new, v_new=v_new, backend="triton")
    else:
        out = da_k.decode_attention_fwd(q, kc, vc, lens, s, splits=splits, k_new=k_new, v_new=v_new)
    assert_close(out, ref, dtype, lowp=lowp, name="vs reference after a manual write")
    assert torch.equal(kc, k_exp) and torch.equal(vc, v_exp)
    kr, vr = k.clone(), v.clone()  # the reference op itself follows the same contract
    ref_op = ref_attention(q, kr, vr, lens, s, k_new, v_new)
    assert torch.equal(kr, k_exp) and torch.equal(vr, v_exp)
    assert_close(ref_op.double(), ref, dtype, lowp=lowp, name="reference op")


def _check_rotary(shape, dtype, splits, device="cpu"):
    """cos / sin: q and k_new rotated in the kernel equal rk.apply_rotary's reference rotation followed by
    the unrotated op (attended and stored); cos/sin at a different position per row, HF's layout."""
    from r1kernels.reference.fused import apply_rotary as ref_rotary
    B, Hq, Hkv, L, Dk, Dv = shape
    q, k, v = _inputs(B, Hq, Hkv, L, Dk, Dv, dtype, device)
    k_new = torch.randn(B, Hkv, Dk, device=device).to(dtype)
    v_new = torch.randn(B, Hkv, Dv, device=device).to(dtype)
    lens = torch.randint(0, L + 1, (B,), device=device)
    lens[:4] = torch.tensor([L - 1, 0, L, 5][:B])
    inv = 1.0 / 10000 ** (torch.arange(0, Dk, 2, device=device).float() / Dk)
    ang = (lens.float() + 3.0)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().to(dtype), torch.cat([ang, ang], -1).sin().to(dtype)
    qr, kr = ref_rotary(q[:, :, None], k_new[:, :, None], cos[:, None], sin[:, None])
    qr, kr = qr[:, :, 0], kr[:, :, 0]
    s = Dk ** -0.5
    k_exp, v_exp = k.clone(), v.clone()
    ref = ref_attention(qr.double(), k_exp, v_exp, lens, s, kr.double(), v_new.double())
    lowp = ref_attention(qr, k.clone(), v.clone(), lens, s, kr, v_new) if dtype != torch.float32 else None
    kc, vc = k.clone(), v.clone()
    if splits is None:
        out = rk.decode_attention(q, kc, vc, lens, k_new=k_new, v_new=v_new, cos=cos, sin=sin, backend="triton")
    else:
        out = da_k.decode_attention_fwd(q, kc, vc, lens, s, splits=splits, k_new=k_new, v_new=v_new, cos=cos,
                                        sin=sin)
    assert_close(out, ref, dtype, lowp=lowp, name="rotated in the kernel vs rotated first")
    assert_close(kc, k_exp, dtype, name="stored rotated key")  # k_exp: written by the reference op
    assert torch.equal(vc, v_exp)
    kt, vt = k.clone(), v.clone()  # the reference op with cos/sin is the same composition
    ref_op = ref_attention(q, kt, vt, lens, s, k_new, v_new, cos, sin)
    assert_close(ref_op.double(), ref, dtype, lowp=lowp, name="reference op")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [None, 3])
def test_rotary_in_the_kernel(shape, dtype, splits):
    _check_rotary(shape, dtype, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("splits", [None, 4])
def test_gpu_rotary_in_the_kernel(dtype, splits):
    """Qwen2.5-1.5B heads (G=6, D=128), 64 rows: the compiled kernel's rotation (tensor-core dot in bf16)."""
    _check_rotary((64, 12, 2, 1024, 128, 128), dtype, splits, "cuda")


def test_rotary_arguments():
    q, k, v = _inputs(2, 4, 2, 8, 16, 16, torch.float32)
    lens, kn, vn = torch.tensor([3, 4]), torch.zeros(2, 2, 16), torch.zeros(2, 2, 16)
    c = torch.ones(2, 16)
    with pytest.raises(ValueError, match="cos and sin"):
        rk.decode_attention(q, k, v, lens, k_new=kn, v_new=vn, cos=c)
    with pytest.raises(ValueError, match="need k_new"):
        rk.decode_attention(q, k, v, lens, cos=c, sin=c)
    with pytest.raises(ValueError, match="cos must have shape"):
        rk.decode_attention(q, k, v, lens, k_new=kn, v_new=vn, cos=torch.ones(2, 8), sin=c)


def test_new_token_arguments():
    q, k, v = _inputs(2, 4, 2, 8, 16, 16, torch.float32)
    lens = torch.tensor([3, 4])
    with pytest.raises(ValueError, match="k_new and v_new"):
        rk.decode_attention(q, k, v, lens, k_new=torch.zeros(2, 2, 16))
    with pytest.raises(ValueError, match="v_new"):
        rk.decode_attention(q, k, v, lens, k_new=torch.zeros(2, 2, 16), v_new=torch.zeros(2, 4, 16))


def test_num_splits_shapes_only():
    cases = [(1024, 128, 64, 528), (4096, 16, 64, 528), (37, 6, 16, 16), (1, 1, 64, 528), (10**5, 1, 64, 10**4)]
    for L, programs, block_n, target in cases:
        S, chunk = da_k.num_splits(L, programs, block_n, target)
        assert 1 <= S <= da_k.MAX_SPLITS and chunk % block_n == 0
        assert (S - 1) * chunk < L <= S * chunk  # every split starts inside the cache
    assert da_k.num_splits(1024, 128, 64, 132) == (1, 1024)  # one wave of programs already: no combine
    assert da_k.num_splits(4096, 16, 64, 132) == (8, 512)


def test_strided_views_and_scale():
    """Caches as the first rows / positions of bigger buffers and in [B, L, H, D] layout; q and lens
    non-contiguous; int64 lens larger than L count as L."""
    B, Hq, Hkv, L, Dk, Dv = 3, 4, 2, 21, 24, 16
    k = torch.randn(5, Hkv, 40, Dk)[:B, :, :L]                   # slice of a [Bmax, Hkv, Lmax, D] buffer
    v = torch.randn(5, 40, Hkv, Dv).transpose(1, 2)[:B, :, :L]   # [B, L, H, D] storage
    q = torch.randn(B, Dk, Hq).transpose(1, 2)                   # non-contiguous q
    lens = torch.tensor([[L, 0], [9, 0], [L + 5, 0]])[:, 0]  # strided lens too
    _check(q, k, v, lens, torch.float32, scale=0.37)


def test_mixed_dtypes():
    """fp32 q against a bf16 cache: fp32 math, output in q's dtype."""
    q, k, v = _inputs(2, 4, 2, 19, 16, 16, torch.bfloat16)
    q = q.float()
    lens = torch.tensor([19, 4])
    out = rk.decode_attention(q, k, v, lens, backend="triton")
    assert out.dtype == torch.float32
    assert_close(out, ref_attention(q.double(), k.double(), v.double(), lens), torch.float32)


def test_invalid_positions_are_never_read():
    """Positions >= lens hold NaN / inf / huge values: the output stays finite and bit-identical."""
    B, Hq, Hkv, L, D = 3, 4, 2, 40, 16
    q, k, v = _inputs(B, Hq, Hkv, L, D, D, torch.float32)
    lens = torch.tensor([17, 1, 0])
    base = rk.decode_attention(q, k, v, lens, backend="triton")
    pos = torch.arange(L)[None, None, :, None] >= lens[:, None, None, None]
    k2 = k.masked_fill(pos, float("nan"))
    v2 = v.masked_fill(pos, float("inf"))
    v2[0, :, 30] = 1e30
    for splits in (1, 3):
        out = da_k.decode_attention_fwd(q, k2, v2, lens, D ** -0.5, splits=splits)
        assert torch.isfinite(out).all()
        assert torch.equal(out, da_k.decode_attention_fwd(q, k, v, lens, D ** -0.5, splits=splits))
    assert torch.equal(rk.decode_attention(q, k2, v2, lens, backend="triton"), base)
    assert (base[2] == 0).all()  # lens 0 -> zeros


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_shapes(backend):
    """0 rows (also with this step's keys/values and the rotary embedding): an empty [0, Hq, Dv] output (the
    reference's reshape(0, Hq, -1) raised); an empty cache: zeros."""
    q, k, v = _inputs(0, 4, 2, 8, 16, 12, torch.float32)
    none = torch.zeros(0, dtype=torch.long)
    assert rk.decode_attention(q, k, v, none, backend=backend).shape == (0, 4, 12)
    new = dict(k_new=torch.randn(0, 2, 16), v_new=torch.randn(0, 2, 12), cos=torch.ones(0, 16), sin=torch.zeros(0, 16))
    assert rk.decode_attention(q, k, v, none, backend=backend, **new).shape == (0, 4, 12)
    q, k, v = _inputs(2, 4, 2, 0, 16, 8, torch.float32)
    out = rk.decode_attention(q, k, v, torch.zeros(2, dtype=torch.long), backend=backend)
    assert out.shape == (2, 4, 8) and (out == 0).all()


@pytest.mark.parametrize("change,name", [
    (dict(q=torch.randn(2, 5, 16)), "query heads"),                       # Hq not a multiple of Hkv
    (dict(lens=torch.tensor([3, 3, 3])), "lens"),                          # wrong lens shape
    (dict(lens=torch.tensor([3.0, 2.0])), "lens"),                         # float lens
    (dict(k_cache=torch.randn(2, 2, 8, 12)), "k_cache"),                   # Dk mismatch
    (dict(v_cache=torch.randn(2, 2, 9, 16)), "v_cache"),                   # L mismatch
    (dict(v_cache=torch.randn(2, 2, 8, 16, dtype=torch.float64)), "v_cache"),  # dtype mismatch
    (dict(q=torch.randn(2, 4)), "q"),
    (dict(scale=0.0), "scale"),
    (dict(scale=float("inf")), "scale"),
])
def test_bad_input(change, name):
    args = dict(q=torch.randn(2, 4, 16), k_cache=torch.randn(2, 2, 8, 16), v_cache=torch.randn(2, 2, 8, 16),
                lens=torch.tensor([3, 8]))
    args.update(change)
    scale = args.pop("scale", None)
    with pytest.raises(ValueError, match=name):
        rk.decode_attention(**args, scale=scale, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_negative_lens(backend):
    """lens < 0 raises a ValueError naming lens before anything is written (the reference stored k_new at
    L + lens[b], Python's negative index, and the kernel stored nothing). lens >= L stays valid."""
    q, k, v = _inputs(2, 4, 2, 8, 16, 16, torch.float32)
    k0, v0 = k.clone(), v.clone()
    new = dict(k_new=torch.ones(2, 2, 16), v_new=torch.ones(2, 2, 16))
    for lens in (torch.tensor([3, -2]), torch.tensor([-1, -1], dtype=torch.int32)):
        for kw in ({}, new):
            with pytest.raises(ValueError, match="lens must be >= 0"):
                rk.decode_attention(q, k, v, lens, backend=backend, **kw)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    rk.decode_attention(q, k, v, torch.tensor([8, 0]), backend=backend, **new)  # row 0 full: stores nothing
    assert torch.equal(k[0], k0[0]) and (k[1, :, 0] == 1).all() and torch.equal(k[1, :, 1:], k0[1, :, 1:])


def test_check_lens_false_skips_only_the_data_check(monkeypatch):
    """check_lens=False: no value check of lens runs (the engine's uncaptured steps paid three kernels a layer
    for it on a GPU); shape checks stay, and valid lens give the same output."""
    import r1kernels._checks as C

    q, k, v = _inputs(2, 4, 2, 8, 16, 16, torch.float32)
    lens = torch.tensor([3, 8])
    seen = []
    real = C._value_check
    monkeypatch.setattr(C, "_value_check", lambda ok, msg: seen.append(msg) or real(ok, msg))
    want = rk.decode_attention(q, k, v, lens, backend="torch")
    assert any("lens" in m for m in seen)
    seen.clear()
    assert torch.equal(rk.decode_attention(q, k, v, lens, check_lens=False, backend="torch"), want)
    assert seen == []
    with pytest.raises(ValueError, match="lens"):
        rk.decode_attention(q, k, v, lens[:1], check_lens=False)


def test_opcheck():
    q, k, v = _inputs(2, 4, 2, 21, 16, 8, torch.float32)
    torch.library.opcheck(da_ops.decode_attention_op, (q, k, v, torch.tensor([21, 5]), 0.25))
    torch.library.opcheck(da_ops.decode_attention_op, (q, k, v, torch.tensor([20, 5]), 0.25,
                                                       torch.randn(2, 2, 16), torch.randn(2, 2, 8)))


def test_compile_fullgraph():
    q, k, v = _inputs(2, 4, 2, 21, 16, 8, torch.float32)
    lens = torch.tensor([21, 5])
    f = torch.compile(lambda q, k, v, lens: rk.decode_attention(q, k, v, lens, backend="triton") * 2,
                      fullgraph=True)
    assert_close(f(q, k, v, lens), 2 * ref_attention(q.double(), k.double(), v.double(), lens), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(64, 12, 2, 1024, 128, 128), (8, 16, 16, 300, 192, 128),
                                   (4, 64, 2, 200, 256, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_real_shapes(shape, dtype):
    """Qwen2.5-1.5B (G=6, D=128), DeepSeek-V3 MLA expanded (Dk=192, Dv=128, G=1), and the largest heads
    (D=256, G=32: two head tiles, the smallest pipeline)."""
    B, Hq, Hkv, L, Dk, Dv = shape
    q, k, v = _inputs(B, Hq, Hkv, L, Dk, Dv, dtype, "cuda")
    lens = torch.randint(0, L + 1, (B,), device="cuda")
    lens[0], lens[1] = L, 0
    out = rk.decode_attention(q, k, v, lens, backend="triton")
    ref = ref_attention(q.double(), k.double(), v.double(), lens)
    lowp = ref_attention(q, k, v, lens) if dtype != torch.float32 else None
    assert_close(out, ref, dtype, lowp=lowp)


@pytest.mark.gpu
@pytest.mark.parametrize("sync_checks", [False, True])
def test_gpu_cuda_graph_replay(sync_checks, monkeypatch):
    """Captured once, replayed with new lens in place (a static graph): matches the reference each time.
    R1K_SYNC_CHECKS=1 does not make the capture sync (the lens check is skipped while capturing)."""
    from r1kernels import _checks
    monkeypatch.setattr(_checks, "SYNC_CHECKS", sync_checks)
    B, Hq, Hkv, L, D = 16, 12, 2, 512, 128
    q, k, v = _inputs(B, Hq, Hkv, L, D, D, torch.bfloat16, "cuda")
    lens = torch.full((B,), L, device="cuda")
    rk.decode_attention(q, k, v, lens, backend="triton")  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = rk.decode_attention(q, k, v, lens, backend="triton")
    for new in (torch.randint(0, L + 1, (B,)), torch.ones(B, dtype=torch.long), torch.full((B,), L)):
        lens.copy_(new)
        g.replay()
        ref = ref_attention(q.double(), k.double(), v.double(), lens)
        assert_close(out, ref, torch.bfloat16, lowp=ref_attention(q, k, v, lens))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", ["q", "k_cache", "v_cache", "k_new"])
def test_an_input_that_requires_grad_is_an_error(backend, name):
    """Inference only: with grad mode on, an input that requires grad is a ValueError naming it (the torch path
    recorded a graph, the Triton one raised inside torch.library at backward); under torch.no_grad it runs."""
    q, k, v = _inputs(2, 4, 2, 9, 16, 16, torch.float32)
    kw = dict(q=q, k_cache=k, v_cache=v, lens=torch.tensor([3, 8]), k_new=torch.randn(2, 2, 16),
              v_new=torch.randn(2, 2, 16))
    kw[name] = kw[name].requires_grad_()
    with pytest.raises(ValueError, match=f"decode_attention is inference only.*{name} requires grad"):
        rk.decode_attention(backend=backend, **kw)
    with torch.no_grad():
        rk.decode_attention(backend=backend, **kw)
