// Few-row bf16 linear layers of the decode step: see decode_linear.h for the math and the work split.
// Tile layout: each CTA holds, per pipeline stage, BN weight rows x 64 k (128-byte rows) and the MR <= 64
// activation rows x 64 k, both XOR-swizzled by 16-byte chunk (ldmatrix phases and cp.async stores are
// conflict-free). Warp w multiplies weight rows [w * WR, (w + 1) * WR) of the tile by every activation row:
// mma.m16n8k16 with the weight as A (row-major, k contiguous) and the activations as B (k contiguous).
#include <cuda_bf16.h>

#include "decode_linear.h"

namespace {

constexpr int kRowWarps = 4;  // warps across a tile's weight rows; k_groups of them split each k-step
constexpr int kBK = R1K_DECODE_LINEAR_K_STEP;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, L2 only; valid == false zero-fills (the source is not read)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                            uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// byte offset of 16-byte chunk c (0..7) of row r in a tile of 128-byte rows: the 8 consecutive rows one
// ldmatrix phase reads at one chunk fall in 8 different 16-byte bank groups
__device__ __forceinline__ uint32_t swz(int r, int c) { return (r << 7) | ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16(v)); }

template <int WR, int KG, int MT, int STAGES>
constexpr int smem_bytes() {
  constexpr int pipe = STAGES * (kRowWarps * WR * 128 + MT * 8 * 128);
  constexpr int red = (KG - 1) * kRowWarps * 32 * (WR / 16) * MT * 4 * 4;  // k-group partials
  constexpr int tile = kRowWarps * WR * MT * 8 * 4;                          // split-K sums
  return pipe > red ? (pipe > tile ? pipe : tile) : (red > tile ? red : tile);
}

