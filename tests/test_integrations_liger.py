"""r1kernels.integrations.liger against the installed liger-kernel: the same constructor/call arguments give
the same loss, metrics and gradients as Liger's LigerFusedLinearGRPOLoss and triton_grpo_loss (Liger's
Triton kernel under the interpreter on CPU) on fresh random inputs at several shapes. triton_grpo_loss(reduce=False):
the returned kl and the old / ref log-probs carry no gradient, as in Liger."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close

pytest.importorskip("liger_kernel")
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss as LigerLinear  # noqa: E402
from liger_kernel.transformers.grpo_loss import triton_grpo_loss as liger_triton  # noqa: E402

from r1kernels.integrations import liger as ours  # noqa: E402

SHAPES = [(1, 1, 8, 5), (1, 6, 16, 37), (3, 7, 16, 37), (2, 13, 24, 130)]  # B, T, H, V (V not a multiple of any block)
CASES = [dict(loss_type="dapo"), dict(loss_type="grpo", importance_sampling_level="sequence"),
         dict(loss_type="bnpo", delta=1.3), dict(loss_type="dr_grpo", max_completion_length=20),
         dict(loss_type="cispo", epsilon_high=5.0), dict(loss_type="sapo")]


# every clip bound of CASES and of both Liger classes' defaults (eps_low 0.2; eps_high 0.2, or 0.4 in
# triton_grpo_loss; dapo's 0.28; delta 1.3; cispo's 1 + 5.0)
CLIP_BOUNDS = (0.8, 1.2, 1.28, 1.3, 1.4, 6.0)


def _old_logps(logp, scale):
    """logp + scale * noise: ratios on both sides of the clip bounds, but none within 1e-4 (in log) of one. Two
    float32 implementations put a token within ~3e-7 of a bound on different sides (measured: the clip-ratio
    metric then differs by a token), so such a draw is moved 2e-4 further from the bound."""
    old = logp + scale * torch.randn_like(logp)
    for b in CLIP_BOUNDS:
        d = logp.double() - old.double() - math.log(b)
        step = torch.where(d >= 0, 2e-4, -2e-4)
        old = torch.where(d.abs() < 1e-4, old - step.to(old.dtype), old)
    return old


def _inputs(B, T, H, V, temperature=1.0):
    hidden = torch.randn(B, T, H) / H ** 0.25
    weight = torch.randn(V, H) / H ** 0.25
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.25).long()
    mask[0, 0] = 1
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, ids[..., None])[..., 0].float()
    old, ref = _old_logps(logp, 0.3), logp + 0.2 * torch.randn(B, T)
    return hidden, weight, ids, mask, torch.randn(B), old, ref


def _run(fn, leaves):
    for t in leaves:
        t.grad = None
    loss, metrics = fn()
    loss.backward()
    return loss.detach(), [m.detach() for m in metrics], [t.grad.clone() for t in leaves]


def _same(a, b, what):
    assert_close(a[0], b[0].double(), name=f"{what} loss")
    assert len(a[1]) == len(b[1])
    for i, (x, y) in enumerate(zip(a[1], b[1])):
        assert_close(x, y.double(), name=f"{what} metric {i}")
    for i, (x, y) in enumerate(zip(a[2], b[2])):
        assert_close(x, y.double(), name=f"{what} grad {i}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["loss_type"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_fused_linear_grpo_loss_equals_liger(shape, case, beta):
    hidden, weight, ids, mask, adv, old, ref = _inputs(*shape, temperature=0.8)
    hidden.requires_grad_(), weight.requires_grad_()
    kw = dict(beta=beta, compiled=False, temperature=0.8, **case)
    args = (ids, mask, adv)
    call = dict(ref_per_token_logps=ref, old_per_token_logps=old, num_items_in_batch=int(mask.sum()) + 3)
    want = _run(lambda: LigerLinear(**kw)(hidden, weight, *args, **call), [hidden, weight])
    got = _run(lambda: ours.LigerFusedLinearGRPOLoss(**kw)(hidden, weight, *args, **call), [hidden, weight])
    _same(got, want, f"{case} beta={beta}")


def test_fused_linear_ref_input_and_bias():
    hidden, weight, ids, mask, adv, old, _ = _inputs(2, 9, 16, 41)
    bias = torch.randn(41) * 0.1
    ref_in, ref_w = hidden + 0.05 * torch.randn_like(hidden), weight + 0.05 * torch.randn_like(weight)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    kw = dict(beta=0.1, compiled=False, loss_type="bnpo")
    call = dict(bias=bias, old_per_token_logps=old, ref_input=ref_in, ref_weight=ref_w)
    want = _run(lambda: LigerLinear(**kw)(hidden, weight, ids, mask, adv, **call), leaves)
    got = _run(lambda: ours.LigerFusedLinearGRPOLoss(**kw)(hidden, weight, ids, mask, adv, **call), leaves)
    _same(got, want, "ref_input")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["loss_type"])
def test_triton_grpo_loss_equals_liger(shape, case):
    _triton_grpo_loss_equals_liger(shape, case, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 96, 8, 32000), (2, 40, 8, 151936)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["loss_type"])
def test_gpu_triton_grpo_loss_equals_liger(shape, case):
    """The same on the GPU: our compiled kernels beside Liger's at real vocabularies."""
    _triton_grpo_loss_equals_liger(shape, case, "cuda")


