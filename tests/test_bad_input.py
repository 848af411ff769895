"""Every public function rejects bad input with a ValueError that names the argument."""
import math

import pytest
import torch

import r1kernels as rk

V = 11


def _grpo_args():
    return dict(logits=torch.randn(2, 3, V), completion_ids=torch.randint(0, V, (2, 3)), advantages=torch.randn(2))


@pytest.mark.parametrize("kwargs,name", [
    (dict(logits=torch.randn(3, V), labels=torch.randint(0, V, (4,))), "labels"),
    (dict(logits=torch.randn(3, V), labels=torch.randn(3)), "labels"),
    (dict(logits=torch.randint(0, 3, (3, V)), labels=torch.randint(0, V, (3,))), "logits"),
    (dict(logits=torch.randn(3, V), labels=torch.full((3,), V)), "labels"),
    (dict(logits=torch.randn(3, V), labels=torch.full((3,), -1)), "labels"),
    (dict(logits=torch.randn(3, V), labels=torch.randint(0, V, (3,), device="meta")), "labels"),
    (dict(logits=torch.randn(3, V), labels=torch.randint(0, V, (3,)), temperature=0.0), "temperature"),
    (dict(logits=torch.randn(3, V), labels=torch.randint(0, V, (3,)), temperature=float("inf")), "temperature"),
    (dict(logits=torch.randn(3, V), labels=torch.randint(0, V, (3,)), temperature=1e-40), "temperature"),
    (dict(logits=torch.randn(3, V), labels=torch.randint(0, V, (3,)), backend="cuda"), "backend"),
    (dict(logits=torch.randn(3, V), labels=torch.randint(0, V, (3,)), backend="nope"), "backend"),
])
def test_token_logprobs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rk.token_logprobs(**kwargs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(hidden=torch.randn(3, 4), weight=torch.randn(V, 5), labels=torch.randint(0, V, (3,))), "weight"),
    (dict(hidden=torch.randn(3, 4), weight=torch.randn(V, 4), labels=torch.randint(0, V, (2,))), "labels"),
    (dict(hidden=torch.randn(3, 4), weight=torch.randn(V, 4), labels=torch.full((3,), V)), "labels"),
    (dict(hidden=torch.randn(3, 4), weight=torch.randn(V, 4), labels=torch.randint(0, V, (3,)),
          bias=torch.randn(V + 1)), "bias"),
])
def test_linear_token_logprobs(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rk.linear_token_logprobs(**kwargs)


@pytest.mark.parametrize("override,name", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(importance_sampling_level="batch"), "importance_sampling_level"),
    (dict(advantages=torch.randn(3)), "advantages"),
    (dict(completion_mask=torch.ones(2, 4)), "completion_mask"),
    (dict(old_logprobs=torch.randn(2, 4)), "old_logprobs"),
    (dict(beta=0.1), "ref_logprobs"),
    (dict(epsilon=-0.1), "epsilon"),
    (dict(delta=0.0), "delta"),
    (dict(completion_ids=torch.full((2, 3), V)), "completion_ids"),
    (dict(max_completion_length=0), "max_completion_length"),
    (dict(num_items_in_batch=0), "num_items_in_batch"),
    (dict(num_items_in_batch=float("inf")), "num_items_in_batch"),
    (dict(beta=float("inf"), ref_logprobs=torch.randn(2, 3)), "beta"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(temperature=float("inf")), "temperature"),
])
def test_grpo_loss(override, name):
    args = {**_grpo_args(), **override}
    with pytest.raises(ValueError, match=name):
        rk.grpo_loss(**args)
    h = torch.randn(2, 3, 4)
    args.pop("logits")
    with pytest.raises(ValueError, match=name):
        rk.linear_grpo_loss(h, torch.randn(V, 4), **args)