template <int WR, int KG, int MT, int STAGES, int MODE>
__global__ void __launch_bounds__(kRowWarps * 32 * KG) decode_linear_kernel(const R1kDecodeLinear p) {
  constexpr int kThreads = kRowWarps * 32 * KG;
  constexpr int BN = kRowWarps * WR;        // weight rows per tile
  constexpr int MR = MT * 8;                // activation rows held (rows >= M are zeros)
  constexpr int W_BYTES = BN * 128, STAGE_BYTES = W_BYTES + MR * 128;
  constexpr int IT = WR / 16;               // m16 tiles per warp
  constexpr int WCH = BN * 8 / kThreads;    // 16-byte weight chunks per thread and stage (>= 1)
  constexpr int XCH = (MR * 8 + kThreads - 1) / kThreads;  // activation chunks per thread and stage
  static_assert(WCH >= 1 && BN * 8 % kThreads == 0, "a tile's chunks must spread evenly over the threads");
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int is_last;
  const int tid = threadIdx.x, lane = tid & 31, warp = (tid >> 5) % kRowWarps, kg = tid >> 7;
  const int ftid = tid & 127;  // this thread's index among the 128 of its k-group (fragment order)
  const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int kblocks = static_cast<int>(p.K / kBK);
  const int kb0 = static_cast<int>(static_cast<int64_t>(split) * kblocks / splits);
  const int nkb = static_cast<int>(static_cast<int64_t>(split + 1) * kblocks / splits) - kb0;
  const __nv_bfloat16* w = static_cast<const __nv_bfloat16*>(p.w);
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  const uint32_t sbase = smem_addr(smem);

  // this thread's cp.async sources (at k block kb0) and shared-memory offsets, fixed over the K loop
  const __nv_bfloat16* wsrc[WCH];
  uint32_t wdst[WCH];
  bool wok[WCH];
#pragma unroll
  for (int i = 0; i < WCH; ++i) {
    const int id = tid + i * kThreads, r = id >> 3, c = id & 7;
    int64_t row;
    if (MODE == 2) {  // tile rows [0, BN/2): gate rows; [BN/2, BN): the matching up rows (N + n)
      const int64_t n = static_cast<int64_t>(tile) * (BN / 2) + (r % (BN / 2));
      wok[i] = n < p.N;
      row = r < BN / 2 ? n : p.N + n;
    } else {
      row = static_cast<int64_t>(tile) * BN + r;
      wok[i] = row < p.N;
    }
    wsrc[i] = w + (wok[i] ? row * p.K + static_cast<int64_t>(kb0) * kBK + c * 8 : 0);
    wdst[i] = swz(r, c);
  }
  const __nv_bfloat16* xsrc[XCH];
  uint32_t xdst[XCH];
  bool xok[XCH];
#pragma unroll
  for (int i = 0; i < XCH; ++i) {
    const int id = tid + i * kThreads, r = id >> 3, c = id & 7;
    xok[i] = r < p.M && r < MR;
    xsrc[i] = x + (xok[i] ? r * p.ldx + static_cast<int64_t>(kb0) * kBK + c * 8 : 0);
    xdst[i] = W_BYTES + swz(r, c);
  }
  auto load = [&](int slot, int t) {  // k block kb0 + t into stage `slot`
    const uint32_t base = sbase + slot * STAGE_BYTES;
    const int64_t koff = static_cast<int64_t>(t) * kBK;
#pragma unroll
    for (int i = 0; i < WCH; ++i) cp_async16(base + wdst[i], wsrc[i] + (wok[i] ? koff : 0), wok[i]);
#pragma unroll
    for (int i = 0; i < XCH; ++i)
      if (tid + i * kThreads < MR * 8) cp_async16(base + xdst[i], xsrc[i] + (xok[i] ? koff : 0), xok[i]);
  };

  float acc[IT][MT][4];
#pragma unroll
  for (int i = 0; i < IT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkb) load(s, s);
    cp_async_commit();
  }
  for (int t = 0; t < nkb; ++t) {
    cp_async_wait<STAGES - 2>();  // stage t landed (this thread's part) ...
    __syncthreads();              // ... everyone's, and everyone is done with stage t - 1's slot
    if (t + STAGES - 1 < nkb) load((t + STAGES - 1) % STAGES, t + STAGES - 1);
    cp_async_commit();
    const uint32_t wbase = sbase + (t % STAGES) * STAGE_BYTES, xbase = wbase + W_BYTES;
#pragma unroll
    for (int k2 = 0; k2 < kBK / 16 / KG; ++k2) {  // this k-group's 16-wide k-steps of the stage
      const int kk = k2 * KG + kg;
      uint32_t a[IT][4], b[MT][2];
#pragma unroll
      for (int i = 0; i < IT; ++i)
        ldmatrix_x4(wbase + swz(warp * WR + i * 16 + (lane & 15), 2 * kk + (lane >> 4)), a[i][0], a[i][1],
                    a[i][2], a[i][3]);
#pragma unroll
      for (int j = 0; j < MT; j += 2)
        ldmatrix_x4(xbase + swz(j * 8 + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)), b[j][0],
                    b[j][1], b[j + 1][0], b[j + 1][1]);
#pragma unroll
      for (int i = 0; i < IT; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j) mma_bf16(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline's shared memory
  float* red = reinterpret_cast<float*>(smem);
  constexpr int FR = IT * MT * 4;  // accumulator values per thread
  if (KG > 1) {  // k-groups 1.. hand their partials to k-group 0, which adds them in k-group order
    if (kg > 0) {
#pragma unroll
      for (int i = 0; i < IT; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) red[((kg - 1) * FR + (i * MT + j) * 4 + r) * 128 + ftid] = acc[i][j][r];
    }
    __syncthreads();
    if (kg == 0) {
#pragma unroll
      for (int i = 0; i < IT; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int g2 = 1; g2 < KG; ++g2) acc[i][j][r] += red[((g2 - 1) * FR + (i * MT + j) * 4 + r) * 128 + ftid];
    }
    __syncthreads();
  }

  if (splits > 1) {  // partials in fragment order (coalesced); the tile's last split sums them in split order
    constexpr int TILE_FLOATS = BN * MR;
    static_assert(TILE_FLOATS == FR * 128, "fragment order covers the tile");
    float* part = p.ws + (static_cast<int64_t>(split) * gridDim.x + tile) * TILE_FLOATS;
    if (kg == 0) {
#pragma unroll
      for (int i = 0; i < IT; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) __stcg(part + ((i * MT + j) * 4 + r) * 128 + ftid, acc[i][j][r]);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
      const int last = atomicAdd(p.counters + tile, 1) == splits - 1;
      if (last) p.counters[tile] = 0;  // every split of this tile has arrived: ready for the next launch
      is_last = last;
    }
    __syncthreads();
    if (!is_last) return;  // the whole CTA leaves together
    __threadfence();
    const float* base = p.ws + static_cast<int64_t>(tile) * TILE_FLOATS;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * TILE_FLOATS;
    for (int e = tid; e < TILE_FLOATS; e += kThreads) {  // every thread, independent loads per split
      float s = 0.f;
#pragma unroll 4
      for (int sp = 0; sp < splits; ++sp) s += __ldcg(base + sp * stride + e);
      red[e] = s;
    }
    __syncthreads();
    if (kg == 0) {
#pragma unroll
      for (int i = 0; i < IT; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[i][j][r] = red[((i * MT + j) * 4 + r) * 128 + ftid];
    }
    __syncthreads();
  }

  // accumulator (i, j, r) of k-group 0: weight row warp * WR + i * 16 + g (+ 8 for r >= 2), activation row
  // j * 8 + 2q (+1)
  const int g = lane >> 2, q = lane & 3;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  if (MODE == 2) {  // up warps (2, 3) hand their bf16-rounded values to the gate warps (0, 1) through smem
    if (kg == 0 && warp >= 2) {
#pragma unroll
      for (int i = 0; i < IT; ++i)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) red[((((warp - 2) * IT + i) * MT + j) * 4 + r) * 32 + lane] = round_bf16(acc[i][j][r]);
    }
    __syncthreads();
    if (kg != 0 || warp >= 2) return;
#pragma unroll
    for (int i = 0; i < IT; ++i)
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t n = static_cast<int64_t>(tile) * (BN / 2) + warp * WR + i * 16 + g + (r >= 2 ? 8 : 0);
          const int64_t m = j * 8 + 2 * q + (r & 1);
          if (m < p.M && n < p.N) {
            const float gv = round_bf16(acc[i][j][r]);
            const float u = red[(((warp * IT + i) * MT + j) * 4 + r) * 32 + lane];
            out[m * p.ldo + n] = __float2bfloat16(gv / (1.f + __expf(-gv)) * u);
          }
        }
    return;
  }
  if (kg != 0) return;
  const __nv_bfloat16* bias = static_cast<const __nv_bfloat16*>(p.bias);
#pragma unroll
  for (int i = 0; i < IT; ++i)
#pragma unroll
    for (int j = 0; j < MT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t n = static_cast<int64_t>(tile) * BN + warp * WR + i * 16 + g + (r >= 2 ? 8 : 0);
        const int64_t m = j * 8 + 2 * q + (r & 1);
        if (m < p.M && n < p.N) {
          float v = acc[i][j][r];
          if (MODE == 0 && bias != nullptr) v += __bfloat162float(bias[n]);
          if (MODE == 1) v += __bfloat162float(out[m * p.ldo + n]);
          out[m * p.ldo + n] = __float2bfloat16(v);
        }
      }
}

