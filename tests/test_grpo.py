"""grpo_loss: the single-pass Triton kernel (interpreter on CPU) vs the float64 reference: loss, metrics,
per-token log-probs (where the mask is 1: masked tokens are not read) and the logits' gradient. Old / ref /
sampling log-probs are constants of the loss on every backend."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_close, loss_scale
from test_logprob import masked_vocab

import r1kernels as rk
from r1kernels.reference import grpo as R

triton = pytest.importorskip("triton")
from r1kernels.ops import grpo as grpo_ops  # noqa: E402


def _inputs(B, T, V, device="cpu", dtype=torch.float32, adv_per_token=False, mask_kind="random"):
    logits = (torch.randn(B, T, V, device=device) * 2).to(dtype)
    ids = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, T, device=device) if adv_per_token else torch.randn(B, device=device)
    mask = (torch.rand(B, T, device=device) > 0.25).float()
    if mask_kind == "random" and B > 1:
        mask[-1] = 0  # a fully masked row
    elif mask_kind == "none":
        mask = None
    elif mask_kind == "empty":
        mask = torch.zeros(B, T, device=device)
    base = R.token_logprobs(logits, ids)
    old = base + 0.3 * torch.randn(B, T, device=device)
    ref = base + 0.3 * torch.randn(B, T, device=device)
    return logits, ids, adv, mask, old, ref


def _check(logits, ids, adv, mask, dtype=torch.float32, inplace=False, backend="triton", **kw):
    x = logits.detach().clone().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    y = x * 1.0 if inplace else x  # in place needs a non-leaf
    out = rk.grpo_loss(y, ids, adv, mask, backend=backend, inplace_backward=inplace, **kw)
    kw64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    ref = rk.grpo_loss(x64, ids, adv.double(), mask, backend="torch", **kw64)
    g = 1.0 + torch.rand(()).item()  # a non-unit upstream gradient exercises the backward scaling
    (out.loss * g).backward()
    (ref.loss * g).backward()
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    scale = loss_scale(lambda a: rk.grpo_loss(x64.detach(), ids, a.double(), mask, backend="torch", **kw64).loss, adv)
    assert_close(out.loss, ref.loss, torch.float32, name="loss", scale=scale)
    m = torch.ones_like(ref.per_token_logprobs) if mask is None else mask.double()
    assert_close(out.per_token_logprobs * m, ref.per_token_logprobs * m, torch.float32, name="logp")
    assert set(out.metrics) == set(ref.metrics)
    for k in ref.metrics:
        assert_close(out.metrics[k], ref.metrics[k], torch.float32, name=k)
    assert x.grad.dtype == logits.dtype
    assert_close(x.grad, x64.grad, dtype, name="grad")
    if mask is not None:  # masked tokens: exact zero gradient
        assert (x.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
@pytest.mark.parametrize("level", R.IS_LEVELS)
def test_loss_types(loss_type, level):
    logits, ids, adv, mask, old, ref = _inputs(3, 5, 37)
    if loss_type == "luspo" and level == "token":
        with pytest.raises(ValueError, match="importance_sampling_level"):
            rk.grpo_loss(logits, ids, adv, mask, loss_type="luspo", backend="triton")
        return
    _check(logits, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.04, loss_type=loss_type,
           importance_sampling_level=level, epsilon_high=0.28 if loss_type != "cispo" else 4.0,
           max_completion_length=7 if loss_type == "dr_grpo" else None)


@pytest.mark.parametrize("mode", R.IS_MODES)
@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("clip", [(None, 1.2), (0.9, None), (0.8, 1.5)])
def test_rollout_correction(mode, with_old, clip):
    """Rollout importance sampling from the sampling log-probs: token modes in the fused kernel (one more
    input), sequence modes through log-probs + the reference; with or without old log-probs (then the
    current ones, detached), bias-corrected KL on, against the float64 reference."""
    logits, ids, adv, mask, old, ref = _inputs(3, 6, 37)
    samp = R.token_logprobs(logits, ids) + 0.3 * torch.randn(3, 6)
    samp[0, 1] = float("nan")  # a token the engine did not score: weight 1
    if mode.endswith("truncate") and clip == (None, None):
        return
    kw = dict(sampling_logprobs=samp, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip[0],
              vllm_importance_sampling_clip_max=clip[1], ref_logprobs=ref, beta=0.05, epsilon_high=0.28)
    if with_old:
        kw["old_logprobs"] = old
    _check(logits, ids, adv, mask, **kw)
    _check(logits, ids, adv, mask, inplace=True, **kw)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("level", R.IS_LEVELS)
def test_bias_corrected_kl(bias_correction, level):
    logits, ids, adv, mask, old, ref = _inputs(3, 5, 29)
    _check(logits, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.2, importance_sampling_level=level,
           use_bias_correction_kl=bias_correction)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 2.0])
def test_off_policy_mask(threshold):
    logits, ids, adv, mask, old, ref = _inputs(4, 5, 31)
    samp = R.token_logprobs(logits, ids) + 0.5 * torch.randn(4, 5).abs()
    _check(logits, ids, adv, mask, old_logprobs=old, sampling_logprobs=samp, off_policy_mask_threshold=threshold)
    _check(logits, ids, adv, mask, old_logprobs=old, off_policy_mask_threshold=threshold)


def test_sapo_temperatures_are_kernel_arguments():
    logits, ids, adv, mask, old, ref = _inputs(3, 5, 29)
    _check(logits, ids, adv, mask, old_logprobs=old, loss_type="sapo", sapo_temperature_pos=0.4,
           sapo_temperature_neg=2.5)


@pytest.mark.parametrize("q,coef", [(1.0, 0.05), (0.3, 0.0), (0.5, -0.02)])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_entropy_controls(q, coef, loss_type):
    """top_entropy_quantile and entropy_coef: entropy from the log-prob kernel's pass, its gradient in the
    backward kernel's one pass (rows whose coefficients are 0 are not read), vs the float64 reference."""
    logits, ids, adv, mask, old, ref = _inputs(3, 6, 37)
    _check(logits, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.02, loss_type=loss_type,
           top_entropy_quantile=q, entropy_coef=coef)
    _check(logits, ids, adv, mask, inplace=True, old_logprobs=old, top_entropy_quantile=q, entropy_coef=coef)


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("mask_kind", ["random", "none", "empty"])
def test_compute_entropy(level, inplace, mask_kind):
    """compute_entropy=True: metrics["entropy"] is the masked mean of -sum p log p (p = softmax(logits / T)),
    computed here in float64, and the loss and log-probs are those of the same call without it."""
    logits, ids, adv, mask, old, ref = _inputs(3, 5, 41, mask_kind=mask_kind)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, importance_sampling_level=level, temperature=0.8)
    _check(logits, ids, adv, mask, inplace=inplace, compute_entropy=True, **kw)
    out = rk.grpo_loss(logits, ids, adv, mask, backend="triton", compute_entropy=True, **kw)
    lp = torch.log_softmax(logits.double() / 0.8, -1)
    h = -(lp.exp() * lp).sum(-1)
    m = torch.ones_like(h) if mask is None else mask.double()
    assert_close(out.metrics["entropy"], (h * m).sum() / m.sum().clamp(min=1.0), torch.float32, name="entropy")
    off = rk.grpo_loss(logits, ids, adv, mask, backend="triton", **kw)
    assert "entropy" not in off.metrics
    assert torch.equal(out.loss, off.loss) and torch.equal(out.per_token_logprobs, off.per_token_logprobs)