@pytest.mark.parametrize("args,kwargs,name", [
    ((torch.randn(10), 3), {}, "group_size"),
    ((torch.randn(10), 0), {}, "group_size"),
    ((torch.randn(10), 1), {}, "group_size"),
    ((torch.tensor([1.0, float("nan")]), 2), {}, "NaN"),
    ((torch.tensor([1.0, float("inf")]), 2), {}, "rewards contains NaN or inf"),
    ((torch.tensor([[1.0, 0.0], [-float("inf"), 0.0]]), 2), dict(reward_weights=[1.0, 0.0]), "rewards contains"),
    ((torch.randn(4, 2), 2), dict(reward_weights=[1.0, float("nan")]), "reward_weights contains"),
    ((torch.randn(4, 2), 2), dict(reward_weights=torch.tensor([float("inf"), 1.0])), "reward_weights contains"),
    ((torch.randn(4, 2), 2), dict(reward_weights="ab"), "reward_weights must be numbers"),
    ((torch.randn(4, 2), 2), dict(reward_weights=[1.0, None]), "reward_weights must be numbers"),
    ((torch.randn(4), 2), dict(scale="median"), "scale"),
    ((torch.randn(4, 2), 2), dict(reward_weights=[1.0, 2.0, 3.0]), "reward_weights"),
    ((torch.randint(0, 2, (4,)), 2), {}, "rewards"),
    ((torch.randn(4, 2, 2), 2), {}, "rewards"),
    ((torch.ones(4), 2), dict(eps=0.0), "eps"),
    ((torch.ones(4), 2), dict(eps=0.0, scale="batch"), "eps"),
    ((torch.ones(4), 2), dict(eps=float("nan")), "eps"),
    ((torch.ones(4), 2), dict(eps=float("inf")), "eps"),
    ((torch.ones(4), 2), dict(eps=float("inf"), scale="none"), "eps"),
])
def test_group_advantages(args, kwargs, name):
    for backend in ("auto", "torch"):
        with pytest.raises(ValueError, match=name):
            rk.group_advantages(*args, **kwargs, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inf_clip_bounds_do_not_clip(backend):
    """epsilon / epsilon_high / delta may be inf (every backend's clip is min/max/compare): the loss and
    gradient are the unclipped objective's, computed here from the log-probs, and nothing counts as clipped."""
    args = _grpo_args()
    x, ids, adv = args["logits"], args["completion_ids"], args["advantages"]
    old = rk.token_logprobs(x + torch.randn_like(x), ids)  # ratios far from 1: a finite epsilon would clip
    inf = float("inf")
    xg = x.clone().requires_grad_()
    out = rk.grpo_loss(xg, ids, adv, old_logprobs=old, epsilon=inf, epsilon_high=inf, delta=inf,
                       loss_type="bnpo", backend=backend)
    out.loss.backward()
    xr = x.clone().requires_grad_()
    ratio = torch.exp(torch.log_softmax(xr, -1).gather(-1, ids[..., None])[..., 0] - old)
    expected = -(ratio * adv[:, None]).mean()  # bnpo: sum over tokens / count, no mask
    expected.backward()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(xg.grad, xr.grad)
    assert all(float(v) == 0.0 for k, v in out.metrics.items() if k.startswith("clip_ratio"))


def test_group_advantages_eps():
    """eps must be > 0 when dividing by a std (a constant group would give 0 / 0); scale="none" divides
    by nothing, so eps=0 is fine there."""
    assert torch.equal(rk.group_advantages(torch.ones(4), 2), torch.zeros(4))
    assert torch.equal(rk.group_advantages(torch.ones(4), 2, eps=0.0, scale="none"), torch.zeros(4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", list(rk.LOSS_TYPES))
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_with_no_rows(backend, loss_type, level):
    """No rows: the losses normalized by tokens return 0 (zero gradients); those that average over sequences or
    divide by their count (0 / 0: the reference gave NaN, the kernel 0 at token level) are a ValueError naming
    completion_ids, for grpo_loss and linear_grpo_loss."""
    T, H = int(torch.randint(1, 6, ())), 4
    ids, adv = torch.zeros(0, T, dtype=torch.long), torch.zeros(0)
    opts = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=T, backend=backend,
                old_logprobs=torch.zeros(0, T))
    hidden, weight = torch.randn(0, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)
    calls = (lambda: rk.grpo_loss(hidden @ weight.t(), ids, adv, **opts),
             lambda: rk.linear_grpo_loss(hidden, weight, ids, adv, **opts))
    for call in calls:
        if rk.LOSS_REDUCTION[loss_type] in ("sequence", "sequence_sum", "length"):
            with pytest.raises(ValueError, match="completion_ids has no rows"):
                call()
        else:
            out = call()
            assert out.loss.item() == 0.0
            out.loss.backward()
            assert weight.grad is not None and not weight.grad.any()


def test_grpo_loss_accepts_b1_advantages_and_masked_ignore_index():
    args = _grpo_args()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ids = args["completion_ids"].masked_fill(mask == 0, -100)
    for fn, x in ((rk.grpo_loss, args["logits"]), (rk.linear_grpo_loss, None)):
        a = (x,) if x is not None else (torch.randn(2, 3, 4), torch.randn(V, 4))
        out = fn(*a, ids, args["advantages"][:, None], mask)
        assert torch.isfinite(out.loss)
        with pytest.raises(ValueError, match="completion_ids.*completion_mask"):
            fn(*a, ids, args["advantages"])  # -100 without a mask
        with pytest.raises(ValueError, match="advantages"):
            fn(*a, ids, torch.randn(2, 2), mask)


def test_every_listed_kernel_resolves():
    """Each KERNELS entry whose dependency is installed here loaded (with triton installed: every triton
    entry); a kernel is never silently dropped."""
    from r1kernels import _backend as B
    for op, entries in B.KERNELS.items():
        loaded = [b for b, _ in B._LOADED[op]]
        for backend, path in entries:
            if B.DEPENDENCY.get(backend, (True, ""))[0]:
                assert backend in loaded, f"{op}: {path} did not load"
    if B.HAS_TRITON:
        assert all(b in [x for x, _ in B._LOADED[op]] for op, es in B.KERNELS.items() for b, _ in es if b == "triton")


def test_dispatch_fails_loudly(tmp_path, monkeypatch):
    from r1kernels import _backend as B
    with pytest.raises(ImportError, match="defines no 'grpo_loss_tritn'"):
        B._load("grpo_loss", "triton", "r1kernels.ops.grpo:grpo_loss_tritn")
    with pytest.raises(ImportError, match="does not import"):
        B._load("grpo_loss", "triton", "r1kernels.ops.grpo_typo:grpo_loss_triton")
    (tmp_path / "r1k_broken_kernel.py").write_text("import r1k_no_such_dependency\n")
    (tmp_path / "r1k_fake_triton_user.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="r1k_no_such_dependency"):
        B._load("grpo_loss", "triton", "r1k_broken_kernel:f")
    if B.HAS_TRITON:  # triton is installed: a module failing on it is broken, not "triton missing"
        with pytest.raises(ImportError, match="does not import"):
            B._load("route", "cuda", "r1k_fake_triton_user:f")
    monkeypatch.setattr(B, "HAS_TRITON", False)
    monkeypatch.setitem(B.DEPENDENCY, "triton", (False, "triton is not installed"))
    assert B._load("grpo_loss", "triton", "r1kernels.ops.grpo:grpo_loss_tritn") is None  # dependency absent
    if B.HAS_EXTENSION:  # a cuda kernel in a module that needs the (absent) triton: unavailable, no error
        assert B._load("route", "cuda", "r1k_fake_triton_user:f") is None


@pytest.mark.parametrize("kwargs,name", [
    (dict(top_k=9, n_group=4, topk_group=2), "top_k"),
    (dict(top_k=2, n_group=3, topk_group=2), "n_group"),
    (dict(top_k=2, n_group=4, topk_group=5), "topk_group"),
    (dict(top_k=0, n_group=4, topk_group=2), "top_k"),
])
def test_route_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rk.moe.route(torch.randn(5, 16), torch.zeros(16), **kwargs)


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), -1.0, 0.0, True, "2.5", None])
def test_route_scaling_factor(factor):
    """routed_scaling_factor multiplies every routing weight: a finite real number > 0 (not a bool)."""
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        rk.moe.route(torch.randn(5, 16), torch.zeros(16), top_k=2, n_group=4, topk_group=2,
                     routed_scaling_factor=factor)


