// DeepSeek-V3 MoE routing kernels: fused gate (one warp per token), stable counting-sort permute index,
// permute / unpermute row copies. No torch headers (see moe.h).
//
// Gate forward, one warp per token, lane l holding experts [l*VPT, (l+1)*VPT) (E = 32*VPT):
//   s = sigmoid(x) computed exactly as torch's CUDA sigmoid (1 / (1 + expf(-x)), IEEE division, the
//   accurate expf even under --use_fast_math) so that ids match the torch reference bit for bit;
//   c = s + bias; per group top-2 by a butterfly over the 32/n_group lanes of the group (values only:
//   the sum of the top two does not depend on tie order); group rank by comparing all n_group scores
//   (ties to the lower group); top_k rounds of a warp argmax on order-preserving int keys
//   (__reduce_max_sync, then __reduce_min_sync of the index among the lanes holding the max: ties to the
//   lower expert); weights from the unbiased s, normalized and scaled.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "moe.h"

extern "C" __device__ float __nv_expf(float);

namespace r1k {
namespace {

constexpr unsigned FULL = 0xffffffffu;

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

// 1 / (1 + expf(-x)) correctly rounded: the IEEE reciprocal equals the IEEE quotient 1/d.
__device__ __forceinline__ float sigmoid_exact(float x) {
  return __frcp_rn(__fadd_rn(1.0f, __nv_expf(-x)));
}

// Warp argmax over (key, index): the largest key, ties to the lowest index; every lane gets the index.
// redux.sync (sm_80+): measured on H100 faster than a 64-bit shuffle butterfly (benchmarks/NOTES-moe.md, 9).
__device__ __forceinline__ int warp_argmax(int key, int idx) {
  const int m = __reduce_max_sync(FULL, key);
  return __reduce_min_sync(FULL, key == m ? idx : INT_MAX);
}

// Order-preserving map float -> int32 (larger float, larger int). INT_MIN stays below every float.
__device__ __forceinline__ int order_key(float f) {
  int i = __float_as_int(f);
  return i >= 0 ? i : i ^ 0x7fffffff;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
}

template <typename scalar_t, int VPT>
__device__ __forceinline__ void load_row(const scalar_t* p, bool vec, float (&out)[VPT]) {
  if (vec) {
    Pack<scalar_t, VPT> pk = *reinterpret_cast<const Pack<scalar_t, VPT>*>(p);
#pragma unroll
    for (int j = 0; j < VPT; ++j) out[j] = to_f(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < VPT; ++j) out[j] = to_f(p[j]);
  }
}

// One token's routing by one warp: x = this lane's VPT logits (as float), b = its VPT biases.
template <int VPT>
__device__ __forceinline__ void route_token(const float (&x)[VPT], const float (&b)[VPT], int64_t t, int lane,
                                            int n_group, int topk_group, int top_k, float scale, bool norm,
                                            float* __restrict__ w_out, int64_t* __restrict__ ids_out,
                                            float* __restrict__ s_out) {
  const int base = lane * VPT;
  float s[VPT], c[VPT];
  float a1 = -INFINITY, a2 = -INFINITY;
  bool nan_here = false;  // a NaN logit: the token's weights are NaN, as the reference's (fmaxf would drop it)
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    nan_here |= x[j] != x[j];
    s[j] = sigmoid_exact(x[j]);
    c[j] = __fadd_rn(s[j], b[j]);
    if (c[j] > a1) { a2 = a1; a1 = c[j]; } else if (c[j] > a2) { a2 = c[j]; }
  }
  // group top-2 over the lanes of the group (lanes_per_group = 32 / n_group, a power of two)
  const int lg = 31 - __clz(n_group);           // n_group is a power of two
  const int lpg = 32 >> lg;
  for (int o = 1; o < lpg; o <<= 1) {
    const float b1 = __shfl_xor_sync(FULL, a1, o), b2 = __shfl_xor_sync(FULL, a2, o);
    const float n2 = fmaxf(fminf(a1, b1), fmaxf(a2, b2));
    a1 = fmaxf(a1, b1);
    a2 = n2;
  }
  const float my_score = __fadd_rn(a1, a2);
  const int my_group = lane >> (5 - lg);
  int rank = 0;
  for (int g = 0; g < n_group; ++g) {
    const float sg = __shfl_sync(FULL, my_score, g * lpg);
    rank += (sg > my_score) || (sg == my_score && g < my_group);
  }
  const bool keep = rank < topk_group;
  int key[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j) key[j] = order_key(keep ? c[j] : -INFINITY);

