// group_advantages: schema and CPU implementation (float64 accumulation; bit-identical to
// r1kernels.reference.group_advantages on fp32 input, which also computes in float64). NaN rewards raise
// ValueError here and stop the CUDA kernel with a device-side assert: the public API does not check them again.
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"

namespace {

// scale: 0 = group, 1 = batch, 2 = none (same codes in the CUDA and Triton kernels).
int64_t scale_code(const std::string& scale) {
  if (scale == "group") return 0;
  if (scale == "batch") return 1;
  if (scale == "none") return 2;
  TORCH_CHECK_VALUE(false, "scale must be 'group', 'batch' or 'none', got '", scale, "'");
}

at::Tensor group_advantages_cpu(const at::Tensor& rewards, int64_t group_size, std::string scale,
                                double eps, const std::optional<at::Tensor>& weights) {
  R1K_CHECK_CPU(rewards);
  R1K_CHECK(rewards.dim() == 1 || rewards.dim() == 2, "rewards must be [N] or [N, R]");
  R1K_CHECK(group_size >= 1 && rewards.size(0) % group_size == 0, "group_size must divide the batch");
  const int64_t code = scale_code(scale);
  const int64_t N = rewards.size(0), R = rewards.dim() == 2 ? rewards.size(1) : 1;
  at::Tensor r = rewards.to(at::kDouble).contiguous().view({N, R});
  std::vector<double> w(R, 1.0);
  if (weights.has_value()) {
    R1K_CHECK(weights->numel() == R, "reward_weights must have one entry per reward column");
    at::Tensor wd = weights->to(at::kDouble).contiguous().cpu();
    for (int64_t j = 0; j < R; ++j) w[j] = wd.data_ptr<double>()[j];
  }
  const double* rp = r.data_ptr<double>();
  for (int64_t i = 0; i < N * R; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(rp[i]),
                      "rewards contains NaN or inf (map 'not applicable' rewards to a finite value before this call)");
  }
  std::vector<double> total(N);
  for (int64_t i = 0; i < N; ++i) {
    double acc = 0.0;
    for (int64_t j = 0; j < R; ++j) acc += rp[i * R + j] * w[j];
    total[i] = acc;
  }
  double batch_std = 0.0;
  if (code == 1) {
    double mean = 0.0;
    for (double x : total) mean += x;
    mean /= N;
    double ss = 0.0;
    for (double x : total) ss += (x - mean) * (x - mean);
    batch_std = std::sqrt(ss / (N - 1));
  }
  at::Tensor out = at::empty({N}, rewards.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  for (int64_t g0 = 0; g0 < N; g0 += group_size) {
    double mean = 0.0;
    for (int64_t i = 0; i < group_size; ++i) mean += total[g0 + i];
    mean /= group_size;
    double denom = 1.0;
    if (code == 0) {
      double ss = 0.0;
      for (int64_t i = 0; i < group_size; ++i) ss += (total[g0 + i] - mean) * (total[g0 + i] - mean);
      denom = std::sqrt(ss / (group_size - 1)) + eps;
    } else if (code == 1) {
      denom = batch_std + eps;
    }
    for (int64_t i = 0; i < group_size; ++i) op[g0 + i] = static_cast<float>((total[g0 + i] - mean) / denom);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1kernels, m) {
  m.def("group_advantages(Tensor rewards, int group_size, str scale, float eps, Tensor? weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) { m.impl("group_advantages", &group_advantages_cpu); }
