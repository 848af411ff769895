"""group_advantages kernels (Triton under the interpreter on CPU; CUDA on the GPU) vs the float64
reference: both accumulate in float64, so results match to fp32 rounding."""
from __future__ import annotations

import pytest
import torch

import r1kernels as rk
from r1kernels import _backend
from r1kernels.reference import group_advantages as ref_adv

triton = pytest.importorskip("triton")
from r1kernels.ops import advantage as adv_ops  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (TRITON_INTERPRET=1)
CASES = [(5, 4, 1, "group", None), (3, 7, 3, "group", [0.5, 1.0, 2.0]), (6, 3, 2, "batch", None),
         (4, 130, 1, "group", None), (2, 5, 1, "none", None), (9, 2, 1, "batch", [2.0]), (1, 16, 2, "none", None)]


def _check(backend, device, n_groups, G, R, scale, w, dtype=torch.float32):
    r = (torch.randn(n_groups * G, R, device=device) * 3).to(dtype)
    if R == 1 and w is None:
        r = r[:, 0]
    out = rk.group_advantages(r, G, scale=scale, reward_weights=w, backend=backend)
    exp = ref_adv(r, G, scale, 1e-4, torch.tensor(w) if w else None)
    assert out.dtype == torch.float32 and out.shape == (n_groups * G,)
    torch.testing.assert_close(out.cpu(), exp.cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_triton(case):
    _check("triton", DEV, *case)


def test_triton_bf16_and_tied_rewards():
    _check("triton", DEV, 3, 8, 1, "group", None, torch.bfloat16)
    r = torch.ones(8, device=DEV)  # zero std: (R - mean) / eps = 0
    out = rk.group_advantages(r, 4, backend="triton")
    assert torch.equal(out, torch.zeros(8, device=DEV))


def test_triton_compile_and_opcheck():
    r = torch.randn(12, 2, device=DEV)
    w = torch.tensor([1.0, 0.5], device=DEV)
    f = torch.compile(lambda x: rk.group_advantages(x, 4, reward_weights=w, backend="triton") * 2, fullgraph=True)
    torch.testing.assert_close(f(r), 2 * ref_adv(r, 4, "group", 1e-4, w), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(adv_ops._group_advantages_triton_op, (r, 4, "group", 1e-4, w))
    torch.library.opcheck(adv_ops._group_advantages_triton_op, (r[:, 0].contiguous(), 3, "batch", 1e-4, None))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(4096, 16, 1, "group", None), (64, 1000, 3, "batch", [1.0, 0.2, 0.3])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda(case, dtype):
    if not _backend.extension_has("group_advantages", "CUDA"):
        pytest.skip("extension built without CUDA")
    _check("cuda", "cuda", *case, dtype=dtype)


@pytest.mark.gpu
def test_auto_picks_a_kernel_on_cuda():
    assert _backend.available("group_advantages", "cuda")[0] in ("cuda", "triton")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("where", [0, 5, 17])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_raises_on_every_cpu_backend(backend, where, bad):
    """NaN or inf rewards are a ValueError naming the argument on every backend (an inf reward made its group's
    advantages NaN): the public API checks them, or the extension's op itself (it stops on them in one pass)."""
    if backend == "cpp" and not _backend.extension_has("group_advantages", "CPU"):
        pytest.skip("extension not built")
    if backend == "triton" and DEV != "cpu":
        pytest.skip("the CPU case of the Triton path runs under the interpreter")
    r = torch.randn(18, 2)
    r[where, where % 2] = bad
    with pytest.raises(ValueError, match="rewards contains NaN or inf"):
        rk.group_advantages(r, 6, reward_weights=[1.0, 0.5], backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_cuda_non_finite_reward_is_a_device_assert(scale, bad):
    """On CUDA the extension's kernel itself stops on a NaN or inf reward (a device-side assert, as
    torch._assert_async gives; the public API adds no check launches of its own), in a child process because
    the assert ends its CUDA context."""
    import subprocess
    import sys
    if not _backend.extension_has("group_advantages", "CUDA"):
        pytest.skip("extension built without CUDA")
    code = ("import torch, r1kernels as rk\n"
            f"r = torch.randn(4096 * 16, device='cuda'); r[12345] = float('{bad}')\n"
            f"a = rk.group_advantages(r, 16, scale='{scale}')\n"
            "torch.cuda.synchronize()\nprint('NO ERROR')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "NO ERROR" not in out, out[-2000:]
    assert "rewards contains NaN or inf" in out or "device-side assert" in out, out[-2000:]


F32_MAX = torch.finfo(torch.float32).max


def _cpu_backend(backend):
    if backend == "cpp" and not _backend.extension_has("group_advantages", "CPU"):
        pytest.skip("extension not built")
    if backend == "triton" and DEV != "cpu":
        pytest.skip("the CPU case of the Triton path runs under the interpreter")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("cols", [0, 2])
def test_scale_none_past_float32_raises_on_every_cpu_backend(backend, cols):
    """Finite float32 rewards whose R - group mean passes float32's range: scale='none' was an inf advantage on
    every backend (float64 math cast to float32); now a ValueError naming rewards exactly when the advantage, computed
    here in float64 from the rewards, rounds to inf in float32. Fresh random magnitudes around the boundary (some
    draws overflow, some do not); "group" / "batch" of the same rewards stay finite and equal the reference."""
    _cpu_backend(backend)
    G, n_groups = int(torch.randint(2, 7, ())), int(torch.randint(1, 4, ()))
    w = torch.rand(cols) + 0.5 if cols else None
    for _ in range(6):
        mag = 10 ** (38 + float(torch.rand(())) * 0.6 - 0.3)  # 5e37 .. 2e38 per reward
        shape = (n_groups * G, max(cols, 1))
        r = (torch.rand(shape) * 2 - 1).sign() * mag * (0.5 + torch.rand(shape))
        r = r.clamp(-F32_MAX, F32_MAX).float()
        r = r if cols else r[:, 0]
        t = r.double() if not cols else (r.double() * w.double()).sum(-1)
        t_BG = t.view(-1, G)
        want_inf = bool(torch.isinf((t_BG - t_BG.mean(-1, keepdim=True)).float()).any())
        if want_inf:
            with pytest.raises(rk.AdvantageOverflowError, match=r"rewards: .*overflow float32"):
                rk.group_advantages(r, G, scale="none", reward_weights=w, backend=backend)
        else:
            out = rk.group_advantages(r, G, scale="none", reward_weights=w, backend=backend)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, ref_adv(r, G, "none", 1e-4, w), rtol=1e-6, atol=0)
        for scale in ("group", "batch"):
            out = rk.group_advantages(r, G, scale=scale, reward_weights=w, backend=backend)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, ref_adv(r, G, scale, 1e-4, w), rtol=1e-6, atol=1e-6)
    # a group whose centered value certainly passes float32 (3 members: 3e38 - (-1e38) = 4e38) and one that does not
    r = torch.randn(3 * G)
    r[:3] = torch.tensor([3e38, -3e38, -3e38])
    with pytest.raises(rk.AdvantageOverflowError, match=r"rewards: .*overflow float32"):
        rk.group_advantages(r, 3, scale="none", backend=backend)
    edge = torch.tensor([F32_MAX / 2, -F32_MAX / 2] * 2) * (1 - torch.rand(4) * 1e-3)  # |R - mean| < F32_MAX
    assert torch.isfinite(rk.group_advantages(edge, 2, scale="none", backend=backend)).all()


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_float64_rewards_past_float64_std_raise(backend, scale):
    """float64 rewards of magnitude ~1e200: their squares overflow the float64 std, which was inf, so "group" /
    "batch" returned advantages of 0 (finite and wrong) and "none" an inf: a ValueError naming rewards on every
    backend. Large float64 rewards within the bound (1e100) keep the exact result: a pair (a, -a) has advantages
    +-a / (sqrt(2) a + eps) = +-1/sqrt(2) ("group"), against a hand value, not the reference."""
    _cpu_backend(backend)
    G = int(torch.randint(2, 6, ()))
    r = torch.randn(4 * G, dtype=torch.float64)
    r[int(torch.randint(0, 4 * G, ()))] = float(torch.rand(()) + 1) * 1e200
    with pytest.raises(rk.AdvantageOverflowError, match="rewards"):
        rk.group_advantages(r, G, scale=scale, backend=backend)
    r[0] = float("nan")  # NaN is named as NaN, also by the extension's own check (not as a magnitude)
    with pytest.raises(ValueError, match="NaN"):
        rk.group_advantages(r, G, scale=scale, backend=backend)
    a = float(torch.rand(()) + 1) * 1e100
    pair = torch.tensor([a, -a], dtype=torch.float64)
    if scale == "none":
        with pytest.raises(rk.AdvantageOverflowError, match=r"rewards: .*overflow float32"):
            rk.group_advantages(pair, 2, scale=scale, backend=backend)
    else:
        out = rk.group_advantages(pair, 2, scale=scale, backend=backend)
        want = torch.tensor([1, -1], dtype=torch.float32) / 2 ** 0.5
        torch.testing.assert_close(out, want, rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_scale_none_past_float32_raises_with_sync_checks(backend, monkeypatch):
    """The GPU backends under R1K_SYNC_CHECKS=1: the same ValueError naming rewards as on CPU (without it, a
    device-side assert, as for NaN rewards)."""
    if backend == "cuda" and not _backend.extension_has("group_advantages", "CUDA"):
        pytest.skip("extension built without CUDA")
    monkeypatch.setattr(rk._checks, "SYNC_CHECKS", True)
    r = torch.randn(3 * 64, device="cuda")
    r[:3] = torch.tensor([3e38, -3e38, -3e38])
    with pytest.raises(rk.AdvantageOverflowError, match=r"rewards: .*overflow float32"):
        rk.group_advantages(r, 3, scale="none", backend=backend)
    r[:3] = torch.randn(3)
    out = rk.group_advantages(r, 3, scale="none", backend=backend)
    torch.testing.assert_close(out, ref_adv(r, 3, "none", 1e-4, None), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("cols", [0, 3])
def test_rewards_that_require_grad_give_advantages_without_grad(backend, cols):
    """group_advantages is not differentiable on any backend (the advantages are constants of the loss, computed
    under no_grad in TRL): rewards (and reward weights) that require grad give advantages that do not, equal to
    those of the detached rewards (the reference returned a gradient, the Triton op raised in backward, the C++
    op's graph gave None)."""
    _cpu_backend(backend)
    for n_groups, G in [(2, 4), (5, 3)]:
        r = torch.randn(n_groups * G, cols) if cols else torch.randn(n_groups * G)
        w = torch.rand(cols).requires_grad_() if cols else None
        x = r.clone().requires_grad_()
        for scale in ("group", "batch", "none"):
            out = rk.group_advantages(x * 2.0, G, scale=scale, reward_weights=w, backend=backend)
            want = rk.group_advantages(r * 2.0, G, scale=scale, reward_weights=None if w is None else w.detach(),
                                       backend=backend)
            assert not out.requires_grad and out.grad_fn is None
            assert torch.equal(out, want)
