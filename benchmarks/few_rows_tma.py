"""An experiment, not used by the engine until it measures faster than cuBLAS (bench_decode_gemm --few-rows;
the two earlier few-row GEMMs, Triton with pointer loads and CUDA mma.sync, lost: benchmarks/NOTES-decode-gemm.md).
Few-row bf16 GEMM for the decode step, out[M, N] = x[M, K] @ W[N, K]^T with M <= 64, loading both operands
with tensor-memory-accelerator descriptors (host-built, so a captured CUDA graph keeps them), pipelined over K,
and one of three epilogues:

  "none"      out = acc (+ bias)
  "residual"  res += acc, in place (o_proj / down_proj adding the layer's residual)
  "silu_gate" out = silu(x @ Wg^T) * (x @ Wu^T): gate and up as two accumulators of one program, so the
              [M, 2I] intermediate is never written
Program p owns weight rows [p * BLOCK_N, (p + 1) * BLOCK_N); the x tile rows past M are zero-filled by the
descriptor (no bytes read). Accumulation in fp32, one rounding at the store."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EPILOGUES = ("none", "residual", "silu_gate")


@triton.jit
def _few_rows_kernel(x_desc, w_desc, w2_desc, out_ptr, bias_ptr, M, N, K, stride_om,
                     EPI: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        x = x_desc.load([0, k0])
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
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EPI == 1:
        acc += tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
    if EPI == 2:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=msk)


DEFAULT_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "STAGES": 4, "num_warps": 4}


def few_rows_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, *, bias_N=None, epilogue: str = "none",
                    w2_NK: torch.Tensor | None = None, out_MN: torch.Tensor | None = None, config=None):
    """x_MK [M <= 64, K] contiguous; w_NK (and w2_NK for silu_gate) [N, K] with unit stride along K.
    epilogue "residual": out_MN is the residual, updated in place and returned."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if M > 64:
        raise ValueError(f"x_MK: at most 64 rows, got {M}")
    if (epilogue == "silu_gate") != (w2_NK is not None):
        raise ValueError("w2_NK: required by epilogue='silu_gate' and only by it")
    if epilogue == "residual" and (out_MN is None or out_MN.shape != (M, N)):
        raise ValueError(f"out_MN: the residual [{M}, {N}] is required by epilogue='residual'")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if INTERPRET:
        bn, bk = min(bn, 16), min(bk, 32)
    bm = 64 if not INTERPRET else max(16, triton.next_power_of_2(M))
    if out_MN is None:
        out_MN = x_MK.new_empty(M, N)
    x_desc = TensorDescriptor.from_tensor(x_MK, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w_NK, [bn, bk])
    w2_desc = TensorDescriptor.from_tensor(w2_NK, [bn, bk]) if w2_NK is not None else w_desc
    _few_rows_kernel[(triton.cdiv(N, bn),)](
        x_desc, w_desc, w2_desc, out_MN, bias_N if bias_N is not None else out_MN, M, N, K, out_MN.stride(0),
        EPI=EPILOGUES.index(epilogue), HAS_BIAS=bias_N is not None, DOT_F32=INTERPRET or x_MK.device.type != "cuda",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"], num_warps=cfg["num_warps"])
    return out_MN
