"""sample_tokens: the Triton kernel (interpreter on CPU) vs the reference and vs computations written here
(an independent Philox4x32-10 checked on Random123's known answers, sort-based kept sets, float64
log-probs, chi-square tests of the draws); batch invariance; bad input."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

import r1kernels as rk
from r1kernels.reference import sampling as ref

triton = pytest.importorskip("triton")
from r1kernels.ops import sampling as ops  # noqa: E402

DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy=False)
OPTS = [dict(), dict(greedy=True), dict(temperature=0.6), dict(top_k=5), dict(top_k=1), dict(top_p=0.8),
        dict(min_p=0.1), dict(top_k=20, top_p=0.7, min_p=0.05, temperature=1.3), dict(top_p=0.9, greedy=True)]


def _opts(**kw):
    return {**DEFAULTS, **kw}


def _inputs(B, V, dtype=torch.float32, scale=3.0):
    logits = (torch.randn(B, V) * scale).to(dtype)
    seeds = torch.randint(-2**62, 2**62, (B,))
    positions = torch.randint(0, 2**31 - 1, (B,))
    return logits, seeds, positions


def _kept(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, **_):
    """bool [B, V] from a sort of each row, the top-p mass in float64 (independent of the reference)."""
    z = logits.float() / temperature
    B, V = z.shape
    zs = z.sort(-1, descending=True).values
    thr = torch.full((B, 1), float("-inf"))
    if 0 < top_k < V:
        thr = zs[:, top_k - 1:top_k]
    if top_p < 1.0:
        p = torch.softmax(z.double().masked_fill(z < thr, float("-inf")), -1).sort(-1, descending=True).values
        n = ((p.cumsum(-1) - p) < top_p).sum(-1, keepdim=True)  # the smallest prefix with mass >= top_p
        thr = torch.maximum(thr, zs.gather(-1, n - 1))
    if min_p > 0.0:
        thr = torch.maximum(thr, zs[:, :1] + math.log(min_p))
    return z >= thr


def _logp64(logits, tok, keep, temperature=1.0, **_):
    z = (logits.double() / temperature).masked_fill(~keep, float("-inf"))
    return z.gather(-1, tok[:, None]).squeeze(-1) - z.logsumexp(-1)


def _check(logits, seeds, positions, opts):
    o = _opts(**opts)
    tok, lp = ops.sample_tokens_triton(logits, seeds, positions, **o)
    rtok, rlp = ref.sample_tokens(logits, seeds, positions, **o)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32
    assert tok.shape == lp.shape == (logits.shape[0],)
    assert torch.equal(tok, rtok), f"tokens {tok.tolist()} != reference {rtok.tolist()}"
    keep = _kept(logits, **o)
    assert keep.gather(-1, tok[:, None]).all()
    assert_close(lp, _logp64(logits, tok, keep, **o), torch.float32, name="logp")
    assert_close(rlp, _logp64(logits, tok, keep, **o), torch.float32, name="reference logp")
    return tok, lp


@pytest.mark.parametrize("B,V", [(1, 1), (3, 7), (5, 100), (3, 1000)])
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_reference(B, V, opts):
    _check(*_inputs(B, V), opts)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(top_k=10, top_p=0.9, temperature=0.8)], ids=["default", "trunc"])
def test_low_precision(dtype, opts):
    logits, seeds, positions = _inputs(4, 300, dtype)
    _check(logits, seeds, positions, opts)


@pytest.mark.parametrize("opts", [dict(), dict(greedy=True), dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3)],
                         ids=str)
def test_ties_and_masked_vocab(opts):
    """Integer logits (many exact ties, at the top-k / top-p edges too) and -inf (masked) entries."""
    logits = torch.randint(-3, 3, (6, 150)).float()
    logits[:, 1::4] = float("-inf")
    seeds, positions = torch.randint(0, 2**31, (6,), dtype=torch.int32), torch.arange(6, dtype=torch.int32)
    _check(logits, seeds, positions, opts)


@pytest.mark.parametrize("opts", [dict(), dict(top_p=0.95)], ids=["default", "top_p"])
def test_peaked_rows(opts):
    """A leading token far above the rest: later blocks are skipped without noise, same draw."""
    logits, seeds, positions = _inputs(4, 1000)
    logits[torch.arange(4), torch.randint(0, 1000, (4,))] += 40.0
    logits[1, 5] += 45.0  # a leader in the first block, the rest of the row skipped
    _check(logits, seeds, positions, opts)


@pytest.mark.parametrize("V,temperature", [(4, 1.0), (70, 0.8), (130, 1.0), (1000, 1.3)])
def test_top_p_logits_apart_with_equal_fp32_probabilities(V, temperature):
    """Per row two logits one fp32 ulp apart (distinct after the temperature too) whose fp32 probabilities round
    equal, each holding just under half the mass (the rest far below), top_p = 0.4: the larger one's mass alone
    reaches top_p, so the rule keeps it alone: the kept set, every draw on both backends, log-prob 0. The
    reference sorted by p, whose order among equal p is arbitrary: tau could come from the smaller logit,
    keeping both (half the draws the excluded one)."""
    B = 8
    logits = torch.randn(B, V) * 0.5 - 12.0
    big = torch.empty(B, dtype=torch.long)
    for b in range(B):
        small_col, big_col = torch.randperm(V)[:2].tolist()
        while True:
            a = torch.empty(()).uniform_(0.0, 0.5)
            logits[b, small_col], logits[b, big_col] = a, torch.nextafter(a, torch.tensor(1.0))
            z = logits[b] / temperature  # still apart after the temperature (equal z are a tie: both kept)
            p = torch.softmax(z, -1)
            if z[small_col] < z[big_col] and p[small_col] == p[big_col]:
                break
        big[b] = big_col
    want = torch.zeros(B, V, dtype=torch.bool).scatter(-1, big[:, None], True)
    assert torch.equal(_kept(logits, temperature, top_p=0.4), want)
    assert torch.equal(ref.kept_mask(logits / temperature, top_p=0.4), want)
    seeds, positions = torch.randint(-2**62, 2**62, (B,)), torch.randint(0, 2**31 - 1, (B,))
    for backend in ("torch", "triton"):
        tok, lp = rk.sample_tokens(logits, seeds, positions, temperature=temperature, top_p=0.4, backend=backend)
        assert torch.equal(tok, big), (backend, tok.tolist(), big.tolist())
        assert torch.equal(lp, torch.zeros(B)), (backend, lp.tolist())


def test_strided_and_int32_inputs():
    full, seeds, positions = _inputs(5, 130)
    opts = dict(top_k=7, temperature=0.9)
    _check(full[:, :101], seeds.int(), positions.int(), opts)  # row stride 130, vocab contiguous
    t = full[:, :100].t().contiguous().t()  # vocab stride 5: copied
    _check(t, -seeds, positions, opts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", [{}, dict(top_k=3, top_p=0.8, min_p=0.1), dict(greedy=True)])
def test_empty_batch(backend, opts):
    """0 rows: empty int64 tokens and fp32 log-probs on both backends (the reference's reshape(0, -1) raised)."""
    none = torch.zeros(0, dtype=torch.long)
    tok, lp = rk.sample_tokens(torch.randn(0, 9), none, none, backend=backend, **opts)
    assert tok.shape == lp.shape == (0,) and tok.dtype == torch.int64 and lp.dtype == torch.float32


def _philox4x32_10(ctr, key):
    """Random123's Philox4x32-10 on Python ints, as published."""
    c, (k0, k1), m = list(ctr), key, 0xFFFFFFFF
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & m, (k1 + 0xBB67AE85) & m
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & m, (p0 >> 32) ^ c[3] ^ k1, p0 & m]
    return c


