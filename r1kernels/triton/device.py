"""The one place kernels ask the device for launch sizes, and read whether Triton interprets (INTERPRET)."""
from __future__ import annotations

import functools

import torch

from .._backend import TRITON_INTERPRET as INTERPRET  # noqa: F401  (TRITON_INTERPRET=1, read in one place)


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
def _cuda_smem_per_sm(index: int) -> int:
    return getattr(torch.cuda.get_device_properties(index), "shared_memory_per_multiprocessor", 0)


def programs_per_sm(device: torch.device, smem_bytes: int) -> int:
    """How many programs of smem_bytes of shared memory one SM holds at once (1 KB a block reserved by the
    driver); at least 1, and 1 off CUDA."""
    if device.type != "cuda":
        return 1
    return max(1, _cuda_smem_per_sm(_index(device)) // (smem_bytes + 1024))