def _triton_grpo_loss_equals_liger(shape, case, device):
    B, T, H, V = shape
    _, _, _, mask, adv, _, _ = (t.to(device) for t in _inputs(B, T, H, 2))
    ids = torch.randint(0, V, (B, T), device=device)
    logits = torch.randn(B, T + 1, V, device=device)
    logp = torch.log_softmax(logits[:, :-1].double() / 0.9, -1).gather(-1, ids[..., None])[..., 0].float()
    old = _old_logps(logp, 0.3)
    ref = logp + 0.2 * torch.randn(B, T, device=device)
    kw = dict(temperature=0.9, beta=0.04, inplace=False,
              **{"eps_high" if k == "epsilon_high" else k: v for k, v in case.items()})
    x = logits.clone().requires_grad_()
    want = _run(lambda: liger_triton(x * 1.0, old, ref, ids, adv, mask, reduce=True, **kw), [x])
    got = _run(lambda: ours.triton_grpo_loss(x * 1.0, old, ref, ids, adv, mask, reduce=True, **kw), [x])
    if "delta" in case:
        # liger-kernel 0.8.5's Triton backward leaves out delta's clamp (16-39% gradient error against autograd
        # of its own formula, measured): the gradient is checked against that formula instead
        want[2][0] = _delta_grad(logits, old, ref, ids, adv, mask, kw, mean=True)
    _same(got, want, f"reduce {case}")
    # reduce=False: masked per-token loss (differentiable), kl, is_clipped
    want = liger_triton(x * 1.0, old, ref, ids, adv, mask, reduce=False, **kw)
    got = ours.triton_grpo_loss(x * 1.0, old, ref, ids, adv, mask, reduce=False, **kw)
    for name, g, w in zip(("per_token_loss", "kl", "is_clipped"), got, want):
        assert_close(g, w.double(), name=name)
    x.grad = None
    want[0].sum().backward()
    gw, x.grad = x.grad.clone(), None
    if "delta" in case:
        gw = _delta_grad(logits, old, ref, ids, adv, mask, kw, mean=False)
    got[0].sum().backward()
    assert_close(x.grad, gw.double(), name="per-token grad")


def _delta_grad(logits, old, ref, ids, adv, mask, kw, mean):
    """d/dlogits of the masked per-token loss with delta and the k3 KL (its bnpo mean, or its sum), by
    float64 autograd."""
    x = logits.double().requires_grad_()
    lp = torch.log_softmax(x[:, :-1] / kw["temperature"], -1).gather(-1, ids[..., None])[..., 0]
    r, a, m = torch.exp(lp - old.double()), adv.double()[:, None], mask.double()
    per_token = -torch.min(r.clamp(max=kw["delta"]) * a, r.clamp(1 - kw.get("eps_low", 0.2), 1.4) * a)
    d = ref.double() - lp
    per_token = per_token + kw["beta"] * (torch.exp(d) - d - 1)
    ((per_token * m).sum() / (m.sum() if mean else 1.0)).backward()
    return x.grad