int m_tiles(int64_t M) { return M <= 16 ? 2 : M <= 32 ? 4 : 8; }

template <int WR, int KG, int MT, int STAGES, int MODE>
cudaError_t launch(const R1kDecodeLinear* p, cudaStream_t stream) {
  constexpr int smem = smem_bytes<WR, KG, MT, STAGES>();
  auto kernel = decode_linear_kernel<WR, KG, MT, STAGES, MODE>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const dim3 grid(static_cast<unsigned>(r1k_decode_linear_tiles(p->N, p->mode, WR)),
                  static_cast<unsigned>(p->splits));
  kernel<<<grid, kRowWarps * 32 * KG, smem, stream>>>(*p);
  return cudaGetLastError();
}

template <int WR, int KG, int MT, int STAGES>
cudaError_t by_mode(const R1kDecodeLinear* p, cudaStream_t s) {
  switch (p->mode) {
    case 0: return launch<WR, KG, MT, STAGES, 0>(p, s);
    case 1: return launch<WR, KG, MT, STAGES, 1>(p, s);
    default: return launch<WR, KG, MT, STAGES, 2>(p, s);
  }
}

template <int WR, int KG, int MT>
cudaError_t by_stages(const R1kDecodeLinear* p, cudaStream_t s) {
  return p->stages == 4 ? by_mode<WR, KG, MT, 4>(p, s) : by_mode<WR, KG, MT, 6>(p, s);
}

template <int WR, int KG>
cudaError_t by_m(const R1kDecodeLinear* p, cudaStream_t s) {
  switch (m_tiles(p->M)) {
    case 2: return by_stages<WR, KG, 2>(p, s);
    case 4: return by_stages<WR, KG, 4>(p, s);
    default: return by_stages<WR, KG, 8>(p, s);
  }
}

template <int WR>
cudaError_t by_kg(const R1kDecodeLinear* p, cudaStream_t s) {
  switch (p->k_groups) {
    case 1: return by_m<WR, 1>(p, s);
    case 2: return by_m<WR, 2>(p, s);
    default: return by_m<WR, 4>(p, s);
  }
}

}  // namespace

extern "C" int64_t r1k_decode_linear_tiles(int64_t N, int mode, int warp_rows) {
  const int64_t rows = mode == 2 ? 2 * warp_rows : 4 * warp_rows;  // output columns per tile
  return (N + rows - 1) / rows;
}

extern "C" int64_t r1k_decode_linear_ws_floats(const R1kDecodeLinear* p) {
  if (p->splits <= 1) return 0;
  return static_cast<int64_t>(p->splits) * r1k_decode_linear_tiles(p->N, p->mode, p->warp_rows) * 4 *
         p->warp_rows * m_tiles(p->M) * 8;
}

extern "C" cudaError_t r1k_decode_linear(const R1kDecodeLinear* p, cudaStream_t stream) {
  if (p->M < 1 || p->M > R1K_DECODE_LINEAR_MAX_M || p->N < 1 || p->K < kBK || p->K % kBK != 0 ||
      p->splits < 1 || p->splits > p->K / kBK || p->mode < 0 || p->mode > 2 ||
      (p->warp_rows != 16 && p->warp_rows != 32) || (p->stages != 4 && p->stages != 6) ||
      (p->k_groups != 1 && p->k_groups != 2 && p->k_groups != 4) ||
      (p->splits > 1 && (p->ws == nullptr || p->counters == nullptr)))
    return cudaErrorInvalidValue;
  return p->warp_rows == 16 ? by_kg<16>(p, stream) : by_kg<32>(p, stream);
}
