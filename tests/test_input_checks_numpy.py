"""numpy / torch scalars as token ids and sampling options: eos_tuple reads numpy integers, integer arrays and
integer tensors as Python ints (tokenizers and TRL configs pass them), and check_sampling_options takes numpy
numbers (numbers.Real / numbers.Integral) -- while bools, floats where an int is due, out-of-range values and
junk stay errors naming the argument. End to end: numpy values give what their Python values give."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import r1kernels as rk
from r1train.generation import SamplingParams, eos_tuple, generate

# ---- eos_tuple


def _want(ids):
    """The ids as plain ints, repeats dropped in order (computed here, from the numpy / list form)."""
    out = []
    for i in np.atleast_1d(np.asarray(ids)).tolist():
        if i not in out:
            out.append(i)
    return tuple(out)


class _Opaque:
    """An object that is no number, with a repr that is the same in every process (an object()'s names its
    address, and pytest-xdist's workers must collect the same test ids)."""

    def __repr__(self):
        return "opaque"


@pytest.mark.parametrize("eos_id", [np.int64(2), np.int32(7), np.uint8(255), np.int64(0), np.array(7),
                                    np.array([2, 5, 2]), np.array([3], dtype=np.int32), torch.tensor(3),
                                    torch.tensor(4, dtype=torch.int32), torch.tensor([3, 4, 3]),
                                    [np.int64(1), 2, np.int16(1)], (np.uint32(9),), 5, [5, 6]],
                         ids=repr)
def test_eos_tuple_takes_numpy_and_tensor_integers(eos_id):
    got = eos_tuple(eos_id)
    want = _want(eos_id.tolist() if isinstance(eos_id, torch.Tensor) else eos_id)
    assert got == want and all(type(i) is int for i in got)


@pytest.mark.parametrize("eos_id", [True, False, np.bool_(True), torch.tensor(True), np.array([True, False]),
                                    torch.tensor([True]), [1, True], 2.0, np.float32(2), np.float64(2.0),
                                    torch.tensor(2.0), np.array([2.0]), torch.tensor([2.5]), [2, 3.0], "2", b"\x02",
                                    None, [], (), np.array([], dtype=np.int64), [[2]], _Opaque(), 2 ** 63,
                                    [np.uint64(2 ** 63)]], ids=repr)
def test_eos_tuple_still_rejects_junk(eos_id):
    with pytest.raises(ValueError, match="eos_id"):
        eos_tuple(eos_id)


def _tiny_model(V=61):
    tf = pytest.importorskip("transformers")
    from r1train.tasks.models import tiny_config

    cfg = tiny_config("tiny-qwen2", V, hidden_size=32, num_layers=1, num_heads=2, max_position=64)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3.0)
    return model


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
def test_numpy_eos_and_sampling_options_generate_as_python_values(engine):
    """Each engine with a numpy eos id / numpy sampling options produces exactly the tokens and log-probs of the
    same values as Python numbers (np.float32(0.9) is the double float(np.float32(0.9)), not 0.9)."""
    model = _tiny_model()
    ids = torch.randint(3, 61, (3, 5))
    mask = torch.ones_like(ids)
    np_sp = SamplingParams(np.int64(6), temperature=np.float32(0.7), top_k=np.int64(20), top_p=np.float32(0.9),
                           min_p=np.float64(0.01))
    py_sp = SamplingParams(6, temperature=float(np.float32(0.7)), top_k=20, top_p=float(np.float32(0.9)),
                           min_p=0.01)
    kw = dict(pad_id=0, backend="torch", engine=engine, cuda_graphs=False)
    base, _ = generate(model, ids, mask, [1, 2, 3], py_sp, eos_id=-1, **kw)
    eos = int(base[0, 2])  # a token the first row draws: its row stops there
    want = generate(model, ids, mask, [1, 2, 3], py_sp, eos_id=eos, **kw)
    for eos_id in (np.int64(eos), np.array([eos]), torch.tensor(eos)):
        got = generate(model, ids, mask, [1, 2, 3], np_sp, eos_id=eos_id, **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (want[0][0, 3:] == 0).all()  # the eos did end row 0


# ---- check_sampling_options

OK = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, greedy=False, max_new_tokens=4)


