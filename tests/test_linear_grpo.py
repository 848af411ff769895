"""linear_grpo_loss: chunked cuBLAS logits + the fused Triton loss kernel vs the float64 reference:
loss, metrics, per-token log-probs and the gradients of hidden, weight and bias; old / ref log-probs are
constants of the loss on every backend."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, loss_scale
from test_grpo import _dapo_k3_loss

import r1kernels as rk
from r1kernels.reference import grpo as R

triton = pytest.importorskip("triton")
from r1kernels.ops import linear_grpo as lin_ops  # noqa: E402


def _check(B, T, H, V, device="cpu", dtype=torch.float32, with_bias=True, with_sampling=False, **kw):
    hidden = (torch.randn(B, T, H, device=device)).to(dtype)
    weight = (torch.randn(V, H, device=device) / H ** 0.5 * 3).to(dtype)
    bias = (torch.randn(V, device=device) * 0.1).to(dtype) if with_bias else None
    ids = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, device=device)
    mask = (torch.rand(B, T, device=device) > 0.2).float()
    mask[0, -1] = 0
    base = R.token_logprobs((hidden.float() @ weight.float().t()), ids)
    old = base + 0.2 * torch.randn(B, T, device=device)
    ref = base + 0.2 * torch.randn(B, T, device=device)
    opts = dict(old_logprobs=old, ref_logprobs=ref, beta=0.05, **kw)
    if with_sampling:  # rollout-engine log-probs near the policy's
        opts["sampling_logprobs"] = base + 0.3 * torch.randn(B, T, device=device)
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    b = leaves[2] if with_bias else None
    b64 = leaves64[2] if with_bias else None
    out = rk.linear_grpo_loss(leaves[0], leaves[1], ids, adv, mask, bias=b, backend="triton", **opts)
    (out.loss * 1.5).backward()
    o64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in opts.items()}
    lp = {}  # name -> the same computation from cuBLAS's bf16 logits (the tolerance scale for bf16)
    if dtype == torch.float32:
        exp = rk.linear_grpo_loss(leaves64[0], leaves64[1], ids, adv.double(), mask, bias=b64, backend="torch", **o64)
        (exp.loss * 1.5).backward()
        grads64 = [t.grad for t in leaves64]
    else:
        # For bf16 inputs the contract is grpo_loss(hidden @ weight.T + bias) with that product rounded to bf16
        # (as a bf16 lm_head computes it); the reference takes the correctly rounded bf16 logits, then fp64
        # loss and gradients. Two bf16 GEMMs of different shapes (the kernel's chunks, one full product) round
        # some logits differently, and at logit scale ~10 an ulp (1/16) moves probabilities by percents, so
        # the kernel is held to 2x the error of the same fp64 computation from cuBLAS's full bf16 product.
        cap = kw.get("softcap")

        def from_logits(logits):
            logits64 = logits.double().requires_grad_()
            z = logits64 if cap is None else cap * torch.tanh(logits64 / cap)
            e = rk.grpo_loss(z, ids, adv.double(), mask, backend="torch",  # without the linear-only options
                             **{k: v for k, v in o64.items() if k not in ("chunk_budget_bytes", "softcap")})
            (g_logits,) = torch.autograd.grad(e.loss * 1.5, logits64)
            g2 = g_logits.reshape(-1, V)
            return e, [(g2 @ leaves64[1].detach()).reshape(B, T, H), g2.t() @ leaves64[0].detach().reshape(-1, H),
                       g2.sum(0)][:len(leaves)]

        with torch.no_grad():
            z64 = leaves64[0].detach() @ leaves64[1].detach().t() + (leaves64[2].detach() if with_bias else 0.0)
            z_lp = leaves[0].detach() @ leaves[1].detach().t()
            z_lp = z_lp + leaves[2].detach() if with_bias else z_lp
        exp, grads64 = from_logits(z64.to(dtype))
        exp_lp, grads_lp = from_logits(z_lp)
        lp = {"loss": exp_lp.loss, "logp": exp_lp.per_token_logprobs * mask, **exp_lp.metrics,
              **{f"grad {n}": g for n, g in zip(("hidden", "weight", "bias"), grads_lp)}}
    scale = loss_scale(lambda a: rk.linear_grpo_loss(*[t.detach() for t in leaves64[:2]], ids, a.double(), mask,
                                                     bias=b64.detach() if with_bias else None, backend="torch",
                                                     **o64).loss, adv)
    assert_close(out.loss, exp.loss, dtype, lowp=lp.get("loss"), name="loss", scale=scale)
    assert_close(out.per_token_logprobs * mask, exp.per_token_logprobs * mask, dtype, lowp=lp.get("logp"),
                 name="logp")
    for k in exp.metrics:
        if k.startswith("clip_ratio") and dtype != torch.float32:
            # shares of clipped tokens: the kernel's own bf16 logits may put a token on the other side of a
            # clip bound than cuBLAS's, so allow two tokens of the shortest row
            assert abs(float(out.metrics[k]) - float(exp.metrics[k])) <= 2 / float(mask.sum(1).min()), k
        else:
            assert_close(out.metrics[k], exp.metrics[k], dtype, lowp=lp.get(k), name=k)
    for t, g64, name in zip(leaves, grads64, ("hidden", "weight", "bias")):
        assert t.grad.dtype == t.dtype
        assert_close(t.grad, g64, dtype, lowp=lp.get(f"grad {name}"), name=f"grad {name}")


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_matches_reference(level, loss_type):
    _check(3, 4, 8, 37, importance_sampling_level=level, loss_type=loss_type, temperature=0.9)


@pytest.mark.parametrize("level", R.IS_LEVELS)
def test_compute_entropy(level):
    """metrics["entropy"] from the fused chunked kernel's pass (token level) or the log-prob path (sequence),
    against the float64 reference (through _check) and a direct computation over chunks of 5 rows."""
    _check(3, 4, 8, 37, importance_sampling_level=level, compute_entropy=True,
           chunk_budget_bytes=_budget_for_rows(5, 37))
    h, w = torch.randn(2, 6, 8), torch.randn(37, 8)
    ids, adv, mask = torch.randint(0, 37, (2, 6)), torch.randn(2), (torch.rand(2, 6) > 0.3).float()
    mask[:, 0] = 1
    out = rk.linear_grpo_loss(h, w, ids, adv, mask, importance_sampling_level=level, temperature=1.3,
                              compute_entropy=True, backend="triton")
    lp = torch.log_softmax(h.double() @ w.double().t() / 1.3, -1)
    ent = -(lp.exp() * lp).sum(-1)
    assert_close(out.metrics["entropy"], (ent * mask).sum() / mask.sum(), torch.float32, name="entropy")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,T,H,V,keep,chunk", [(3, 4, 8, 37, 20, None), (2, 5, 6, 130, 3, 4), (4, 3, 8, 64, 63, 5)])
@pytest.mark.parametrize("op", ["logprobs", "entropy_coef", "quantile", "compute_entropy", "sequence"])
def test_masked_vocabulary_bias(backend, B, T, H, V, keep, chunk, op):
    """A -inf bias entry (a vocabulary masked in the head) gives -inf logits, which add 0 to the entropy and its
    gradient: outputs and the gradients of hidden, weight and bias equal the float64 head over the finite columns
    alone (weight and bias gradients 0 at the masked ones); 0 * -inf was NaN in both backends."""
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) / H ** 0.5 * 3
    bias = torch.randn(V) * 0.1
    cols = torch.randperm(V)[:keep].sort().values
    bias_inf = torch.full((V,), float("-inf")).index_copy(0, cols, bias[cols])
    j = torch.randint(0, keep, (B, T))
    ids = cols[j]
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias_inf)]
    leaves64 = [t.double().requires_grad_() for t in (hidden, weight[cols], bias[cols])]
    budget = {"chunk_budget_bytes": _budget_for_rows(chunk, V)} if chunk and backend == "triton" else {}
    if op == "logprobs":
        out = rk.linear_token_logprobs(*leaves[:2], ids, bias=leaves[2], temperature=0.8, return_entropy=True,
                                       backend=backend, **budget)
        exp = rk.linear_token_logprobs(*leaves64[:2], j, bias=leaves64[2], temperature=0.8, return_entropy=True,
                                       backend="torch")
        gs = [torch.randn(B, T) for _ in out]
        sum((o * g).sum() for o, g in zip(out, gs)).backward()
        sum((e * g.double()).sum() for e, g in zip(exp, gs)).backward()
        for o, e, name in zip(out, exp, ("logp", "entropy")):
            assert_close(o, e, name=name)
    else:
        kw = {"entropy_coef": dict(entropy_coef=0.05), "quantile": dict(top_entropy_quantile=0.5),
              "compute_entropy": dict(compute_entropy=True),
              "sequence": dict(compute_entropy=True, importance_sampling_level="sequence")}[op]
        adv = torch.randn(B)
        mask = (torch.rand(B, T) > 0.25).float()
        mask[0, 0] = 1.0
        out = rk.linear_grpo_loss(*leaves[:2], ids, adv, mask, bias=leaves[2], temperature=0.8, backend=backend,
                                  **kw, **budget)
        exp = rk.linear_grpo_loss(*leaves64[:2], j, adv.double(), mask, bias=leaves64[2], temperature=0.8,
                                  backend="torch", **kw)
        out.loss.backward()
        exp.loss.backward()
        scale = loss_scale(lambda a: rk.linear_grpo_loss(*[t.detach() for t in leaves64[:2]], j, a.double(), mask,
                                                         bias=leaves64[2].detach(), temperature=0.8, backend="torch",
                                                         **kw).loss, adv)
        assert_close(out.loss, exp.loss, name="loss", scale=scale)
        assert set(out.metrics) == set(exp.metrics)
        for k in exp.metrics:
            assert_close(out.metrics[k], exp.metrics[k], name=k)
        with torch.no_grad():
            lsm = torch.log_softmax((leaves64[0] @ leaves64[1].t() + leaves64[2]) / 0.8, -1)
            h = -(lsm.exp() * lsm).sum(-1)  # the entropy over the finite columns
        assert_close(out.metrics["entropy"], (h * mask).sum() / mask.sum(), name="entropy")
    assert_close(leaves[0].grad, leaves64[0].grad, name="grad hidden")
    for t, t64, name in zip(leaves[1:], leaves64[1:], ("weight", "bias")):
        assert_close(t.grad, torch.zeros(t.shape, dtype=torch.float64).index_copy(0, cols, t64.grad),
                     name=f"grad {name}")


@pytest.mark.parametrize("mode", R.IS_MODES)
def test_rollout_correction(mode):
    """Token modes run the fused chunked kernel (chunks split sequences here), sequence modes and the
    off-policy mask the log-prob path; both against the float64 reference."""
    budget = _budget_for_rows(5, 29)
    _check(3, 4, 6, 29, with_sampling=True, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=1.3,
           chunk_budget_bytes=budget)
    _check(3, 4, 6, 29, with_sampling=True, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.9,
           off_policy_mask_threshold=0.1, use_bias_correction_kl=False)


@pytest.mark.parametrize("loss_type,level", [("luspo", "sequence"), ("vespo", "token"), ("sapo", "token")])
def test_loss_family_and_entropy(loss_type, level):
    _check(3, 4, 6, 29, loss_type=loss_type, importance_sampling_level=level, sapo_temperature_pos=0.6,
           sapo_temperature_neg=1.7)
    _check(3, 4, 6, 29, loss_type=loss_type, importance_sampling_level=level, top_entropy_quantile=0.4,
           entropy_coef=0.03)


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("softcap,chunk", [(2.5, None), (1.2, 5), (30.0, 7)])
def test_softcap(level, softcap, chunk):
    """softcap (Gemma 2's final_logit_softcapping): the fused kernel's loss, metrics, log-probs and gradients
    of hidden / weight / bias against the float64 reference on c * tanh(z / c) (logits of scale ~3 against caps
    of 1.2-30: saturated and nearly linear), with chunk boundaries inside sequences; entropy on."""
    budget = {"chunk_budget_bytes": _budget_for_rows(chunk, 37)} if chunk else {}
    _check(3, 4, 8, 37, importance_sampling_level=level, softcap=softcap, temperature=0.9, compute_entropy=True,
           **budget)
    _check(2, 5, 8, 37, importance_sampling_level=level, softcap=softcap, loss_type="grpo", with_bias=False, **budget)


def test_softcap_bf16_against_rounded_logits():
    _check(2, 8, 32, 61, dtype=torch.bfloat16, softcap=3.0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "30", 1e4, 1e-4, 3.5e38])
@pytest.mark.parametrize("op", ["linear_grpo_loss", "linear_token_logprobs"])
def test_bad_softcap(op, bad):
    """Not a positive number, or outside the float32 kernels' range [1e-3, 1e3] (their tanh's error grows as
    softcap * 2^-24: 1.6e-3 in the log-probs at 1e4; NaN past float32's range; 0 / 0 gradients below it)."""
    h, w, ids = torch.randn(2, 3, 4), torch.randn(11, 4), torch.randint(0, 11, (2, 3))
    args = (h, w, ids, torch.randn(2)) if op == "linear_grpo_loss" else (h, w, ids)
    with pytest.raises(ValueError, match="softcap"):
        getattr(rk, op)(*args, softcap=bad)


def _budget_for_rows(rows, V, dtype=torch.float32):
    """A chunk budget that plans `rows` rows of V logits per chunk (no fp32 dweight accumulator)."""
    return rows * (V * torch.empty((), dtype=dtype).element_size() + lin_ops.ROW_FP32_BYTES)


@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_chunks_equal_unchunked_reference(rows):
    """12 tokens (3 sequences of 4) in chunks of 1, 3 or 6 rows (boundaries inside sequences) or 4 rows
    (whole sequences): the same loss, metrics and gradients as the float64 reference, which never chunks."""
    B, T, V = 3, 4, 29
    budget = _budget_for_rows(rows, V)
    plan = lin_ops.chunk_plan(B * T, V, torch.float32, budget)
    assert plan.rows == rows and plan.chunks == -(-B * T // rows)
    _check(B, T, 6, V, with_bias=False, chunk_budget_bytes=budget)
    _check(B, T, 6, V, chunk_budget_bytes=budget, loss_type="grpo")
    _check(B, T, 6, V, importance_sampling_level="sequence", chunk_budget_bytes=budget)


def test_chunk_plan():
    """The plan covers N rows in balanced chunks within the budget; the default budgets keep the
    temporaries <= 1.0 GiB (linear_grpo_loss) and <= 0.3 GiB (linear_token_logprobs) at N=8192, H=3584,
    V=151936 bf16 with chunks of >= MIN_CHUNK_ROWS rows; an fp32 dweight accumulator only where it fits."""
    GiB = 2**30
    for N, V, budget in [(8192, 151936, lin_ops.GRPO_CHUNK_BUDGET), (8192, 151936, lin_ops.LOGPROB_CHUNK_BUDGET),
                         (1000, 5000, 10**6), (7, 100, 1), (1, 10, 10**9)]:
        p = lin_ops.chunk_plan(N, V, torch.bfloat16, budget)
        assert p.chunks * p.rows >= N > (p.chunks - 1) * p.rows
        row_bytes = V * 2 + lin_ops.ROW_FP32_BYTES
        assert p.temp_bytes <= max(budget, row_bytes)
        assert (p.chunks - 1) * max(1, budget // row_bytes) < N  # one chunk fewer would break the budget
    grpo = lin_ops.chunk_plan(8192, 151936, torch.bfloat16, lin_ops.GRPO_CHUNK_BUDGET, weight_numel=151936 * 3584,
                              weight_dtype=torch.bfloat16, device="cuda")
    assert grpo.temp_bytes <= 1.0 * GiB and not grpo.fp32_dweight and grpo.rows >= lin_ops.MIN_CHUNK_ROWS
    lp = lin_ops.chunk_plan(8192, 151936, torch.bfloat16, lin_ops.LOGPROB_CHUNK_BUDGET)
    assert lp.temp_bytes <= 0.3 * GiB and lp.rows >= lin_ops.MIN_CHUNK_ROWS
    small = lin_ops.chunk_plan(4096, 1000, torch.bfloat16, lin_ops.GRPO_CHUNK_BUDGET, weight_numel=1000 * 64,
                               weight_dtype=torch.bfloat16, device="cuda")
    assert small.fp32_dweight and small.chunks == 1 and small.temp_bytes <= lin_ops.GRPO_CHUNK_BUDGET
    on_cpu = lin_ops.chunk_plan(4096, 1000, torch.bfloat16, lin_ops.GRPO_CHUNK_BUDGET, weight_numel=1000 * 64,
                                weight_dtype=torch.bfloat16, device="cpu")
    assert not on_cpu.fp32_dweight  # no fp32-output addmm on the CPU


def test_bad_chunk_budget():
    h, w, ids = torch.randn(2, 3, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 3))
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match="chunk_budget_bytes"):
            rk.linear_grpo_loss(h, w, ids, torch.randn(2), chunk_budget_bytes=bad)
        with pytest.raises(ValueError, match="chunk_budget_bytes"):
            rk.linear_token_logprobs(h, w, ids, chunk_budget_bytes=bad)


def test_compile_fullgraph():
    B, T, H, V = 2, 3, 5, 17
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    f = torch.compile(lambda h, w: rk.linear_grpo_loss(h, w, ids, adv, backend="triton").loss, fullgraph=True)
    f(hidden, weight).backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    R.linear_grpo_loss(h64, w64, ids, adv.double())[0].backward()
    assert_close(hidden.grad, h64.grad, name="compiled grad hidden")
    assert_close(weight.grad, w64.grad, name="compiled grad weight")
    g = torch.compile(lambda h, w: rk.linear_token_logprobs(h, w, ids, backend="triton").sum(), fullgraph=True)
    hidden.grad = weight.grad = None
    g(hidden, weight).backward()
    h64.grad = w64.grad = None
    from r1kernels.reference import linear_token_logprobs as ref_lin
    ref_lin(h64, w64, ids).sum().backward()
    assert_close(hidden.grad, h64.grad, name="compiled logprob grad hidden")
    for cap in (None, 2.5):  # softcap: an optional float of the op's schema
        torch.library.opcheck(lin_ops.linear_logprobs_fwd, (hidden.detach().requires_grad_(), weight.detach(), None,
                                                            ids, 0.9, True, 2**20, cap))
    opts = dict(num_items_f=None, max_completion_length=None, temperature=1.0, epsilon=0.2, epsilon_high=0.2,
                delta=None, beta=0.0, loss_type="dapo", kl_estimator="k3", sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                is_mode=None, is_clip_min=None, is_clip_max=None, bias_kl=True, entropy=False, chunk_budget_bytes=2**20)
    torch.library.opcheck(lin_ops.linear_grpo_fwd, (hidden.detach(), weight.detach(), None, ids, adv, None, None, None,
                                                     None, None), opts)
    torch.library.opcheck(lin_ops.linear_grpo_fwd, (hidden.detach().requires_grad_(), weight.detach(),
                                                     torch.randn(V), ids, adv, None, None, None, None, None),
                          {**opts, "loss_type": "sapo", "entropy": True, "softcap": 2.5},
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(lin_ops.linear_grpo_fwd, (hidden.detach().requires_grad_(), weight.detach(), None, ids, adv,
                                                     None, None, None, None, None), {**opts, "grad_weight": False},
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(lin_ops.linear_grpo_fwd, (hidden.detach(), weight.detach(), torch.randn(V), ids, adv, None,
                                                     None, None, None, None),
                          {**opts, "grad_hidden": False, "grad_weight": False, "grad_bias": False})


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
@pytest.mark.parametrize("entropy", [False, True])
def test_empty_batch_backpropagates(backend, shape, entropy):
    """No tokens: empty outputs that stay in the autograd graph, so backward runs and gives zero gradients
    (the reference returned outputs without a graph for 0 rows and loss.backward() raised)."""
    H, V = 5, 7
    hidden, weight, bias = (torch.randn(*s).requires_grad_() for s in ((*shape, H), (V, H), (V,)))
    ids = torch.zeros(shape, dtype=torch.long)
    out = rk.linear_token_logprobs(hidden, weight, ids, bias=bias, return_entropy=entropy, backend=backend)
    out = out if entropy else (out,)
    assert all(o.shape == shape and o.dtype == torch.float32 and o.requires_grad for o in out)
    sum(o.sum() for o in out).backward()
    res = rk.linear_grpo_loss(hidden, weight, ids, torch.zeros(shape[0]), bias=bias, compute_entropy=entropy,
                              backend=backend)
    assert res.loss.shape == () and res.loss.item() == 0.0 and res.per_token_logprobs.shape == shape
    res.loss.backward()
    for t in (hidden, weight, bias):
        assert t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("entropy,with_bias,chunk,softcap", [(False, True, None, None), (True, False, 5, None),
                                                             (True, True, 4, None), (False, True, None, 2.5),
                                                             (True, True, 5, 1.7), (True, False, None, 40.0)])
def test_linear_token_logprobs(entropy, with_bias, chunk, softcap):
    """Unchunked, and chunks of 5 and 4 of the 6 rows (a boundary inside the second sequence); soft-capped
    logits (Gemma 2), which the reference computes as an independent formula says."""
    from r1kernels.reference import linear_token_logprobs as ref_lin
    H, V = 7, 43
    budget = {"chunk_budget_bytes": _budget_for_rows(chunk, V)} if chunk else {}
    leaves = [torch.randn(2, 3, H), torch.randn(V, H) / H ** 0.5 * 3] + ([torch.randn(V) * 0.1] if with_bias else [])
    leaves = [t.requires_grad_() for t in leaves]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    labels = torch.randint(0, V, (2, 3))
    out = rk.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if with_bias else None,
                                   temperature=0.8, return_entropy=entropy, softcap=softcap, backend="triton", **budget)
    exp = ref_lin(leaves64[0], leaves64[1], labels, leaves64[2] if with_bias else None, 0.8, entropy,
                  softcap=softcap)
    if softcap is not None:  # the spec itself: log_softmax(c * tanh(z / c) / T)
        with torch.no_grad():
            z = leaves64[0] @ leaves64[1].t() + (leaves64[2] if with_bias else 0.0)
            lp = torch.log_softmax(softcap * torch.tanh(z / softcap) / 0.8, -1)
            torch.testing.assert_close(exp[0] if entropy else exp, lp.gather(-1, labels[..., None])[..., 0])
            if entropy:
                torch.testing.assert_close(exp[1], -(lp.exp() * lp).sum(-1))
    out, exp = (out, exp) if entropy else ((out,), (exp,))
    gs = [torch.randn_like(o) for o in out]
    sum((o * g).sum() for o, g in zip(out, gs)).backward()
    sum((e * g.double()).sum() for e, g in zip(exp, gs)).backward()
    for o, e in zip(out, exp):
        assert_close(o, e, name="logp/entropy")
    for t, t64 in zip(leaves, leaves64):
        assert_close(t.grad, t64.grad, name="grad")


@pytest.mark.parametrize("softcap,chunk,with_bias", [(None, None, True), (2.5, 4, False), (1.7, 5, True)])
def test_linear_logprobs_lse_output_has_its_gradient(softcap, chunk, with_bias):
    """The fused op's lse output (logsumexp of the capped logits / T) carries its own gradient beside the
    log-prob's and the entropy's (it was dropped); against float64 autograd of the formula, chunked or not."""
    H, V, T = 7, 43, 0.8
    budget = _budget_for_rows(chunk, V) if chunk else 2**20
    leaves = [torch.randn(2, 3, H), torch.randn(V, H) / H ** 0.5 * 3] + ([torch.randn(V) * 0.1] if with_bias else [])
    leaves = [t.requires_grad_() for t in leaves]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    labels = torch.randint(0, V, (2, 3))
    outs = lin_ops.linear_logprobs_fwd(leaves[0], leaves[1], leaves[2] if with_bias else None, labels, T, True,
                                       budget, softcap)
    z = leaves64[0] @ leaves64[1].t() + (leaves64[2] if with_bias else 0.0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z / T, -1)
    lp_all = torch.log_softmax(z / T, -1)
    exp = (lp_all.gather(-1, labels[..., None])[..., 0], lse, -(lp_all.exp() * lp_all).sum(-1))
    for o, e, name in zip(outs, exp, ("logp", "lse", "entropy")):
        assert_close(o, e.detach(), name=name)
    gs = [torch.randn(labels.shape) for _ in range(3)]
    for used in ((1,), (0, 1, 2)):
        for t in leaves + leaves64:
            t.grad = None
        sum((outs[i] * gs[i]).sum() for i in used).backward(retain_graph=True)
        sum((exp[i] * gs[i].double()).sum() for i in used).backward(retain_graph=True)
        for t, t64 in zip(leaves, leaves64):
            assert_close(t.grad, t64.grad, name=f"grad of outputs {used}")


@pytest.mark.parametrize("op", ["linear_grpo_loss", "linear_token_logprobs"])
@pytest.mark.parametrize("B,T,H,V", [(2, 3, 8, 17), (3, 5, 12, 61)])
def test_frozen_weight_runs_no_weight_gradient_gemm(op, B, T, H, V, monkeypatch):
    """lm_head frozen (LoRA): the hidden gradient equals the float64 reference's, the weight gets none, and
    the weight-gradient GEMM never runs (its accumulator is never called); with a trainable weight it runs."""
    calls = []
    orig = lin_ops._accumulate
    monkeypatch.setattr(lin_ops, "_accumulate", lambda *a: (calls.append(1), orig(*a))[1])
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) / H ** 0.5 * 3
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
    old = torch.randn(B, T) - 3.0

    def run(h, w, backend):
        if op == "linear_grpo_loss":
            return rk.linear_grpo_loss(h, w, ids, adv, old_logprobs=old, ref_logprobs=old, beta=0.04,
                                       backend=backend).loss * 1.3
        return (rk.linear_token_logprobs(h, w, ids, backend=backend) * torch.linspace(-1, 1, T)).sum()

    for frozen in (True, False):
        calls.clear()
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen)
        run(h, w, "triton").backward()
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_(not frozen)
        run(h64, w64, "torch").backward()
        assert_close(h.grad, h64.grad, name="grad hidden")
        assert (w.grad is None) == frozen and bool(calls) != frozen
        if not frozen:
            assert_close(w.grad, w64.grad, name="grad weight")


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_hidden_gives_nan_loss(level, backend):
    """One NaN in hidden must reach the loss on every backend."""
    B, T, H, V = 2, 3, 8, 17
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    hidden[0, 1, 2] = float("nan")
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
    for loss_type in ("dapo", "grpo", "cispo", "sapo"):
        out = rk.linear_grpo_loss(hidden, weight, ids, adv, loss_type=loss_type, importance_sampling_level=level,
                                  backend=backend)
        assert torch.isnan(out.loss), (loss_type, out.loss)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("T,rows", [(1, 1), (5, 2), (7, 7), (9, 4)])
