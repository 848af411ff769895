"""token_logprobs: the Triton kernel (interpreter on CPU) vs the float64 reference, values and gradients."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import r1kernels as rk
from r1kernels.reference import token_logprobs as ref_logprobs

triton = pytest.importorskip("triton")
from r1kernels.ops import logprob as lp_ops  # noqa: E402


def _check(logits, labels, temperature, entropy, dtype):
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    out = rk.token_logprobs(x, labels, temperature=temperature, return_entropy=entropy, backend="triton")
    ref = ref_logprobs(x64, labels, temperature, entropy)
    out, ref = (out, ref) if entropy else ((out,), (ref,))
    gs = [torch.randn_like(o) for o in out]
    sum((o * g).sum() for o, g in zip(out, gs)).backward()
    sum((r * g.double()).sum() for r, g in zip(ref, gs)).backward()
    lowp = None
    if dtype != torch.float32:  # the torch reference run in the same low precision
        xl = logits.detach().clone().requires_grad_()
        rl = ref_logprobs(xl, labels, temperature, entropy)
        rl = rl if entropy else (rl,)
        sum((r * g).sum() for r, g in zip(rl, gs)).backward()
        lowp = xl.grad
    for o, r, name in zip(out, ref, ("logp", "entropy")):
        assert o.dtype == torch.float32 and o.shape == labels.shape
        assert_close(o, r, torch.float32, name=name)
    assert x.grad.dtype == logits.dtype
    assert_close(x.grad, x64.grad, dtype, lowp=lowp, name="grad")


@pytest.mark.parametrize("shape,V", [((3, 5), 67), ((7,), 1), ((2, 1), 130), ((1, 4, 3), 29), ((2, 3), 128)])
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True)])
def test_matches_reference(shape, V, temperature, entropy):
    logits = torch.randn(*shape, V) * 3
    labels = torch.randint(0, V, shape)
    _check(logits, labels, temperature, entropy, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    logits = (torch.randn(4, 3, 77) * 4).to(dtype)
    _check(logits, torch.randint(0, 77, (4, 3)), 1.3, True, dtype)


def test_sliced_logits_int32_labels():
    full = torch.randn(2, 6, 45)
    logits = full[:, :-1]  # non-contiguous rows, contiguous vocab
    labels = torch.randint(0, 45, (2, 5), dtype=torch.int32)
    _check(logits, labels, 1.0, False, torch.float32)


def masked_vocab(lead, V, keep, scale=3.0):
    """A masked vocabulary: logits [*lead, V] with V - keep columns of each row at -inf (each row its own set);
    -> (logits, labels [*lead] among the finite columns, cols [*lead, keep] each row's finite columns in order,
    finite [*lead, keep] their logits, j [*lead] each label's index in cols)."""
    cols = torch.rand(*lead, V).argsort(-1)[..., :keep].sort(-1).values
    finite = torch.randn(*lead, keep) * scale
    logits = torch.full((*lead, V), float("-inf")).scatter(-1, cols, finite)
    j = torch.randint(0, keep, lead)
    return logits, cols.gather(-1, j[..., None])[..., 0], cols, finite, j


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lead,V,keep,temperature", [((3, 5), 67, 40, 1.0), ((2, 3), 130, 3, 0.7),
                                                     ((7,), 29, 1, 1.3), ((1, 4, 2), 128, 100, 0.9)])
def test_masked_vocabulary_entropy(backend, lead, V, keep, temperature):
    """-inf logits (a masked vocabulary) have p = 0 and add 0 to the entropy (0 log 0 = 0) and to its gradient:
    log-prob, entropy and gradient equal the float64 softmax over the finite columns alone (the gradient 0 at
    the -inf ones); 0 * -inf was NaN in both backends."""
    logits, labels, cols, finite, j = masked_vocab(lead, V, keep)
    x = logits.clone().requires_grad_()
    lp, h = rk.token_logprobs(x, labels, temperature=temperature, return_entropy=True, backend=backend)
    f64 = finite.double().requires_grad_()
    lsm = torch.log_softmax(f64 / temperature, -1)
    lp64, h64 = lsm.gather(-1, j[..., None])[..., 0], -(lsm.exp() * lsm).sum(-1)
    g, gh = torch.randn(lead), torch.randn(lead)
    (lp * g + h * gh).sum().backward()
    (lp64 * g + h64 * gh).sum().backward()
    assert_close(lp, lp64, name="logp")
    assert_close(h, h64, name="entropy")
    assert_close(x.grad, torch.zeros(*lead, V, dtype=torch.float64).scatter(-1, cols, f64.grad), name="grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lead,V,keep", [((3, 5), 67, 40), ((2, 3), 130, 3), ((1, 4, 2), 128, 100)])