@pytest.mark.parametrize("ctr,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(ctr, key, expected):
    assert _philox4x32_10(ctr, key) == list(expected)


def test_reference_philox_and_uniforms():
    zero = torch.zeros(1, dtype=torch.long)
    assert [w.item() for w in ref.philox4(zero, zero, zero, zero)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C,
                                                                       0x9B00DBD8]
    seeds = torch.tensor([0, -1, 2**40 + 12345, -(2**63)])
    positions = torch.tensor([0, 2**32 - 1, 7, -5])
    V = 11  # a partial last group of 4
    u = ref.uniforms(seeds, positions, V)
    assert u.shape == (4, V)
    for b in range(len(seeds)):
        s, p = int(seeds[b]) & (2**64 - 1), int(positions[b]) & 0xFFFFFFFF
        for v in range(V):
            x = _philox4x32_10((v // 4, p, 0, 0), (s & 0xFFFFFFFF, s >> 32))[v % 4]
            assert u[b, v].item() == ((x >> 9) + 0.5) * 2.0**-23
    u = ref.uniforms(torch.randint(-2**62, 2**62, (4,)), torch.randint(0, 2**31, (4,)), 25_000).flatten()
    n = u.numel()
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.double().mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    ks = ((torch.arange(1, n + 1, dtype=torch.float64) / n) - u.double().sort().values).abs().max().item()
    assert ks < 2.5 / n**0.5  # Kolmogorov-Smirnov, alpha ~ 1e-5


def _chi2_crit(df, z=3.72):
    """Upper quantile of chi-square(df) at the normal quantile z (Wilson-Hilferty; z=3.72: alpha ~ 1e-4)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * a**0.5) ** 3


@pytest.mark.parametrize("opts,n_triton", [(dict(), 200), (dict(temperature=0.7, top_k=4), 60),
                                           (dict(top_p=0.8), 60), (dict(min_p=0.5), 150)],
                         ids=["default", "top_k", "top_p", "min_p"])
def test_draw_distribution(opts, n_triton):
    """Draws of one row at positions 0..N-1 against softmax(z / T) renormalized on the kept set: N = 4000
    from the reference, the first n_triton (the interpreter is slow) from the kernel, which must equal them."""
    N, V = 4000, 6
    row = torch.linspace(-0.8, 0.8, V)[torch.randperm(V)]
    seeds = torch.full((N,), torch.randint(0, 2**62, ()).item())
    positions = torch.arange(N)
    o = _opts(**opts)
    keep = _kept(row[None], **o)[0]
    p = torch.softmax((row.double() / o["temperature"]).masked_fill(~keep, float("-inf")), -1)
    rtok, rlp = ref.sample_tokens(row.expand(N, V), seeds, positions, **o)
    n = n_triton
    tok, lp = ops.sample_tokens_triton(row.expand(n, V), seeds[:n], positions[:n], **o)
    assert torch.equal(tok, rtok[:n])
    for name, t, logp in (("reference", rtok, rlp), ("triton", tok, lp)):
        assert keep[t].all(), name
        k = keep.nonzero().flatten()
        expected = len(t) * p[k]
        chi2 = ((torch.bincount(t, minlength=V).double()[k] - expected) ** 2 / expected).sum().item()
        assert chi2 < _chi2_crit(len(k) - 1), f"{name}: chi2 {chi2:.1f} over {len(k) - 1} dof"
        assert_close(logp.double(), p[t].log(), torch.float32, name=f"{name} logp")


def test_batch_invariance(monkeypatch):
    """A row draws the same token and bitwise log-prob alone and at any index of any batch."""
    from r1kernels.triton import sampling as k

    monkeypatch.setattr(k, "SPLIT_BLOCKS", 2)  # 2 programs per row of V = 200
    V = 200
    logits, seeds, positions = _inputs(1, V)
    for opts in (dict(), dict(top_p=0.9, top_k=50)):
        o = _opts(**opts)
        tok1, lp1 = ops.sample_tokens_triton(logits, seeds, positions, **o)
        for B, i in ((3, 0), (3, 2), (4, 1)):
            x, s, p = _inputs(B, V)
            x[i], s[i], p[i] = logits[0], seeds[0], positions[0]
            tok, lp = ops.sample_tokens_triton(x, s, p, **o)
            assert tok[i] == tok1[0] and lp[i] == lp1[0], (opts, B, i)


def test_public_api_dispatch():
    if "triton" not in rk._backend.available("sample_tokens", "cpu"):
        pytest.skip("r1kernels._backend.KERNELS has no triton entry for sample_tokens")
    logits, seeds, positions = _inputs(3, 50)
    tok, lp = rk.sample_tokens(logits, seeds, positions, top_k=4, backend="triton")
    rtok, rlp = rk.sample_tokens(logits, seeds, positions, top_k=4, backend="torch")
    assert torch.equal(tok, rtok)
    assert_close(lp, rlp, torch.float32)


@pytest.mark.parametrize("override,name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(temperature=0.0), "temperature"), (dict(min_p=1.01), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("inf"), greedy=True), "temperature"),
    (dict(temperature=1e-40), "temperature"),
    # past float32's range (rounded to inf there: NaN log-probs) and an int float() cannot convert
    (dict(temperature=3.5e38), "temperature"), (dict(temperature=10**400), "temperature"),
    # below float32's smallest normal number (rounded to 0 or a subnormal: top-p kept every token)
    (dict(top_p=1e-46), "top_p"), (dict(top_p=1e-39), "top_p"),
    (dict(seeds=torch.zeros(2, dtype=torch.long)), "seeds"), (dict(positions=torch.zeros(3, 1, dtype=torch.long)),
                                                              "positions"),
    (dict(seeds=torch.zeros(3)), "seeds"),
])
def test_bad_input(override, name):
    logits, seeds, positions = _inputs(3, 10)
    args = {**dict(logits=logits, seeds=seeds, positions=positions), **override}
    with pytest.raises(ValueError, match=name):
        rk.sample_tokens(**args)


def test_top_k_past_int64_is_no_top_k():
    """top_k >= V keeps every token on every backend, also past the custom op's int64 (2**63: a RuntimeError of the
    op's schema on the Triton backend before); the smallest top_p accepted keeps only the top token."""
    logits, seeds, positions = _inputs(3, 70)
    want = rk.sample_tokens(logits, seeds, positions, backend="torch")
    for backend in ["torch"] + (["triton"] if "triton" in rk._backend.available("sample_tokens", "cpu") else []):
        for k in (70, 71, 2**63, 10**30):
            tok, lp = rk.sample_tokens(logits, seeds, positions, top_k=k, backend=backend)
            assert torch.equal(tok, want[0]), (backend, k)
            assert_close(lp, want[1], torch.float32)
        tok, lp = rk.sample_tokens(logits, seeds, positions, top_p=torch.finfo(torch.float32).tiny, backend=backend)
        assert torch.equal(tok, logits.argmax(-1)) and torch.equal(lp, torch.zeros(3)), backend


def test_backend_refusing_the_inputs_names_them():
    if "triton" not in rk._backend.available("sample_tokens", "cpu"):
        pytest.skip("r1kernels._backend.KERNELS has no triton entry for sample_tokens")
    logits, seeds, positions = _inputs(3, 70)
    with pytest.raises(ValueError, match=r"backend='triton' for sample_tokens does not support these inputs "
                                         r"\(input 0: float64 \[3, 70\]\)"):
        rk.sample_tokens(logits.double(), seeds, positions, backend="triton")


@pytest.mark.parametrize("logits,T", [([1.0, 1.0], 1e-4), ([30.0, 30.0, 29.0], 0.01), ([1e30, 1e30], 1.0),
                                      ([2.0, -1.0, 0.5], 1.0)])
def test_logprob_precision_at_large_z(logits, T):
    """The log-prob keeps log_softmax's precision where |z| = |logits / T| is large (z - logsumexp(z) in fp32 gave
    -0.69336 for [1, 1] at T = 1e-4 and 0.0 for [1e30, 1e30])."""
    x = torch.tensor([logits] * 2)
    seeds, positions = torch.tensor([1, 2]), torch.tensor([3, 4])
    want = torch.log_softmax(x.double() / T, -1)
    for backend in ["torch"] + (["triton"] if "triton" in rk._backend.available("sample_tokens", "cpu") else []):
        tok, lp = rk.sample_tokens(x, seeds, positions, temperature=T, backend=backend)
        assert_close(lp, want.gather(-1, tok[:, None]).squeeze(-1), torch.float32, name=f"{backend} logp")


def test_opcheck():
    logits, seeds, positions = _inputs(3, 40)
    torch.library.opcheck(ops.sample_tokens_op, (logits, seeds, positions, 1.0, 0, 1.0, 0.0, False))
    torch.library.opcheck(ops.sample_tokens_op, (logits.bfloat16(), seeds.int(), positions, 0.7, 5, 0.9, 0.05, True))


def test_compile_fullgraph():
    logits, seeds, positions = _inputs(3, 40)

    def f(x, s, p):
        tok, lp = ops.sample_tokens_triton(x * 2.0, s, p + 1, temperature=0.8, top_p=0.9)
        return tok + 1, lp.exp()

    tok, pr = torch.compile(f, fullgraph=True, backend="aot_eager")(logits, seeds, positions)  # inductor: +10 s
    rtok, rlp = ref.sample_tokens(logits * 2.0, seeds, positions + 1, **_opts(temperature=0.8, top_p=0.9))
    assert torch.equal(tok, rtok + 1)
    assert_close(pr, rlp.exp(), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [dict(), dict(top_p=0.9, top_k=50), dict(min_p=0.05, temperature=0.7)],
                         ids=["default", "top_p_k", "min_p"])
def test_gpu_real_shape(opts):
    B, V = 64, 151936
    logits = (torch.randn(B, V, device="cuda") * 2).bfloat16()
    seeds = torch.randint(0, 2**62, (B,), device="cuda")
    positions = torch.randint(0, 4096, (B,), device="cuda")
    o = _opts(**opts)
    tok, lp = ops.sample_tokens_triton(logits, seeds, positions, **o)
    rtok, rlp = ref.sample_tokens(logits, seeds, positions, **o)
    assert (tok == rtok).float().mean().item() >= 0.98  # float ties of -log(-log(u)) across backends
    same = tok == rtok
    assert_close(lp[same], rlp[same], torch.float32)


@pytest.mark.gpu
def test_gpu_cuda_graph():
    """No host sync: the op captures into a CUDA graph and replays on new inputs written in place."""
    B, V = 8, 50000
    logits, seeds, positions = (t.cuda() for t in _inputs(B, V, torch.bfloat16))
    o = _opts(top_p=0.9, top_k=40, temperature=0.8)
    ops.sample_tokens_triton(logits, seeds, positions, **o)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tok, lp = ops.sample_tokens_triton(logits, seeds, positions, **o)
    for _ in range(2):
        logits.copy_(torch.randn_like(logits) * 3)
        positions.add_(1)
        g.replay()
        rtok, rlp = ref.sample_tokens(logits, seeds, positions, **o)
        assert torch.equal(tok, rtok)
        assert_close(lp, rlp, torch.float32)


def _hf_kept(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, **_):
    """bool [B, V]: the tokens transformers' warpers leave finite, in generate's order (temperature, top-k,
    top-p, min-p; transformers.generation.utils._get_logits_processor), min_tokens_to_keep=1."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    s = TemperatureLogitsWarper(temperature)(None, logits.float())
    for on, w in ((top_k != 0, lambda: TopKLogitsWarper(top_k)), (top_p < 1.0, lambda: TopPLogitsWarper(top_p)),
                  (min_p > 0.0, lambda: MinPLogitsWarper(min_p))):
        if on:
            s = w()(None, s)
    return s > float("-inf")


HF_EDGE_OPTS = [dict(min_p=1.0), dict(min_p=1.0, top_k=3, temperature=0.5), dict(top_k=1000), dict(top_k=1),
                dict(top_p=1e-9), dict(top_p=1e-9, min_p=1.0, greedy=True), dict(temperature=1e-5, min_p=0.999),
                dict(temperature=1e3, top_k=4, top_p=0.6, min_p=0.2)]


@pytest.mark.parametrize("B,V", [(3, 5), (4, 130)])
@pytest.mark.parametrize("opts", HF_EDGE_OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_edge_options_match_transformers_warpers(B, V, opts):
    """The kept set against transformers' TopK / TopP / MinP warpers at the edges of each option's range (min_p
    1.0, which transformers and TRL accept, was a ValueError), on logits with -inf entries and a row with one
    finite entry; the drawn token is in that set, equal on both backends, with the log-prob renormalized
    over it."""
    logits = torch.randn(B, V) * 3  # no ties: transformers keeps some of the tokens tied at a top-p edge
    logits[0, 1::3] = float("-inf")
    logits[-1, :] = float("-inf")
    logits[-1, torch.randint(0, V, ())] = 0.5
    seeds, positions = torch.randint(0, 2**62, (B,)), torch.randint(0, 2**31 - 1, (B,))
    o = _opts(**opts)
    hf = _hf_kept(logits, **o)
    assert torch.equal(hf, _kept(logits, **o) & (logits > float("-inf")))
    tok, lp = rk.sample_tokens(logits, seeds, positions, backend="torch", **o)
    ttok, tlp = rk.sample_tokens(logits, seeds, positions, backend="triton", **o)
    assert torch.equal(tok, ttok) and hf.gather(-1, tok[:, None]).all()
    for name, got in (("reference", lp), ("triton", tlp)):
        assert_close(got, _logp64(logits, tok, hf, **o), torch.float32, name=f"{name} logp")


@pytest.mark.gpu
@pytest.mark.parametrize("B,V", [(5, 130), (16, 151936)])
@pytest.mark.parametrize("opts", HF_EDGE_OPTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_gpu_edge_options_match_transformers_warpers(B, V, opts):
    """The compiled kernel at the option edges (min_p = 1.0, top_p -> 0, top_k >= V, extreme temperatures) on
    real-vocabulary rows with -inf entries and a one-token row: the drawn token is in transformers' kept set,
    equal to the reference's on the same logits, with the float64 log-prob over that set."""
    logits = torch.randn(B, V, device="cuda") * 3
    logits[0, 1::3] = float("-inf")
    logits[-1, :] = float("-inf")
    logits[-1, torch.randint(0, V, ())] = 0.5
    seeds = torch.randint(0, 2**62, (B,), device="cuda")
    positions = torch.randint(0, 2**31 - 1, (B,), device="cuda")
    o = _opts(**opts)
    hf = _hf_kept(logits.cpu(), **o).cuda()
    tok, lp = ops.sample_tokens_triton(logits, seeds, positions, **o)
    rtok, _ = ref.sample_tokens(logits, seeds, positions, **o)
    assert hf.gather(-1, tok[:, None]).all()
    assert int((tok != rtok).sum()) <= 1  # a float near-tie of -log(-log(u)) can differ across backends
    assert_close(lp, _logp64(logits, tok, hf, **o).float(), torch.float32, name="triton logp")


def _no_distribution_rows(B, V):
    """logits [B, V] whose even rows have nothing to sample from (a NaN at a random index, +inf, NaN and +inf, all
    NaN, all -inf, a finite logit past float32 at temperature 1e-5, cycling), odd rows finite (one -inf entry)."""
    logits, seeds, positions = _inputs(B, V)
    bad = torch.zeros(B, dtype=torch.bool)
    for b in range(0, B, 2):
        kind, i, j = (b // 2) % 6, torch.randint(0, V, ()).item(), torch.randint(0, V, ()).item()
        if kind == 0:
            logits[b, i] = math.nan
        elif kind == 1:
            logits[b, i] = math.inf
        elif kind == 2:
            logits[b, i], logits[b, j] = math.nan, math.inf
        elif kind == 3:
            logits[b] = math.nan
        elif kind == 4:
            logits[b] = -math.inf
        else:
            logits[b, i] = 4e33  # finite; 4e33 / 1e-5 overflows float32: no distribution at that temperature
        bad[b] = kind != 5
    logits[1::2, 0] = -math.inf
    return logits, seeds, positions, bad


@pytest.mark.parametrize("B,V", [(12, 9), (12, 400)])  # 400: two programs per row under the interpreter
@pytest.mark.parametrize("opts", OPTS + [dict(temperature=1e-5, top_k=3)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_rows_with_nan_or_inf_logits_are_marked_alike(B, V, opts):
    """A row whose logits hold NaN or +inf (also one that overflows at the temperature), or are all -inf, draws
    token 0 with log-prob NaN on every backend and with every option (the Triton kernel skipped a NaN logit and
    returned a finite log-prob, the reference took the NaN's index: different tokens, and a NaN row that r1train's
    generate(check_finite=True) could not see); the other rows draw as they do without them."""
    logits, seeds, positions, bad = _no_distribution_rows(B, V)
    o = _opts(**opts)
    if o["temperature"] == 1e-5:
        bad |= (logits / 1e-5 == math.inf).any(-1)
    for backend in ("torch", "triton"):
        tok, lp = rk.sample_tokens(logits, seeds, positions, backend=backend, **opts)
        assert (tok[bad] == 0).all() and lp[bad].isnan().all(), (backend, tok.tolist(), lp.tolist())
        good = ~bad
        tok_g, lp_g = rk.sample_tokens(logits[good], seeds[good], positions[good], backend=backend, **opts)
        assert torch.equal(tok[good], tok_g) and torch.isfinite(lp[good]).all() and torch.equal(lp[good], lp_g)
    rtok, rlp = rk.sample_tokens(logits, seeds, positions, backend="torch", **opts)
    assert torch.equal(tok, rtok)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_that_require_grad_give_outputs_without_grad(backend):
    """sample_tokens is not differentiable on any backend: logits that require grad give log-probs that do not
    (the reference returned a differentiable log-prob, the Triton op one whose backward raised), equal to those of
    the detached logits."""
    for B, V in [(3, 20), (5, 130)]:
        logits, seeds, positions = _inputs(B, V)
        x = logits.clone().requires_grad_()
        tok, lp = rk.sample_tokens(x * 2.0, seeds, positions, top_p=0.9, backend=backend)
        want_tok, want_lp = rk.sample_tokens(logits * 2.0, seeds, positions, top_p=0.9, backend=backend)
        assert not lp.requires_grad and lp.grad_fn is None and not tok.requires_grad
        assert torch.equal(tok, want_tok) and torch.equal(lp, want_lp)
