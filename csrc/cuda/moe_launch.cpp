// CUDA bindings of the MoE routing ops (schemas in csrc/moe.cpp): tensors -> pointers -> csrc/cuda/moe.cu.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "moe.h"

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: R1K_CHECK(false, "MoE CUDA kernels take float32, bfloat16 or float16 tensors, got ", t);
  }
  return -1;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits_in, const at::Tensor& bias,
                                                              int64_t top_k, int64_t n_group, int64_t topk_group,
                                                              double scale, bool norm) {
  R1K_CHECK_CUDA(logits_in);
  R1K_CHECK(logits_in.dim() == 2, "logits must be [T, E]");
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  R1K_CHECK(r1k::moe_route_supported(E, n_group, top_k), "CUDA gate: unsupported E=", E, " n_group=", n_group,
            " top_k=", top_k);
  R1K_CHECK(topk_group >= 1 && topk_group <= n_group && top_k <= topk_group * (E / n_group), "bad routing config");
  c10::cuda::CUDAGuard guard(logits_in.device());
  at::Tensor logits = logits_in.contiguous();
  at::Tensor b = bias.to(at::kFloat).contiguous();
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor w = at::empty({T, top_k}, f32), s = at::empty({T, top_k}, f32);
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  check(r1k::moe_route_fwd(logits.data_ptr(), dtype_code(logits.scalar_type()), b.data_ptr<float>(), T, E, n_group,
                           topk_group, top_k, static_cast<float>(scale), norm, w.data_ptr<float>(),
                           ids.data_ptr<int64_t>(), s.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
        "moe_route");
  return {w, ids, s};
}

at::Tensor moe_route_backward_cuda(const at::Tensor& grad_w, const at::Tensor& ids, const at::Tensor& s_sel,
                                   int64_t num_experts, double scale, bool norm, at::ScalarType dtype) {
  R1K_CHECK_CUDA(grad_w);
  c10::cuda::CUDAGuard guard(grad_w.device());
  const int64_t T = ids.size(0), K = ids.size(1);
  at::Tensor g = grad_w.to(at::kFloat).contiguous(), s = s_sel.to(at::kFloat).contiguous();
  at::Tensor i = ids.to(at::kLong).contiguous();
  at::Tensor out = at::empty({T, num_experts}, grad_w.options().dtype(dtype));
  check(r1k::moe_route_bwd(g.data_ptr<float>(), i.data_ptr<int64_t>(), s.data_ptr<float>(), T, num_experts, K,
                           static_cast<float>(scale), norm, out.data_ptr(), dtype_code(dtype),
                           c10::cuda::getCurrentCUDAStream()),
        "moe_route_backward");
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_permute_index_cuda(const at::Tensor& ids, int64_t num_experts) {
  R1K_CHECK_CUDA(ids);
  R1K_CHECK(num_experts >= 1 && num_experts <= 1024, "CUDA permute supports 1..1024 experts");
  c10::cuda::CUDAGuard guard(ids.device());
  at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t N = flat.numel();
  at::Tensor ws = at::empty({std::max<int64_t>(r1k::moe_permute_workspace(N, num_experts), 1)},
                            flat.options().dtype(at::kInt));
  at::Tensor row_map = at::empty({N}, flat.options());
  at::Tensor tpe = at::empty({num_experts}, flat.options());
  check(r1k::moe_permute_index(flat.data_ptr<int64_t>(), N, num_experts, ws.data_ptr<int32_t>(),
                               row_map.data_ptr<int64_t>(), tpe.data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()),
        "moe_permute_index");
  return {row_map, tpe};
}

at::Tensor moe_permute_cuda(const at::Tensor& hidden_in, const at::Tensor& row_map_in, int64_t top_k) {
  R1K_CHECK_CUDA(hidden_in);
  c10::cuda::CUDAGuard guard(hidden_in.device());
  at::Tensor hidden = hidden_in.contiguous(), row_map = row_map_in.to(at::kLong).contiguous();
  const int64_t T = hidden.size(0), H = hidden.size(1);
  R1K_CHECK(row_map.numel() == T * top_k, "row_map must have T*top_k entries");
  at::Tensor out = at::empty({T * top_k, H}, hidden.options());
  check(r1k::moe_permute_rows(hidden.data_ptr(), row_map.data_ptr<int64_t>(), T, top_k, H,
                              dtype_code(hidden.scalar_type()), out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "moe_permute");
  return out;
}

at::Tensor moe_unpermute_cuda(const at::Tensor& x_in, const at::Tensor& row_map_in,
                              const std::optional<at::Tensor>& w_in, int64_t top_k) {
  R1K_CHECK_CUDA(x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous(), row_map = row_map_in.to(at::kLong).contiguous();
  R1K_CHECK(x.size(0) % top_k == 0 && row_map.numel() == x.size(0), "x and row_map must have T*top_k rows");
  const int64_t T = x.size(0) / top_k, H = x.size(1);
  at::Tensor w;
  if (w_in.has_value()) w = w_in->to(at::kFloat).contiguous();
  at::Tensor out = at::empty({T, H}, x.options());
  check(r1k::moe_unpermute_rows(x.data_ptr(), row_map.data_ptr<int64_t>(), w.defined() ? w.data_ptr<float>() : nullptr,
                                T, top_k, H, dtype_code(x.scalar_type()), out.data_ptr(),
                                c10::cuda::getCurrentCUDAStream()),
        "moe_unpermute");
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                               const at::Tensor& row_map_in, const at::Tensor& w_in) {
  R1K_CHECK_CUDA(grad_out_in);
  c10::cuda::CUDAGuard guard(grad_out_in.device());
  at::Tensor x = x_in.contiguous(), row_map = row_map_in.to(at::kLong).contiguous();
  at::Tensor g = grad_out_in.to(x.scalar_type()).contiguous(), w = w_in.to(at::kFloat).contiguous();
  const int64_t T = w.size(0), K = w.size(1), H = x.size(1);
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_w = at::empty({T, K}, w.options());
  check(r1k::moe_unpermute_bwd(g.data_ptr(), x.data_ptr(), row_map.data_ptr<int64_t>(), w.data_ptr<float>(), T, K, H,
                               dtype_code(x.scalar_type()), grad_x.data_ptr(), grad_w.data_ptr<float>(),
                               c10::cuda::getCurrentCUDAStream()),
        "moe_unpermute_backward");
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_route_backward", &moe_route_backward_cuda);
  m.impl("moe_permute_index", &moe_permute_index_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cuda);
}