ENTROPY_OPTS = {"entropy_coef": dict(entropy_coef=0.05), "quantile": dict(top_entropy_quantile=0.5),
                "quantile0": dict(top_entropy_quantile=0.0), "compute_entropy": dict(compute_entropy=True),
                "sequence": dict(compute_entropy=True, importance_sampling_level="sequence")}


@pytest.mark.parametrize("backend,inplace", [("torch", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("B,T,V,keep", [(3, 5, 37, 20), (2, 4, 130, 3), (4, 3, 64, 63)])
@pytest.mark.parametrize("opts", list(ENTROPY_OPTS))
def test_masked_vocabulary(backend, inplace, B, T, V, keep, opts):
    """-inf logits (a masked vocabulary) add 0 to the entropy and its gradient: loss, metrics and gradient equal
    the float64 loss over the finite columns alone (gradient 0 at the -inf ones). 0 * -inf was NaN: a NaN loss and
    gradient with entropy_coef, a NaN entropy metric, and with top_entropy_quantile a NaN threshold that masked
    every token (a loss of exactly 0). compute_entropy at the token level runs the fused loss kernel."""
    kw = dict(ENTROPY_OPTS[opts], temperature=0.8)
    logits, ids, cols, finite, j = masked_vocab((B, T), V, keep, scale=2.0)
    adv = torch.randn(B)
    mask = (torch.rand(B, T) > 0.25).float()
    mask[0, 0] = 1.0
    old = R.token_logprobs(finite, j, 0.8) + 0.3 * torch.randn(B, T)
    x = logits.clone().requires_grad_()
    out = rk.grpo_loss(x * 1.0 if inplace else x, ids, adv, mask, old_logprobs=old, backend=backend,
                       inplace_backward=inplace, **kw)
    f64 = finite.double().requires_grad_()
    exp = rk.grpo_loss(f64, j, adv.double(), mask, old_logprobs=old.double(), backend="torch", **kw)
    out.loss.backward()
    exp.loss.backward()
    scale = loss_scale(lambda a: rk.grpo_loss(finite.double(), j, a.double(), mask, old_logprobs=old.double(),
                                              backend="torch", **kw).loss, adv)
    assert_close(out.loss, exp.loss, name="loss", scale=scale)
    assert_close(out.per_token_logprobs * mask, exp.per_token_logprobs * mask, name="logp")
    assert set(out.metrics) == set(exp.metrics)
    for k in exp.metrics:
        assert_close(out.metrics[k], exp.metrics[k], name=k)
    lsm = torch.log_softmax(finite.double() / 0.8, -1)
    h = -(lsm.exp() * lsm).sum(-1)  # the entropy over the finite columns
    assert_close(out.metrics["entropy"], (h * mask).sum() / mask.sum(), name="entropy")
    assert_close(x.grad, torch.zeros(B, T, V, dtype=torch.float64).scatter(-1, cols, f64.grad), name="grad")


@pytest.mark.parametrize("kl_estimator", R.KL_ESTIMATORS)
def test_kl_estimators(kl_estimator):
    logits, ids, adv, mask, old, ref = _inputs(2, 4, 29)
    ref = ref + 3.0 * torch.randn_like(ref)  # far from the policy: exercises low_var_kl's clamps
    _check(logits, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1, kl_estimator=kl_estimator)


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_old_absent(level, loss_type):
    logits, ids, adv, mask, _, _ = _inputs(3, 4, 31)
    _check(logits, ids, adv, mask, loss_type=loss_type, importance_sampling_level=level)


@pytest.mark.parametrize("case", ["delta", "temperature", "adv_per_token", "num_items", "num_items_tensor",
                                  "beta0_ref", "no_mask", "empty_mask", "T1", "inplace", "inplace_seq", "V_block"])
def test_options(case):
    B, T, V = {"T1": (4, 1, 23), "V_block": (2, 3, 128)}.get(case, (3, 5, 41))  # V_block: no partial block
    logits, ids, adv, mask, old, ref = _inputs(B, T, V, adv_per_token=case == "adv_per_token",
                                               mask_kind={"no_mask": "none", "empty_mask": "empty"}.get(case, "random"))
    kw = dict(old_logprobs=old)
    if case == "delta":
        kw.update(delta=1.05, epsilon=0.1)
    elif case == "temperature":
        kw.update(temperature=0.7, ref_logprobs=ref, beta=0.02)
    elif case == "num_items":
        kw.update(num_items_in_batch=11)
    elif case == "num_items_tensor":
        kw.update(num_items_in_batch=torch.tensor(13.0))
    elif case == "beta0_ref":
        kw.update(ref_logprobs=ref, beta=0.0)
    elif case == "inplace_seq":
        kw.update(importance_sampling_level="sequence", ref_logprobs=ref, beta=0.1)
    _check(logits, ids, adv, mask, inplace=case.startswith("inplace"), **kw)


def test_low_precision_bf16():
    logits, ids, adv, mask, old, ref = _inputs(2, 6, 53, dtype=torch.bfloat16)
    _check(logits, ids, adv, mask, dtype=torch.bfloat16, old_logprobs=old, ref_logprobs=ref, beta=0.05)


def test_sliced_logits():
    logits, ids, adv, mask, old, _ = _inputs(2, 6, 33)
    _check(logits[:, :-1], ids[:, :-1], adv, mask[:, :-1], old_logprobs=old[:, :-1])


def test_inplace_writes_into_logits():
    logits, ids, adv, mask, old, _ = _inputs(2, 3, 17)
    h = logits.clone().requires_grad_()
    y = h * 1.0
    out = rk.grpo_loss(y, ids, adv, mask, old_logprobs=old, backend="triton", inplace_backward=True)
    out.loss.backward()
    assert torch.equal(y.detach(), h.grad)  # the gradient lives in the logits' storage


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(inplace, level):
    logits, ids, adv, mask, old, ref = _inputs(2, 4, 27)

    def f(x):
        out = rk.grpo_loss(x * 1.0, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1,
                           importance_sampling_level=level, inplace_backward=inplace, backend="triton")
        return out.loss, out.metrics["clip_ratio/region_mean"]

    x = logits.clone().requires_grad_()
    loss, _ = torch.compile(f, fullgraph=True)(x)
    loss.backward()
    x64 = logits.double().requires_grad_()
    ref_out = R.grpo_loss(x64, ids, adv.double(), mask, old_logprobs=old.double(), ref_logprobs=ref.double(),
                          beta=0.1, importance_sampling_level=level)
    ref_out[0].backward()
    assert_close(loss, ref_out[0], torch.float32, name="compiled loss")
    assert_close(x.grad, x64.grad, torch.float32, name="compiled grad")


def test_opcheck():
    logits, ids, adv, mask, old, ref = _inputs(2, 3, 19)
    samp = old + 0.1
    args = (ids, adv, mask, old, ref, None, None)
    opts = dict(num_items_f=None, max_completion_length=None, temperature=1.0, epsilon=0.2, epsilon_high=0.28,
                delta=None, beta=0.04, loss_type="dapo", kl_estimator="k3", sapo_tau_pos=1.0, sapo_tau_neg=1.05,
                is_mode=None, is_clip_min=None, is_clip_max=None, bias_kl=True, entropy=False)
    for loss_type in ("grpo", "sapo"):
        torch.library.opcheck(grpo_ops.grpo_loss_fwd, (logits.clone(),) + args, {**opts, "loss_type": loss_type})
    torch.library.opcheck(grpo_ops.grpo_loss_fwd, (logits.clone(),) + args[:-2] + (samp, torch.tensor(7.0)),
                          {**opts, "num_items_f": None, "is_mode": "token_mask", "is_clip_max": 1.5})
    torch.library.opcheck(grpo_ops.grpo_loss_fwd_inplace, (logits.clone(),) + args, opts)
    torch.library.opcheck(grpo_ops.grpo_loss_fwd, (logits.clone(),) + args, {**opts, "entropy": True})
    torch.library.opcheck(grpo_ops.grpo_loss_fwd, (logits.clone(),) + args, {**opts, "grad": False})
    torch.library.opcheck(grpo_ops.grpo_scale_grad_, (logits.clone(), torch.tensor(2.0)))
    for entropy in (False, True):
        logp, lse, ent = grpo_ops.grpo_logprobs(logits, ids, mask, 0.9, entropy)
        torch.library.opcheck(grpo_ops.grpo_logprobs, (logits, ids, mask, 0.9, entropy))
        g = torch.randn(2, 3) * mask
        g_ent = torch.randn(2, 3) * mask if entropy else None
        torch.library.opcheck(grpo_ops.grpo_logprobs_grad, (logits, ids, lse, ent, g, g_ent, 0.9))
        torch.library.opcheck(grpo_ops.grpo_logprobs_grad_, (logits.clone(), ids, lse, ent, g, g_ent, 0.9))


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_logits_give_nan_loss(level, backend):
    """A NaN in the logits must reach the loss on every backend (a diverging run shows NaN)."""
    logits, ids, adv, mask, old, ref = _inputs(2, 3, 17, mask_kind="none")
    for bad in (torch.full_like(logits, float("nan")), logits.index_put((torch.tensor(1), torch.tensor(2)),
                                                                        torch.tensor(float("nan")))):
        for loss_type in ("dapo", "grpo", "cispo", "sapo"):
            for kw in ({}, dict(old_logprobs=old), dict(old_logprobs=old, ref_logprobs=ref, beta=0.04)):
                out = rk.grpo_loss(bad, ids, adv, loss_type=loss_type, importance_sampling_level=level,
                                   backend=backend, **kw)
                assert torch.isnan(out.loss), (loss_type, list(kw), out.loss)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kl_estimator", R.KL_ESTIMATORS)
def test_nan_reference_logprobs_give_nan_loss(backend, kl_estimator):
    """A NaN reference log-prob reaches the loss through every KL estimator (low_var_kl clamps too)."""
    logits, ids, adv, mask, old, ref = _inputs(2, 3, 17, mask_kind="none")
    ref = ref.index_put((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan")))
    out = rk.grpo_loss(logits, ids, adv, ref_logprobs=ref, beta=0.04, kl_estimator=kl_estimator,
                       backend=backend)
    assert torch.isnan(out.loss), (kl_estimator, out.loss)


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ignore_index_labels_at_masked_positions(level, backend):
    """completion_ids may hold -100 where the mask is 0: same loss and gradient as any valid label there."""
    logits, ids, adv, mask, old, ref = _inputs(3, 4, 23)
    ids_ignored = ids.masked_fill(mask == 0, -100)
    kw = dict(old_logprobs=old, importance_sampling_level=level, backend=backend)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    a = rk.grpo_loss(x1, ids, adv, mask, **kw)
    b = rk.grpo_loss(x2, ids_ignored, adv, mask, **kw)
    a.loss.backward()
    b.loss.backward()
    assert_close(b.loss, a.loss, name="loss")
    assert_close(x2.grad, x1.grad, name="grad")
    with pytest.raises(ValueError, match="completion_mask"):
        rk.grpo_loss(logits, ids.masked_fill(mask != 0, -100), adv, mask, backend=backend)
    with pytest.raises(ValueError, match="completion_mask"):
        rk.grpo_loss(logits, ids_ignored, adv, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_advantages_b1_broadcast_like_b(backend):
    logits, ids, adv, mask, old, _ = _inputs(3, 4, 19)
    a = rk.grpo_loss(logits, ids, adv, mask, old_logprobs=old, backend=backend)
    b = rk.grpo_loss(logits, ids, adv[:, None], mask, old_logprobs=old, backend=backend)
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_num_items_as_a_one_element_tensor(backend):
    """num_items_in_batch as a [1] tensor (how TRL passes it): a scalar loss equal to the number's; a tensor of
    more elements is an error naming it."""
    logits, ids, adv, mask, old, _ = _inputs(3, 4, 19)
    n = float(mask.sum()) + 2.0
    want = rk.grpo_loss(logits, ids, adv, mask, old_logprobs=old, num_items_in_batch=n, backend="torch").loss
    got = rk.grpo_loss(logits, ids, adv, mask, old_logprobs=old, num_items_in_batch=torch.tensor([n]), backend=backend)
    assert got.loss.shape == ()
    assert_close(got.loss, want.double(), name="loss")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        rk.grpo_loss(logits, ids, adv, mask, num_items_in_batch=torch.tensor([n, n]), backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dr_grpo_without_tokens_is_zero(backend):
    """dr_grpo divides by B * (max_completion_length or T): with completions of no tokens (T = 0) and no
    max_completion_length, the loss is 0 on every backend (the reference's 0 / 0 was NaN)."""
    logits, ids, adv = torch.randn(2, 0, 11), torch.zeros(2, 0, dtype=torch.long), torch.randn(2)
    out = rk.grpo_loss(logits, ids, adv, loss_type="dr_grpo", backend=backend)
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("B,T,V", [(2, 8, 13), (3, 17, 40), (1, 1, 5)])
def test_dr_grpo_sequence_level_divides_by_the_completion_width(backend, B, T, V):
    """dr_grpo at the sequence level with beta = 0 and no max_completion_length: the loss is the sum of the
    masked per-token terms over B * T, T the mask's width (a [B, 1] sequence-level loss was divided by B * 1:
    T times too large), by an independent float64 computation, for grpo_loss and linear_grpo_loss."""
    H = 8
    h, w = torch.randn(B, T, H), torch.randn(V, H) / 2
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 0] = 1.0
    logp = torch.log_softmax(h.double() @ w.double().t(), -1).gather(-1, ids[..., None])[..., 0]
    old = (logp + 0.2 * torch.randn(B, T, dtype=torch.float64)).float()
    r = torch.exp(((logp - old.double()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True))
    a = adv.double()[:, None]
    want = (-torch.min(r * a, r.clamp(0.8, 1.2) * a) * mask).sum() / (B * T)
    kw = dict(old_logprobs=old, loss_type="dr_grpo", importance_sampling_level="sequence", backend=backend)
    assert_close(rk.grpo_loss(h @ w.t(), ids, adv, mask, **kw).loss.double(), want, name="grpo_loss")
    assert_close(rk.linear_grpo_loss(h, w, ids, adv, mask, **kw).loss.double(), want, name="linear_grpo_loss")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("B,T,V", [(0, 3, 11), (2, 0, 7), (0, 0, 5)])
@pytest.mark.parametrize("opts", list(ENTROPY_OPTS))
def test_empty_batch_entropy_options(inplace, B, T, V, opts):
    """No tokens (B or T = 0) with the entropy options: the reference's loss (0), metrics (entropy among them) and
    zero gradient. The Triton path passed no entropy for an empty one: top_entropy_quantile raised
    AttributeError, and entropy_coef / compute_entropy at the sequence level lost the 'entropy' metric."""
    kw = ENTROPY_OPTS[opts]
    ids, adv, mask = torch.randint(0, V, (B, T)), torch.randn(B), torch.ones(B, T)
    x, x64 = torch.randn(B, T, V).requires_grad_(), torch.randn(B, T, V, dtype=torch.float64).requires_grad_()
    out = rk.grpo_loss(x * 1.0 if inplace else x, ids, adv, mask, backend="triton", inplace_backward=inplace, **kw)
    exp = rk.grpo_loss(x64, ids, adv.double(), mask, backend="torch", **kw)
    out.loss.backward()
    exp.loss.backward()
    assert out.loss.shape == () and out.loss.item() == exp.loss.item() == 0.0
    assert out.per_token_logprobs.shape == (B, T)
    assert set(out.metrics) == set(exp.metrics) and "entropy" in out.metrics
    assert all(out.metrics[k].item() == exp.metrics[k].item() for k in exp.metrics)
    assert x.grad.shape == x.shape and not x.grad.any()


@pytest.mark.parametrize("loss_type", R.LOSS_TYPES)
def test_num_items_warns_when_unused(loss_type):
    logits, ids, adv, mask, _, _ = _inputs(2, 3, 13)
    kw = dict(loss_type=loss_type, num_items_in_batch=5, backend="torch",
              importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    if R.LOSS_REDUCTION[loss_type] == "items":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rk.grpo_loss(logits, ids, adv, mask, **kw)
    else:
        with pytest.warns(UserWarning, match="num_items_in_batch is ignored"):
            rk.grpo_loss(logits, ids, adv, mask, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_real_shape(level, inplace):
    B, T, V = 2, 256, 151936
    logits, ids, adv, mask, old, ref = _inputs(B, T, V, device="cuda", dtype=torch.bfloat16)
    _check(logits, ids, adv, mask, dtype=torch.bfloat16, inplace=inplace, old_logprobs=old, ref_logprobs=ref,
           beta=0.04, importance_sampling_level=level, loss_type="grpo" if level == "sequence" else "dapo")


# The CUDA cluster kernel (csrc/cuda/grpo.cu, sm_90+): every option of the token-level family, at shapes whose
# rows are 16-byte aligned (vector path) and not (V * element size not a multiple of 16: element path), each
# row split over 1-8 CTAs, against the float64 reference.
CUDA_SHAPES = [(3, 5, 1001, torch.float32), (2, 7, 4096, torch.bfloat16), (2, 3, 151936, torch.bfloat16),
               (2, 4, 32003, torch.float16)]
CUDA_CASES = {
    "dapo": dict(loss_type="dapo", epsilon_high=0.28), "grpo_k1": dict(loss_type="grpo", kl_estimator="k1"),
    "bnpo_k2": dict(loss_type="bnpo", kl_estimator="k2"), "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=9),
    "cispo": dict(loss_type="cispo", epsilon_high=4.0),
    "sapo": dict(loss_type="sapo", sapo_temperature_pos=0.4, sapo_temperature_neg=2.5),
    "low_var_kl": dict(kl_estimator="low_var_kl"), "delta": dict(delta=1.05, epsilon=0.1),
    "is_truncate": dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.2),
    "is_mask": dict(vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=0.8,
                    vllm_importance_sampling_clip_max=1.5),
    "no_bias_kl": dict(use_bias_correction_kl=False),
    "entropy_temperature": dict(compute_entropy=True, temperature=0.7),
    "adv_per_token": {}, "no_mask": {}, "empty_mask": {}, "no_old": {}, "num_items": dict(num_items_in_batch=11),
    "sequence": dict(importance_sampling_level="sequence", loss_type="grpo"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("i,case", list(enumerate(CUDA_CASES)))
def test_cuda_token_kernel(i, case, inplace, monkeypatch):
    if not grpo_ops.HAS_CUDA_TOKEN:
        pytest.skip("extension built without the CUDA token kernel")
    B, T, V, dtype = CUDA_SHAPES[i % len(CUDA_SHAPES)]
    monkeypatch.setitem(grpo_ops.CUDA_CONFIG, "cluster", (1, 2, 4, 8)[(i + inplace) % 4])
    mask_kind = {"no_mask": "none", "empty_mask": "empty"}.get(case, "random")
    logits, ids, adv, mask, old, ref = _inputs(B, T, V, device="cuda", dtype=dtype,
                                               adv_per_token=case == "adv_per_token", mask_kind=mask_kind)
    kw = dict(CUDA_CASES[case])
    if case != "no_old":
        kw["old_logprobs"] = old
    kw.update(ref_logprobs=ref + (3.0 * torch.randn_like(ref) if case == "low_var_kl" else 0.0), beta=0.05)
    if case.startswith("is_"):
        samp = R.token_logprobs(logits.float(), ids) + 0.3 * torch.randn(B, T, device="cuda")
        samp[0, 1] = float("nan")  # a token the engine did not score: weight 1
        kw["sampling_logprobs"] = samp
    _check(logits, ids, adv, mask, dtype=dtype, inplace=inplace, backend="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}-{str(s[3])[6:]}")
def test_cuda_token_kernel_equals_triton(shape, cluster, monkeypatch):
    """Loss, metrics, log-probs and gradient of the CUDA kernel against the Triton kernel on the same
    input (same fp32 math, different reduction order)."""
    if not grpo_ops.HAS_CUDA_TOKEN:
        pytest.skip("extension built without the CUDA token kernel")
    B, T, V, dtype = shape
    monkeypatch.setitem(grpo_ops.CUDA_CONFIG, "cluster", cluster)
    logits, ids, adv, mask, old, ref = _inputs(B, T, V, device="cuda", dtype=dtype)
    outs = []
    for backend in ("cuda", "triton"):
        x = logits.detach().clone().requires_grad_()
        out = rk.grpo_loss(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.04, compute_entropy=True,
                           backend=backend)
        out.loss.backward()
        outs.append((out, x.grad))
    (a, ga), (b, gb) = outs
    assert_close(a.loss, b.loss, torch.float32, name="loss")
    assert_close(a.per_token_logprobs, b.per_token_logprobs, torch.float32, name="logp")
    for k in b.metrics:
        assert_close(a.metrics[k], b.metrics[k], torch.float32, name=k)
    assert_close(ga, gb, dtype, name="grad")
    assert (ga[mask == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", [4, 8])
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_token_kernel_many_rows(cluster, inplace, monkeypatch):
    """Many more rows than the GPU holds clusters at once, with masked rows (which read nothing and write
    zeros) between scored ones."""
    if not grpo_ops.HAS_CUDA_TOKEN:
        pytest.skip("extension built without the CUDA token kernel")
    monkeypatch.setitem(grpo_ops.CUDA_CONFIG, "cluster", cluster)
    B, T, V = 6, 160, 151936  # 960 rows
    logits, ids, adv, mask, old, ref = _inputs(B, T, V, device="cuda", dtype=torch.bfloat16)
    mask[:, 1::3] = 0  # masked rows between published ones
    _check(logits, ids, adv, mask, dtype=torch.bfloat16, inplace=inplace, backend="cuda", old_logprobs=old,
           ref_logprobs=ref, beta=0.04, compute_entropy=True)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("layout", ["sliced", "expanded", "vocab_strided"])
@pytest.mark.parametrize("B,T,V", [(1, 4, 17), (2, 5, 33), (3, 2, 70)])
def test_inplace_backward_any_logits_layout(level, layout, B, T, V):
    _inplace_backward_layout(level, layout, B, T, V, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("layout", ["sliced", "expanded", "vocab_strided"])
def test_gpu_inplace_backward_any_logits_layout(level, layout):
    """The same on the GPU at a real vocabulary (the row-strided scale kernel's loop over V)."""
    _inplace_backward_layout(level, layout, 2, 33, 151936, "cuda")


def _inplace_backward_layout(level, layout, B, T, V, device):
    """inplace_backward with logits that are not a contiguous block: logits[:, :-1] of a [B, T + 1, V] tensor
    (the gradient is written between other rows; a non-unit upstream gradient must scale those rows, not the
    first B*T*V elements of the storage), logits expanded from [1, T, V] (stride 0: the rows share memory,
    which cannot hold B gradients) and logits transposed from [B, V, T] (no unit stride along V: the sequence
    level raised in backward, after its forward ran). The leaf's gradient against the float64 reference of the
    same layout."""
    shape = {"sliced": (B, T + 1, V), "expanded": (1, T, V), "vocab_strided": (B, V, T)}[layout]
    leaf = torch.randn(shape, device=device) * 2
    ids = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, device=device)
    mask = (torch.rand(B, T, device=device) > 0.25).float()
    old = torch.randn(B, T, device=device) * 0.3 - 3.0

    def view(t):
        return {"sliced": lambda: t[:, :-1], "expanded": lambda: t.expand(B, T, V),
                "vocab_strided": lambda: t.transpose(1, 2)}[layout]()

    x, x64 = leaf.clone().requires_grad_(), leaf.double().requires_grad_()
    out = rk.grpo_loss(view(x * 1.0), ids, adv, mask, old_logprobs=old, importance_sampling_level=level,
                       backend="triton", inplace_backward=True)
    ref = rk.grpo_loss(view(x64 * 1.0), ids, adv.double(), mask, old_logprobs=old.double(),
                       importance_sampling_level=level, backend="torch")
    g = 1.5 + torch.rand(()).item()
    (out.loss * g).backward()
    (ref.loss * g).backward()
    scale = loss_scale(lambda a: rk.grpo_loss(view(x64.detach()), ids, a.double(), mask, old_logprobs=old.double(),
                                              importance_sampling_level=level, backend="torch").loss, adv)
    assert_close(out.loss, ref.loss, torch.float32, name="loss", scale=scale)
    assert_close(x.grad, x64.grad, torch.float32, name="grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("adv_per_token", [False, True])
@pytest.mark.parametrize("linear", [False, True])
def test_advantages_get_no_gradient_on_any_backend(backend, adv_per_token, linear):
    """The advantages are constants of the loss (TRL and Liger give them no gradient): advantages that require
    grad get none on every backend, and the loss still reaches the logits / hidden states."""
    B, T, V, H = 3, 5, 11, 8
    logits, ids, adv, mask, old, ref = _inputs(B, T, V, adv_per_token=adv_per_token)
    adv = adv.clone().requires_grad_()
    if linear:
        x = torch.randn(B, T, H, requires_grad=True)
        w = torch.randn(V, H)
        out = rk.linear_grpo_loss(x, w, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1,
                                  backend=backend)
    else:
        x = logits.clone().requires_grad_()
        out = rk.grpo_loss(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1, backend=backend)
    out.loss.backward()
    assert adv.grad is None and x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("adv_shape", ["B", "B1", "BT"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("linear", [False, True])
def test_non_finite_advantages_are_an_error(backend, adv_shape, bad, linear):
    """A NaN or inf advantage (one, at a random position) is a ValueError naming advantages on every backend, for
    grpo_loss and linear_grpo_loss: it made the loss and gradients NaN silently. Finite ones still run."""
    B, T, V, H = 3, 4, 13, 8
    logits, ids, adv, mask, old, _ = _inputs(B, T, V, adv_per_token=adv_shape == "BT")
    adv = adv[:, None] if adv_shape == "B1" else adv
    if linear:
        x, w = torch.randn(B, T, H), torch.randn(V, H)

        def run(a):
            return rk.linear_grpo_loss(x, w, ids, a, mask, old_logprobs=old, backend=backend)
    else:
        def run(a):
            return rk.grpo_loss(logits, ids, a, mask, old_logprobs=old, backend=backend)
    assert torch.isfinite(run(adv).loss)
    i = torch.randint(0, adv.numel(), ()).item()
    with pytest.raises(ValueError, match="advantages contains NaN or inf"):
        run(adv.flatten().index_fill(0, torch.tensor(i), bad).view_as(adv))


def _dapo_k3_loss(logits, ids, adv, mask, old, ref, beta, eps, temperature):
    """Independent float64 token-level dapo loss with the k3 KL times the ratio (TRL's bias-corrected KL, the
    default), old / ref as constants: sum(mask * L) / sum(mask)."""
    z = logits.double() / temperature
    logp = z.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    r = torch.exp(logp - old.double())
    a = adv.double()[:, None]
    pg = -torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
    d = ref.double() - logp
    L = pg + beta * (torch.exp(d) - d - 1.0) * r
    m = mask.double()
    return (L * m).sum() / m.sum()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_old_and_ref_logprobs_get_no_gradient(backend):
    """old_logprobs / ref_logprobs computed with grad (from another forward pass) were differentiated through by
    the torch reference (a gradient into the model that made them), not by the kernels."""
    B, T, V = 3, 5, 29
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    mask = (torch.rand(B, T) > 0.25).long()
    mask[:, 0] = 1
    other = torch.randn(B, T, V, requires_grad=True)  # the model old/ref came from
    lp_other = torch.log_softmax(other, -1).gather(-1, ids[..., None])[..., 0]
    old = lp_other + 0.05 * torch.randn(B, T)
    ref = lp_other + 0.2 * torch.randn(B, T)
    x = logits.clone().requires_grad_()
    out = rk.grpo_loss(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, beta=0.1, epsilon=0.2,
                       temperature=0.9, backend=backend)
    out.loss.backward()
    assert other.grad is None or other.grad.abs().max() == 0, "gradient flowed through old/ref log-probs"
    x64 = logits.double().requires_grad_()
    want = _dapo_k3_loss(x64, ids, adv, mask, old.detach(), ref.detach(), 0.1, 0.2, 0.9)
    want.backward()
    assert_close(out.loss, want.detach(), name="loss")
    assert_close(x.grad, x64.grad, name="logits grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_sampling_logprobs_get_no_gradient(backend, mode):
    B, T, V = 2, 4, 13
    logits = torch.randn(B, T, V, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    old = rk.token_logprobs(logits.detach(), ids)
    samp = (old + 0.05 * torch.randn(B, T)).requires_grad_()
    out = rk.grpo_loss(logits, ids, torch.randn(B), old_logprobs=old, sampling_logprobs=samp,
                       vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=10.0, backend=backend)
    out.loss.backward()
    assert samp.grad is None or samp.grad.abs().max() == 0
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def _f64(kw):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("inplace", [False, True])
def test_repeated_backward_matches_reference(level, inplace):
    """Backward through one loss three times (torch.autograd.grad twice with retain_graph=True, then .backward(),
    which frees the graph) at upstream g1 = 1, g2, g3: each gives the float64 reference's gradient, and the first
    result is left as it was (the forward's saved gradient is scaled in place only by a backward that frees the
    graph; it was scaled twice, or the second backward failed on its version counter)."""
    for B, T, V in [(2, 3, 17), (3, 5, 37), (1, 1, 5)]:
        logits, ids, adv, mask, old, ref = _inputs(B, T, V)
        kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, importance_sampling_level=level)
        x = logits.clone().requires_grad_()
        out = rk.grpo_loss(x * 1.0, ids, adv, mask, backend="triton", inplace_backward=inplace, **kw)
        x64 = logits.double().requires_grad_()
        ref_loss = rk.grpo_loss(x64, ids, adv.double(), mask, backend="torch", **_f64(kw)).loss
        g1, g2, g3 = 1.0, 0.5 + torch.rand(()).item(), -1.0 - torch.rand(()).item()
        (first,) = torch.autograd.grad(out.loss * g1, x, retain_graph=True)
        kept = first.clone()
        (second,) = torch.autograd.grad(out.loss * g2, x, retain_graph=True)
        (out.loss * g3).backward()
        for g, got, name in ((g1, first, "first"), (g2, second, "second"), (g3, x.grad, "third")):
            (want,) = torch.autograd.grad(ref_loss * g, x64, retain_graph=True)
            assert_close(got, want, name=f"{name} backward {(B, T, V)}")
        assert torch.equal(first, kept)


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("how", ["no_grad", "no_requires_grad"])
@pytest.mark.parametrize("B,T,V", [(2, 3, 1000), (3, 4, 517)])
def test_no_gradient_wanted_writes_none(level, how, B, T, V):
    """Without a gradient to compute (torch.no_grad(), or logits that do not require grad) the kernel path
    allocates no logits-sized buffer (the largest allocation is far below one; with grad the token-level forward
    writes one) and its loss, metrics and log-probs are bitwise those of the call with grad."""
    from torch.profiler import ProfilerActivity, profile

    logits, ids, adv, mask, old, ref = _inputs(B, T, V)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, importance_sampling_level=level, compute_entropy=True)

    def largest_allocation(x, grad):
        with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
            out = rk.grpo_loss(x, ids, adv, mask, backend="triton", **kw)
        return out, max([e.cpu_memory_usage for e in p.events()] + [0])

    with_grad, big = largest_allocation(logits.clone().requires_grad_(), True)
    if level == "token":  # the forward's gradient buffer: the measurement sees it (sequence: in backward)
        assert big >= logits.nbytes
    out, big = largest_allocation(logits.clone().requires_grad_(how == "no_grad"), how != "no_grad")
    assert big < logits.nbytes // 4, (how, big, logits.nbytes)
    assert out.loss.grad_fn is None
    assert torch.equal(out.loss, with_grad.loss.detach())
    assert torch.equal(out.per_token_logprobs, with_grad.per_token_logprobs)
    assert all(torch.equal(out.metrics[k], with_grad.metrics[k]) for k in with_grad.metrics)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("mask_kind", ["random", "empty"])
@pytest.mark.parametrize("B,T,V,strided", [(2, 5, 151936, False), (3, 4, 32003, False), (3, 4, 32003, True)])
def test_gpu_no_gradient_wanted_writes_none(backend, mask_kind, B, T, V, strided):
    """Under torch.no_grad() the token-level GPU kernels allocate no logits-sized buffer (the peak allocation of
    the call stays far below one; with grad the forward allocates its gradient) and give the loss, metrics and
    log-probs of the call with grad bitwise (the gradient pass is skipped, the first pass unchanged). strided: the
    logits a view [:, 1:] of [B, T + 1, V] (rows of an odd V are not all 16-byte aligned, unlike the gradient's)."""
    if backend == "cuda" and not grpo_ops.HAS_CUDA_TOKEN:
        pytest.skip("extension built without the CUDA token kernel")
    logits, ids, adv, mask, old, ref = _inputs(B, T + strided, V, device="cuda", dtype=torch.bfloat16,
                                               mask_kind=mask_kind)
    if strided:
        ids, mask, old, ref = ids[:, 1:], mask[:, 1:], old[:, 1:], ref[:, 1:]
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, compute_entropy=True, backend=backend)

    def peak(grad):
        full = logits.clone().requires_grad_()
        x = full[:, 1:] if strided else full
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.set_grad_enabled(grad):
            out = rk.grpo_loss(x, ids, adv, mask, **kw)
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    nbytes = B * T * V * logits.element_size()  # the scored logits (the gradient's size)
    with_grad, big = peak(True)
    assert big >= nbytes
    out, big = peak(False)
    assert big < nbytes // 4, (backend, big, nbytes)
    assert out.loss.grad_fn is None
    assert torch.equal(out.loss, with_grad.loss.detach())
    assert torch.equal(out.per_token_logprobs, with_grad.per_token_logprobs)
    assert all(torch.equal(out.metrics[k], with_grad.metrics[k]) for k in with_grad.metrics)


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_num_items_tensor_on_another_device_is_an_error(backend, linear):
    """num_items_in_batch as a tensor on another device than the inputs: a ValueError naming it on every backend
    (the Triton kernel read it through a pointer of the wrong device: a loss of ~1e-17 from a "meta" tensor; the
    reference returned a meta loss). The GPU case is test_gpu_num_items_tensor_on_the_cpu_is_an_error."""
    B, T, V, H = 2, 3, 7, 4
    logits, ids, adv, mask, _, _ = _inputs(B, T, V)
    for n in (torch.tensor(5.0, device="meta"), torch.tensor([5.0], device="meta")):
        with pytest.raises(ValueError, match="num_items_in_batch is on meta but completion_ids is on cpu"):
            if linear:
                rk.linear_grpo_loss(torch.randn(B, T, H), torch.randn(V, H), ids, adv, mask, num_items_in_batch=n,
                                    backend=backend)
            else:
                rk.grpo_loss(logits, ids, adv, mask, num_items_in_batch=n, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_num_items_tensor_on_the_cpu_is_an_error(backend):
    logits, ids, adv, mask, _, _ = _inputs(2, 3, 7, device="cuda")
    with pytest.raises(ValueError, match="num_items_in_batch is on cpu but completion_ids is on cuda"):
        rk.grpo_loss(logits, ids, adv, mask, num_items_in_batch=torch.tensor(5.0), backend=backend)


@pytest.mark.parametrize("level", R.IS_LEVELS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("linear", [False, True])
def test_per_token_logprobs_are_zero_where_masked(backend, level, linear):
    """per_token_logprobs: 0 where completion_mask is 0 on every backend and path (the kernels read nothing there;
    the reference and the linear sequence-level path returned the label's log-prob), the float64 log-prob
    elsewhere; masked labels may be -100."""
    for B, T, V, H in [(2, 3, 11, 4), (3, 7, 40, 8)]:
        hidden, weight = torch.randn(B, T, H), torch.randn(V, H)
        logits = hidden @ weight.t()
        ids = torch.randint(0, V, (B, T))
        mask = (torch.rand(B, T) > 0.4).long()
        mask[0, 0], mask[-1, -1] = 0, 1
        kw = dict(importance_sampling_level=level, backend=backend)
        if linear:
            out = rk.linear_grpo_loss(hidden, weight, ids.masked_fill(mask == 0, -100), torch.randn(B), mask, **kw)
        else:
            out = rk.grpo_loss(logits, ids.masked_fill(mask == 0, -100), torch.randn(B), mask, **kw)
        want = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
        assert (out.per_token_logprobs[mask == 0] == 0).all()
        assert_close(out.per_token_logprobs[mask == 1], want[mask == 1], name="unmasked log-probs")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_masked_token_on_a_masked_column(backend, loss_type):
    """A masked-out position (completion_mask 0) whose id sits on a -inf logit: it adds nothing. The reference
    padded its old log-prob with the policy's own -inf (exp(-inf - -inf) = NaN loss); the kernels skip it. Loss
    and gradient equal the loss over the other positions (that token's logits left finite)."""
    B, T, V = 3, 5, 37
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.3).float()
    mask[0, 0], mask[1, 2] = 1.0, 0.0
    clean = logits.clone()
    logits[1, 2, ids[1, 2]] = float("-inf")
    adv = torch.randn(B)
    kw = dict(loss_type=loss_type, max_completion_length=T, beta=0.1, ref_logprobs=torch.randn(B, T) - 3.0)
    x, y = logits.clone().requires_grad_(), clean.clone().requires_grad_()
    out = rk.grpo_loss(x, ids, adv, mask, backend=backend, **kw)
    exp = rk.grpo_loss(y, ids, adv, mask, backend="torch", **kw)
    out.loss.backward()
    exp.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    assert_close(out.loss, exp.loss, name="loss")
    assert_close(x.grad, y.grad, name="grad")


def test_nan_completion_mask_is_an_error():
    """A NaN in a float completion_mask gave a NaN loss on every backend, silently: a ValueError naming it."""
    mask = torch.ones(2, 3)
    mask[1, 1] = float("nan")
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="completion_mask contains NaN"):
            rk.grpo_loss(torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3)), torch.randn(2), mask, backend=backend)
