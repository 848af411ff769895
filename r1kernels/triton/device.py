"""The one place kernels ask the device for launch sizes and launch options."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._backend import TRITON_INTERPRET as INTERPRET  # TRITON_INTERPRET=1, read in one place

try:  # grid dependency control (Triton >= 3.3); without it no kernel is launched with PDL
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_wait = gdc_launch_dependents = None

# Programmatic dependent launch for the decode step's kernels (rms_norm, decode_linear, decode attention) on
# Hopper or newer: each launch may start while its predecessor finishes, and waits (gdc_wait, first thing in
# every program) until the predecessor has completed and its writes are visible. Since every kernel launched
# so waits before it can complete, completion stays ordered along the stream. OFF: its effect is within the
# call-to-call variation. Measured on H100s (fixed rollout, each beside the default in one process): +2.4% (cd8bc50);
# -1.9% (7f99945; the replayed step's idle time between kernels 116 -> 20 us, span 2209 -> 2182 us); -0.3 to -0.8%
# in 4 interleaved rounds on the same machine; +2.1% (fixed) and +3.9% (varied) on another machine at 8947a6d
# (results/rollout_*_h100_2026-12-05_{cd8bc50,7f99945,8947a6d}.json). It can save at most the gaps (~5% of the
# step). R1K_PDL=1 or device.PDL = True turns it on; bench_rollout --ab pdl times it beside the default (captured
# graphs keep what they captured: reset the engine after a change).
PDL = os.environ.get("R1K_PDL", "0") == "1"


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 elsewhere (the interpreter: few programs, fast tests)."""
    if device.type != "cuda":
        return 2
    return _cuda_sms(_index(device))


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> bool:
    """Launch with programmatic dependent launch (PDL above): a CUDA device of compute capability >= 9, not
    the interpreter (it has no grid dependency control)."""
    return PDL and not INTERPRET and device.type == "cuda" and _pdl_capable(_index(device))


def pdl_launch(on: bool) -> dict:
    """The launch keyword of a kernel that takes `PDL: tl.constexpr` and calls pdl_enter first."""
    return {"launch_pdl": True} if on else {}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """First in every program of a kernel launched with pdl_launch(True): wait for the predecessor's
    completion, then let the successor launch (it waits the same way, so it may start now)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
