// r1kernels::grpo_token: the CUDA binding of csrc/cuda/grpo.cu (tensors -> R1kGrpoToken). Internal: called by
// r1kernels/ops/grpo.py's token-level path with its tensors already float32 / contiguous, and it writes logp,
// stats and dx (dx may be x itself: the in-place backward; None: no gradient written). Schema and CUDA kernel only (no CPU kernel).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "grpo.h"

namespace {

const float* opt_f32(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return nullptr;
  R1K_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, name,
            " must be a contiguous float32 tensor of ", n, " elements");
  return t->data_ptr<float>();
}

void grpo_token_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& adv,
                     const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& old,
                     const std::optional<at::Tensor>& ref, const std::optional<at::Tensor>& samp,
                     const at::Tensor& scale, at::Tensor& logp, at::Tensor& stats, const std::optional<at::Tensor>& dx,
                     c10::IntArrayRef dx_strides, double inv_t, double eps_low, double eps_high, double delta,
                     double beta, double tau_pos, double tau_neg, double is_lo, double is_hi, int64_t loss_code,
                     int64_t kl_code, bool has_delta, bool is_mask, bool bias_kl, bool entropy, bool use_kl,
                     int64_t cluster) {
  R1K_CHECK_CUDA(x);
  R1K_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [B, T, V] with a contiguous last dimension");
  R1K_CHECK(!dx.has_value() || (dx->scalar_type() == x.scalar_type() && dx->is_cuda()),
            "dx must be a CUDA tensor of x's dtype (or None: no gradient)");
  R1K_CHECK(dx_strides.size() == 2, "dx_strides must hold 2 strides");
  const int64_t B = x.size(0), T = x.size(1), V = x.size(2), N = B * T;
  int dt = -1;
  switch (x.scalar_type()) {
    case at::kFloat: dt = 0; break;
    case at::kHalf: dt = 2; break;
    case at::kBFloat16: dt = 3; break;
    default: R1K_CHECK(false, "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  R1K_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel() == N, "ids must be int64 [B*T]");
  R1K_CHECK(adv.scalar_type() == at::kFloat && adv.is_contiguous() && scale.scalar_type() == at::kFloat &&
                scale.is_contiguous(), "adv and scale must be contiguous float32");
  R1K_CHECK(logp.numel() == N && stats.numel() == 6 * N, "logp must be [B*T] and stats [6, B*T]");
  const c10::cuda::CUDAGuard guard(x.device());
  R1kGrpoToken p = {};
  p.x = x.data_ptr();
  p.ids = ids.data_ptr<int64_t>();
  p.adv = adv.data_ptr<float>();
  p.mask = opt_f32(mask, "mask", N);
  p.old = opt_f32(old, "old", N);
  p.ref = opt_f32(ref, "ref", N);
  p.samp = opt_f32(samp, "samp", N);
  p.scale = scale.data_ptr<float>();
  p.logp = logp.data_ptr<float>();
  p.stats = stats.data_ptr<float>();
  p.dx = dx.has_value() ? dx->data_ptr() : nullptr;
  p.B = B;
  p.T = T;
  p.V = V;
  p.x_sb = x.stride(0);
  p.x_st = x.stride(1);
  p.dx_sb = dx_strides[0];
  p.dx_st = dx_strides[1];
  // [B] per sequence or [B, T] per row (as the Triton launcher)
  p.adv_sb = adv.dim() == 2 ? T : 1;
  p.adv_st = adv.dim() == 2 ? 1 : 0;
  p.sc_sb = scale.dim() == 2 ? T : 1;
  p.sc_st = scale.dim() == 2 ? 1 : 0;
  p.inv_t = static_cast<float>(inv_t);
  p.eps_low = static_cast<float>(eps_low);
  p.eps_high = static_cast<float>(eps_high);
  p.delta = static_cast<float>(delta);
  p.beta = static_cast<float>(beta);
  p.tau_pos = static_cast<float>(tau_pos);
  p.tau_neg = static_cast<float>(tau_neg);
  p.is_lo = static_cast<float>(is_lo);
  p.is_hi = static_cast<float>(is_hi);
  p.dtype = dt;
  p.loss = static_cast<int>(loss_code);
  p.kl = static_cast<int>(kl_code);
  p.has_delta = has_delta;
  p.is_mask = is_mask;
  p.bias_kl = bias_kl;
  p.entropy = entropy;
  p.use_kl = use_kl;
  p.cluster = static_cast<int>(cluster);
  const size_t need = r1k_grpo_token_smem(V, static_cast<int>(x.element_size()), p.cluster);
  R1K_CHECK(need <= r1k_grpo_token_smem_limit(), "grpo_token: a row slice of ", need, " bytes (V=", V,
            ", cluster=", cluster, ") exceeds the shared memory of one CTA");
  const cudaError_t err = r1k_grpo_token(&p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "grpo_token CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1kernels, m) {
  m.def(
      "grpo_token(Tensor x, Tensor ids, Tensor adv, Tensor? mask, Tensor? old, Tensor? ref, Tensor? samp, "
      "Tensor scale, Tensor(a!) logp, Tensor(b!) stats, Tensor(c!)? dx, int[] dx_strides, *, float inv_t, "
      "float eps_low, float eps_high, float delta, float beta, float tau_pos, float tau_neg, float is_lo, "
      "float is_hi, int loss_code, int kl_code, bool has_delta, bool is_mask, bool bias_kl, bool entropy, "
      "bool use_kl, int cluster) -> ()");
}

TORCH_LIBRARY_IMPL(r1kernels, CUDA, m) { m.impl("grpo_token", &grpo_token_cuda); }
