"""Few-row projection of the decode step: out[M, N] = x[M, K] @ W[N, K]^T for M <= 64 rows, both operands
loaded by tensor descriptors (Hopper's tensor-memory-accelerator copies; host-built, so a captured CUDA graph
keeps them), pipelined over K in STAGES, fp32 accumulation, one rounding at the store, and one epilogue:

  "none"      out = acc (+ bias)
  "residual"  res += acc (+ bias), in place (o_proj adding the layer's residual)
  "silu_gate" out = silu(x @ Wg^T) * (x @ Wu^T): gate and up as two accumulators of one program, so the
              [M, 2I] gate/up output is never written and no SiLU kernel runs

Program p owns weight rows [p * BLOCK_N, (p + 1) * BLOCK_N); the x tile's rows past M are zero-filled by the
descriptor. The bias and the residual tile load before the K loop, not after it (H100, 28-call graphs at 64 rows,
results/decode_linear_variants_h100_2026-12-07_56ee7ae.json: q/k/v 5.52 -> 5.41 us, o_proj + its RMSNorm 8.51 ->
8.38, down_proj + its RMSNorm 18.05 -> 17.83).
H200, Qwen2.5-1.5B decode shapes at 64 rows, 28 distinct weights per CUDA graph (bench_decode_linear --sweep,
results/decode_gemm_few_rows_h200_2026-12-05_3d03630.json), best of 33 configs against the engine's
cuBLAS form: q/k/v + bias 5.2 vs 6.0 us, o_proj + residual 4.9 vs 5.4, gate/up + SiLU 17.7 vs 20.8
(cuBLAS + silu_mul); down_proj + residual 13.4 vs 12.7 (cuBLAS wins: the engine keeps it). Measured slower
and removed (benchmarks/NOTES-decode-linear.md): the layer's RMSNorm folded into the K loop (H200 rollout +5.0%),
programmatic dependent launch with an L2 prefetch of the first weight tiles (+1.5%)."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.3 (tensor descriptors); older: the kernel is never eligible
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from .device import INTERPRET, programs_per_sm, sm_count

EPILOGUES = ("none", "residual", "silu_gate")
MAX_ROWS = 64
# ONE_WAVE: with 200 KB of shared memory a program holds its SM alone, so a grid past the SM count (times the
# programs an SM holds at once: device.programs_per_sm) runs a second wave. H200
# (results/decode_linear_h200_2026-12-05_3267bdf.json, these configs vs cuBLAS): faster at the 1.5B shapes,
# 70-128 programs (q/k/v 5.2 vs 6.0 us, o_proj 4.8 vs 5.4, gate/up 17.3 vs 20.0); slower at the 7B ones,
# 148-288 programs (q/k/v 19.4 vs 12.0, o_proj 13.6 vs 9.4; gate/up 73.8 vs 74.7). Those run cuBLAS.
# each epilogue's fastest config in the sweep above (5 stages x 40 KB of shared memory: Hopper's 228 KB)
CONFIGS = {"none": {"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 5, "num_warps": 4},
           "residual": {"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 5, "num_warps": 4},
           "silu_gate": {"BLOCK_N": 128, "BLOCK_K": 64, "STAGES": 5, "num_warps": 4}}


@triton.jit
def _decode_linear_kernel(x_desc, w_desc, w2_desc, out_ptr, bias_ptr, M, N, K, stride_om, EPI: tl.constexpr,
                          HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    # the epilogue's global operands load before the K loop: no dependent round trip after it
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EPI == 1:
        acc += tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = x_desc.load([0, k0])  # columns past K are zero-filled: no tail mask
        w = w_desc.load([n0, k0])
        if DOT_F32:  # the interpreter's bf16 dot is wrong
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w.T, acc)
        if EPI == 2:
            w2 = w2_desc.load([n0, k0])
            if DOT_F32:
                w2 = w2.to(tl.float32)
            acc2 = tl.dot(x, w2.T, acc2)
    if EPI == 2:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=msk)


def _epilogue(residual_MN, w2_NK) -> str:
    return "silu_gate" if w2_NK is not None else "residual" if residual_MN is not None else "none"


def decode_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None,
                  residual_MN: torch.Tensor | None = None, w2_NK: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """x_MK [1 <= M <= 64, K > 0] and w_NK / w2_NK [N, K] with unit stride along K and 16-byte aligned (eligible());
    residual_MN [M, N] (unit stride along N): updated in place and returned; w2_NK: the silu_gate epilogue
    (w_NK is the gate's). config: overrides of CONFIGS[epilogue] and of BLOCK_M (the x tile's rows, >= M; default
    block_m(M); the benchmarks' sweeps)."""
    M, K = x_MK.shape
    N = w_NK.shape[0]
    epi = _epilogue(residual_MN, w2_NK)
    cfg = {**CONFIGS[epi], **(config or {})}
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if INTERPRET:
        bn, bk = min(bn, 16), min(bk, 32)
    bm = cfg.get("BLOCK_M", block_m(M))
    if bm < M:  # one tile of rows a program: a smaller one would leave rows uncomputed
        raise ValueError(f"decode_linear: config BLOCK_M={bm} is below the {M} rows of x_MK")
    out_MN = residual_MN if residual_MN is not None else x_MK.new_empty(M, N)
    x_desc = TensorDescriptor.from_tensor(x_MK, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w_NK, [bn, bk])
    w2_desc = TensorDescriptor.from_tensor(w2_NK, [bn, bk]) if w2_NK is not None else w_desc
    _decode_linear_kernel[(triton.cdiv(N, bn),)](
        x_desc, w_desc, w2_desc, out_MN, bias_N if bias_N is not None else out_MN, M, N, K, out_MN.stride(0),
        EPI=EPILOGUES.index(epi), HAS_BIAS=bias_N is not None, DOT_F32=INTERPRET or x_MK.device.type != "cuda",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])
    return out_MN


