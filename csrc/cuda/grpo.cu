// Token-level GRPO loss: one read + one write of the logits (see grpo.h for the contract).
// Grid: one cluster of p.cluster CTAs per row (row = blockIdx.x / cluster). CTA r of a row copies columns
// [r * chunk, (r + 1) * chunk) into shared memory (16-byte cp.async when aligned), reduces its online
// log-sum-exp (max, sum, entropy sum) in base 2, publishes that partial and, if it holds the label, the
// label's logit; after a cluster barrier every CTA combines the partials through distributed shared memory,
// computes the token's loss terms (the same scalar math in every CTA) and writes its slice of the gradient
// from shared memory with streaming stores. A row whose mask is 0 reads nothing and writes zeros. With
// p.dx null (no gradient wanted) nothing is written to dx: step 4 and the masked rows' zeros are skipped.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <math.h>

#include "grpo.h"

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int64_t kChunkAlign = 8;  // chunk boundaries on 16 bytes for every dtype (8 x fp16 / bf16)

template <typename T> __device__ __forceinline__ float to_f(T v) { return static_cast<float>(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Online log-sum-exp state in base-2 units: m the raw max, s = sum 2^(x*k - m*k), t = sum 2^(..) * x*k.
struct Lse {
  float m, s, t;
};

__device__ __forceinline__ Lse lse_merge(Lse a, Lse b, float k) {
  const float mn = fmaxf(a.m, b.m);
  if (mn == -INFINITY) return {mn, 0.f, 0.f};
  const float fa = a.m == -INFINITY ? 0.f : exp2f((a.m - mn) * k);
  const float fb = b.m == -INFINITY ? 0.f : exp2f((b.m - mn) * k);
  return {mn, a.s * fa + b.s * fb, a.t * fa + b.t * fb};
}

// Adds n values (n <= 8) to the state: one rescale per group.
__device__ __forceinline__ void lse_add(Lse& st, const float* v, int n, float k, bool entropy) {
  float mx = st.m;
  for (int j = 0; j < n; ++j) mx = fmaxf(mx, v[j]);
  if (mx == -INFINITY) return;
  const float ms = mx * k;
  const float alpha = st.m == -INFINITY ? 0.f : exp2f(st.m * k - ms);
  float s = 0.f, t = 0.f;
  for (int j = 0; j < n; ++j) {
    const float z = v[j] * k;
    const float e = exp2f(z - ms);
    s += e;
    if (entropy && e > 0.f) t += e * z;  // a -inf logit (masked vocabulary) adds 0, not 0 * -inf = NaN
  }
  st = {mx, st.s * alpha + s, st.t * alpha + t};
}

struct Partial {  // what one CTA publishes to its cluster
  Lse lse;
  float xy;       // the label's logit, valid when has_y
  int has_y;
};

struct Terms {
  float L, dL, kl, low, high;
};

// (KL estimate, d KL / d l) as r1kernels/triton/grpo.py kl_and_grad.
__device__ __forceinline__ void kl_and_grad(float l, float lref, int code, float& kl, float& dkl) {
  const float d = lref - l;
  if (code == R1K_KL_K1) {
    kl = l - lref;
    dkl = 1.f;
  } else if (code == R1K_KL_K2) {
    kl = 0.5f * d * d;
    dkl = -d;
  } else if (code == R1K_KL_K3) {
    const float e = expf(d);
    kl = e - d - 1.f;
    dkl = 1.f - e;
  } else {
    const float dc = fminf(fmaxf(d, -20.f), 20.f);
    const float e = expf(dc);
    const float v = e - dc - 1.f;
    kl = fminf(fmaxf(v, -10.f), 10.f);
    const bool inside = d >= -20.f && d <= 20.f && v >= -10.f && v <= 10.f;
    dkl = inside ? 1.f - e : 0.f;
    if (d != d) kl = dkl = d;
  }
}

// Per-token (L, dL/dl, kl, low, high) as r1kernels/triton/grpo.py _token_terms.
__device__ Terms token_terms(const R1kGrpoToken& p, float l, float A, float old, float lref, float samp,
                             bool has_ref, bool has_is) {
  const float r = expf(l - old);
  float L, dLdr;
  if (p.loss == R1K_LOSS_CISPO) {
    L = fminf(r, p.eps_high);
    dLdr = 0.f;
  } else if (p.loss == R1K_LOSS_SAPO) {
    const float tau = A > 0.f ? p.tau_pos : p.tau_neg;
    const float sg = 1.f / (1.f + expf(-tau * (r - 1.f)));
    L = -A * sg * 4.f / tau;
    dLdr = -4.f * A * sg * (1.f - sg);
  } else {
    float a = r * A, ga = A;
    if (p.has_delta) {
      a = fminf(r, p.delta) * A;
      ga = r <= p.delta ? A : 0.f;
    }
    const float rc = fminf(fmaxf(r, 1.f - p.eps_low), 1.f + p.eps_high);
    const float bb = rc * A;
    const float gb = (r >= 1.f - p.eps_low && r <= 1.f + p.eps_high) ? A : 0.f;
    const float g = a < bb ? ga : (a > bb ? gb : 0.5f * (ga + gb));
    L = -fminf(a, bb);
    dLdr = -g;
  }
  float dL;
  if (p.loss == R1K_LOSS_CISPO) {  // -sg(min(r, eps_high)) * A * l
    dL = -L * A;
    L = -L * A * l;
  } else {
    dL = dLdr * r;
  }
  if (has_is) {
    const float d = old - samp;
    float w = expf(d != d ? 0.f : d);
    if (p.is_mask) w = (w < p.is_lo || w > p.is_hi) ? 0.f : w;
    else w = fminf(fmaxf(w, p.is_lo), p.is_hi);
    L *= w;
    dL *= w;
  }
  float kl = 0.f;
  if (has_ref) {
    float dkl;
    kl_and_grad(l, lref, p.kl, kl, dkl);
    if (p.bias_kl) {
      dkl = (dkl + kl) * r;
      kl *= r;
    }
    if (p.use_kl) {
      L += p.beta * kl;
      dL += p.beta * dkl;
    }
  }
  if (r != r) L = dL = r;
  // the clip metrics count on the ratio after the delta clamp (TRL), NaN kept
  const bool clamp = p.has_delta && p.loss != R1K_LOSS_CISPO && p.loss != R1K_LOSS_SAPO && r > p.delta;
  const float rm = clamp ? p.delta : r;
  const float low = (rm < 1.f - p.eps_low && A < 0.f) ? 1.f : 0.f;
  const float high = (rm > 1.f + p.eps_high && A > 0.f) ? 1.f : 0.f;
  return {L, dL, kl, low, high};
}

__device__ __forceinline__ Lse warp_lse(Lse v, float k) {
  for (int o = 16; o > 0; o >>= 1) {
    const Lse w = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o),
                   __shfl_xor_sync(0xffffffffu, v.t, o)};
    v = lse_merge(v, w, k);
  }
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grpo_token_kernel(const R1kGrpoToken p, int64_t chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  __shared__ Partial part;
  __shared__ Lse warp_part[kWarps];
  __shared__ float bcast[2];  // lse2, c
  constexpr int E = 16 / sizeof(T);

  cg::cluster_group cluster = cg::this_cluster();
  const int CL = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t row = blockIdx.x / CL;
  const int64_t N = p.B * p.T;
  const int64_t b = row / p.T, t = row - b * p.T;
  const T* x_row = static_cast<const T*>(p.x) + b * p.x_sb + t * p.x_st;
  const bool has_dx = p.dx != nullptr;
  T* dx_row = has_dx ? static_cast<T*>(p.dx) + b * p.dx_sb + t * p.dx_st : nullptr;
  const int64_t c0 = rank * chunk;
  const int64_t n = c0 < p.V ? (p.V - c0 < chunk ? p.V - c0 : chunk) : 0;
  // 16-byte vectors where the slice is aligned, the rest element by element: the loads and the log-sum-exp by x's
  // alignment alone (so the log-prob is bitwise the same with and without a gradient), the stores by dx's
  const bool x_aligned = (reinterpret_cast<uintptr_t>(x_row + c0) & 15) == 0;
  const bool dx_aligned = has_dx && (reinterpret_cast<uintptr_t>(dx_row + c0) & 15) == 0;
  const int64_t nv = x_aligned ? n / E : 0;
  const int64_t nv_dx = dx_aligned ? n / E : 0;
  const float m_row = p.mask ? p.mask[row] : 1.f;

  if (m_row == 0.f) {  // every CTA of the cluster takes this branch: no cluster barrier is pending
    const T zero = from_f<T>(0.f);
    uint4 z4;
    T* zp = reinterpret_cast<T*>(&z4);
    for (int j = 0; j < E; ++j) zp[j] = zero;
    if (has_dx) {
      for (int64_t i = threadIdx.x; i < nv_dx; i += kThreads) __stcs(reinterpret_cast<uint4*>(dx_row + c0) + i, z4);
      for (int64_t i = nv_dx * E + threadIdx.x; i < n; i += kThreads) dx_row[c0 + i] = zero;
    }
    if (rank == 0 && threadIdx.x == 0) {
      p.logp[row] = 0.f;
      for (int k = 0; k < 6; ++k) p.stats[k * N + row] = 0.f;
    }
    return;
  }

  // 1. the slice into shared memory
  for (int64_t i = threadIdx.x; i < nv; i += kThreads)
    __pipeline_memcpy_async(xs + i * E, x_row + c0 + i * E, 16);
  __pipeline_commit();
  for (int64_t i = nv * E + threadIdx.x; i < n; i += kThreads) xs[i] = x_row[c0 + i];
  __pipeline_wait_prior(0);
  __syncthreads();

  // 2. this CTA's online log-sum-exp
  const float k = p.inv_t * kLog2e;
  const bool ent = p.entropy != 0;
  Lse st = {-INFINITY, 0.f, 0.f};
  float v[E];
  for (int64_t i = threadIdx.x; i < nv; i += kThreads) {
    const uint4 raw = reinterpret_cast<const uint4*>(xs)[i];
    const T* e = reinterpret_cast<const T*>(&raw);
    for (int j = 0; j < E; ++j) v[j] = to_f(e[j]);
    lse_add(st, v, E, k, ent);
  }
  for (int64_t i = nv * E + threadIdx.x; i < n; i += kThreads) {
    v[0] = to_f(xs[i]);
    lse_add(st, v, 1, k, ent);
  }
  st = warp_lse(st, k);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_part[warp] = st;
  const int64_t y = p.ids[row];
  __syncthreads();
  if (threadIdx.x == 0) {
    Lse a = warp_part[0];
    for (int w = 1; w < kWarps; ++w) a = lse_merge(a, warp_part[w], k);
    part.lse = a;
    part.has_y = y >= c0 && y < c0 + n;
    part.xy = part.has_y ? to_f(xs[y - c0]) : 0.f;
  }
  cluster.sync();  // every CTA's partial is published

  // 3. combine the cluster's partials; the token's terms (thread 0 of every CTA computes the same values)
  if (threadIdx.x == 0) {
    Lse a = {-INFINITY, 0.f, 0.f};
    float xy = 0.f;
    for (int r = 0; r < CL; ++r) {
      const Partial* q = cluster.map_shared_rank(&part, r);
      a = lse_merge(a, q->lse, k);
      if (q->has_y) xy = q->xy;
    }
    const float mx = a.m == -INFINITY ? 0.f : a.m * k;
    const float lse2 = mx + log2f(a.s);
    const float l = (xy * k - lse2) * kLn2;
    const float A = p.adv[b * p.adv_sb + t * p.adv_st];
    const float old = p.old ? p.old[row] : l;
    const bool has_ref = p.ref != nullptr, has_is = p.samp != nullptr;
    const float lref = has_ref ? p.ref[row] : l;
    const float samp = has_is ? p.samp[row] : old;
    const Terms tm = token_terms(p, l, A, old, lref, samp, has_ref, has_is);
    const float sb = p.scale[b * p.sc_sb + t * p.sc_st] * m_row;
    bcast[0] = lse2;
    bcast[1] = sb * tm.dL * p.inv_t;
    if (rank == 0) {
      p.logp[row] = l;
      p.stats[row] = sb * tm.L;
      p.stats[N + row] = m_row * tm.kl;
      p.stats[2 * N + row] = m_row * tm.low;
      p.stats[3 * N + row] = m_row * tm.high;
      p.stats[4 * N + row] = m_row * fmaxf(tm.low, tm.high);
      p.stats[5 * N + row] = ent ? m_row * (lse2 - a.t / a.s) * kLn2 : 0.f;
    }
  }
  // no CTA may exit while a peer still reads its partial: arrive now, wait after the stores
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  __syncthreads();

  // 4. dx = c (onehot(y) - p) over this slice, from shared memory
  const float lse2 = bcast[0], c = bcast[1];
  const int64_t n_dx = has_dx ? n : 0;
  for (int64_t i = threadIdx.x; i < nv_dx; i += kThreads) {
    const uint4 raw = reinterpret_cast<const uint4*>(xs)[i];
    const T* e = reinterpret_cast<const T*>(&raw);
    uint4 out;
    T* o = reinterpret_cast<T*>(&out);
    const int64_t col0 = c0 + i * E;
    for (int j = 0; j < E; ++j) {
      const float pj = exp2f(to_f(e[j]) * k - lse2);
      o[j] = from_f<T>(col0 + j == y ? c - c * pj : -c * pj);
    }
    __stcs(reinterpret_cast<uint4*>(dx_row + c0) + i, out);
  }
  for (int64_t i = nv_dx * E + threadIdx.x; i < n_dx; i += kThreads) {
    const float pj = exp2f(to_f(xs[i]) * k - lse2);
    dx_row[c0 + i] = from_f<T>(c0 + i == y ? c - c * pj : -c * pj);
  }
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

int64_t chunk_of(int64_t V, int cluster) {
  const int64_t per = (V + cluster - 1) / cluster;
  return (per + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
}

template <typename T>
cudaError_t launch(const R1kGrpoToken* p, cudaStream_t stream) {
  const int64_t N = p->B * p->T;
  if (N == 0) return cudaSuccess;
  const int64_t chunk = chunk_of(p->V, p->cluster);
  const size_t smem = static_cast<size_t>(chunk) * sizeof(T);
  cudaError_t e = cudaFuncSetAttribute(grpo_token_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(N * p->cluster), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(p->cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, grpo_token_kernel<T>, *p, chunk);
}

}  // namespace

extern "C" size_t r1k_grpo_token_smem(int64_t V, int elem_bytes, int cluster) {
  return static_cast<size_t>(chunk_of(V, cluster)) * static_cast<size_t>(elem_bytes);
}

extern "C" size_t r1k_grpo_token_smem_limit(void) {
  int dev = 0, bytes = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
  // the kernel's static shared memory (partials, broadcast) stays under 1 KB
  return bytes > 1024 ? static_cast<size_t>(bytes - 1024) : 0;
}

extern "C" cudaError_t r1k_grpo_token(const R1kGrpoToken* p, cudaStream_t stream) {
  if (p->cluster != 1 && p->cluster != 2 && p->cluster != 4 && p->cluster != 8) return cudaErrorInvalidValue;
  switch (p->dtype) {
    case 0: return launch<float>(p, stream);
    case 2: return launch<__half>(p, stream);
    case 3: return launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