def test_batch_of_one_row(loss_type, T, rows):
    """B = 1 (per_device_train_batch_size=1): the chunked kernel reads the row's advantage and scale for every
    token of a chunk (an expanded [1, T] view, whose reshape keeps stride 0): against the float64 reference."""
    _check(1, T, 6, 29, loss_type=loss_type, max_completion_length=12, chunk_budget_bytes=_budget_for_rows(rows, 29))


def test_ignore_index_and_b1_advantages():
    """-100 at masked positions and [B, 1] advantages, as in grpo_loss."""
    B, T, H, V = 3, 4, 8, 19
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
    mask = (torch.rand(B, T) > 0.3).float()
    for level in R.IS_LEVELS:
        for backend in ("triton", "torch"):
            a = rk.linear_grpo_loss(hidden, weight, ids, adv, mask, importance_sampling_level=level, backend=backend)
            b = rk.linear_grpo_loss(hidden, weight, ids.masked_fill(mask == 0, -100), adv[:, None], mask,
                                    importance_sampling_level=level, backend=backend)
            assert_close(b.loss, a.loss, name="loss")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_bf16_against_rounded_logits(loss_type):
    """The bf16 contract at a small shape (the GPU test's real shape runs the same comparison)."""
    _check(2, 8, 32, 61, dtype=torch.bfloat16, loss_type=loss_type)


