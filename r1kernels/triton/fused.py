"""Triton kernels: the small fused ops of a Qwen2/Llama layer, forward (the decode step and training) and
backward (training); r1kernels.reference.fused is the spec, its torch autograd the spec of the backwards.

No host synchronization (the forward launchers are replayed inside CUDA graphs): outputs are allocated with
torch.empty*, grids depend on shapes only. fp32 math inside, plain tl.* ops.
- _rms_norm_kernel: ROWS rows of [M, H] per program, the whole row in one block (H <= MAX_H).
- _rms_norm_bwd_kernel: a run of rows per program (the whole row in one block); recomputes rsqrt(mean(x^2))
  from x (nothing but x is saved), writes dx and the program's fp32 partial sum of dweight (summed after).
- _rotary_kernel: grid (B * T, q head blocks + k head blocks): one program rotates BH heads of q or of k at
  one (b, t), the two halves of D loaded separately (no gather), cos/sin loaded once per program.
- _silu_mul_kernel: grid (rows, column blocks) over [M, C] inputs with their own row strides, so the two
  halves of one fused gate/up projection are read in place. _silu_mul_bwd_kernel: the same grid, reads
  gate, up and the output's gradient once, writes both input gradients.
- The rotary backward is the rotation by -sin (apply_rotary(dq, dk, cos, -sin)): no kernel of its own.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import sm_count

MAX_H = 65536


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, M, H, sx, so, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    cm = cols < H
    m = (rows < M)[:, None] & cm[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=1) / H
    r = tl.rsqrt(var + eps)
    # HF rounds the normalized row to the input dtype before the weight product.
    h = (x * r[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    y = h * w[None, :]
    tl.store(o_ptr + r64[:, None] * so + cols[None, :], y.to(o_ptr.dtype.element_ty), mask=m)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    H = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if out.numel() == 0:  # no rows or H = 0 (reshape(-1, 0) has no row count to infer)
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, H)
    M = x2.shape[0]
    w = weight.contiguous()
    BLOCK = triton.next_power_of_2(H)
    ROWS = max(1, min(16, 2048 // BLOCK, triton.next_power_of_2(M)))
    num_warps = 8 if BLOCK >= 4096 else 4 if BLOCK >= 1024 else 2 if BLOCK * ROWS >= 512 else 1
    _rms_norm_kernel[(triton.cdiv(M, ROWS),)](x2, w, out.view(-1, H), M, H, x2.stride(0), H, float(eps),
                                                ROWS=ROWS, BLOCK=BLOCK, num_warps=num_warps)
    return out


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_ptr, M, H, sx, sdy, eps, ROWS_PER_PROG,
                         HAS_DW: tl.constexpr, BLOCK: tl.constexpr):
    # y = w * round(x * r), r = rsqrt(mean(x^2) + eps); the rounding's gradient is taken as 1 (as autograd
    # of the reference does): dw = sum_rows dy * round(x * r), dx = r * (dh - n * mean(dh * n)), dh = dy * w,
    # n = x * r.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cm = cols < H
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + i
        m = cols < tl.where(row < M, H, 0)
        r64 = row.to(tl.int64)
        x = tl.load(x_ptr + r64 * sx + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64 * sdy + cols, mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        n = x * r
        if HAS_DW:
            dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
        dh = dy * w
        dx = r * (dh - n * (tl.sum(dh * n, axis=0) / H))
        tl.store(dx_ptr + r64 * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
    if HAS_DW:
        tl.store(dw_ptr + pid * H + cols, dw, mask=cm)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
                      need_dw: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx in x's dtype and shape, dweight in weight's dtype or None)."""
    H = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if dx.numel() == 0:  # no rows or H = 0, as in rms_norm
        return dx, (torch.zeros_like(weight) if need_dw else None)
    x2, dy2 = _row_view(x, H), _row_view(dy, H)
    M = x2.shape[0]
    progs = min(M, 4 * sm_count(x.device))
    rows_per = triton.cdiv(M, progs)
    progs = triton.cdiv(M, rows_per)
    part = torch.empty((progs, H) if need_dw else (1,), dtype=torch.float32, device=x.device)
    BLOCK = triton.next_power_of_2(H)
    num_warps = 8 if BLOCK >= 4096 else 4 if BLOCK >= 1024 else 2 if BLOCK >= 256 else 1
    _rms_norm_bwd_kernel[(progs,)](x2, weight.contiguous(), dy2, dx, part, M, H, x2.stride(0), dy2.stride(0),
                                   float(eps), rows_per, HAS_DW=need_dw, BLOCK=BLOCK, num_warps=num_warps)
    return dx, (part.sum(0).to(weight.dtype) if need_dw else None)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, sxb, sxh, sxt, sob, soh, sot, b, t, h0, H, c1, c2, s1, s2,
                  HALF: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr):
    h = (h0 + tl.arange(0, BH)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK)
    m = (h < H)[:, None] & (offs_d < HALF)[None, :]
    src = x_ptr + b * sxb + t * sxt + h[:, None] * sxh + offs_d[None, :]
    dst = o_ptr + b * sob + t * sot + h[:, None] * soh + offs_d[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * c1 - x2 * s1).to(o_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF, (x2 * c2 + x1 * s2).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, c_ptr, s_ptr, T, Hq, Hk, NQB,
                   sqb, sqh, sqt, skb, skh, skt, sob, soh, sot, spb, sph, spt, scb, sct, ssb, sst,
                   HALF: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    hb = tl.program_id(1)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK)
    md = offs_d < HALF
    c1 = tl.load(c_ptr + b * scb + t * sct + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_ptr + b * scb + t * sct + HALF + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_ptr + b * ssb + t * sst + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_ptr + b * ssb + t * sst + HALF + offs_d, mask=md, other=0.0).to(tl.float32)[None, :]
    if hb < NQB:
        _rotate_heads(q_ptr, qo_ptr, sqb, sqh, sqt, sob, soh, sot, b, t, hb * BH, Hq, c1, c2, s1, s2,
                      HALF, BH, BLOCK)
    else:
        _rotate_heads(k_ptr, ko_ptr, skb, skh, skt, spb, sph, spt, b, t, (hb - NQB) * BH, Hk, c1, c2, s1, s2,
                      HALF, BH, BLOCK)