@pytest.mark.parametrize("kw", [dict(temperature=np.float32(0.7)), dict(temperature=np.float16(2.0)),
                                dict(temperature=np.int64(1)), dict(top_k=np.int64(5)), dict(top_k=np.uint8(0)),
                                dict(top_p=np.float32(0.9)), dict(top_p=np.float64(1.0)), dict(top_p=np.int64(1)),
                                dict(min_p=np.float32(0.05)), dict(min_p=np.float16(0.0)),
                                dict(max_new_tokens=np.int32(5)), dict(max_new_tokens=np.int64(1))], ids=repr)
def test_sampling_options_take_numpy_numbers(kw):
    rk.check_sampling_options(**{**OK, **kw})
    SamplingParams(**{**OK, **kw})


@pytest.mark.parametrize("kw,name", [
    (dict(top_k=np.bool_(True)), "top_k"), (dict(top_k=True), "top_k"), (dict(top_k=np.float32(5)), "top_k"),
    (dict(top_k=np.int64(-1)), "top_k"), (dict(top_k=5.0), "top_k"),
    (dict(top_p=np.bool_(True)), "top_p"), (dict(top_p=True), "top_p"), (dict(top_p=np.float32("nan")), "top_p"),
    (dict(top_p=np.float32(1.5)), "top_p"), (dict(top_p=np.float32(0)), "top_p"), (dict(top_p="0.9"), "top_p"),
    (dict(top_p=torch.tensor(0.9)), "top_p"),
    (dict(min_p=np.bool_(False)), "min_p"), (dict(min_p=np.float64(-0.1)), "min_p"),
    (dict(min_p=np.float32("nan")), "min_p"), (dict(min_p=np.float32(1.01)), "min_p"),
    (dict(temperature=np.bool_(True)), "temperature"), (dict(temperature=True), "temperature"),
    (dict(temperature=np.float32("nan")), "temperature"), (dict(temperature=np.float32("inf")), "temperature"),
    (dict(temperature=np.float32(0)), "temperature"), (dict(temperature=np.float32(-1)), "temperature"),
    (dict(temperature=np.float32(1e-6)), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(max_new_tokens=np.int64(0)), "max_new_tokens"), (dict(max_new_tokens=np.float32(4)), "max_new_tokens"),
    (dict(max_new_tokens=np.bool_(True)), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(greedy=np.bool_(True)), "greedy"), (dict(greedy=1), "greedy")], ids=repr)
def test_sampling_options_still_reject_bad_values(kw, name):
    with pytest.raises(ValueError, match=name):
        rk.check_sampling_options(**{**OK, **kw})
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{**OK, **kw})