def test_label_on_a_masked_column_entropy_gradient(backend, lead, V, keep):
    """A label on a -inf logit (log-prob -inf): the entropy's gradient is the float64 one over the finite columns
    (0 at the -inf ones, the label's included). The Triton backward's label fix-up computed 0 * -inf = NaN there."""
    logits, labels, cols, finite, j = masked_vocab(lead, V, keep)
    masked = torch.ones(*lead, V, dtype=torch.bool).scatter(-1, cols, False)
    labels = masked.float().multinomial(1)[..., 0] if len(lead) == 1 else \
        masked.reshape(-1, V).float().multinomial(1).view(lead)
    x = logits.clone().requires_grad_()
    lp, h = rk.token_logprobs(x, labels, return_entropy=True, backend=backend)
    assert torch.isinf(lp).all() and (lp < 0).all()
    gh = torch.randn(lead)
    (h * gh).sum().backward()
    f64 = finite.double().requires_grad_()
    lsm = torch.log_softmax(f64, -1)
    (-(lsm.exp() * lsm).sum(-1) * gh).sum().backward()
    assert_close(h, -(lsm.exp() * lsm).sum(-1), name="entropy")
    assert_close(x.grad, torch.zeros(*lead, V, dtype=torch.float64).scatter(-1, cols, f64.grad), name="grad")


def test_empty():
    out = rk.token_logprobs(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), backend="triton")
    assert out.shape == (0,)


def test_compile_fullgraph():
    logits = torch.randn(3, 4, 33, requires_grad=True)
    labels = torch.randint(0, 33, (3, 4))

    def f(x):
        lp, h = rk.token_logprobs(x, labels, temperature=0.9, return_entropy=True, backend="triton")
        return (lp * 2 + h).sum()

    torch.compile(f, fullgraph=True)(logits).backward()
    x64 = logits.detach().double().requires_grad_()
    lp, h = ref_logprobs(x64, labels, 0.9, True)
    (lp * 2 + h).sum().backward()
    assert_close(logits.grad, x64.grad, torch.float32, name="compiled grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads", ["lse", "logp+lse", "lse+entropy", "all"])
def test_lse_output_has_its_gradient(dtype, grads):
    """The op's lse output (logsumexp(logits / T), which the verl drop-ins use) carries its own gradient p / T:
    it was dropped. Any mix of the three outputs' gradients against the float64 reference's autograd."""
    shape, V, T = (3, 5), 41, 0.8
    logits = (torch.randn(*shape, V) * 3).to(dtype)
    labels = torch.randint(0, V, shape)
    entropy = "entropy" in grads or grads == "all"
    x = logits.clone().requires_grad_()
    x64 = logits.double().requires_grad_()
    out = lp_ops.token_logprobs_lse_triton(x, labels, T, entropy)
    ref = rk.reference.token_logprobs_lse(x64, labels, T, entropy)
    for o, r, name in zip(out, ref, ("logp", "lse", "entropy")):
        if r is not None:
            assert_close(o, r, torch.float32, name=name)
    used = {"lse": (1,), "logp+lse": (0, 1), "lse+entropy": (1, 2), "all": (0, 1, 2)}[grads]
    gs = {i: torch.randn(shape) for i in used}
    sum((out[i] * g).sum() for i, g in gs.items()).backward()
    sum((ref[i] * g.double()).sum() for i, g in gs.items()).backward()
    lowp = None
    if dtype != torch.float32:  # the torch reference in the same low precision
        xl = logits.clone().requires_grad_()
        rl = rk.reference.token_logprobs_lse(xl, labels, T, entropy)
        sum((rl[i] * g).sum() for i, g in gs.items()).backward()
        lowp = xl.grad
    assert_close(x.grad, x64.grad, dtype, lowp=lowp, name="grad")


def test_opcheck():
    logits = torch.randn(2, 3, 19, requires_grad=True)
    labels = torch.randint(0, 19, (2, 3))
    torch.library.opcheck(lp_ops.token_logprobs_fwd, (logits, labels, 0.8, True))
    torch.library.opcheck(lp_ops.token_logprobs_fwd, (logits, labels, 1.0, False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_real_shape(dtype):
    N, V = 1024, 151936
    logits = (torch.randn(N, V, device="cuda") * 2).to(dtype)
    labels = torch.randint(0, V, (N,), device="cuda")
    _check(logits, labels, 1.0, True, dtype)