@pytest.mark.gpu
def test_gpu_real_shape():
    _check(2, 256, 3584, 151936, device="cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gpu_batch_of_one_row(loss_type):
    """B = 1 on the GPU (test_batch_of_one_row's case at a real vocabulary, several chunks)."""
    _check(1, 300, 1536, 151936, device="cuda", dtype=torch.bfloat16, loss_type=loss_type,
           chunk_budget_bytes=_budget_for_rows(128, 151936, torch.bfloat16))


@pytest.mark.gpu
def test_gpu_softcap_real_shape():
    """Gemma 2's cap (30) and vocabulary: the GRPO loss kernel's cap path at a real shape (logits of scale ~3,
    the cap's near-linear range; test_gpu_linear_token_logprobs runs logits of scale ~20)."""
    _check(2, 128, 2304, 256000, device="cuda", dtype=torch.bfloat16, softcap=30.0)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_gpu_linear_token_logprobs(softcap):
    from r1kernels.reference import linear_token_logprobs as ref_lin
    N, H, V = 512, 3584, 151936
    h = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda") / H ** 0.5 * (1 if softcap is None else 20)).to(torch.bfloat16)
    w.requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    lp = rk.linear_token_logprobs(h, w, y, backend="triton", softcap=softcap)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exp = ref_lin(h64, w64, y, softcap=softcap)
    g = torch.randn_like(lp)
    (lp * g).sum().backward()
    (exp * g.double()).sum().backward()
    assert_close(lp, exp, torch.bfloat16, name="logp")
    assert_close(h.grad, h64.grad, torch.bfloat16, name="grad hidden")
    assert_close(w.grad, w64.grad, torch.bfloat16, name="grad weight")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_old_ref_logprobs_get_no_gradient(backend):
    B, T, H, V = 2, 4, 8, 23
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) / math.sqrt(H)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    mask = torch.ones(B, T, dtype=torch.long)
    src = torch.randn(B, T, requires_grad=True)
    lp = torch.log_softmax((hidden @ weight.t()).double(), -1).gather(-1, ids[..., None])[..., 0].float()
    old, ref = lp + 0.05 * src, lp + 0.2 * src
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = rk.linear_grpo_loss(h, w, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1, backend=backend)
    out.loss.backward()
    assert src.grad is None or src.grad.abs().max() == 0, "gradient flowed through old/ref log-probs"
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = _dapo_k3_loss(h64 @ w64.t(), ids, adv, mask, old.detach(), ref.detach(), 0.1, 0.2, 1.0)
    want.backward()
    assert_close(out.loss, want.detach(), name="loss")
    assert_close(h.grad, h64.grad, name="hidden grad")
    assert_close(w.grad, w64.grad, name="weight grad")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("B,T,H,V", [(2, 3, 8, 17), (3, 5, 12, 61), (1, 1, 4, 5)])
