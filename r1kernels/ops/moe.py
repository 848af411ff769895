"""MoE routing ops: the C++/CUDA ops torch.ops.r1kernels.moe_* (schemas in csrc/moe.cpp) and the Triton
custom ops r1kernels::moe_*_triton, each with a fake (torch.compile). The ops are not differentiable by
themselves: each backend's route / permute / unpermute is one torch.autograd.Function over its ops
(`_autograd`), the one autograd path of eager and torch.compile(fullgraph=True) calls (dynamo traces the
Function; the fakes give the shapes). The functions at the bottom take the reference's positional
signatures (r1kernels/reference/moe.py) and are listed in r1kernels._backend.KERNELS.

Why Functions and not torch.library.register_autograd: a registered Python autograd kernel adds a
C++ -> Python -> C++ round trip (boxing, redispatch) to every eager call. Measured on a 2-core CPU VM
(torch 2.13, best of 9 x 3000 calls): a trivial custom op with register_autograd 40 us per call, an
autograd.Function over the same op 21 us, the body alone 4.6 us; the C++ ops through these Functions cost
what the former eager-only Functions did (route fwd 61.7 vs 61.1 us with the C++ CPU kernel at T=2, E=32;
unpermute fwd 15.5 vs 18.4 us, fwd+bwd 95.5 vs 101.3 us).

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


def _route_bwd_fake(grad_w, ids, s_sel, num_experts, scale, norm, dtype):
    return grad_w.new_empty(ids.shape[0], num_experts, dtype=dtype)


def _permute_fake(hidden, row_map, top_k):
    return hidden.new_empty(hidden.shape[0] * top_k, hidden.shape[1])


def _unpermute_fake(x, row_map, weights, top_k):
    return x.new_empty(x.shape[0] // top_k, x.shape[1])


def _unpermute_bwd_fake(grad_out, x, row_map, weights):
    return torch.empty_like(x), weights.new_empty(weights.shape, dtype=torch.float32)


def _autograd(route_op, route_bwd_op, permute_op, unpermute_op, unpermute_bwd_op):
    """(route, permute, unpermute) of one backend: autograd.Function.apply over its five ops.
    route(logits, bias, top_k, n_group, topk_group, scale, norm) -> (w, ids); permute(hidden, row_map, top_k)
    -> [T*K, H]; unpermute(x, row_map, w) -> [T, H]."""

    class Route(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, bias, top_k, n_group, topk_group, scale, norm):
            w, ids, s_sel = route_op(logits, bias, top_k, n_group, topk_group, scale, norm)
            ctx.save_for_backward(ids, s_sel)
            ctx.meta = (logits.shape[1], scale, norm, logits.dtype)
            ctx.mark_non_differentiable(ids)
            ctx.set_materialize_grads(False)  # no zero-filled [T, K] int64 grad for the ids
            return w, ids

        @staticmethod
        def backward(ctx, grad_w, grad_ids):
            if grad_w is None:
                return (None,) * 7
            ids, s_sel = ctx.saved_tensors
            return (route_bwd_op(grad_w, ids, s_sel, *ctx.meta),) + (None,) * 6

    class Permute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, row_map, top_k):
            ctx.save_for_backward(row_map)
            ctx.top_k = top_k
            return permute_op(hidden, row_map, top_k)

        @staticmethod
        def backward(ctx, grad):
            (row_map,) = ctx.saved_tensors
            return unpermute_op(grad, row_map, None, ctx.top_k), None, None  # the sum of each token's K rows

    class Unpermute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, row_map, w):
            ctx.save_for_backward(x, row_map, w)
            return unpermute_op(x, row_map, w, w.shape[1])

        @staticmethod
        def backward(ctx, grad):
            x, row_map, w = ctx.saved_tensors
            gx, gw = unpermute_bwd_op(grad, x, row_map, w)
            return gx, None, gw.to(w.dtype)

    return Route.apply, Permute.apply, Unpermute.apply


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


def route_eligible(logits, bias, top_k, n_group, topk_group, *a, **k):
    E = logits.shape[1]
    return (logits.dtype in _FLOAT and E in (32, 64, 128, 256, 512) and 1 <= n_group <= 32
            and n_group & (n_group - 1) == 0 and top_k <= 32)


def _float_only(x, *a, **k):
    return x.dtype in _FLOAT


def _permute_eligible(hidden, topk_ids, *a, **k):  # K = 0 (no expert per token): the reference
    return hidden.dtype in _FLOAT and topk_ids.shape[1] > 0


CUDA_PERMUTE_MAX_EXPERTS = 1024  # moe_permute_index_cuda (csrc/cuda/moe_launch.cpp) takes 1..1024 experts


def _permute_cuda_eligible(hidden, topk_ids, num_experts, *a, **k):
    """_permute_eligible within the CUDA index kernel's expert count (more: Triton's sort-based index or the
    reference, as backend auto picks)."""
    return _permute_eligible(hidden, topk_ids) and 1 <= num_experts <= CUDA_PERMUTE_MAX_EXPERTS


def _unpermute_eligible(x, row_map, weights, *a, **k):  # the kernels divide the T*K rows by K
    return x.dtype in _FLOAT and weights.shape[1] > 0


# ---------------------------------------------------------------- C++ / CUDA ops (r1kernels._C)
OPS = torch.ops.r1kernels if _backend.HAS_EXTENSION else None
HAS_CPP = _backend.HAS_EXTENSION and hasattr(torch.ops.r1kernels, "moe_route")

if HAS_CPP:
    for _name, _fake in (("moe_route", _route_fake), ("moe_route_backward", _route_bwd_fake),
                         ("moe_permute", _permute_fake), ("moe_unpermute", _unpermute_fake),
                         ("moe_unpermute_backward", _unpermute_bwd_fake)):
        torch.library.register_fake(f"r1kernels::{_name}")(_fake)

    @torch.library.register_fake("r1kernels::moe_permute_index")
    def _(ids, num_experts):
        return ids.new_empty(ids.numel(), dtype=torch.int64), ids.new_empty(num_experts, dtype=torch.int64)

    _route_cpp, _permute_cpp, _unpermute_cpp = _autograd(
        OPS.moe_route.default, OPS.moe_route_backward.default, OPS.moe_permute.default, OPS.moe_unpermute.default,
        OPS.moe_unpermute_backward.default)

    def route_cuda(logits, bias, top_k, n_group, topk_group, scale=1.0, norm=True):
        return _route_cpp(logits, bias, top_k, n_group, topk_group, float(scale), bool(norm))

    def permute_cuda(hidden, topk_ids, num_experts):
        row_map, counts = OPS.moe_permute_index(topk_ids, num_experts)
        return _permute_cpp(hidden, row_map, topk_ids.shape[1]), row_map, counts

    def unpermute_cuda(expert_out, row_map, topk_weights):
        return _unpermute_cpp(expert_out, row_map, topk_weights)

    _cuda = {"cuda"} if _backend.extension_has("moe_route", "CUDA") else set()
    route_cuda.devices = permute_cuda.devices = unpermute_cuda.devices = _cuda
    route_cuda.eligible = route_eligible
    permute_cuda.eligible = _permute_cuda_eligible
    unpermute_cuda.eligible = _unpermute_eligible


# ---------------------------------------------------------------- Triton custom ops
if _backend.HAS_TRITON:
    from ..triton import moe as _tk

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
    _route_bwd_triton.register_fake(_route_bwd_fake)
    _permute_triton.register_fake(_permute_fake)
    _unpermute_triton.register_fake(_unpermute_fake)
    _unpermute_bwd_triton.register_fake(_unpermute_bwd_fake)

    _route_tk, _permute_tk, _unpermute_tk = _autograd(_route_triton, _route_bwd_triton, _permute_triton,
                                                      _unpermute_triton, _unpermute_bwd_triton)

    def route_triton(logits, bias, top_k, n_group, topk_group, scale=1.0, norm=True):
        return _route_tk(logits, bias, top_k, n_group, topk_group, float(scale), bool(norm))

    def permute_index_torch(topk_ids, num_experts):
        """row_map and counts by a stable sort (the Triton path's index; the CUDA path has a kernel). Counts
        by scatter_add_, not bincount (whose CUDA kernel reads the max id on the host)."""
        flat = topk_ids.reshape(-1).long()
        order = torch.sort(flat, stable=True).indices
        row_map = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
        return row_map, counts

    def permute_triton(hidden, topk_ids, num_experts):
        row_map, counts = permute_index_torch(topk_ids, num_experts)
        return _permute_tk(hidden, row_map, topk_ids.shape[1]), row_map, counts

    def unpermute_triton(expert_out, row_map, topk_weights):
        return _unpermute_tk(expert_out, row_map, topk_weights)

    route_triton.eligible = lambda logits, bias, top_k, n_group, *a, **k: (
        logits.dtype in _FLOAT and logits.shape[1] <= 1024)
    permute_triton.eligible = _permute_eligible
    unpermute_triton.eligible = _unpermute_eligible
