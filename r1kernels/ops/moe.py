"""MoE routing ops: the C++/CUDA ops torch.ops.r1kernels.moe_* (schemas in csrc/moe.cpp) and Triton custom
ops r1kernels::moe_*_triton, each with a fake (torch.compile) and autograd. The functions at the bottom
take the reference's positional signatures (r1kernels/reference/moe.py) and are listed in
r1kernels._backend.KERNELS.

Gradients: route -> logits through the gathered sigmoid weights only (ids, bias: none); permute ->
hidden by summing the K copies; unpermute -> expert rows (w * grad) and weights (<grad, row>).
"""
from __future__ import annotations

import torch

from .. import _backend

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _route_fake(logits, bias, top_k, n_group, topk_group, scale, norm):
    T = logits.shape[0]
    w = logits.new_empty(T, top_k, dtype=torch.float32)
    return w, logits.new_empty(T, top_k, dtype=torch.int64), torch.empty_like(w)


def _route_setup(ctx, inputs, output):
    logits, _, _, _, _, scale, norm = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.meta = (logits.shape[1], scale, norm, logits.dtype)


def _permute_fake(hidden, row_map, top_k):
    return hidden.new_empty(hidden.shape[0] * top_k, hidden.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.top_k = inputs[2]


def _unpermute_fake(x, row_map, weights, top_k):
    return x.new_empty(x.shape[0] // top_k, x.shape[1])


def _unpermute_setup(ctx, inputs, output):
    x, row_map, weights, top_k = inputs
    ctx.save_for_backward(x, row_map, weights)
    ctx.top_k = top_k


def _unpermute_bwd_fake(grad_out, x, row_map, weights):
    return torch.empty_like(x), weights.new_empty(weights.shape, dtype=torch.float32)


def _register(ns, route_bwd, unpermute, unpermute_bwd, permute_op, unpermute_op, route_op):
    """Autograd for one backend's route / permute / unpermute ops (ns: how the backward ops are called)."""

    def route_backward(ctx, grad_w, grad_ids, grad_s):
        ids, s_sel = ctx.saved_tensors
        E, scale, norm, dtype = ctx.meta
        if grad_w is None:
            return (None,) * 7
        return route_bwd(grad_w, ids, s_sel, E, scale, norm, dtype), None, None, None, None, None, None

    def permute_backward(ctx, grad):
        (row_map,) = ctx.saved_tensors
        return unpermute(grad, row_map, None, ctx.top_k), None, None

    def unpermute_backward(ctx, grad):
        x, row_map, weights = ctx.saved_tensors
        if weights is None:  # the sum of the K rows (the backward of permute): no second derivative here
            return permute_op(grad, row_map, ctx.top_k), None, None, None
        gx, gw = unpermute_bwd(grad, x, row_map, weights)
        return gx, None, gw.to(weights.dtype), None

    torch.library.register_autograd(route_op, route_backward, setup_context=_route_setup)
    torch.library.register_autograd(permute_op, permute_backward, setup_context=_permute_setup)
    torch.library.register_autograd(unpermute_op, unpermute_backward, setup_context=_unpermute_setup)


class _Bf16RouterLinear(torch.autograd.Function):
    """logits = bf16(hidden) @ bf16(weight).T accumulated and returned in fp32; backward with bf16 operands."""

    @staticmethod
    def forward(ctx, hidden, weight):
        hb, wb = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(hb, wb)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return _mm_f32(hb, wb.t())

    @staticmethod
    def backward(ctx, grad):
        hb, wb = ctx.saved_tensors
        gb = grad.to(torch.bfloat16)
        gh = gw = None
        if ctx.needs_input_grad[0]:  # bf16 hidden: a bf16 GEMM (fp32 accumulation), no fp32 [T, H] round trip
            gh = torch.mm(gb, wb) if ctx.dtypes[0] == torch.bfloat16 else _mm_f32(gb, wb).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            gw = _mm_f32(gb.t(), hb).to(ctx.dtypes[1])
        return gh, gw


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=fp32) on CUDA bf16 (torch >= 2.8); else bf16 output


def _mm_f32(a, b):
    if a.is_cuda:
        if _MM_OUT_DTYPE[0]:
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE[0] = False
        return torch.mm(a, b).float()
    return a.float() @ b.float()  # the same products (bf16 operands are exact in fp32), fp32 accumulation


def router_logits(hidden, weight, gemm_dtype=None):
    """[T, H] x [E, H] -> fp32 [T, E]: fp32 GEMM (gemm_dtype None / float32, as transformers), or bf16
    operands with fp32 accumulation."""
    if gemm_dtype == torch.bfloat16:
        return _Bf16RouterLinear.apply(hidden, weight)
    return torch.nn.functional.linear(hidden.float(), weight.float())


# ---------------------------------------------------------------- eager fast path
# In eager mode the public functions call the kernels through plain autograd.Functions, below the
# dispatcher's autograd layer (the torch.library autograd wrappers cost tens of microseconds per call,
# more than the gate kernel itself); under torch.compile they call the registered custom ops.
class _Impl:
    """One backend's raw callables: route_fwd/route_bwd/permute_rows/unpermute_rows/unpermute_bwd."""

    def __init__(self, route_fwd, route_bwd, permute_rows, unpermute_rows, unpermute_bwd):
        self.route_fwd, self.route_bwd = route_fwd, route_bwd
        self.permute_rows, self.unpermute_rows, self.unpermute_bwd = permute_rows, unpermute_rows, unpermute_bwd


class _RouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bias, top_k, n_group, topk_group, scale, norm, impl):
        with torch._C._AutoDispatchBelowAutograd():
            w, ids, s = impl.route_fwd(logits, bias, top_k, n_group, topk_group, scale, norm)
        ctx.save_for_backward(ids, s)
        ctx.meta = (logits.shape[1], scale, norm, logits.dtype, impl)
        ctx.mark_non_differentiable(ids)
        ctx.set_materialize_grads(False)  # no zero-filled [T, K] int64 grad for the ids
        return w, ids

    @staticmethod
    def backward(ctx, grad_w, grad_ids):
        if grad_w is None:
            return (None,) * 8
        ids, s = ctx.saved_tensors
        E, scale, norm, dtype, impl = ctx.meta
        with torch._C._AutoDispatchBelowAutograd():
            g = impl.route_bwd(grad_w, ids, s, E, scale, norm, dtype)
        return g, None, None, None, None, None, None, None


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, row_map, top_k, impl):
        ctx.save_for_backward(row_map)
        ctx.meta = (top_k, impl)
        with torch._C._AutoDispatchBelowAutograd():
            return impl.permute_rows(hidden, row_map, top_k)

    @staticmethod
    def backward(ctx, grad):
        (row_map,) = ctx.saved_tensors
        top_k, impl = ctx.meta
        with torch._C._AutoDispatchBelowAutograd():
            return impl.unpermute_rows(grad, row_map, None, top_k), None, None, None


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_map, w, impl):
        ctx.save_for_backward(x, row_map, w)
        ctx.impl = impl
        with torch._C._AutoDispatchBelowAutograd():
            return impl.unpermute_rows(x, row_map, w, w.shape[1])

    @staticmethod
    def backward(ctx, grad):
        x, row_map, w = ctx.saved_tensors
        with torch._C._AutoDispatchBelowAutograd():
            gx, gw = ctx.impl.unpermute_bwd(grad, x, row_map, w)
        return gx, None, gw.to(w.dtype), None


