"""Test setup: fresh random seed per run (printed), the one tolerance table, gpu/slow markers, and the
Triton interpreter on machines with no GPU (set before anything imports triton)."""
from __future__ import annotations

import hashlib
import os
import random
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _inductor_cache_dir() -> str:
    """Inductor's FX-graph cache key omits custom ops' schemas: a graph compiled before an op's schema changed
    is reused with the old call (CI failed so: decode_linear 'expected at most 4 argument(s) but received 6').
    One cache per version of the package's sources keeps reruns warm and every change cold."""
    root = Path(__file__).resolve().parents[1] / "r1kernels"
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return os.path.join(tempfile.gettempdir(), f"r1k_inductor_{digest.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())

SEED = int(os.environ.get("R1K_TEST_SEED", random.SystemRandom().randrange(2**31)))
# pytest-xdist workers are started after this module is imported by the controller: they inherit the seed
os.environ["R1K_TEST_SEED"] = str(SEED)

# Relative-norm error ||out - ref|| / ||ref|| allowed against a float64 reference, by input dtype.
# Kernels must also stay within 2x the error of the torch reference run in the same low precision.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 4e-3,
}
ATOL = 1e-6
# A set of tensors checked together (a model's gradients): the root-mean-square of their relative errors is held
# to LOWP_RATIO x the torch low-precision reference's, each tensor to LOWP_RATIO_ONE x its own. One run's error
# norm of an 8-32-element tensor (a bias, a head-dim norm weight) is a noisy estimate: over 800 bf16 runs of
# test_patch_layers (27 tensors each) the ratio to HF's error averaged 1.0 per tensor and reached 2.45, the
# pooled ratio 1.33.
LOWP_RATIO = 2.0
LOWP_RATIO_ONE = 4.0


def pytest_report_header(config):
    return f"r1kernels test seed: R1K_TEST_SEED={SEED}"


def pytest_terminal_summary(terminalreporter):
    """The seed again at the end: `pytest -q` (what CI runs) hides the header, and a failure that is not an
    assert_close names no seed."""
    terminalreporter.write_line(f"r1kernels test seed: R1K_TEST_SEED={SEED}")


@pytest.fixture(autouse=True)
def _seed(request):
    # crc32, not hash(): str hashes change per process, and R1K_TEST_SEED must reproduce a failure
    seed = (SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """In-process trainers (the demo, the TRL trainer) initialise torch.distributed and keep it, as
    DeepSpeed does; a later test must not see that group."""
    yield
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        from r1train.engine import destroy_process_group

        destroy_process_group()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(out, ref, scale=0.0) -> float:
    """||out - ref|| / max(||ref||, scale) in float64 (NaN anywhere gives inf, so it never passes)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out64).any() or torch.isinf(out64).any() and not torch.equal(out64.isinf(), ref64.isinf()):
        return float("inf")
    num = (out64 - ref64).norm().item()
    den = max(ref64.norm().item(), scale)
    return num / den if den > 0 else num


def _atol(ref, scale=0.0) -> float:
    """ATOL per element as a share of max(||ref||, scale)."""
    return ATOL / max(ref.detach().double().norm().item(), scale, 1e-30) * (ref.numel() ** 0.5)


def assert_close(out, ref, dtype=torch.float32, *, lowp=None, name="output", scale=0.0, lowp_ratio=LOWP_RATIO):
    """out vs the float64 reference ref: within TOLERANCES[dtype] (or, when `lowp` -- the torch reference
    evaluated in the same low precision -- is given, within lowp_ratio x its error) plus ATOL. Errors are
    relative to max(||ref||, scale); for a loss (a sum of signed terms that can cancel to near zero while
    rounding errors scale with the terms) pass the sum of the terms' magnitudes as `scale`."""
    err = rel_err(out, ref, scale)
    tol = TOLERANCES[dtype]
    if lowp is not None:
        tol = max(tol, lowp_ratio * rel_err(lowp, ref, scale))
    tol += _atol(ref, scale)
    nan_ref = int(torch.isnan(ref.detach()).sum())
    why = f"; the reference itself has {nan_ref} NaN values" if nan_ref else ""
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.3e}{why} (seed {SEED})"


def assert_close_set(outs: dict, refs: dict, dtype, *, lowps: dict | None = None, name="output"):
    """Every tensor of outs vs its float64 ref in refs as assert_close does; with lowps (the torch low-precision
    reference's tensors) the low-precision rule applies to the set: each tensor within LOWP_RATIO_ONE x its own
    error, the RMS of the relative errors within LOWP_RATIO x lowps' RMS, all at least TOLERANCES[dtype]."""
    assert set(outs) == set(refs), f"{name}: {sorted(set(outs) ^ set(refs))} in one set only"
    for k in outs:
        assert_close(outs[k], refs[k], dtype, lowp=lowps[k] if lowps else None, name=f"{name} {k}",
                     lowp_ratio=LOWP_RATIO_ONE)
    if lowps:
        def rms(tensors):
            return (sum(rel_err(tensors[k], refs[k]) ** 2 for k in refs) / len(refs)) ** 0.5

        err, tol = rms(outs), max(TOLERANCES[dtype], LOWP_RATIO * rms(lowps)) + max(map(_atol, refs.values()))
        assert err <= tol, f"{name}: RMS relative error {err:.3e} > tolerance {tol:.3e} (seed {SEED})"


def loss_scale(loss_of_adv, adv) -> float:
    """The magnitude a GRPO-family loss's rounding errors scale with (`scale` for assert_close): with
    advantages of one sign every policy term has one sign, so |L(|A|)| + |L(-|A|)| is of the order of the
    sum of the terms' magnitudes (KL terms included) however much L(A) cancels. loss_of_adv: adv -> loss,
    the float64 reference."""
    with torch.no_grad():
        return abs(float(loss_of_adv(adv.abs()))) + abs(float(loss_of_adv(-adv.abs())))


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
