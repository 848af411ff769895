// Token-level GRPO loss kernel (one read + one write of the logits) entry point: raw pointers, sizes and a
// stream (no torch headers). The math is r1kernels/triton/grpo.py's, per token:
//   l = log softmax(x / T)[y], the per-token loss L(l) of the clipped family + KL, c = dL/dl,
//   dx = s_b * c / T * (onehot(y) - softmax(x / T)), written into dx (which may alias x).
// Each row is split over the `cluster` CTAs of one thread-block cluster; each CTA holds its slice in shared
// memory between the log-sum-exp and the gradient, and the CTAs exchange (max, sum) through distributed
// shared memory: HBM sees one read and one write of every row. Needs sm_90.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Loss and KL codes: their indices in r1kernels/reference/grpo.py's LOSS_TYPES / KL_ESTIMATORS (the one
// table; the Python launcher passes LOSS_CODE[...] / KL_CODE[...]). Every loss other than cispo and sapo is
// the clipped surrogate here (the others differ in their reduction, which is the per-row scale).
enum { R1K_LOSS_CISPO = 4, R1K_LOSS_SAPO = 5 };
enum { R1K_KL_K1 = 0, R1K_KL_K2 = 1, R1K_KL_K3 = 2, R1K_KL_LOW_VAR = 3 };

typedef struct {
  const void* x;        // [B, T, V] logits, last dim contiguous; strides x_sb, x_st (elements)
  const int64_t* ids;   // [B * T] labels
  const float* adv;     // advantages: element (b, t) at b * adv_sb + t * adv_st
  const float* mask;    // [B * T] or null (all ones); a row with mask 0 reads nothing
  const float* old;     // [B * T] old log-probs or null (then old = l)
  const float* ref;     // [B * T] reference log-probs or null
  const float* samp;    // [B * T] sampling log-probs or null (no importance-sampling correction)
  const float* scale;   // the loss reduction s_b: element (b, t) at b * sc_sb + t * sc_st
  float* logp;          // [B * T] out: l (0 where masked)
  float* stats;         // [6, B * T] out: s_b m L, m kl, m low, m high, m max(low, high), m entropy
  void* dx;             // [B, T, V] out (may be x): strides dx_sb, dx_st; null: no gradient, nothing written
  int64_t B, T, V, x_sb, x_st, dx_sb, dx_st, adv_sb, adv_st, sc_sb, sc_st;
  float inv_t, eps_low, eps_high, delta, beta, tau_pos, tau_neg, is_lo, is_hi;
  int dtype;            // 0 f32, 2 f16, 3 bf16 (x and dx)
  int loss, kl;         // codes above
  int has_delta, is_mask, bias_kl, entropy, use_kl;
  int cluster;          // CTAs per row: 1, 2, 4 or 8
} R1kGrpoToken;

// Shared memory each CTA needs for a row of V elements of elem_bytes split over `cluster` CTAs.
size_t r1k_grpo_token_smem(int64_t V, int elem_bytes, int cluster);
// The largest dynamic shared memory one CTA may use on the current device (0 on error).
size_t r1k_grpo_token_smem_limit(void);
cudaError_t r1k_grpo_token(const R1kGrpoToken* p, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
