// DeepSeek-V3 MoE routing kernels (no torch headers): fused gate forward/backward, permute index,
// permute/unpermute copies. dtype codes: 0 = fp32, 1 = bf16, 2 = fp16. Every launcher returns the
// cudaError_t of its launches.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace r1k {

// True when the warp kernels support this config (E = 32 * VPT, VPT in {1,2,4,8,16}; n_group a power of
// two <= 32 dividing E; top_k <= 32).
bool moe_route_supported(int64_t E, int64_t n_group, int64_t top_k);

// logits [T, E] (dtype code), bias fp32 [E] -> weights fp32 [T, K], ids int64 [T, K], s_sel fp32 [T, K]
// (the gathered unbiased sigmoid scores, saved for the backward).
cudaError_t moe_route_fwd(const void* logits, int dtype, const float* bias, int64_t T, int64_t E, int64_t n_group,
                          int64_t topk_group, int64_t top_k, float scale, bool norm, float* weights,
                          int64_t* ids, float* s_sel, cudaStream_t stream);

// grad_weights fp32 [T, K], ids, s_sel -> grad_logits [T, E] (dtype code; every element written).
cudaError_t moe_route_bwd(const float* grad_w, const int64_t* ids, const float* s_sel, int64_t T, int64_t E,
                          int64_t top_k, float scale, bool norm, void* grad_logits, int dtype, cudaStream_t stream);

// Stable counting sort of the flat expert ids [N]: row_map [N] (row of the grouped layout for slot i),
// tokens_per_expert int64 [E]. workspace: moe_permute_workspace(N, E) int32s.
int64_t moe_permute_workspace(int64_t N, int64_t E);
cudaError_t moe_permute_index(const int64_t* ids, int64_t N, int64_t E, int32_t* workspace, int64_t* row_map,
                              int64_t* tokens_per_expert, cudaStream_t stream);

// out[row_map[t*K+k]] = hidden[t], rows of H elements of dtype.
cudaError_t moe_permute_rows(const void* hidden, const int64_t* row_map, int64_t T, int64_t K, int64_t H, int dtype,
                             void* out, cudaStream_t stream);

// out[t] = sum_k w[t,k] * x[row_map[t*K+k]] (w == nullptr: 1), fp32 accumulation in k order.
cudaError_t moe_unpermute_rows(const void* x, const int64_t* row_map, const float* w, int64_t T, int64_t K,
                               int64_t H, int dtype, void* out, cudaStream_t stream);

// grad_x[row_map[t*K+k]] = w[t,k] * grad_out[t]; grad_w[t,k] = <grad_out[t], x[row_map[t*K+k]]> (fp32).
cudaError_t moe_unpermute_bwd(const void* grad_out, const void* x, const int64_t* row_map, const float* w,
                              int64_t T, int64_t K, int64_t H, int dtype, void* grad_x, float* grad_w,
                              cudaStream_t stream);

}  // namespace r1k