  int my_id = 0;
  float my_s = 0.0f;
  for (int r = 0; r < top_k; ++r) {
    int bk = INT_MIN, bj = 0;
    float bs = 0.0f;
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      if (key[j] > bk) { bk = key[j]; bj = j; bs = s[j]; }
    const int id = warp_argmax(bk, base + bj);
    const int owner = id / VPT;
    const float sv = __shfl_sync(FULL, bs, owner);
    if (lane == owner) {
#pragma unroll
      for (int j = 0; j < VPT; ++j)
        if (j == bj) key[j] = INT_MIN;
    }
    if (lane == r) { my_id = id; my_s = sv; }
  }
  const float total = warp_sum(lane < top_k ? my_s : 0.0f);
  const bool any_nan = __any_sync(FULL, nan_here);
  if (lane < top_k) {
    float w = norm ? __fdiv_rn(my_s, __fadd_rn(total, 1e-20f)) : my_s;
    w_out[t * top_k + lane] = any_nan ? __int_as_float(0x7fc00000) : __fmul_rn(w, scale);
    ids_out[t * top_k + lane] = my_id;
    s_out[t * top_k + lane] = my_s;
  }
}

// One token per warp. Measured on an H100 (T=16384, E=256): a persistent-warp variant that prefetched the
// next token's row ran 11% slower (31.0 vs 27.9 us): the kernel is bound by issue and the latency of its
// serial warp reductions, not DRAM. Capping registers at 40 for VPT <= 8 (6 blocks of 256 per SM) raises the
// warps resident per SM from 32 to 48 to hide more of that latency.
template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(256, (VPT <= 8 ? 6 : 1)) route_fwd_kernel(
    const scalar_t* __restrict__ logits, const float* __restrict__ bias, int64_t T, int n_group, int topk_group,
    int top_k, float scale, bool norm, bool vec, float* __restrict__ w_out, int64_t* __restrict__ ids_out,
    float* __restrict__ s_out) {
  constexpr int E = 32 * VPT;
  const int lane = threadIdx.x & 31;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (t >= T) return;  // whole warps exit together
  const int base = lane * VPT;
  float x[VPT], b[VPT];
  load_row<scalar_t, VPT>(logits + t * E + base, vec, x);
  load_row<float, VPT>(bias + base, true, b);
  route_token<VPT>(x, b, t, lane, n_group, topk_group, top_k, scale, norm, w_out, ids_out, s_out);
}

template <typename scalar_t, int VPT>
__global__ void __launch_bounds__(256) route_bwd_kernel(const float* __restrict__ grad_w,
                                                        const int64_t* __restrict__ ids,
                                                        const float* __restrict__ s_sel, int64_t T, int top_k,
                                                        float scale, bool norm, bool vec,
                                                        scalar_t* __restrict__ grad_logits) {
  const int lane = threadIdx.x & 31;
  const int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (t >= T) return;
  constexpr int E = 32 * VPT;
  const int base = lane * VPT;
  float g = 0.0f, sv = 0.0f;
  int id = -1;
  if (lane < top_k) {
    g = grad_w[t * top_k + lane];
    sv = s_sel[t * top_k + lane];
    id = static_cast<int>(ids[t * top_k + lane]);
  }
  float gs;
  if (norm) {
    const float S = warp_sum(sv) + 1e-20f;
    const float dot = warp_sum(g * sv);
    gs = scale * (g / S - dot / (S * S));
  } else {
    gs = scale * g;
  }
  const float gx = gs * sv * (1.0f - sv);
  Pack<scalar_t, VPT> out;
#pragma unroll
  for (int j = 0; j < VPT; ++j) out.v[j] = from_f<scalar_t>(0.0f);
  for (int k = 0; k < top_k; ++k) {
    const int idk = __shfl_sync(FULL, id, k);
    const float gk = __shfl_sync(FULL, gx, k);
    const int off = idk - base;
#pragma unroll
    for (int j = 0; j < VPT; ++j)
      if (off == j) out.v[j] = from_f<scalar_t>(gk);
  }
  scalar_t* dst = grad_logits + t * E + base;
  if (vec) {
    *reinterpret_cast<Pack<scalar_t, VPT>*>(dst) = out;
  } else {
#pragma unroll
    for (int j = 0; j < VPT; ++j) dst[j] = out.v[j];
  }
}

// ---- permute index: stable counting sort in chunks of 1024 slots, one warp per chunk ----
constexpr int CHUNK = 1024;

__global__ void __launch_bounds__(256) count_kernel(const int64_t* __restrict__ ids, int64_t N, int E,
                                                    int32_t* __restrict__ counts) {
  extern __shared__ int32_t hist_s[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  const int64_t nchunks = (N + CHUNK - 1) / CHUNK;
  if (chunk >= nchunks) return;
  int32_t* h = hist_s + warp * E;
  for (int e = lane; e < E; e += 32) h[e] = 0;
  __syncwarp();
  const int64_t start = chunk * CHUNK;
  for (int it = 0; it < CHUNK / 32; ++it) {
    const int64_t i = start + it * 32 + lane;
    if (i < N) {
      const int64_t e = ids[i];
      if (e >= 0 && e < E) atomicAdd(&h[e], 1);
    }
  }
  __syncwarp();
  for (int e = lane; e < E; e += 32) counts[chunk * E + e] = h[e];
}

// One block, one thread per expert: prefix over chunks, exclusive scan over experts.
__global__ void scan_kernel(int32_t* __restrict__ counts, int64_t nchunks, int E, int64_t* __restrict__ tpe) {
  __shared__ int32_t warp_tot[32];
  const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
  int32_t total = 0;
  if (e < E) {
    int64_t c = 0;
    for (; c + 8 <= nchunks; c += 8) {
      int32_t v[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] = counts[(c + u) * E + e];
#pragma unroll
      for (int u = 0; u < 8; ++u) total += v[u];
    }
    for (; c < nchunks; ++c) total += counts[c * E + e];
  }
  // exclusive scan of totals over experts
  int32_t incl = total;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t v = __shfl_up_sync(FULL, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    int32_t v = lane < nw ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t u = __shfl_up_sync(FULL, v, o);
      if (lane >= o) v += u;
    }
    if (lane < nw) warp_tot[lane] = v;  // inclusive over warps
  }
  __syncthreads();
  const int32_t off = incl - total + (warp > 0 ? warp_tot[warp - 1] : 0);
  if (e < E) {
    tpe[e] = total;
    int32_t run = off;
    for (int64_t c = 0; c < nchunks; ++c) {
      const int32_t v = counts[c * E + e];
      counts[c * E + e] = run;
      run += v;
    }
  }
}

__global__ void __launch_bounds__(256) rank_kernel(const int64_t* __restrict__ ids, int64_t N, int E,
                                                   const int32_t* __restrict__ starts,
                                                   int64_t* __restrict__ row_map) {
  extern __shared__ int32_t base_s[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  const int64_t nchunks = (N + CHUNK - 1) / CHUNK;
  if (chunk >= nchunks) return;
  int32_t* base = base_s + warp * E;
  for (int e = lane; e < E; e += 32) base[e] = starts[chunk * E + e];
  __syncwarp();
  const int64_t start = chunk * CHUNK;
  const unsigned lt = (1u << lane) - 1u;
  for (int it = 0; it < CHUNK / 32; ++it) {
    const int64_t i = start + it * 32 + lane;
    int64_t e = i < N ? ids[i] : -1;
    if (e < 0 || e >= E) e = -1;
    const unsigned mask = __match_any_sync(FULL, static_cast<int>(e));
    const int rank = __popc(mask & lt);
    if (e >= 0) row_map[i] = base[e] + rank;
    __syncwarp();
    if (e >= 0 && rank == 0) base[e] += __popc(mask);
    __syncwarp();
  }
}

// ---- row copies: one block per token, 16-byte vectors when the row allows ----
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(256) permute_rows_kernel(const scalar_t* __restrict__ hidden,
                                                           const int64_t* __restrict__ row_map, int K, int64_t H,
                                                           scalar_t* __restrict__ out) {
  using P = Pack<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t nv = H / VEC;
  const P* src = reinterpret_cast<const P*>(hidden + t * H);
  for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
    const P x = src[v];
    for (int k = 0; k < K; ++k) {
      const int64_t r = row_map[t * K + k];
      reinterpret_cast<P*>(out + r * H)[v] = x;
    }
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(256) unpermute_rows_kernel(const scalar_t* __restrict__ x,
                                                             const int64_t* __restrict__ row_map,
                                                             const float* __restrict__ w, int K, int64_t H,
                                                             scalar_t* __restrict__ out) {
  using P = Pack<scalar_t, VEC>;
  const int64_t t = blockIdx.x;
  const int64_t nv = H / VEC;
  for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
    float acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
#pragma unroll 8
    for (int k = 0; k < K; ++k) {
      const int64_t r = row_map[t * K + k];
      const float wk = w ? w[t * K + k] : 1.0f;
      const P xv = reinterpret_cast<const P*>(x + r * H)[v];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = fmaf(wk, to_f(xv.v[j]), acc[j]);
    }
    P o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_f<scalar_t>(acc[j]);
    reinterpret_cast<P*>(out + t * H)[v] = o;
  }
}

// One block per token. Its K expert rows go in chunks of up to 8: each thread keeps a chunk's partial dot
// products <grad_out[t], x[row]> in registers and issues the chunk's row loads together, then one block
// reduction per chunk. For K <= 8 (DeepSeek-V3: K = 8) that is one reduction per token; measured on H100 at
// T=16384, K=8, H=7168 bf16: 1.39 ms (floor 1.33) against 1.92 ms for one block reduction per k (K > 8:
// one reduction per chunk of 8, not timed).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(128) unpermute_bwd_kernel(const scalar_t* __restrict__ grad_out,
                                                            const scalar_t* __restrict__ x,
                                                            const int64_t* __restrict__ row_map,
                                                            const float* __restrict__ w, int K, int64_t H,
                                                            scalar_t* __restrict__ grad_x,
                                                            float* __restrict__ grad_w) {
  using P = Pack<scalar_t, VEC>;
  constexpr int KC = 8;
  __shared__ float red[KC][32];
  const int64_t t = blockIdx.x;
  const int64_t nv = H / VEC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const P* g = reinterpret_cast<const P*>(grad_out + t * H);
  for (int k0 = 0; k0 < K; k0 += KC) {
    const int kn = K - k0 < KC ? K - k0 : KC;
    int64_t r[KC];
    float wk[KC], part[KC];
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      r[k] = k < kn ? row_map[t * K + k0 + k] : 0;
      wk[k] = k < kn ? w[t * K + k0 + k] : 0.0f;
      part[k] = 0.0f;
    }
    for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
      const P gv = g[v];
      P xv[KC];
#pragma unroll
      for (int k = 0; k < KC; ++k)
        if (k < kn) xv[k] = reinterpret_cast<const P*>(x + r[k] * H)[v];
#pragma unroll
      for (int k = 0; k < KC; ++k) {
        if (k < kn) {
          P o;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float gf = to_f(gv.v[j]);
            part[k] = fmaf(gf, to_f(xv[k].v[j]), part[k]);
            o.v[j] = from_f<scalar_t>(wk[k] * gf);
          }
          reinterpret_cast<P*>(grad_x + r[k] * H)[v] = o;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      const float v = warp_sum(part[k]);
      if (lane == 0) red[k][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < kn) {
      float acc = 0.0f;
      for (int i = 0; i < nw; ++i) acc += red[threadIdx.x][i];
      grad_w[t * K + k0 + threadIdx.x] = acc;
    }
    __syncthreads();  // red is rewritten by the next chunk
  }
}

template <typename F>
cudaError_t dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__nv_bfloat16{});
    case 2: return f(__half{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename scalar_t, typename F>
cudaError_t dispatch_vpt(int64_t E, F&& f) {
  switch (E) {
    case 32: return f(std::integral_constant<int, 1>{});
    case 64: return f(std::integral_constant<int, 2>{});
    case 128: return f(std::integral_constant<int, 4>{});
    case 256: return f(std::integral_constant<int, 8>{});
    case 512: return f(std::integral_constant<int, 16>{});
    default: return cudaErrorInvalidValue;
  }
}

inline bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

// Row kernels: 128 threads (H=7168 bf16 is 896 16-byte vectors = 7 per thread, no ragged tail).
constexpr int ROW_THREADS = 128;

}  // namespace

bool moe_route_supported(int64_t E, int64_t n_group, int64_t top_k) {
  const bool e_ok = E == 32 || E == 64 || E == 128 || E == 256 || E == 512;
  const bool g_ok = n_group >= 1 && n_group <= 32 && (n_group & (n_group - 1)) == 0 && E % n_group == 0;
  return e_ok && g_ok && top_k >= 1 && top_k <= 32;
}

cudaError_t moe_route_fwd(const void* logits, int dtype, const float* bias, int64_t T, int64_t E, int64_t n_group,
                          int64_t topk_group, int64_t top_k, float scale, bool norm, float* weights,
                          int64_t* ids, float* s_sel, cudaStream_t stream) {
  if (!moe_route_supported(E, n_group, top_k)) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (T * 32 + threads - 1) / threads;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return dispatch_vpt<scalar_t>(E, [&](auto vpt) {
      constexpr int VPT = decltype(vpt)::value;
      const bool vec = aligned(logits, sizeof(scalar_t) * VPT) && aligned(bias, sizeof(float) * VPT);
      route_fwd_kernel<scalar_t, VPT><<<blocks, threads, 0, stream>>>(
          static_cast<const scalar_t*>(logits), bias, T, static_cast<int>(n_group), static_cast<int>(topk_group),
          static_cast<int>(top_k), scale, norm, vec, weights, ids, s_sel);
      return cudaGetLastError();
    });
  });
}