def _out_like(t: torch.Tensor) -> torch.Tensor:
    """An output of t's shape and dtype, in t's memory layout when that is dense (HF's elementwise ops keep
    the [B, T, H, D] layout of transposed projections), else contiguous. Shared with the fake."""
    return torch.empty_like(t if t.stride(-1) == 1 else t.contiguous())


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    cos = cos.expand(B, T, D)
    sin = sin.expand(B, T, D)
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    qo, ko = _out_like(q), _out_like(k)
    if B * T == 0 or D == 0:
        return qo, ko
    half = D // 2
    BLOCK = triton.next_power_of_2(half)
    BH = max(1, min(triton.next_power_of_2(max(Hq, Hk, 1)), 512 // BLOCK))
    nqb, nkb = triton.cdiv(Hq, BH), triton.cdiv(Hk, BH)
    num_warps = 4 if BH * BLOCK >= 1024 else 2 if BH * BLOCK >= 256 else 1
    _rotary_kernel[(B * T, nqb + nkb)](
        q, k, qo, ko, cos, sin, T, Hq, Hk, nqb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=half, BH=BH, BLOCK=BLOCK, num_warps=num_warps)
    return qo, ko


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, C, sg, su, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    g = tl.load(g_ptr + row * sg + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(o_ptr + row * C + cols, y.to(o_ptr.dtype.element_ty), mask=m)


def _row_view(x: torch.Tensor, C: int) -> torch.Tensor:
    x2 = x.reshape(-1, C)  # a view for the halves of one [.., 2C] projection: no copy
    return x2 if x2.stride(1) == 1 else x2.contiguous()


@triton.jit
def _silu_mul_bwd_kernel(g_ptr, u_ptr, dy_ptr, dg_ptr, du_ptr, C, sg, su, sdy, BLOCK: tl.constexpr):
    # y = g * s * u, s = sigmoid(g): du = dy * g * s, dg = dy * u * s * (1 + g * (1 - s))
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    g = tl.load(g_ptr + row * sg + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * sdy + cols, mask=m, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(du_ptr + row * C + cols, (dy * g * s).to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dg_ptr + row * C + cols, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=m)


def silu_mul_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup): contiguous, in gate's / up's dtype and shape."""
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    C = gate.shape[-1] if gate.dim() else 1
    if gate.numel() == 0:
        return dg, du
    g2, u2, dy2 = _row_view(gate, C), _row_view(up, C), _row_view(dy, C)
    BLOCK = min(1024, triton.next_power_of_2(C))
    _silu_mul_bwd_kernel[(g2.shape[0], triton.cdiv(C, BLOCK))](g2, u2, dy2, dg, du, C, g2.stride(0), u2.stride(0),
                                                               dy2.stride(0), BLOCK=BLOCK,
                                                               num_warps=4 if BLOCK >= 512 else 1)
    return dg, du


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    C = gate.shape[-1] if gate.dim() else 1
    if gate.numel() == 0:
        return out
    g2, u2 = _row_view(gate, C), _row_view(up, C)
    BLOCK = min(1024, triton.next_power_of_2(C))
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(C, BLOCK))](g2, u2, out, C, g2.stride(0), u2.stride(0), BLOCK=BLOCK,
                                                           num_warps=4 if BLOCK >= 512 else 1)
    return out