def test_sample_tokens_with_numpy_options_equals_python_options():
    """rk.sample_tokens (torch backend) with numpy options draws what the same values as Python numbers draw."""
    logits = torch.randn(6, 50) * 3
    seeds, pos = torch.arange(6), torch.arange(6) + 10
    np_kw = dict(temperature=np.float32(0.8), top_k=np.int64(10), top_p=np.float32(0.85), min_p=np.float32(0.02))
    py_kw = {k: (int(v) if k == "top_k" else float(v)) for k, v in np_kw.items()}
    a = rk.sample_tokens(logits, seeds, pos, backend="torch", **np_kw)
    b = rk.sample_tokens(logits, seeds, pos, backend="torch", **py_kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- r1kernels._checks: is_real / is_integral / as_python (what check_sampling_options and the Liger drop-in use)

REALS = [np.float16(0.5), np.float32(0.9), np.float64(-2.5), np.longdouble(1.25), np.float32("nan"),
         np.float64("inf"), 0.9, -3.0, float("nan")]
INTEGRALS = [np.int8(-3), np.int32(7), np.int64(2 ** 62), np.uint8(255), np.uint64(2 ** 63 + 1), 5, -1, 2 ** 80]
NOT_NUMBERS = [True, False, np.bool_(True), np.bool_(False), np.array(0.5), np.array([2]), np.array([1.0, 2.0]),
               torch.tensor(0.5), torch.tensor(3), "0.5", b"1", None, 1 + 0j, np.complex64(1), [1.0], _Opaque()]


@pytest.mark.parametrize("v", REALS + INTEGRALS + NOT_NUMBERS, ids=repr)
def test_checks_is_real_and_is_integral(v):
    """Real: Python int / float and NumPy real scalars; integral: Python int and NumPy integer scalars. Never bools,
    arrays or tensors (not even of one element), strings or complex numbers."""
    from r1kernels import _checks
    assert _checks.is_real(v) == any(v is x for x in REALS + INTEGRALS)
    assert _checks.is_integral(v) == any(v is x for x in INTEGRALS)


@pytest.mark.parametrize("v", REALS + INTEGRALS, ids=repr)
def test_checks_as_python_gives_the_exact_python_value(v):
    """A NumPy scalar becomes the plain Python int / float of its exact value (np.float32(0.9) is the double of
    that float32, not 0.9; a uint64 past int64 stays exact); Python numbers are returned as they are."""
    from r1kernels import _checks
    got = _checks.as_python(v)
    if type(v) in (int, float):
        assert got is v
        return
    want_type = int if isinstance(v, np.integer) else float
    assert type(got) is want_type
    want = v.item() if want_type is int else float(np.float64(v))  # numpy's own conversions
    assert got == want or (got != got and want != want)


@pytest.mark.parametrize("v", NOT_NUMBERS, ids=repr)
def test_checks_as_python_leaves_non_numbers_for_the_check(v):
    """Bools, arrays, tensors and junk come back unchanged, so the check that follows names them."""
    from r1kernels import _checks
    assert _checks.as_python(v) is v
    with pytest.raises(ValueError, match="beta"):
        _checks.positive("beta", _checks.as_python(v))


def test_checks_as_python_then_positive_takes_numpy_numbers():
    """_checks.positive takes Python numbers: after as_python a NumPy coefficient passes (and NaN still fails)."""
    from r1kernels import _checks
    for v in (np.float32(0.04), np.float64(0.2), np.int64(1), np.float16(0.0)):
        _checks.positive("beta", _checks.as_python(v), allow_zero=True)
    with pytest.raises(ValueError, match="beta"):
        _checks.positive("beta", _checks.as_python(np.float32("nan")), allow_zero=True)


# ---- every public op's scalar options: a NumPy real scalar is its exact Python value

def _f(v):
    """The Python value a NumPy scalar stands for, computed with NumPy's own conversion (independent of
    _checks.as_python): an integer's .item(), a real's float64 value."""
    return v.item() if isinstance(v, np.integer) else float(np.float64(v))


def _grpo_case(B=3, T=5, V=13, H=8, seed=0):
    """A small GRPO batch near on-policy: old / ref / sampling log-probs within ~0.5 of the policy's (so clipping,
    masks and weights each act on some tokens); the logits are hidden @ weight.T (both loss ops see one policy)."""
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    logits = hidden @ weight.T
    ids = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0].float()
    mask = torch.ones(B, T)
    mask[0, 3:] = 0

    def near(shift=0.0):
        return logp + shift + 0.4 * torch.randn(B, T, generator=g)
    return dict(hidden=hidden, weight=weight, logits=logits, completion_ids=ids,
                advantages=torch.tensor([1.0, -0.5, 0.25]), completion_mask=mask, old_logprobs=near(),
                ref_logprobs=near(), sampling_logprobs=near(0.2))