cudaError_t moe_route_bwd(const float* grad_w, const int64_t* ids, const float* s_sel, int64_t T, int64_t E,
                          int64_t top_k, float scale, bool norm, void* grad_logits, int dtype, cudaStream_t stream) {
  if (!moe_route_supported(E, 1, top_k)) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (T * 32 + threads - 1) / threads;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return dispatch_vpt<scalar_t>(E, [&](auto vpt) {
      constexpr int VPT = decltype(vpt)::value;
      const bool vec = aligned(grad_logits, sizeof(scalar_t) * VPT);
      route_bwd_kernel<scalar_t, VPT><<<blocks, threads, 0, stream>>>(
          grad_w, ids, s_sel, T, static_cast<int>(top_k), scale, norm, vec, static_cast<scalar_t*>(grad_logits));
      return cudaGetLastError();
    });
  });
}

int64_t moe_permute_workspace(int64_t N, int64_t E) { return ((N + CHUNK - 1) / CHUNK) * E; }

cudaError_t moe_permute_index(const int64_t* ids, int64_t N, int64_t E, int32_t* workspace, int64_t* row_map,
                              int64_t* tokens_per_expert, cudaStream_t stream) {
  if (E < 1 || E > 1024) return cudaErrorInvalidValue;
  const int64_t nchunks = (N + CHUNK - 1) / CHUNK;
  if (nchunks == 0) return cudaMemsetAsync(tokens_per_expert, 0, E * sizeof(int64_t), stream);
  const int warps = 8;
  const int64_t blocks = (nchunks + warps - 1) / warps;
  const size_t smem = warps * E * sizeof(int32_t);
  count_kernel<<<blocks, warps * 32, smem, stream>>>(ids, N, static_cast<int>(E), workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int scan_threads = static_cast<int>((E + 31) / 32 * 32);
  scan_kernel<<<1, scan_threads, 0, stream>>>(workspace, nchunks, static_cast<int>(E), tokens_per_expert);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  rank_kernel<<<blocks, warps * 32, smem, stream>>>(ids, N, static_cast<int>(E), workspace, row_map);
  return cudaGetLastError();
}

cudaError_t moe_permute_rows(const void* hidden, const int64_t* row_map, int64_t T, int64_t K, int64_t H, int dtype,
                             void* out, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int VEC = 16 / sizeof(scalar_t);
    const auto* h = static_cast<const scalar_t*>(hidden);
    auto* o = static_cast<scalar_t*>(out);
    if (H % VEC == 0 && aligned(hidden, 16) && aligned(out, 16))
      permute_rows_kernel<scalar_t, VEC><<<T, ROW_THREADS, 0, stream>>>(h, row_map, static_cast<int>(K), H, o);
    else
      permute_rows_kernel<scalar_t, 1><<<T, ROW_THREADS, 0, stream>>>(h, row_map, static_cast<int>(K), H, o);
    return cudaGetLastError();
  });
}