def _compiling():
    return torch.compiler.is_compiling()


def route_eligible(logits, bias, top_k, n_group, topk_group, *a, **k):
    E = logits.shape[1]
    return (logits.dtype in _FLOAT and E in (32, 64, 128, 256, 512) and 1 <= n_group <= 32
            and n_group & (n_group - 1) == 0 and top_k <= 32)


def _float_only(x, *a, **k):
    return x.dtype in _FLOAT


# ---------------------------------------------------------------- C++ / CUDA ops (r1kernels._C)
OPS = torch.ops.r1kernels if _backend.HAS_EXTENSION else None
HAS_CPP = _backend.HAS_EXTENSION and hasattr(torch.ops.r1kernels, "moe_route")

if HAS_CPP:
    torch.library.register_fake("r1kernels::moe_route")(_route_fake)
    torch.library.register_fake("r1kernels::moe_permute")(_permute_fake)
    torch.library.register_fake("r1kernels::moe_unpermute")(_unpermute_fake)
    torch.library.register_fake("r1kernels::moe_unpermute_backward")(_unpermute_bwd_fake)

    @torch.library.register_fake("r1kernels::moe_route_backward")
    def _(grad_w, ids, s_sel, num_experts, scale, norm, dtype):
        return grad_w.new_empty(ids.shape[0], num_experts, dtype=dtype)

    @torch.library.register_fake("r1kernels::moe_permute_index")
    def _(ids, num_experts):
        return ids.new_empty(ids.numel(), dtype=torch.int64), ids.new_empty(num_experts, dtype=torch.int64)

    _register("cpp", OPS.moe_route_backward, OPS.moe_unpermute, OPS.moe_unpermute_backward,
              OPS.moe_permute.default, OPS.moe_unpermute.default, OPS.moe_route.default)

    _CPP = _Impl(OPS.moe_route.default, OPS.moe_route_backward.default, OPS.moe_permute.default,
                 OPS.moe_unpermute.default, OPS.moe_unpermute_backward.default)

    def route_cuda(logits, bias, top_k, n_group, topk_group, scale=1.0, norm=True):
        if not _compiling():
            return _RouteFn.apply(logits, bias, top_k, n_group, topk_group, float(scale), bool(norm), _CPP)
        w, ids, _ = OPS.moe_route(logits, bias, top_k, n_group, topk_group, float(scale), bool(norm))
        return w, ids

    def permute_cuda(hidden, topk_ids, num_experts):
        row_map, counts = OPS.moe_permute_index(topk_ids, num_experts)
        if not _compiling():
            return _PermuteFn.apply(hidden, row_map, topk_ids.shape[1], _CPP), row_map, counts
        return OPS.moe_permute(hidden, row_map, topk_ids.shape[1]), row_map, counts

    def unpermute_cuda(expert_out, row_map, topk_weights):
        if not _compiling():
            return _UnpermuteFn.apply(expert_out, row_map, topk_weights, _CPP)
        return OPS.moe_unpermute(expert_out, row_map, topk_weights, topk_weights.shape[1])

    _cuda = {"cuda"} if _backend.extension_has("moe_route", "CUDA") else set()
    route_cuda.devices = permute_cuda.devices = unpermute_cuda.devices = _cuda
    route_cuda.eligible = route_eligible
    permute_cuda.eligible = _float_only
    unpermute_cuda.eligible = _float_only