def test_triton_grpo_loss_inplace_and_on_policy():
    _, _, ids, mask, adv, _, _ = _inputs(2, 6, 8, 50)
    logits = torch.randn(2, 7, 50)
    x = logits.clone().requires_grad_()
    want = _run(lambda: liger_triton(x * 1.0, None, None, ids, adv, mask, beta=0.0, reduce=True, inplace=False), [x])
    got = _run(lambda: ours.triton_grpo_loss(x * 1.0, None, None, ids, adv, mask, beta=0.0, reduce=True), [x])
    _same(got, want, "inplace on-policy")


def test_unsupported_options_run_liger_with_one_warning():
    hidden, weight, ids, mask, adv, old, ref = _inputs(2, 5, 8, 20)
    hidden.requires_grad_(), weight.requires_grad_()
    ours._warned.clear()
    kw = dict(beta=0.0, compiled=False, loss_type="luspo")
    want = _run(lambda: LigerLinear(**kw)(hidden, weight, ids, mask, adv, ref_per_token_logps=ref), [hidden, weight])
    with pytest.warns(UserWarning, match="loss_type='luspo'") as rec:
        loss = ours.LigerFusedLinearGRPOLoss(**kw)
        got = [_run(lambda: loss(hidden, weight, ids, mask, adv, ref_per_token_logps=ref), [hidden, weight])
               for _ in range(2)]
    assert len([w for w in rec if "r1kernels" in str(w.message)]) == 1
    _same(got[0], want, "luspo fallback")


def test_bad_input():
    hidden, weight, ids, mask, adv, old, ref = _inputs(2, 5, 8, 20)
    with pytest.raises(ValueError, match="sapo_temperature_pos"):
        ours.LigerFusedLinearGRPOLoss(sapo_temperature_pos=0.0)
    with pytest.raises(ValueError, match="delta"):
        ours.LigerFusedLinearGRPOLoss(delta=-1.0)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ours.LigerFusedLinearGRPOLoss(loss_type="cispo", importance_sampling_level="sequence")(
            hidden, weight, ids, mask, adv, ref_per_token_logps=ref)
    with pytest.raises(ValueError, match="max_completion_length"):
        ours.LigerFusedLinearGRPOLoss(loss_type="dr_grpo")(hidden, weight, ids, mask, adv, ref_per_token_logps=ref)
    with pytest.raises(ValueError, match="ref_per_token_logps or ref_input"):
        ours.LigerFusedLinearGRPOLoss()(hidden, weight, ids, mask, adv)
    logits = torch.randn(2, 6, 20)
    with pytest.raises(ValueError, match="completion_ids"):
        ours.triton_grpo_loss(logits, old, ref, ids[:, :3], adv, mask)
    with pytest.raises(ValueError, match="ref_logp"):
        ours.triton_grpo_loss(logits, old, None, ids, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        ours.triton_grpo_loss(logits, old, ref, ids, adv, mask, importance_sampling_level="batch")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", [dict(loss_type="cispo", epsilon_high=1.1), dict(loss_type="sapo")],
                         ids=lambda c: c["loss_type"])
