"""L2 prefetch of a weight's leading columns: for each row r < R of w_NK, its first `lines` 128-byte lines are
requested into the GPU's L2 (`prefetch.global.L2`, one instruction per line: no registers filled, nothing waited
for, no value changed). A decode step issues it on a side stream for a layer's MLP weights while the layer's
latency-bound kernels (norms, q/k/v, o_proj) leave the memory bus idle; the MLP's GEMMs then find those columns in
L2 (r1train.generation.fused, PREFETCH). A hint only: the reference is doing nothing."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LINE_BYTES = 128
EVICT = ("normal", "last")


@triton.jit
def _prefetch_kernel(ptr, R, L, stride_r, ELEMS_PER_LINE: tl.constexpr, EVICT_LAST: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_L: tl.constexpr):
    r = tl.minimum(tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R), R - 1)  # past-the-end rows repeat the last
    for l0 in range(0, L, BLOCK_L):
        ln = tl.minimum(l0 + tl.arange(0, BLOCK_L), L - 1)
        p = ptr + r[:, None].to(tl.int64) * stride_r + ln[None, :] * ELEMS_PER_LINE
        if EVICT_LAST:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [p],
                                      dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                                      is_pure=False, pack=1)


def l2_prefetch(w_NK: torch.Tensor, lines: int, evict: str = "normal", block_r: int = 32) -> None:
    """Prefetch the first `lines` 128-byte lines of every row of the CUDA tensor w_NK (unit stride along its last
    axis, rows 128-byte aligned or not: a line is fetched whole). evict: the L2 eviction priority ('normal' |
    'last')."""
    if not w_NK.is_cuda or w_NK.numel() == 0 or lines <= 0:
        return
    R, K = w_NK.shape
    per_line = LINE_BYTES // w_NK.element_size()
    L = min(lines, triton.cdiv(K, per_line))
    _prefetch_kernel[(triton.cdiv(R, block_r),)](
        w_NK, R, L, w_NK.stride(0), ELEMS_PER_LINE=per_line, EVICT_LAST=EVICT.index(evict) == 1, BLOCK_R=block_r,
        BLOCK_L=min(32, triton.next_power_of_2(L)), num_warps=4)