VESPO = dict(loss_type="vespo", vllm_importance_sampling_mode="token_mask")
# (option, NumPy value, another value that changes the result, other options the value needs to matter)
GRPO_OPTIONS = [
    ("beta", np.float32(0.04), 0.5, {}), ("beta", np.float16(0.5), 0.0, {}),
    ("epsilon", np.float32(0.2), 0.05, {}), ("epsilon", np.int64(0), 1.0, {}),
    ("epsilon_high", np.float32(0.28), 0.05, {}), ("delta", np.float32(1.1), 5.0, {}),
    ("temperature", np.float32(0.7), 1.0, {}), ("temperature", np.int32(2), 1.0, {}),
    ("max_completion_length", np.int64(7), 9, dict(loss_type="dr_grpo")),
    ("num_items_in_batch", np.float32(9), 4.0, dict(loss_type="dapo")),
    ("num_items_in_batch", np.int64(11), 4, dict(loss_type="dapo")),
    ("vllm_importance_sampling_clip_max", np.float32(1.05), 3.0, dict(vllm_importance_sampling_mode="token_truncate")),
    ("vllm_importance_sampling_clip_min", np.float32(0.95), 0.1, dict(vllm_importance_sampling_mode="token_truncate")),
    ("off_policy_mask_threshold", np.float32(0.0), 100.0, {}),
    ("sapo_temperature_pos", np.float32(0.9), 2.0, dict(loss_type="sapo")),
    ("sapo_temperature_neg", np.float32(1.1), 2.0, dict(loss_type="sapo")),
    ("vespo_k_pos", np.float32(1.5), 3.0, VESPO), ("vespo_lambda_pos", np.float32(2.5), 1.0, VESPO),
    ("vespo_k_neg", np.float32(2.5), 1.0, VESPO), ("vespo_lambda_neg", np.int64(3), 1.0, VESPO),
    ("top_entropy_quantile", np.float32(0.6), 1.0, {}), ("entropy_coef", np.float32(0.01), 0.0, {}),
]


@pytest.mark.parametrize("linear", [False, True], ids=["grpo_loss", "linear_grpo_loss"])
@pytest.mark.parametrize("name,value,other,extra", GRPO_OPTIONS,
                         ids=lambda x: repr(x) if not isinstance(x, (dict, float, int)) else "")
def test_grpo_loss_numpy_option_equals_python_value(linear, name, value, other, extra):
    """Loss, log-probs, metrics and gradients with a NumPy option are bitwise those of the equal Python number; the
    option matters in this configuration (another value changes the loss or its gradient)."""
    c = _grpo_case()
    base = dict(completion_mask=c["completion_mask"], old_logprobs=c["old_logprobs"],
                ref_logprobs=c["ref_logprobs"], sampling_logprobs=c["sampling_logprobs"], beta=0.1, backend="torch",
                **extra)

    def run(v):
        x = (c["hidden"] if linear else c["logits"]).clone().requires_grad_(True)
        lead = (x, c["weight"]) if linear else (x,)
        out = (rk.linear_grpo_loss if linear else rk.grpo_loss)(*lead, c["completion_ids"], c["advantages"],
                                                                 **{**base, name: v})
        out.loss.backward()
        return out, x.grad

    (got, g_got), (want, g_want) = run(value), run(_f(value))
    assert torch.equal(got.loss, want.loss) and torch.equal(got.per_token_logprobs, want.per_token_logprobs)
    assert torch.equal(g_got, g_want)
    assert got.metrics.keys() == want.metrics.keys()
    assert all(torch.equal(got.metrics[k], want.metrics[k]) for k in want.metrics)
    alt, g_alt = run(other)
    assert not torch.equal(alt.loss, want.loss) or not torch.equal(g_alt, g_want)


