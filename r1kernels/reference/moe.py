"""DeepSeek-V3 MoE routing, permutation and balancing (DESIGN.md section 3), fp32 math."""
from __future__ import annotations

import torch

from .logprob import acc


def _topk_lower_index_wins(x, k):
    """Top-k along the last dim, largest first; equal values keep the lower index first."""
    idx = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
    return x.gather(-1, idx), idx


def route(router_logits, e_score_correction_bias, top_k, n_group, topk_group, routed_scaling_factor=1.0,
          norm_topk_prob=True):
    """router_logits [T, E] -> (topk_weights fp32 [T, K], topk_ids int64 [T, K]), ids by descending
    biased score. Gradient flows only through the gathered sigmoid scores."""
    T, E = router_logits.shape
    s_TE = torch.sigmoid(acc(router_logits))
    with torch.no_grad():
        c_TE = s_TE + acc(e_score_correction_bias)
        c_TGe = c_TE.view(T, n_group, E // n_group)
        group_score_TG = _topk_lower_index_wins(c_TGe, 2)[0].sum(-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, _topk_lower_index_wins(group_score_TG, topk_group)[1], True)
        c_TE = c_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)
        topk_ids = _topk_lower_index_wins(c_TE, top_k)[1]
    w_TK = s_TE.gather(1, topk_ids)
    if norm_topk_prob:
        w_TK = w_TK / (w_TK.sum(-1, keepdim=True) + 1e-20)
    return w_TK * routed_scaling_factor, topk_ids


def permute(hidden, topk_ids, num_experts):
    """hidden [T, H], topk_ids [T, K] -> (permuted [T*K, H] grouped by expert (stable in t*K+k order),
    row_map int64 [T*K]: row of permuted holding flat slot t*K+k, tokens_per_expert int64 [E]).
    Offsets for grouped GEMMs: tokens_per_expert.cumsum(0).to(torch.int32)."""
    T, K = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices            # permuted row j holds flat slot order[j]
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)
    permuted = hidden[order // K]
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return permuted, row_map, tokens_per_expert


def unpermute(expert_out, row_map, topk_weights):
    """expert_out [T*K, H], row_map [T*K], topk_weights [T, K] -> [T, H] = sum_k w[t,k] * out[row_map[t*K+k]],
    accumulated in fp32 over k in order, returned in expert_out's dtype."""
    T, K = topk_weights.shape
    gathered_TKH = acc(expert_out[row_map].view(T, K, expert_out.shape[1]))
    out_TH = (gathered_TKH * acc(topk_weights).unsqueeze(-1)).sum(1)
    return out_TH.to(expert_out.dtype)


@torch.no_grad()
def update_bias(bias, tokens_per_expert, rate=1e-3):
    """Auxiliary-loss-free balancing: bias += rate * sign(mean(count) - count), in place."""
    counts = tokens_per_expert.double()  # exact integer counts past 2**24 (fp32 rounds 2**24 + 1 to 2**24)
    bias.add_(torch.sign(counts.mean() - counts).to(bias.dtype), alpha=rate)
    return bias


def sequence_aux_loss(router_logits, topk_ids, seq_len, top_k, alpha=1e-4):
    """router_logits [B*S, E], topk_ids [B*S, K] (or None: plain top-K of the sigmoid scores) -> scalar
    alpha * mean_b sum_i f_i P_i with f_i = E/(K*S) * count_i and P_i = mean_t s_i / sum_E s."""
    N, E = router_logits.shape
    s_NE = torch.sigmoid(acc(router_logits))
    if topk_ids is None:
        topk_ids = _topk_lower_index_wins(s_NE.detach(), top_k)[1]
    B = N // seq_len
    p_BSE = (s_NE / (s_NE.sum(-1, keepdim=True) + 1e-20)).view(B, seq_len, E)  # 1e-20: all s underflow to 0
    counts_BE = torch.zeros(B, E, device=s_NE.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, topk_ids.reshape(B, -1).long(),
                           torch.ones(B, seq_len * topk_ids.shape[-1], device=s_NE.device))
    f_BE = counts_BE * (E / (top_k * seq_len))
    return alpha * (f_BE * p_BSE.mean(1)).sum(-1).mean()
