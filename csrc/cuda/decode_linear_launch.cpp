// r1kernels::decode_linear: the CUDA binding of csrc/cuda/decode_linear.cu (tensors -> R1kDecodeLinear).
// Internal: called by r1kernels/ops/linear.py's decode_linear_cuda after its eligibility check; writes `out`
// (mode 1: adds into it). `counters`: int32 zeros of >= the tile count, left zero by every launch (the caller
// keeps one per device). Schema and CUDA kernel only (no CPU kernel).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../checks.h"
#include "decode_linear.h"

namespace {

void check_bf16_rows(const at::Tensor& t, const char* name) {
  R1K_CHECK_CUDA(t);
  R1K_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16, got ", t.scalar_type());
  R1K_CHECK(t.dim() == 2 && t.stride(1) == 1 && t.stride(0) % 8 == 0 &&
                reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
            name, " must be 2-D with contiguous 16-byte-aligned rows");
}

void decode_linear_cuda(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                        at::Tensor& out, at::Tensor& counters, int64_t mode, int64_t warp_rows, int64_t k_groups,
                        int64_t stages, int64_t splits) {
  check_bf16_rows(x, "x");
  check_bf16_rows(out, "out");
  check_bf16_rows(w, "weight");
  R1K_CHECK(w.is_contiguous(), "weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = mode == 2 ? w.size(0) / 2 : w.size(0);
  R1K_CHECK(w.size(1) == K && (mode != 2 || w.size(0) % 2 == 0), "weight must be [N, K] ([2I, K] when gated)");
  R1K_CHECK(out.size(0) == M && out.size(1) == N, "out must be [", M, ", ", N, "]");
  R1K_CHECK(!bias.has_value() || (mode == 0 && bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() &&
                                  bias->numel() == N), "bias must be a contiguous bf16 [N] (store mode only)");
  R1K_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() &&
                counters.numel() >= r1k_decode_linear_tiles(N, static_cast<int>(mode), static_cast<int>(warp_rows)),
            "counters must be int32 with one entry per tile");
  const c10::cuda::CUDAGuard guard(x.device());
  R1kDecodeLinear p = {};
  p.x = x.data_ptr();
  p.w = w.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.counters = counters.data_ptr<int>();
  p.M = M;
  p.N = N;
  p.K = K;
  p.ldx = x.stride(0);
  p.ldo = out.stride(0);
  p.mode = static_cast<int>(mode);
  p.warp_rows = static_cast<int>(warp_rows);
  p.k_groups = static_cast<int>(k_groups);
  p.stages = static_cast<int>(stages);
  p.splits = static_cast<int>(splits);
  at::Tensor ws;
  const int64_t ws_floats = r1k_decode_linear_ws_floats(&p);
  if (ws_floats > 0) {
    ws = at::empty({ws_floats}, x.options().dtype(at::kFloat));
    p.ws = ws.data_ptr<float>();
  }
  const cudaError_t err = r1k_decode_linear(&p, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "decode_linear CUDA launch failed (M=", M, " N=", N, " K=", K, " mode=", mode,
              " warp_rows=", warp_rows, " k_groups=", k_groups, " stages=", stages, " splits=", splits, "): ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1kernels, m) {
  m.def(
      "decode_linear(Tensor x, Tensor w, Tensor? bias, Tensor(a!) out, Tensor(b!) counters, *, int mode, "
      "int warp_rows, int k_groups, int stages, int splits) -> ()");
}

TORCH_LIBRARY_IMPL(r1kernels, CUDA, m) { m.impl("decode_linear", &decode_linear_cuda); }
