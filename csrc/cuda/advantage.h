// group_advantages CUDA kernel entry points: raw pointers + sizes + stream (no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// rewards [n, R] row-major of dtype code (0 f32, 1 f64, 2 f16, 3 bf16); weights fp32 [R] or null;
// out fp32 [n]; scale 0 group, 1 batch, 2 none. One launch. Returns the launch's cudaError_t.
cudaError_t r1k_group_advantages(const void* rewards, int dtype, const float* weights, float* out, int64_t n,
                                 int64_t R, int64_t group_size, int scale, double eps, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
