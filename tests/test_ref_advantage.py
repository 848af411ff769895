"""Group advantages: hand values, the C++ op bit-identical to the reference, opcheck, compile."""
import math

import pytest
import torch

import r1kernels as rk
from r1kernels import _backend

R = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])


def test_hand_values():
    a = rk.group_advantages(R, 3, backend="torch")
    assert torch.allclose(a, torch.tensor([-1, 0, 1, 0, 0, 0]) / (1 + 1e-4))
    assert torch.equal(rk.group_advantages(R, 3, scale="none", backend="torch"), torch.tensor([-1.0, 0, 1, 0, 0, 0]))
    batch_std = math.sqrt(sum((x - 3.0) ** 2 for x in R.tolist()) / 5)
    a = rk.group_advantages(R, 3, scale="batch", eps=1e-3, backend="torch")
    assert torch.allclose(a, torch.tensor([-1.0, 0, 1, 0, 0, 0]) / (batch_std + 1e-3))
    with pytest.raises(ValueError, match="eps"):  # std 0 of a constant batch would give 0 / 0
        rk.group_advantages(R, 3, scale="batch", eps=0.0, backend="torch")


def test_weighted_columns():
    cols = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    a = rk.group_advantages(cols, 2, scale="none", reward_weights=[2.0, 0.5], backend="torch")
    assert torch.equal(a, torch.tensor([0.75, -0.75, 1.25, -1.25]))


needs_ext = pytest.mark.skipif(not _backend.extension_has("group_advantages", "CPU"),
                               reason="r1kernels._C not built")


@needs_ext
@pytest.mark.parametrize("n_groups,G,R_", [(1, 2, 0), (7, 16, 0), (64, 3, 3), (5, 33, 2)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_cpp_bitwise_equal_to_reference(n_groups, G, R_, scale):
    shape = (n_groups * G,) if R_ == 0 else (n_groups * G, R_)
    rewards = torch.randn(shape) * 3 + 1
    w = None if R_ == 0 else torch.rand(R_) + 0.5
    a = rk.group_advantages(rewards, G, scale=scale, reward_weights=w, backend="cpp")
    b = rk.group_advantages(rewards, G, scale=scale, reward_weights=w, backend="torch")
    assert a.dtype == torch.float32 and torch.equal(a, b)


@needs_ext
def test_auto_picks_the_first_cpu_kernel_and_opcheck():
    """auto on CPU runs the first kernel available there (the interpreter's Triton under the tests, else C++), not
    the reference."""
    avail = _backend.available("group_advantages", "cpu")
    assert "cpp" in avail and avail[0] == ("triton" if _backend.TRITON_INTERPRET else "cpp")
    assert _backend.pick("group_advantages", "auto", torch.device("cpu")) is _backend.pick(
        "group_advantages", avail[0], torch.device("cpu"))
    r = torch.randn(32)
    torch.library.opcheck(torch.ops.r1kernels.group_advantages.default, (r, 8, "group", 1e-4, None))
    torch.library.opcheck(torch.ops.r1kernels.group_advantages.default,
                          (torch.randn(32, 2), 4, "batch", 1e-4, torch.rand(2)))


def test_compile_fullgraph():
    r = torch.randn(48)
    f = torch.compile(lambda x: rk.group_advantages(x, 6), fullgraph=True, backend="aot_eager")
    assert torch.equal(f(r), rk.group_advantages(r, 6, backend="torch"))


def test_scale_none_past_float32_is_an_error_naming_rewards():
    """Hand values: 3e38 against two -3e38 centres to 3e38 + 1e38 = 4e38 > float32's max (was an inf advantage);
    a pair +-3e38 centres to +-3e38 exactly (no error). float64 rewards of 1e200 were advantages of 0 under
    "group" (their float64 std overflows): an error too."""
    with pytest.raises(rk.AdvantageOverflowError, match=r"rewards: .*overflow float32"):
        rk.group_advantages(torch.tensor([3e38, -3e38, -3e38]), 3, scale="none", backend="torch")
    pair = torch.tensor([3e38, -3e38])
    assert torch.equal(rk.group_advantages(pair, 2, scale="none", backend="torch"), pair)
    with pytest.raises(rk.AdvantageOverflowError, match="rewards: float64 rewards"):
        rk.group_advantages(torch.tensor([1e200, -1e200], dtype=torch.float64), 2, backend="torch")


def test_compile_fullgraph_scale_none():
    """The float32-range check runs eagerly only (as the finite check): the compiled op traces without it."""
    r = torch.randn(24, 2)
    w = torch.tensor([1.0, 0.5])
    f = torch.compile(lambda x: rk.group_advantages(x, 4, scale="none", reward_weights=w), fullgraph=True,
                      backend="aot_eager")
    assert torch.equal(f(r), rk.group_advantages(r, 4, scale="none", reward_weights=w, backend="torch"))