def test_repeated_backward_matches_reference(with_bias, B, T, H, V):
    """Backward through one loss three times (torch.autograd.grad twice with retain_graph=True, then .backward(),
    which frees the graph) at upstream g1 = 1, g2, g3: the hidden / weight / bias gradients equal the float64
    reference's each time, and the first results are left as they were (the gradients written in the forward are
    scaled in place only by a backward that frees the graph; the second backward failed on their version)."""
    hidden, weight = torch.randn(B, T, H), torch.randn(V, H) / H ** 0.5 * 3
    bias = torch.randn(V) * 0.1 if with_bias else None
    ids, adv, old = torch.randint(0, V, (B, T)), torch.randn(B), torch.randn(B, T) - 3.0
    mask = (torch.rand(B, T) > 0.2).float()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    # the torch reference in float32 bounds the error: a row whose token has p ~ 1 - 4e-5 (drawn at H = 4) loses
    # ~3 significant digits of 1 - p in float32 in any implementation
    leaves32 = [t.detach().clone().requires_grad_() for t in leaves]

    def loss(ls, backend):
        b = ls[2] if with_bias else None
        o = old.to(ls[0].dtype)
        return rk.linear_grpo_loss(ls[0], ls[1], ids, adv.to(ls[0].dtype), mask, bias=b, old_logprobs=o,
                                   ref_logprobs=o, beta=0.04, backend=backend).loss

    out, ref, ref32 = loss(leaves, "triton"), loss(leaves64, "torch"), loss(leaves32, "torch")
    g1, g2, g3 = 1.0, 0.5 + torch.rand(()).item(), -1.0 - torch.rand(()).item()
    first = torch.autograd.grad(out * g1, leaves, retain_graph=True)
    kept = [t.clone() for t in first]
    second = torch.autograd.grad(out * g2, leaves, retain_graph=True)
    (out * g3).backward()
    for g, got, name in ((g1, first, "first"), (g2, second, "second"), (g3, [t.grad for t in leaves], "third")):
        want = torch.autograd.grad(ref * g, leaves64, retain_graph=True)
        want32 = torch.autograd.grad(ref32 * g, leaves32, retain_graph=True)
        for n, a, b, lp in zip(("hidden", "weight", "bias"), got, want, want32):
            assert_close(a, b, lowp=lp, name=f"{name} backward grad {n}")
    assert all(torch.equal(a, b) for a, b in zip(first, kept))