# ---------------------------------------------------------------- Triton custom ops
try:
    from ..triton import moe as _tk
except ImportError:  # no triton
    _tk = None

if _tk is not None:
    @torch.library.custom_op("r1kernels::moe_route_triton", mutates_args=())
    def _route_triton(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                      scale: float, norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _tk.route_fwd(logits.contiguous(), bias.float().contiguous(), top_k, n_group, topk_group, scale,
                             norm)

    @torch.library.custom_op("r1kernels::moe_route_backward_triton", mutates_args=())
    def _route_bwd_triton(grad_w: torch.Tensor, ids: torch.Tensor, s_sel: torch.Tensor, num_experts: int,
                          scale: float, norm: bool, dtype: torch.dtype) -> torch.Tensor:
        return _tk.route_bwd(grad_w.float().contiguous(), ids.contiguous(), s_sel.contiguous(), num_experts, scale,
                             norm, dtype)

    @torch.library.custom_op("r1kernels::moe_permute_triton", mutates_args=())
    def _permute_triton(hidden: torch.Tensor, row_map: torch.Tensor, top_k: int) -> torch.Tensor:
        return _tk.permute_rows(hidden.contiguous(), row_map.contiguous(), top_k)

    @torch.library.custom_op("r1kernels::moe_unpermute_triton", mutates_args=())
    def _unpermute_triton(x: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None,
                          top_k: int) -> torch.Tensor:
        w = weights.float().contiguous() if weights is not None else None
        return _tk.unpermute_rows(x.contiguous(), row_map.contiguous(), w, top_k)

    @torch.library.custom_op("r1kernels::moe_unpermute_backward_triton", mutates_args=())
    def _unpermute_bwd_triton(grad_out: torch.Tensor, x: torch.Tensor, row_map: torch.Tensor,
                              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.unpermute_bwd(grad_out.to(x.dtype).contiguous(), x.contiguous(), row_map.contiguous(),
                                 weights.float().contiguous())

    _route_triton.register_fake(_route_fake)
    _permute_triton.register_fake(_permute_fake)
    _unpermute_triton.register_fake(_unpermute_fake)
    _unpermute_bwd_triton.register_fake(_unpermute_bwd_fake)

    @_route_bwd_triton.register_fake
    def _(grad_w, ids, s_sel, num_experts, scale, norm, dtype):
        return grad_w.new_empty(ids.shape[0], num_experts, dtype=dtype)

    _register("triton", _route_bwd_triton, _unpermute_triton, _unpermute_bwd_triton, _permute_triton,
              _unpermute_triton, _route_triton)

    _TK = _Impl(
        lambda x, b, *a: _tk.route_fwd(x.contiguous(), b.float().contiguous(), *a),
        lambda g, ids, s, *a: _tk.route_bwd(g.float().contiguous(), ids, s, *a),
        lambda h, rm, k: _tk.permute_rows(h.contiguous(), rm, k),
        lambda x, rm, w, k: _tk.unpermute_rows(x.contiguous(), rm, None if w is None else w.float().contiguous(), k),
        lambda g, x, rm, w: _tk.unpermute_bwd(g.to(x.dtype).contiguous(), x.contiguous(), rm, w.float().contiguous()))

    def route_triton(logits, bias, top_k, n_group, topk_group, scale=1.0, norm=True):
        if not _compiling():
            return _RouteFn.apply(logits, bias, top_k, n_group, topk_group, float(scale), bool(norm), _TK)
        w, ids, _ = _route_triton(logits, bias, top_k, n_group, topk_group, float(scale), bool(norm))
        return w, ids

    def permute_index_torch(topk_ids, num_experts):
        """row_map and counts by a stable sort (the Triton path's index; the CUDA path has a kernel)."""
        flat = topk_ids.reshape(-1).long()
        order = torch.sort(flat, stable=True).indices
        row_map = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return row_map, torch.bincount(flat, minlength=num_experts)

    def permute_triton(hidden, topk_ids, num_experts):
        row_map, counts = permute_index_torch(topk_ids, num_experts)
        if not _compiling():
            return _PermuteFn.apply(hidden, row_map, topk_ids.shape[1], _TK), row_map, counts
        return _permute_triton(hidden, row_map, topk_ids.shape[1]), row_map, counts

    def unpermute_triton(expert_out, row_map, topk_weights):
        if not _compiling():
            return _UnpermuteFn.apply(expert_out, row_map, topk_weights, _TK)
        return _unpermute_triton(expert_out, row_map, topk_weights, topk_weights.shape[1])

    route_triton.eligible = lambda logits, bias, top_k, n_group, *a, **k: (
        logits.dtype in _FLOAT and logits.shape[1] <= 1024)
    permute_triton.eligible = _float_only
    unpermute_triton.eligible = _float_only