def test_fused_linear_delta_has_no_effect_for_cispo_sapo(shape, case):
    """Liger's chunked class (as TRL) clamps the ratio by delta only for the clipped loss types: delta with
    cispo/sapo runs and changes nothing (it was a ValueError here)."""
    hidden, weight, ids, mask, adv, old, ref = _inputs(*shape)
    hidden.requires_grad_(), weight.requires_grad_()
    kw = dict(beta=0.04, compiled=False, delta=1.05, **case)
    call = dict(ref_per_token_logps=ref, old_per_token_logps=old)
    want = _run(lambda: LigerLinear(**kw)(hidden, weight, ids, mask, adv, **call), [hidden, weight])
    got = _run(lambda: ours.LigerFusedLinearGRPOLoss(**kw)(hidden, weight, ids, mask, adv, **call), [hidden, weight])
    _same(got, want, f"{case} delta")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_grpo_loss_skips_masked_positions(shape, level):
    """Liger's kernel never reads old_logp / ref_logp / completion_ids where completion_mask is 0: NaN, -inf
    or -100 there leave the loss, metrics and gradient finite and unchanged (reduce=False gave NaN)."""
    B, T, H, V = shape
    _, _, ids, mask, adv, old, ref = _inputs(B, T, H, V)
    mask[-1, -1] = 0
    off = mask == 0
    bad = (old.masked_fill(off, float("nan")), ref.masked_fill(off, float("-inf")), ids.masked_fill(off, -100))
    x = torch.randn(B, T + 1, V).requires_grad_()
    kw = dict(temperature=0.9, beta=0.04, inplace=False, importance_sampling_level=level)
    for reduce in (True, False):
        want = liger_triton(x * 1.0, old, ref, ids, adv, mask, reduce=reduce, **kw)
        (want[0].sum()).backward()
        gw, x.grad = x.grad.clone(), None
        got = ours.triton_grpo_loss(x * 1.0, *bad, adv, mask, reduce=reduce, **kw)
        (got[0].sum()).backward()
        gg, x.grad = x.grad.clone(), None
        outs = [[out[0]] + (list(out[1]) if reduce else [t for t in out[1:] if t is not None]) for out in (got, want)]
        assert len(outs[0]) == len(outs[1])
        for i, (g, w) in enumerate(zip(*outs)):
            assert_close(g.detach(), w.detach().double(), name=f"reduce={reduce} output {i}")
        assert_close(gg, gw.double(), name=f"reduce={reduce} grad")


def test_bad_input_named():
    """Wrong shapes reach a ValueError naming Liger's argument on both triton_grpo_loss paths (reduce=False
    broadcast an old_logp of shape (1, T) silently, or raised a RuntimeError)."""
    hidden, weight, ids, mask, adv, old, ref = _inputs(2, 5, 8, 20)
    logits = torch.randn(2, 6, 20)
    for reduce in (True, False):
        for name, args in (("old_logp", (old[:1], ref, ids, adv, mask)),
                           ("old_logp", (torch.randn(2, 6), ref, ids, adv, mask)),
                           ("ref_logp", (old, ref[:1], ids, adv, mask)),
                           ("completion_mask", (old, ref, ids, adv, mask[:1])),
                           ("completion_mask", (old, ref, ids, adv, torch.ones(2, 6))),
                           ("advantages", (old, ref, ids, adv[:1], mask)),
                           ("completion_ids", (old, ref, ids + 20, adv, mask)),
                           ("old_logp", (old.long(), ref, ids, adv, mask)),  # the core named old_logprobs
                           ("ref_logp", (old, ref.long(), ids, adv, mask)),
                           ("advantages", (old, ref, ids, adv.masked_fill(adv > adv.min(), float("nan")), mask))):
            with pytest.raises(ValueError, match=name):
                ours.triton_grpo_loss(logits, *args, reduce=reduce)
    with pytest.raises(ValueError, match="ref_weight"):
        ours.LigerFusedLinearGRPOLoss()(hidden, weight, ids, mask, adv, ref_input=hidden)


def _same_empty(got, want, what):
    """Outputs of an empty batch: Liger's values exactly, same shapes."""
    assert len(got[1]) == len(want[1]), what
    for i, (g, w) in enumerate(zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]])):
        assert g.shape == w.shape, f"{what} output {i}: shape {tuple(g.shape)} != Liger's {tuple(w.shape)}"
        torch.testing.assert_close(g, w.to(g.dtype), rtol=0, atol=0, equal_nan=True, msg=f"{what} output {i}")


