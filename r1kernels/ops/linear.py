"""decode_linear on CUDA: torch.ops.r1kernels.decode_linear (csrc/cuda/decode_linear.cu), the few-row bf16
GEMM of the decode step with its epilogue (bias / in-place residual / SiLU gate); see
r1kernels.reference.linear for the spec. Inference only (no autograd): eligible() declines inputs that
require grad.

Launch configuration (weight rows per warp, k-groups, pipeline stages, K splits): `config(M, N, K, mode)` below, from
benchmarks/bench_decode_linear.py's sweep on an H200 (its JSON is committed beside the others); callers may
pass `config=(warp_rows, k_groups, stages, splits)`."""
from __future__ import annotations

import functools

import torch

from .. import _backend

OP = "decode_linear"
MAX_M = 64     # csrc/cuda/decode_linear.h: R1K_DECODE_LINEAR_MAX_M
K_STEP = 64    # R1K_DECODE_LINEAR_K_STEP
MODES = {"store": 0, "residual": 1, "gated": 2}
HAS_CUDA = _backend.HAS_EXTENSION and _backend.extension_has(OP, "CUDA")

_COUNTERS: dict[int, torch.Tensor] = {}  # device index -> int32 zeros, left zero by every launch


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def tiles(n: int, mode: int, warp_rows: int) -> int:
    cols = 2 * warp_rows if mode == 2 else 4 * warp_rows
    return -(-n // cols)


def config(M: int, N: int, K: int, mode: int, sms: int) -> tuple[int, int, int, int]:
    """(warp_rows, k_groups, stages, splits): 128-row tiles, split over K until about one CTA per SM, each
    split at least 4 k-steps of 64."""
    wr = 32
    t = tiles(N, mode, wr)
    splits = max(1, min(K // (4 * K_STEP), round(sms / t)))
    return wr, 2, 4, splits


def _counters(device: torch.device, n: int) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    c = _COUNTERS.get(idx)
    if c is None or c.numel() < n:
        c = _COUNTERS[idx] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return c


if HAS_CUDA:
    @torch.library.register_fake("r1kernels::decode_linear")
    def _fake(x, w, bias, out, counters, *, mode, warp_rows, k_groups, stages, splits):
        return None


def decode_linear_cuda(x, weight, bias=None, residual=None, gated=False, config_=None):
    M, K = x.shape
    mode = 1 if residual is not None else 2 if gated else 0
    N = weight.shape[0] // 2 if gated else weight.shape[0]
    if residual is not None:
        out = residual
    else:
        out = x.new_empty(M, N)
    wr, kg, stages, splits = config_ or config(M, N, K, mode, _sms(x.device.index or 0))
    counters = _counters(x.device, tiles(N, mode, wr))
    torch.ops.r1kernels.decode_linear(x, weight, bias, out, counters, mode=mode, warp_rows=wr, k_groups=kg,
                                      stages=stages, splits=splits)
    return out


def _rows_ok(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


def _eligible(x, weight, bias=None, residual=None, gated=False, config_=None):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return False
    ts = [t for t in (x, weight, bias, residual) if t is not None]
    if any(t.dtype != torch.bfloat16 or t.device.type != "cuda" for t in ts):
        return False
    if not (_rows_ok(x) and weight.is_contiguous() and _rows_ok(weight)) or not 1 <= x.shape[0] <= MAX_M:
        return False
    if x.shape[1] % K_STEP or (bias is not None and not bias.is_contiguous()):
        return False
    return residual is None or _rows_ok(residual)


decode_linear_cuda.eligible = _eligible
decode_linear_cuda.devices = {"cuda"} if HAS_CUDA else set()
