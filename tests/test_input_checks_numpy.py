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
                                    None, [], (), np.array([], dtype=np.int64), [[2]], object(), 2 ** 63,
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
               torch.tensor(0.5), torch.tensor(3), "0.5", b"1", None, 1 + 0j, np.complex64(1), [1.0], object()]


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
