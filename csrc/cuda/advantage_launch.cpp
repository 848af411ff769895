// CUDA implementation of r1kernels::group_advantages (schema in csrc/advantage.cpp): tensors -> pointers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "advantage.h"

namespace {

at::Tensor group_advantages_cuda(const at::Tensor& rewards, int64_t group_size, std::string scale, double eps,
                                 const std::optional<at::Tensor>& weights) {
  R1K_CHECK_CUDA(rewards);
  R1K_CHECK(rewards.dim() == 1 || rewards.dim() == 2, "rewards must be [N] or [N, R]");
  R1K_CHECK(group_size >= 1 && rewards.size(0) % group_size == 0, "group_size must divide the batch");
  int code = scale == "group" ? 0 : scale == "batch" ? 1 : scale == "none" ? 2 : -1;
  R1K_CHECK(code >= 0, "scale must be 'group', 'batch' or 'none', got '", scale, "'");
  int dt = -1;
  switch (rewards.scalar_type()) {
    case at::kFloat: dt = 0; break;
    case at::kDouble: dt = 1; break;
    case at::kHalf: dt = 2; break;
    case at::kBFloat16: dt = 3; break;
    default: R1K_CHECK(false, "rewards must be a floating-point tensor, got ", rewards.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t N = rewards.size(0), R = rewards.dim() == 2 ? rewards.size(1) : 1;
  at::Tensor r = rewards.contiguous();
  at::Tensor w;
  if (weights.has_value()) {
    R1K_CHECK(weights->numel() == R, "reward_weights must have one entry per reward column");
    w = weights->to(rewards.device(), at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({N}, rewards.options().dtype(at::kFloat));
  cudaError_t err = r1k_group_advantages(r.data_ptr(), dt, w.defined() ? w.data_ptr<float>() : nullptr,
                                         out.data_ptr<float>(), N, R, group_size, code, eps,
                                         at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "group_advantages CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(r1kernels, CUDA, m) { m.impl("group_advantages", &group_advantages_cuda); }