@pytest.mark.parametrize("B,T", [(0, 6), (0, 0), (3, 0)])
@pytest.mark.parametrize("case", CASES + [dict(loss_type="grpo")], ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_empty_batch_equals_liger(B, T, case, beta):
    """No rows or no completion tokens: Liger returns a loss of 0 with zero gradients and zero metrics, and both
    drop-ins return the same (rows = 0 was a RuntimeError from reshaping the advantages with -1); where Liger's
    loss is NaN (no rows, a loss that averages over sequences: 0 / 0) ours is a ValueError naming the input."""
    H, V = int(torch.randint(4, 17, ())), int(torch.randint(5, 40, ()))
    hidden, weight, ids, mask, adv, old, ref = _inputs(max(B, 1), max(T, 1), H, V)
    hidden, ids, mask, old, ref = (t[:B, :T].contiguous() for t in (hidden, ids, mask, old, ref))
    adv = adv[:B].contiguous()
    hidden.requires_grad_(), weight.requires_grad_()
    kw = dict(beta=beta, compiled=False, **case)
    call = dict(ref_per_token_logps=ref, old_per_token_logps=old)
    want = _run(lambda: LigerLinear(**kw)(hidden, weight, ids, mask, adv, **call), [hidden, weight])
    undefined = bool(torch.isnan(want[0]))
    assert undefined == (B == 0 and case["loss_type"] in ("grpo", "sapo", "dr_grpo"))
    if undefined:
        with pytest.raises(ValueError, match="_input has no rows"):
            ours.LigerFusedLinearGRPOLoss(**kw)(hidden, weight, ids, mask, adv, **call)
    else:
        got = _run(lambda: ours.LigerFusedLinearGRPOLoss(**kw)(hidden, weight, ids, mask, adv, **call),
                   [hidden, weight])
        _same_empty(got, want, f"fused {case} beta={beta}")
    logits = torch.randn(B, T + 1, V, requires_grad=True)
    tkw = dict(temperature=0.9, beta=beta, inplace=False,
               **{"eps_high" if k == "epsilon_high" else k: v for k, v in case.items()})
    want = _run(lambda: liger_triton(logits * 1.0, old, ref, ids, adv, mask, reduce=True, **tkw), [logits])
    assert bool(torch.isnan(want[0])) == undefined
    if undefined:
        with pytest.raises(ValueError, match="logits has no rows"):
            ours.triton_grpo_loss(logits * 1.0, old, ref, ids, adv, mask, reduce=True, **tkw)
    else:
        got = _run(lambda: ours.triton_grpo_loss(logits * 1.0, old, ref, ids, adv, mask, reduce=True, **tkw),
                   [logits])
        _same_empty(got, want, f"triton {case} beta={beta}")
    want = liger_triton(logits, old, ref, ids, adv, mask, reduce=False, **tkw)
    got = ours.triton_grpo_loss(logits, old, ref, ids, adv, mask, reduce=False, **tkw)
    _same_empty((got[0], [t for t in got[1:] if t is not None], []),
                (want[0], [t for t in want[1:] if t is not None], []), f"per-token {case} beta={beta}")


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("name,value", [("beta", float("nan")), ("beta", -1.0), ("eps_low", float("nan")),
                                        ("eps_low", -0.1), ("eps_high", float("nan"))])
def test_triton_grpo_loss_bad_options_named(reduce, name, value):
    """beta / eps_low / eps_high that make the loss NaN (or make no sense) are a ValueError naming Liger's
    argument on both paths (reduce=False skipped the checks and returned NaN per-token losses; reduce=True
    named r1kernels' `epsilon`)."""
    _, _, ids, mask, adv, old, ref = _inputs(2, 5, 8, 20)
    logits = torch.randn(2, 6, 20)
    with pytest.raises(ValueError, match=name):
        ours.triton_grpo_loss(logits, old, ref, ids, adv, mask, reduce=reduce, **{name: value})


def test_fused_linear_bad_input_names_liger_arguments():
    """LigerFusedLinearGRPOLoss's errors name Liger's arguments (attention_mask, old_per_token_logps,
    ref_input, ...), not r1kernels' (completion_mask, old_logprobs, labels, ...); a NaN attention_mask is not
    reported as a bad num_items_in_batch (which the caller never passed)."""
    hidden, weight, ids, mask, adv, old, ref = _inputs(2, 5, 8, 20)
    nan_mask = mask.float().masked_fill(torch.eye(2, 5, dtype=torch.bool), float("nan"))
    for name, ctor, call in (
            ("attention_mask", {}, dict(attention_mask=mask[:1])),
            ("attention_mask", {}, dict(attention_mask=nan_mask)),
            ("old_per_token_logps", {}, dict(old_per_token_logps=old[:1])),
            ("ref_per_token_logps", {}, dict(ref_per_token_logps=ref[:, :3])),
            ("selected_token_ids", {}, dict(selected_token_ids=ids[:1])),
            ("lin_weight", {}, dict(lin_weight=weight[:, :3])),
            ("epsilon_low", dict(epsilon_low=float("nan")), {}),
            ("epsilon_high", dict(epsilon_high=-1.0), {}),
            ("ref_input", dict(beta=0.1), dict(ref_per_token_logps=None, ref_input=hidden[:1], ref_weight=weight)),
            ("ref_weight", dict(beta=0.1), dict(ref_per_token_logps=None, ref_input=hidden, ref_weight=weight[:, :3])),
            ("ref_bias", dict(beta=0.1), dict(ref_per_token_logps=None, ref_input=hidden, ref_weight=weight,
                                              ref_bias=torch.randn(3))),
            ("selected_token_ids .* ref_weight", dict(beta=0.1),
             dict(ref_per_token_logps=None, ref_input=hidden, ref_weight=weight[:3])),
            # an id past lin_weight's rows (Liger computes a wrong value; the core named completion_ids)
            ("selected_token_ids .* lin_weight", {}, dict(selected_token_ids=ids.masked_fill(mask != 0, 20)))):
        args = dict(_input=hidden, lin_weight=weight, selected_token_ids=ids, attention_mask=mask,
                    advantages=adv, ref_per_token_logps=ref, old_per_token_logps=old)
        args.update(call)
        with pytest.raises(ValueError, match=name):
            ours.LigerFusedLinearGRPOLoss(**ctor)(**args)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_advantages_get_no_gradient(level):
    """Liger treats the advantages as constants (its backward returns None for them) on every path; the
    drop-ins sent a gradient into advantages that require grad (the sequence level, and reduce=False)."""
    hidden, weight, ids, mask, adv, old, ref = _inputs(2, 5, 8, 20)
    hidden.requires_grad_()
    a = adv.clone().requires_grad_()
    loss, _ = ours.LigerFusedLinearGRPOLoss(importance_sampling_level=level)(
        hidden, weight, ids, mask, a, ref_per_token_logps=ref, old_per_token_logps=old)
    loss.backward()
    assert a.grad is None
    logits = torch.randn(2, 6, 20, requires_grad=True)
    for reduce in (True, False):
        out = ours.triton_grpo_loss(logits * 1.0, old, ref, ids, a, mask, reduce=reduce,
                                    importance_sampling_level=level)
        out[0].sum().backward()
        assert a.grad is None, f"reduce={reduce}"
        want = liger_triton(logits * 1.0, old, ref, ids, a, mask, reduce=reduce, importance_sampling_level=level)
        assert want[0].requires_grad
        want[0].sum().backward()
        assert a.grad is None


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_liger_triton_unreduced_kl_carries_no_gradient(level):
    """reduce=False: a loss that adds the returned kl gets the gradient of the per-token loss alone, as in Liger
    (GrpoLossFunction.backward reads only the first output's gradient)."""
    B, T, V = 2, 6, 23
    ids, adv = torch.randint(0, V, (B, T)), torch.randn(B)
    mask = (torch.rand(B, T) > 0.3).float()
    mask[0, 0] = 1
    old, ref = torch.randn(B, T) - 3.0, torch.randn(B, T) - 3.0
    x = torch.randn(B, T + 1, V, requires_grad=True)
    kw = dict(temperature=0.9, beta=0.1, inplace=False, reduce=False, importance_sampling_level=level)
    grads = {}
    for name, fn in (("liger", liger_triton), ("ours", ours.triton_grpo_loss)):
        for with_kl in (False, True):
            x.grad = None
            loss, kl, _ = fn(x * 1.0, old, ref, ids, adv, mask, **kw)
            (loss.sum() + (3.0 * kl.sum() if with_kl else 0.0)).backward()
            grads[name, with_kl] = x.grad.clone()
    assert torch.equal(grads["liger", True], grads["liger", False])  # what Liger does
    assert_close(grads["ours", True], grads["ours", False].double(), name="ours: grad with kl added")
    assert_close(grads["ours", True], grads["liger", True].double(), name="ours vs Liger")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_liger_triton_grpo_loss_per_token_old_ref_no_gradient(backend):
    """liger's triton_grpo_loss(reduce=False) differentiated through old_logp / ref_logp; Liger's kernel does not."""
    B, T, V = 2, 3, 11
    x = torch.randn(B, T + 1, V)
    ids = torch.randint(0, V, (B, T))
    adv = torch.randn(B)
    lp = torch.log_softmax(x[:, :-1].double() / 0.9, -1).gather(-1, ids[..., None])[..., 0].float()
    old = (lp + 0.05 * torch.randn(B, T)).requires_grad_()
    ref = (lp + 0.2 * torch.randn(B, T)).requires_grad_()
    xx = x.clone().requires_grad_()
    g = torch.randn(B, T)
    loss, _, _ = ours.triton_grpo_loss(xx, old, ref, ids, adv, reduce=False, backend=backend)
    (loss * g).sum().backward()
    assert old.grad is None and ref.grad is None
    # independent float64: per-token dapo loss + 0.04 * k3 (no bias correction), old/ref constants
    x64 = x.double().requires_grad_()
    logp = (x64[:, :-1] / 0.9).log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    r = torch.exp(logp - old.detach().double())
    a = adv.double()[:, None]
    d = ref.detach().double() - logp
    L = -torch.minimum(r * a, r.clamp(0.8, 1.4) * a) + 0.04 * (torch.exp(d) - d - 1.0)
    (L * g.double()).sum().backward()
    assert_close(loss, L.detach(), name="per-token loss")
    assert_close(xx.grad, x64.grad, name="logits grad")


@pytest.mark.parametrize("loss_type", ["foo", "GRPO", None, 3])
def test_unknown_loss_type_is_one_error_without_warning(loss_type):
    """An unknown loss_type is a ValueError naming loss_type and nothing else: it was first treated as an option
    r1kernels does not implement, with a warning that Liger's code runs for it (and without liger-kernel, an error
    saying to install it), before Liger's own 'Unknown loss type'."""
    import warnings
    hidden, weight, ids, mask, adv, old, ref = _inputs(2, 5, 8, 20)
    logits = torch.randn(2, 6, 20)
    ours._warned.clear()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="loss_type must be one of"):
            ours.LigerFusedLinearGRPOLoss(loss_type=loss_type)
        module = ours.LigerFusedLinearGRPOLoss()
        module.loss_type = loss_type  # Liger's attribute, read by forward
        with pytest.raises(ValueError, match="loss_type must be one of"):
            module(hidden, weight, ids, mask, adv, ref_per_token_logps=ref)
        for reduce in (True, False):
            with pytest.raises(ValueError, match="loss_type must be one of"):
                ours.triton_grpo_loss(logits, old, ref, ids, adv, mask, loss_type=loss_type, reduce=reduce)
    assert not [w for w in rec if "r1kernels" in str(w.message)] and not ours._warned