@pytest.mark.parametrize("how", ["no_grad", "no_requires_grad"])
@pytest.mark.parametrize("B,T,H,V", [(2, 3, 8, 17), (3, 5, 12, 61)])
def test_no_gradient_wanted_writes_none(how, B, T, H, V, monkeypatch):
    """Without a gradient to compute the fused loss kernel is launched with no gradient output (it skips its
    second pass over the logits; no bias-gradient reduction), over several chunks, and the loss, metrics and
    log-probs are bitwise those of the call with grad."""
    from r1kernels.triton import grpo as k

    launched = []
    orig = k.grpo_token
    monkeypatch.setattr(k, "grpo_token", lambda *a, **kw: (launched.append(a[10] is not None), orig(*a, **kw))[1])
    hidden, weight, bias = torch.randn(B, T, H), torch.randn(V, H) / H ** 0.5 * 3, torch.randn(V) * 0.1
    ids, adv, old = torch.randint(0, V, (B, T)), torch.randn(B), torch.randn(B, T) - 3.0

    def run(grad, *ts):
        with torch.set_grad_enabled(grad):
            return rk.linear_grpo_loss(ts[0], ts[1], ids, adv, bias=ts[2], old_logprobs=old, compute_entropy=True,
                                       chunk_budget_bytes=4 * V * 4, backend="triton")

    def leaves():
        return [t.clone().requires_grad_() for t in (hidden, weight, bias)]

    with_grad = run(True, *leaves())
    assert len(launched) > 1 and all(launched)
    launched.clear()
    out = run(True, hidden, weight, bias) if how == "no_requires_grad" else run(False, *leaves())
    assert len(launched) > 1 and not any(launched), launched
    assert out.loss.grad_fn is None and torch.equal(out.loss, with_grad.loss.detach())
    assert torch.equal(out.per_token_logprobs, with_grad.per_token_logprobs)
    assert all(torch.equal(out.metrics[k], with_grad.metrics[k]) for k in with_grad.metrics)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("h_dtype,w_dtype", [(torch.float32, torch.float64), (torch.float64, torch.bfloat16),
                                             (torch.float64, torch.float32)])