def _op_cases():
    """(label, call(value), option, NumPy value): each public op with a scalar option."""
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(4, 9, generator=g) * 3, torch.randint(0, 9, (4,), generator=g)
    hidden, weight = torch.randn(4, 6, generator=g), torch.randn(9, 6, generator=g)
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0, 0.5, 0.5])
    q, kc, vc = torch.randn(2, 4, 8, generator=g), torch.randn(2, 2, 5, 8, generator=g), torch.randn(2, 2, 5, 8)
    lens = torch.tensor([3, 5])
    x, w = torch.randn(3, 8, generator=g) * 1e-2, torch.randn(8, generator=g)
    rl, bias = torch.randn(6, 8, generator=g), torch.randn(8, generator=g)
    return [
        ("token_logprobs", lambda v: rk.token_logprobs(logits, labels, temperature=v, return_entropy=True,
                                                       backend="torch"), "temperature", np.float32(0.7)),
        ("linear_token_logprobs", lambda v: rk.linear_token_logprobs(hidden, weight, labels, temperature=v,
                                                                     return_entropy=True, backend="torch"),
         "temperature", np.float16(1.5)),
        ("linear_token_logprobs", lambda v: rk.linear_token_logprobs(hidden, weight, labels, chunk_budget_bytes=v,
                                                                     backend="torch"),
         "chunk_budget_bytes", np.int64(1 << 20)),
        ("group_advantages", lambda v: rk.group_advantages(rewards, 2, eps=v, backend="torch"), "eps",
         np.float32(1e-4)),
        ("group_advantages", lambda v: rk.group_advantages(rewards, 3, scale="none", eps=v, backend="torch"), "eps",
         np.float32(0)),
        ("group_advantages", lambda v: rk.group_advantages(rewards, v, backend="torch"), "group_size", np.int64(3)),
        ("decode_attention", lambda v: rk.decode_attention(q, kc, vc, lens, scale=v, backend="torch"), "scale",
         np.float32(0.3)),
        ("rms_norm", lambda v: rk.rms_norm(x, w, v, backend="torch"), "eps", np.float32(1e-3)),
        ("rms_norm", lambda v: rk.rms_norm(x, w, eps=v, backend="torch"), "eps", np.float64(1e-5)),
        ("moe.route", lambda v: rk.moe.route(rl, bias, top_k=2, n_group=2, topk_group=1, routed_scaling_factor=v,
                                             backend="torch"), "routed_scaling_factor", np.float32(2.5)),
        ("moe.update_bias", lambda v: rk.moe.update_bias(torch.zeros(8) + 0.3, torch.arange(8), rate=v),
         "rate", np.float32(1e-3)),
        ("moe.sequence_aux_loss", lambda v: rk.moe.sequence_aux_loss(rl, None, seq_len=3, top_k=2, alpha=v),
         "alpha", np.float32(1e-2)),
        ("moe.route", lambda v: rk.moe.route(rl, bias, top_k=v, n_group=2, topk_group=1, backend="torch"),
         "top_k", np.int64(3)),
        ("moe.route", lambda v: rk.moe.route(rl, bias, top_k=2, n_group=v, topk_group=1, backend="torch"),
         "n_group", np.int32(4)),
        ("moe.route", lambda v: rk.moe.route(rl, bias, top_k=2, n_group=2, topk_group=v, backend="torch"),
         "topk_group", np.int64(2)),
        ("moe.permute", lambda v: rk.moe.permute(rl, torch.tensor([[0, 7], [3, 3], [5, 1], [2, 0], [6, 4],
                                                                   [1, 2]]), v, backend="torch"),
         "num_experts", np.int64(8)),
        ("moe.sequence_aux_loss", lambda v: rk.moe.sequence_aux_loss(rl, None, seq_len=v, top_k=2), "seq_len",
         np.int64(2)),
        ("moe.sequence_aux_loss", lambda v: rk.moe.sequence_aux_loss(rl, None, seq_len=3, top_k=v), "top_k",
         np.uint8(3)),
    ]


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)] if isinstance(out, (tuple, list)) else [torch.tensor(float(out))]


@pytest.mark.parametrize("case", range(len(_op_cases())), ids=lambda i: f"{_op_cases()[i][0]}-{_op_cases()[i][2]}")
def test_public_op_numpy_option_equals_python_value(case):
    _, call, _, value = _op_cases()[case]
    got, want = _flat(call(value)), _flat(call(_f(value)))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("case", range(len(_op_cases())), ids=lambda i: f"{_op_cases()[i][0]}-{_op_cases()[i][2]}")
@pytest.mark.parametrize("bad", [np.bool_(True), True, np.float32("nan"), np.array(0.5), np.array([0.5]),
                                 torch.tensor(0.5), np.float32(-1.0), "0.5"], ids=repr)
def test_public_op_bad_numpy_option_names_it(case, bad):
    _, call, name, _ = _op_cases()[case]
    with pytest.raises(ValueError, match=name):
        call(bad)