def _np_draw(value, kind):
    import numpy as np
    return {"f32": np.float32, "f64": np.float64, "f16": np.float16}[kind](value)


@pytest.mark.parametrize("kind", ["f32", "f64", "f16"])
def test_numpy_coefficients_equal_liger_and_python_values(kind):
    """NumPy beta / epsilon_low / epsilon_high / temperature / delta (np.float32(0.04), ...) were a ValueError here
    while Liger's chunked class takes them: now both drop-ins give exactly what the same values as Python floats
    give (float(np.float32(0.04)), the double of the float32, not 0.04), which is Liger's result for them."""
    shape = SHAPES[int(torch.randint(1, len(SHAPES), ()))]
    hidden, weight, ids, mask, adv, old, ref = _inputs(*shape, temperature=0.8)
    hidden.requires_grad_(), weight.requires_grad_()
    vals = dict(beta=float(torch.rand(()) * 0.1), epsilon_low=float(0.1 + 0.2 * torch.rand(())),
                epsilon_high=float(0.2 + 0.2 * torch.rand(())), temperature=0.8, delta=1.3)
    np_kw = {k: _np_draw(v, kind) for k, v in vals.items()}
    py_kw = {k: float(v) for k, v in np_kw.items()}
    call = dict(ref_per_token_logps=ref, old_per_token_logps=old)
    fused = {}
    for name, kw in (("numpy", np_kw), ("python", py_kw)):
        fused[name] = _run(lambda kw=kw: ours.LigerFusedLinearGRPOLoss(compiled=False, loss_type="bnpo", **kw)(
            hidden, weight, ids, mask, adv, **call), [hidden, weight])
    # Liger is given the Python values: its own arithmetic with an np.float16 coefficient runs in float16
    want = _run(lambda: LigerLinear(compiled=False, loss_type="bnpo", **py_kw)(hidden, weight, ids, mask, adv, **call),
                [hidden, weight])
    _same(fused["numpy"], want, f"fused {kind}")
    for a, b in zip([fused["numpy"][0], *fused["numpy"][1], *fused["numpy"][2]],
                    [fused["python"][0], *fused["python"][1], *fused["python"][2]]):
        assert torch.equal(a, b)
    tkw = {"eps_low" if k == "epsilon_low" else "eps_high" if k == "epsilon_high" else k: v for k, v in np_kw.items()}
    B, T = ids.shape
    x = torch.randn(B, T + 1, weight.shape[0], requires_grad=True)
    for reduce in (True, False):
        got = ours.triton_grpo_loss(x * 1.0, old, ref, ids, adv, mask, reduce=reduce, **tkw)
        py = ours.triton_grpo_loss(x * 1.0, old, ref, ids, adv, mask, reduce=reduce,
                                   **{k: float(v) for k, v in tkw.items()})
        want = liger_triton(x * 1.0, old, ref, ids, adv, mask, reduce=reduce, inplace=False,
                            **{k: float(v) for k, v in tkw.items()})
        flat = [got[0], *(got[1] if reduce else got[1:])]
        assert all(torch.equal(a, b) for a, b in zip(flat, [py[0], *(py[1] if reduce else py[1:])]))
        for i, (g, w) in enumerate(zip(flat, [want[0], *(want[1] if reduce else want[1:])])):
            assert_close(g.detach(), w.detach().double(), name=f"triton reduce={reduce} output {i}")