@pytest.mark.parametrize("call", [
    lambda: rk.rms_norm(torch.randn(2, 4), torch.ones(4), eps=float("inf")),
    lambda: rk.moe.update_bias(torch.zeros(8), torch.ones(8), rate=float("inf")),
    lambda: rk.moe.sequence_aux_loss(torch.randn(4, 8), None, seq_len=2, top_k=2, alpha=float("inf")),
])
def test_inf_scalar_options(call):
    """Scalar options with no meaning at inf (they gave NaN / inf / silently degenerate results) raise."""
    with pytest.raises(ValueError, match="must be a finite number"):
        call()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("eps", [0.0, 0, -1e-6, -math.inf, math.nan])
def test_rms_norm_eps_must_be_positive(backend, eps):
    """eps <= 0 (or NaN) is a ValueError naming eps on every backend: an all-zero row is 0 * rsqrt(0 + eps), NaN at
    eps = 0. Any eps > 0 gives that row zeros."""
    pytest.importorskip("triton")
    for shape in [(3, 8), (2, 5, 33)]:
        x, w = torch.randn(shape), torch.randn(shape[-1])
        x[0] = 0.0
        with pytest.raises(ValueError, match="eps must be"):
            rk.rms_norm(x, w, eps, backend=backend)
        out = rk.rms_norm(x, w, 1e-12, backend=backend)
        assert torch.isfinite(out).all() and (out[0] == 0).all()