@pytest.mark.parametrize("name,bad", [
    ("beta", np.bool_(False)), ("beta", np.float32("nan")), ("beta", np.float32(-0.1)), ("beta", np.array(0.04)),
    ("beta", torch.tensor(0.04)), ("epsilon", np.float64("nan")), ("epsilon", np.array([0.2])),
    ("epsilon_high", np.bool_(True)), ("delta", np.float32(0)), ("temperature", np.float32("inf")),
    ("temperature", np.float32(1e-7)), ("max_completion_length", np.float32(7)),
    ("max_completion_length", np.bool_(True)), ("num_items_in_batch", np.float32(0)),
    ("num_items_in_batch", np.float32("nan")), ("vllm_importance_sampling_clip_max", np.float32("nan")),
    ("sapo_temperature_pos", np.float32(0)), ("vespo_k_pos", np.bool_(True)),
    ("top_entropy_quantile", np.float32(1.5)), ("entropy_coef", np.array(0.1)),
    ("vllm_importance_sampling_correction", np.bool_(True)), ("compute_entropy", np.bool_(False))], ids=repr)
@pytest.mark.parametrize("linear", [False, True], ids=["grpo_loss", "linear_grpo_loss"])
def test_grpo_loss_bad_numpy_option_names_it(linear, name, bad):
    c = _grpo_case()
    lead = (c["hidden"], c["weight"]) if linear else (c["logits"],)
    with pytest.raises(ValueError, match=name):
        (rk.linear_grpo_loss if linear else rk.grpo_loss)(*lead, c["completion_ids"], c["advantages"],
                                                           ref_logprobs=c["ref_logprobs"], backend="torch",
                                                           **{name: bad})


def test_kernels_receive_python_numbers(monkeypatch):
    """Each op hands its kernel the options as Python numbers (a kernel specializes on / torch.compile traces
    them as constants): the backend lookup is replaced by a spy that records the scalar arguments and runs the
    reference."""
    from r1kernels import _backend
    from r1kernels import reference as ref
    seen = []
    refs = {"grpo_loss": ref.grpo_loss, "linear_grpo_loss": ref.linear_grpo_loss,
            "token_logprobs": ref.token_logprobs, "group_advantages": ref.group_advantages,
            "decode_attention": ref.decode_attention, "rms_norm": ref.rms_norm, "route": ref.route}

    def pick(op, backend, device, *args):
        if op not in refs:
            return None

        def spy(*a, **kw):
            kw.pop("inplace_backward", None)
            seen.extend((op, v) for v in list(a) + list(kw.values()) if not isinstance(v, torch.Tensor))
            return refs[op](*a, **kw)
        return spy

    monkeypatch.setattr(_backend, "pick", pick)
    c = _grpo_case()
    opts = dict(completion_mask=c["completion_mask"], old_logprobs=c["old_logprobs"],
                ref_logprobs=c["ref_logprobs"], sampling_logprobs=c["sampling_logprobs"])
    numpy_opts = {name: value for name, value, _, extra in GRPO_OPTIONS if not extra}
    rk.grpo_loss(c["logits"], c["completion_ids"], c["advantages"], **opts, **numpy_opts)
    rk.linear_grpo_loss(c["hidden"], c["weight"], c["completion_ids"], c["advantages"], **opts, **numpy_opts)
    rk.grpo_loss(c["logits"], c["completion_ids"], c["advantages"], **opts, loss_type="sapo",
                 sapo_temperature_pos=np.float32(0.9), sapo_temperature_neg=np.float64(1.1))
    rk.grpo_loss(c["logits"], c["completion_ids"], c["advantages"], **opts, loss_type="vespo",
                 vllm_importance_sampling_mode="token_mask", vllm_importance_sampling_clip_min=np.float32(0.2),
                 **{n: v for n, v, _, e in GRPO_OPTIONS if n.startswith("vespo")})
    rk.grpo_loss(c["logits"], c["completion_ids"], c["advantages"], loss_type="dr_grpo",
                 max_completion_length=np.int64(7))
    for i in range(len(_op_cases())):
        _, call, _, value = _op_cases()[i]
        call(value)
    assert {op for op, _ in seen} >= set(refs)
    bad = [(op, v) for op, v in seen if isinstance(v, np.generic) or type(v).__module__ == "numpy"]
    assert not bad, bad