def _bad_numpy_values():
    import numpy as np
    return [np.bool_(True), np.float32("nan"), np.float64(-0.5), np.array([0.1, 0.2]), np.array(0.04),
            np.array([0.04]), torch.tensor(0.04)]


@pytest.mark.parametrize("i", range(7))
@pytest.mark.parametrize("name", ["beta", "epsilon_low", "epsilon_high"])
def test_numpy_bad_coefficients_named(i, name):
    """NaN, negative or bool NumPy values and arrays / tensors (any size: numbers are scalars, as in
    rk.check_sampling_options) stay a ValueError naming Liger's argument on both drop-ins."""
    value = _bad_numpy_values()[i]
    hidden, weight, ids, mask, adv, old, ref = _inputs(2, 5, 8, 20)
    with pytest.raises(ValueError, match=name):
        ours.LigerFusedLinearGRPOLoss(**{name: value})(hidden, weight, ids, mask, adv, ref_per_token_logps=ref)
    tname = {"epsilon_low": "eps_low", "epsilon_high": "eps_high"}.get(name, name)
    for reduce in (True, False):
        with pytest.raises(ValueError, match=tname):
            ours.triton_grpo_loss(torch.randn(2, 6, 20), old, ref, ids, adv, mask, reduce=reduce, **{tname: value})