cudaError_t moe_unpermute_rows(const void* x, const int64_t* row_map, const float* w, int64_t T, int64_t K,
                               int64_t H, int dtype, void* out, cudaStream_t stream) {
  if (T == 0 || H == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int VEC = 16 / sizeof(scalar_t);
    const auto* xp = static_cast<const scalar_t*>(x);
    auto* o = static_cast<scalar_t*>(out);
    if (H % VEC == 0 && aligned(x, 16) && aligned(out, 16))
      unpermute_rows_kernel<scalar_t, VEC><<<T, ROW_THREADS, 0, stream>>>(xp, row_map, w, static_cast<int>(K), H, o);
    else
      unpermute_rows_kernel<scalar_t, 1><<<T, ROW_THREADS, 0, stream>>>(xp, row_map, w, static_cast<int>(K), H, o);
    return cudaGetLastError();
  });
}

cudaError_t moe_unpermute_bwd(const void* grad_out, const void* x, const int64_t* row_map, const float* w,
                              int64_t T, int64_t K, int64_t H, int dtype, void* grad_x, float* grad_w,
                              cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    constexpr int VEC = 16 / sizeof(scalar_t);
    const auto* g = static_cast<const scalar_t*>(grad_out);
    const auto* xp = static_cast<const scalar_t*>(x);
    auto* gx = static_cast<scalar_t*>(grad_x);
    if (H % VEC == 0 && aligned(grad_out, 16) && aligned(x, 16) && aligned(grad_x, 16))
      unpermute_bwd_kernel<scalar_t, VEC><<<T, ROW_THREADS, 0, stream>>>(g, xp, row_map, w, static_cast<int>(K), H, gx,
                                                                          grad_w);
    else
      unpermute_bwd_kernel<scalar_t, 1><<<T, ROW_THREADS, 0, stream>>>(g, xp, row_map, w, static_cast<int>(K), H, gx,
                                                                        grad_w);
    return cudaGetLastError();
  });
}

}  // namespace r1k