def test_route_and_permute_shapes():
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        rk.moe.route(torch.randn(5, 16), torch.zeros(8), top_k=2, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="topk_ids"):
        rk.moe.permute(torch.randn(5, 4), torch.randint(0, 8, (4, 2)), 8)
    with pytest.raises(ValueError, match="topk_ids"):
        rk.moe.permute(torch.randn(5, 4), torch.full((5, 2), 8), 8)
    with pytest.raises(ValueError, match="row_map"):
        rk.moe.unpermute(torch.randn(10, 4), torch.arange(9), torch.rand(5, 2))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        rk.moe.update_bias(torch.zeros(8), torch.ones(7))
    for dt in (torch.bfloat16, torch.float16, torch.float64):  # bf16: 0.6016 + 1e-3 rounds back to 0.6016
        bias = torch.full((4,), 0.6016, dtype=dt)
        with pytest.raises(ValueError, match="bias must be float32"):
            rk.moe.update_bias(bias, torch.tensor([1, 2, 3, 6]))
        assert (bias == torch.tensor(0.6016, dtype=dt)).all()
    with pytest.raises(ValueError, match="seq_len"):
        rk.moe.sequence_aux_loss(torch.randn(10, 8), None, seq_len=3, top_k=2)


def test_backend_dispatch_errors_and_choices():
    """pick (a table made at import, then the eligibility checks): explicit backends that cannot run on the
    tensors' device, unknown ones and kernels an op does not have raise ValueError naming the backend; auto
    takes the first eligible kernel; torch is the reference."""
    from r1kernels import _backend as B
    r = torch.randn(8)
    with pytest.raises(ValueError, match="backend='cuda' for group_advantages cannot run on cpu"):
        rk.group_advantages(r, 4, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        rk.group_advantages(r, 4, backend="gpu")
    with pytest.raises(ValueError, match="backend='cpp' is not available for grpo_loss"):
        B.pick("grpo_loss", "cpp", r.device, r)
    assert B.pick("group_advantages", "torch", r.device, r, 4) is None
    if B.ENV_BACKEND != "auto":
        return
    for op in B.KERNELS:
        loaded = dict(B._LOADED[op])
        if any(getattr(f, "eligible", None) for f in loaded.values()):
            continue  # the choice depends on the inputs
        here = [b for b in B.available(op, "cpu") if b != "torch"]  # fastest first
        assert B.pick(op, "auto", r.device) is (loaded[here[0]] if here else None), op


def test_sync_checks_never_read_back_while_a_graph_is_captured(monkeypatch):
    """R1K_SYNC_CHECKS=1 reads value checks back (ValueError) except while a CUDA graph is being captured,
    where a read-back fails the capture: there the device assert runs instead (_checks._sync)."""
    from r1kernels import _checks

    t = torch.empty(3, device="meta")  # neither a CPU tensor nor capturable here: the flag alone decides
    monkeypatch.setattr(_checks, "SYNC_CHECKS", True)
    assert _checks._sync(t) and _checks._sync(torch.zeros(1))
    monkeypatch.setattr(_checks, "capturing", lambda x: True)
    assert not _checks._sync(t)
    assert _checks._sync(torch.zeros(1))  # CPU tensors always read back
    monkeypatch.setattr(_checks, "SYNC_CHECKS", False)
    assert not _checks._sync(t)


@pytest.mark.gpu
def test_sync_checks_inside_a_captured_graph_gpu(monkeypatch):
    """With R1K_SYNC_CHECKS=1 an op with a value check (token_logprobs: the labels' range) captures into a CUDA
    graph and replays correctly (the check reads nothing back while capturing)."""
    from r1kernels import _checks

    monkeypatch.setattr(_checks, "SYNC_CHECKS", True)
    logits = torch.randn(6, 40, device="cuda")
    labels = torch.randint(0, 40, (6,), device="cuda")
    rk.token_logprobs(logits, labels)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = rk.token_logprobs(logits, labels)
    logits.copy_(torch.randn(6, 40, device="cuda"))
    g.replay()
    want = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -3.0])
def test_num_items_in_batch_tensor_must_be_finite_positive(backend, value):
    """A tensor inf divided the loss to 0 silently (a Python float inf was already a ValueError)."""
    B, T, V = 2, 3, 7
    with pytest.raises(ValueError, match="num_items_in_batch"):
        rk.grpo_loss(torch.randn(B, T, V), torch.randint(0, V, (B, T)), torch.randn(B),
                     num_items_in_batch=torch.tensor(value), backend=backend)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        rk.linear_grpo_loss(torch.randn(B, T, 4), torch.randn(V, 4), torch.randint(0, V, (B, T)), torch.randn(B),
                            num_items_in_batch=torch.tensor([value]), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_max_completion_length_bool_rejected(backend):
    """True was taken as max_completion_length=1 (dr_grpo's loss then T times too large)."""
    B, T, V = 2, 3, 7
    with pytest.raises(ValueError, match="max_completion_length"):
        rk.grpo_loss(torch.randn(B, T, V), torch.randint(0, V, (B, T)), torch.randn(B), loss_type="dr_grpo",
                     max_completion_length=True, backend=backend)
