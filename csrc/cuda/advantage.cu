// group_advantages: one launch, float64 accumulation, any group size, R weighted reward columns.
// scale 0 (group): one warp per group, lanes stride over members (two passes: mean, then squared
// deviations, so the result matches the float64 reference). scale 1 (batch): every block first reduces
// the batch mean and unbiased std (the rewards are small and L2-resident), then does its groups.
// A NaN or inf reward stops the kernel with a device-side assert (the same error as torch._assert_async), so
// the public API needs no separate isfinite/all/assert launches before this one.
#include <assert.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "advantage.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T> __device__ __forceinline__ double to_d(T v) { return static_cast<double>(v); }
template <> __device__ __forceinline__ double to_d<__half>(__half v) { return static_cast<double>(__half2float(v)); }
template <> __device__ __forceinline__ double to_d<__nv_bfloat16>(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

__device__ __forceinline__ double finite(double v) {
  if (!isfinite(v))
    __assert_fail("rewards contains NaN or inf (map 'not applicable' rewards to a finite value before this call)",
                  __FILE__, __LINE__, __func__);
  return v;
}

template <typename T>
__device__ __forceinline__ double total(const T* r, const float* w, int64_t i, int64_t R) {
  if (R == 1) return finite(to_d(r[i])) * (w ? static_cast<double>(w[0]) : 1.0);
  double acc = 0.0;
  for (int64_t j = 0; j < R; ++j) acc += finite(to_d(r[i * R + j])) * (w ? static_cast<double>(w[j]) : 1.0);
  return acc;
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ double block_sum(double v, double* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  double s = 0.0;
  for (int k = 0; k < kWarps; ++k) s += smem[k];
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) advantages_kernel(const T* __restrict__ r, const float* __restrict__ w,
                                                              float* __restrict__ out, int64_t n, int64_t R,
                                                              int64_t G, int scale, double eps) {
  __shared__ double smem[kWarps];
  double batch_denom = 1.0;
  if (scale == 1) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) s += total(r, w, i, R);
    const double mean = block_sum(s, smem) / static_cast<double>(n);
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const double d = total(r, w, i, R) - mean;
      ss += d * d;
    }
    batch_denom = sqrt(block_sum(ss, smem) / static_cast<double>(n - 1)) + eps;
  }
  const int lane = threadIdx.x & 31;
  const int64_t n_groups = n / G;
  const int64_t warp0 = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t g = warp0; g < n_groups; g += stride) {
    const int64_t base = g * G;
    double s = 0.0;
    for (int64_t i = lane; i < G; i += 32) s += total(r, w, base + i, R);
    const double mean = warp_sum(s) / static_cast<double>(G);
    double denom = batch_denom;
    if (scale == 0) {
      double ss = 0.0;
      for (int64_t i = lane; i < G; i += 32) {
        const double d = total(r, w, base + i, R) - mean;
        ss += d * d;
      }
      denom = sqrt(warp_sum(ss) / static_cast<double>(G - 1)) + eps;
    }
    for (int64_t i = lane; i < G; i += 32) out[base + i] = static_cast<float>((total(r, w, base + i, R) - mean) / denom);
  }
}

template <typename T>
cudaError_t launch(const void* r, const float* w, float* out, int64_t n, int64_t R, int64_t G, int scale, double eps,
                   cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t n_groups = n / G;
  int64_t blocks = (n_groups + kWarps - 1) / kWarps;
  if (scale == 1) {  // each block recomputes the batch statistics: one block per SM at most
    int dev = 0, sms = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) return e;
    if (blocks > sms) blocks = sms;
  }
  if (blocks > 65535) blocks = 65535;
  advantages_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(static_cast<const T*>(r), w, out, n,
                                                                              R, G, scale, eps);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t r1k_group_advantages(const void* rewards, int dtype, const float* weights, float* out,
                                            int64_t n, int64_t R, int64_t group_size, int scale, double eps,
                                            cudaStream_t stream) {
  switch (dtype) {
    case 0: return launch<float>(rewards, weights, out, n, R, group_size, scale, eps, stream);
    case 1: return launch<double>(rewards, weights, out, n, R, group_size, scale, eps, stream);
    case 2: return launch<__half>(rewards, weights, out, n, R, group_size, scale, eps, stream);
    case 3: return launch<__nv_bfloat16>(rewards, weights, out, n, R, group_size, scale, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}