def test_float64_with_another_dtype(backend, h_dtype, w_dtype):
    """hidden and weight of different dtypes, one float64 (Liger accepts them): computed in float64, equal to the
    all-float64 head (the other input's values as given), each gradient in its input's dtype (it raised in the
    reference's GEMM: 'expected m1 and m2 to have the same dtype')."""
    B, T, H, V = 2, 5, 8, 19
    h, w = torch.randn(B, T, H).to(h_dtype), (torch.randn(V, H) / 3).to(w_dtype)
    ids, adv, mask = torch.randint(0, V, (B, T)), torch.randn(B), (torch.rand(B, T) > 0.3).float()
    for op in ("linear_token_logprobs", "linear_grpo_loss"):
        x, y = h.clone().requires_grad_(), w.clone().requires_grad_()
        x64, y64 = h.double().clone().requires_grad_(), w.double().clone().requires_grad_()
        if op == "linear_token_logprobs":
            got, want = (rk.linear_token_logprobs(a, b, ids, backend=bk).sum()
                         for a, b, bk in ((x, y, backend), (x64, y64, "torch")))
        else:
            got, want = (rk.linear_grpo_loss(a, b, ids, adv, mask, backend=bk).loss
                         for a, b, bk in ((x, y, backend), (x64, y64, "torch")))
        got.backward()
        want.backward()
        assert_close(got.double(), want.detach(), torch.float64, name=f"{op} value")
        assert x.grad.dtype == h_dtype and y.grad.dtype == w_dtype, op
        assert_close(x.grad.double(), x64.grad, h_dtype, name=f"{op} hidden gradient")  # rounded to its dtype
        assert_close(y.grad.double(), y64.grad, w_dtype, name=f"{op} weight gradient")
