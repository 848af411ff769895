// Few-row bf16 linear layers of the decode step (M <= 64 rows): raw pointers, sizes and a stream (no torch
// headers). out = epilogue(x[M, K] @ w[N, K]^T), fp32 accumulation:
//   mode 0 (store):    out[m, n] = bf16(acc + bias[n])                       (bias may be null)
//   mode 1 (residual): out[m, n] = bf16(out[m, n] + acc)                     (in place, as addmm_ with beta 1)
//   mode 2 (gated):    w is [2I, K] (gate rows then up rows), out is [M, I]:
//                      out[m, n] = bf16(silu(g) * u), g = bf16(acc[m, n]), u = bf16(acc[m, I + n])
// The weight streams from HBM once through a cp.async pipeline; the tensor cores run with the weight rows as
// the MMA's M side and the few activation rows as its N side. Work is split over the weight rows (tiles of
// 64 or 128 rows) and, where the tiles are fewer than the SMs, over K: each split writes its fp32 partial to
// `ws`, and the last split of a tile to arrive (a per-tile counter, reset by that CTA) sums the partials in
// split order (deterministic) and runs the epilogue. Needs sm_80+ (mma.sync, cp.async, ldmatrix).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* x;        // [M, K] bf16, row stride ldx (elements), 16-byte aligned rows
  const void* w;        // [N, K] bf16 contiguous (mode 2: [2I, K], N = I)
  const void* bias;     // [N] bf16 or null (mode 0 only)
  void* out;            // [M, N] bf16, row stride ldo
  float* ws;            // split partials: r1k_decode_linear_ws_floats() floats (unused when splits == 1)
  int* counters;        // >= r1k_decode_linear_tiles() ints, zero on entry; zero again on exit
  int64_t M, N, K, ldx, ldo;
  int mode;             // 0 store, 1 residual, 2 gated (above)
  int warp_rows;        // weight rows per warp: 16 or 32 (tile = 4 row warps x warp_rows)
  int k_groups;         // 1, 2 or 4 sets of the 4 row warps, each taking every k_groups-th 16-wide k-step
                        // (more warps issuing MMAs per SM); summed in k-group order in shared memory
  int stages;           // cp.async pipeline depth: 4 or 6
  int splits;           // K splits, 1 .. K / 64
} R1kDecodeLinear;

// Largest M, and the K granularity (K % this == 0), the kernel takes.
enum { R1K_DECODE_LINEAR_MAX_M = 64, R1K_DECODE_LINEAR_K_STEP = 64 };
int64_t r1k_decode_linear_tiles(int64_t N, int mode, int warp_rows);
int64_t r1k_decode_linear_ws_floats(const R1kDecodeLinear* p);
cudaError_t r1k_decode_linear(const R1kDecodeLinear* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