def block_m(M: int) -> int:
    """The x tile's rows: the next power of two >= M, at least 16 (the MMA's smallest tile). A 64-row descriptor box
    over fewer rows zero-fills the rest at a cost: H100, 28-call graphs (bench_decode_linear_variants
    --rows-sweep, results/decode_linear_rows_h100_2026-12-07_32948a3.json), 64-row box vs this one, us:
    q/k/v 8.18 vs 5.98 at 2 rows, 7.27 vs 6.00 at 16, 6.56 vs 5.64 at 32; o_proj 7.54 vs 5.79, 7.07 vs 5.80,
    6.39 vs 5.85; gate/up 22.68 vs 21.54, 22.83 vs 21.99, 22.79 vs 22.75; equal at 64."""
    return max(16, triton.next_power_of_2(M))


def aligned(*tensors) -> bool:
    """Tensor descriptors need 16-byte aligned base addresses (a view at an odd offset may not have one)."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


@functools.cache
def _device_ok(index: int) -> bool:
    """Tensor-memory-accelerator copies (compute capability 9+) and the shared memory CONFIGS' 5 stages take
    (200 KB a block: Hopper's and datacenter Blackwell's 227 KB, not the ~100 KB of consumer parts)."""
    p = torch.cuda.get_device_properties(index)
    need = max(_smem(c, epi) for epi, c in CONFIGS.items())
    return p.major >= 9 and getattr(p, "shared_memory_per_block_optin", 0) >= need


def _smem(cfg: dict, epi: str, tile_m: int = MAX_ROWS) -> int:
    """Bytes of shared memory the pipeline's stages hold: the x tile and one (two for silu_gate) weight tiles."""
    return (tile_m + (2 if epi == "silu_gate" else 1) * cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2 * cfg["STAGES"]


def eligible(x_MK, w_NK, bias_N=None, residual_MN=None, w2_NK=None) -> bool:
    """Shapes, dtypes, strides and the device (a Hopper or newer GPU, or the interpreter): tensor
    descriptors need unit stride along K, 16-byte aligned (nonzero) row strides, and no empty axis. Shapes,
    strides and dtypes only, so it traces under torch.compile.
    On a GPU also ONE_WAVE: at most one program per SM. The base addresses (not traceable) are aligned()'s:
    the custom op checks them when it runs."""
    dt = x_MK.dtype
    if TensorDescriptor is None or dt not in (torch.bfloat16, torch.float16):
        return False
    if not 0 < x_MK.shape[0] <= MAX_ROWS or 0 in w_NK.shape:
        return False
    if x_MK.device.type == "cuda":
        if not _device_ok(x_MK.device.index if x_MK.device.index is not None else torch.cuda.current_device()):
            return False
        epi = _epilogue(residual_MN, w2_NK)
        cfg = CONFIGS[epi]
        if triton.cdiv(w_NK.shape[0], cfg["BLOCK_N"]) > sm_count(x_MK.device) * programs_per_sm(
                x_MK.device, _smem(cfg, epi)):
            return False  # more than one wave of programs: slower than cuBLAS (ONE_WAVE)
    elif not INTERPRET:
        return False
    es = dt.itemsize
    for t in (x_MK, w_NK, w2_NK):
        if t is not None and (t.dtype != dt or t.stride(1) != 1 or (t.stride(0) * es) % 16 or t.stride(0) == 0):
            return False
    return all(t is None or (t.dtype == dt and t.stride(-1) == 1) for t in (bias_N, residual_MN))
