"""Padding-free, token-budget micro-batches (padding_free, max_tokens_per_batch).

A rank's N rows (left-padded prompt + right-padded completion) are planned into micro-batches: the padded
partition (per_device_train_batch_size consecutive rows) or, with a token budget, as few bins of at most
max_tokens_per_batch tokens as fit (largest row first into the lightest bin). Each micro-batch runs as ONE
sequence [1, n]: its rows' real tokens back to back, position ids restarting at 0 per row, and causal
attention inside each row only (`packed_attention`: torch's varlen flash attention on CUDA bf16/fp16,
elsewhere one torch sdpa over the rows re-padded for attention only: measured on a 2-core CPU, the demo's
SFT step 0.50 -> 0.39 s against the padded batch, where sdpa row by row was slower than padding). A row
feeds its prompt and its completion up to the token before its last loss token (the hidden state before
token t scores t, so nothing after the last scored token is computed); a policy with MoE routers that count
(`routed`) feeds through its last loss token (that output unscored), as the padded forward does, so the routers
count the same tokens packed and padded (expert loads, moe/max_load_ratio, the aux-loss-free bias update). For
such a policy GRPO also passes its completion mask: a row then feeds its real
completion tokens up to its padded micro-batch's trim (the padded forward routes those of a row whose loss
mask is zeroed, e.g. mask_truncated_completions, too). A row's fed tokens are at most its prompt + completion
tokens, what max_tokens_per_batch must hold (check_token_budget: the longest row).

Why the losses stay exactly those of the padded batch: every normalization of the loss family is a sum
over tokens with a weight that depends only on the row and on the padded micro-batch the row would have
been in (grpo/sapo: 1 / (rows * the row's tokens), bnpo: 1 / that micro-batch's tokens, dr_grpo:
1 / (rows * max_completion_length), luspo: 1 / rows, dapo/cispo/vespo: 1 / num_items), and every
per-sequence quantity (GSPO ratio, sequence rollout-correction weights, the off-policy mask, VESPO's
weight) reads its own row only. So a packed micro-batch's loss is sum over its rows of w_row * sum_t m*L,
with w_row from the padded partition (`reduction_weights`), and the packed losses add up to the padded
ones whatever rows share a micro-batch. L itself comes from r1kernels' reference (grpo_token_loss) on the
[rows, T] layout of the packed log-probs (a scatter of fp32 scalars); the head runs on the scored tokens
only (rk.linear_token_logprobs, or rk.linear_grpo_loss directly on the packed tokens when the loss is
token-local with num_items normalization, where w_row is one constant). The expensive transformer
forward/backward runs packed, which is where the time goes. One exception, by definition per micro-batch:
top_entropy_quantile's threshold is taken over the packed micro-batch's tokens (the padded one's without
a token budget, where the packs are the padded micro-batches).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from r1kernels.reference.grpo import LOSS_REDUCTION

ATTN_NAME = "r1train_packed"


@dataclass
class Pack:
    """One packed micro-batch. rows: rank-local row indices [b]; the scored (loss) tokens are listed row by
    row: token j is completion column tok_col[j] of rows[tok_row[j]], scored by the hidden state at packed
    position score_idx[j]."""
    rows: torch.Tensor           # [b] int64
    input_ids: torch.Tensor      # [1, n]
    position_ids: torch.Tensor   # [1, n]
    cu_seqlens: torch.Tensor     # [b + 1] int32 ([0, 1] for a filler pack: b = 0, one unscored token)
    max_len: int
    score_idx: torch.Tensor      # [C] int64
    tok_row: torch.Tensor        # [C] int64, 0..b-1
    tok_col: torch.Tensor        # [C] int64
    T: int                       # the longest row's scored tokens: the pack's [b, T] layout
    src: torch.Tensor            # [n] int64: each packed token's flat index in the rank's [N, L] input_ids

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def attn_kwargs(self) -> dict:
        return {"cu_seq_lens_q": self.cu_seqlens, "max_length_q": self.max_len}

    def gather(self, x_BT: torch.Tensor) -> torch.Tensor:
        """[1, C] of a rank-level [N, T'] tensor at the pack's scored tokens."""
        return x_BT[self.rows[self.tok_row], self.tok_col][None]

    def to_rows(self, x_1C: torch.Tensor) -> torch.Tensor:
        """[b, T] layout of a [1, C] per-token tensor (zeros past each row's scored tokens; differentiable)."""
        out = x_1C.new_zeros(self.rows.numel(), self.T)
        return out.index_put((self.tok_row, self.tok_col), x_1C[0])

    def rows_T(self, x_BT: torch.Tensor) -> torch.Tensor:
        """[b, T] slice of a rank-level [N, T'] tensor."""
        return x_BT[self.rows, :self.T]


def loss_lengths(mask_BT: torch.Tensor) -> torch.Tensor:
    """Per row: 1 + the last completion column with a nonzero loss mask (0 for a row with no loss)."""
    pos = torch.arange(1, mask_BT.shape[1] + 1, device=mask_BT.device)
    return ((mask_BT != 0) * pos).amax(1) if mask_BT.shape[1] else mask_BT.new_zeros(mask_BT.shape[0])


def plan(lengths: list[int], rows_per_batch: int, max_tokens: int | None = None,
         min_batches: int = 1) -> list[list[int]]:
    """Micro-batches as lists of row indices: consecutive runs of rows_per_batch rows (no budget), or with a
    token budget the fewest bins, and at least max(min_batches, 1), of at most max_tokens tokens that the
    greedy packing fits (largest row first into the lightest bin; more bins until every bin fits).
    Invariants: every row is in exactly one bin; len(result) >= min_batches (never capped at the row count;
    without a budget == max(ceil(n / rows_per_batch), min_batches), with one == min_batches when min_batches
    >= len(lengths)); bins that get no row are [] and come last: build_packs runs each as a filler pack, so a
    rank short of rows still runs as many micro-batches."""
    n = len(lengths)
    if max_tokens is None:
        runs = [list(range(s, min(s + rows_per_batch, n))) for s in range(0, n, rows_per_batch)]
        return runs + [[] for _ in range(min_batches - len(runs))]
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens}")
    if n and max(lengths) > max_tokens:
        raise ValueError(f"max_tokens_per_batch={max_tokens} is less than the longest row ({max(lengths)} tokens)")
    order = sorted(range(n), key=lambda i: -lengths[i])
    k = max(math.ceil(sum(lengths) / max_tokens), min_batches, 1)  # never capped at n: min_batches is a promise
    while True:
        heap = [(0, b) for b in range(k)]
        bins: list[list[int]] = [[] for _ in range(k)]
        for i in order:
            load, b = heapq.heappop(heap)
            bins[b].append(i)
            heapq.heappush(heap, (load + lengths[i], b))
        # with k >= n bins every row lands in a bin of load 0 (or of 0-token rows), so it fits: the loop ends
        if max(load for load, _ in heap) <= max_tokens or k >= n:
            return sorted((sorted(b) for b in bins), key=lambda b: not b)  # stable: the empty bins last
        k += 1


def plan_all_ranks(lengths, rows_per_batch, max_tokens, device) -> list[list[int]]:
    """plan() with the same number of micro-batches on every rank, with or without a token budget (ZeRO's
    collectives run per forward and backward, so every rank must run as many; ranks of uneven row counts
    plan different counts even without a budget); a rank short of rows gets empty bins. Each round every rank
    replans with min_batches = the ranks' largest count, and plan returns at least that many (exactly that
    many unless its rows need more), so the largest count never falls and only grows while some rank's rows
    need more bins: bounded (as many bins as rows always fit), so the rounds end (without a budget after the
    first). Every rank takes the same branch each round (hi and lo are all-reduced), so no rank leaves the
    loop while another all-reduces."""
    bins = plan(lengths, rows_per_batch, max_tokens)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return bins
    while True:
        t = torch.tensor([len(bins), -len(bins)], dtype=torch.long, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        hi, lo = t[0].item(), -t[1].item()
        if hi == lo:
            return bins
        bins = plan(lengths, rows_per_batch, max_tokens, min_batches=hi)


def build_packs(input_ids_BL, prompt_mask_BP, mask_BT, *, rows_per_batch: int, max_tokens: int | None = None,
                routed: bool = False, completion_mask_BT=None):
    """The rank's micro-batches as Packs. Row i feeds its p_i prompt tokens and its first f_i completion
    tokens, and scores completion tokens 0..n_i-1 (n_i = loss_lengths). f_i = n_i - 1 (the hidden state before
    token t scores t: nothing after the last scored token is computed); routed (a policy with MoE routers that
    count): f_i = n_i, the tokens the padded forward feeds through the last scored token, which its routers
    route (the last output unscored). completion_mask_BT (with routed) [N, T] (a prefix of real tokens per row,
    as the rollout's): f_i = max(n_i, min(c_i, T_g)) with c_i the row's real completion tokens and T_g = max(1,
    the longest n of its padded micro-batch, rows_per_batch consecutive rows): exactly the real tokens of GRPO's
    padded forward, trimmed to T_g completion columns, so that MoE routers count the padded run's tokens when
    mask_BT zeroes a row's real tokens."""
    dev = input_ids_BL.device
    P, L = prompt_mask_BP.shape[1], input_ids_BL.shape[1]
    p = prompt_mask_BP.sum(1).cpu()
    n = loss_lengths(mask_BT).cpu()
    if (p < 1).any():
        raise ValueError("padding_free needs at least one prompt token per row (the first completion token is "
                         "scored from the last prompt token)")
    f = n if routed else (n - 1).clamp(min=0)
    if routed and completion_mask_BT is not None and n.numel():
        grp = torch.arange(n.numel()) // rows_per_batch
        trim_G = torch.zeros(int(grp[-1]) + 1, dtype=n.dtype).scatter_reduce(0, grp, n, "amax").clamp(min=1)
        f = torch.maximum(n, torch.minimum(loss_lengths(completion_mask_BT).cpu(), trim_G[grp]))
    feed = p + f
    groups = plan_all_ranks(feed.tolist(), rows_per_batch, max_tokens, dev)
    flat = input_ids_BL.reshape(-1)
    packs = []
    for rows in groups:
        if not rows:  # an empty bin (plan_all_ranks: this rank has fewer rows than another has packs)
            packs.append(_filler_pack(flat))
            continue
        r = torch.tensor(rows, dtype=torch.long)
        f_r, p_r, n_r = feed[r], p[r], n[r]  # f_r: fed tokens, prompt + completion
        starts = torch.cumsum(f_r, 0) - f_r
        first = r * L + P - p_r  # flat index of each row's first prompt token (left padding)
        pos = torch.arange(int(f_r.sum())) - torch.repeat_interleave(starts, f_r)
        src = torch.repeat_interleave(first, f_r) + pos
        tok_row = torch.repeat_interleave(torch.arange(len(rows)), n_r)
        tok_col = torch.arange(int(n_r.sum())) - torch.repeat_interleave(torch.cumsum(n_r, 0) - n_r, n_r)
        score = torch.repeat_interleave(starts + p_r - 1, n_r) + tok_col
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(f_r, 0)
        src = src.to(dev)
        packs.append(Pack(rows=r.to(dev), input_ids=flat[src][None], position_ids=pos.to(dev)[None],
                          cu_seqlens=cu.to(dev), max_len=int(f_r.max()), score_idx=score.to(dev),
                          tok_row=tok_row.to(dev), tok_col=tok_col.to(dev), T=max(int(n_r.max()), 1), src=src))
    return packs


def _filler_pack(flat: torch.Tensor) -> Pack:
    """An empty bin's micro-batch: no rows and no scored tokens (its loss is an empty sum: 0, every gradient
    0), yet one token to feed (the rank's first token; token 0 on a rank without rows), so its forward and
    backward run every layer, and ZeRO's collectives in them, as the other ranks' packs do: transformers
    cannot run a sequence of 0 tokens. That token is one sequence of its own (cu_seqlens [0, 1])."""
    dev = flat.device
    src = torch.zeros(min(flat.numel(), 1), dtype=torch.long, device=dev)
    ids = flat[src][None] if flat.numel() else torch.zeros(1, 1, dtype=flat.dtype, device=dev)
    none = torch.zeros(0, dtype=torch.long, device=dev)
    return Pack(rows=none, input_ids=ids, position_ids=torch.zeros(1, 1, dtype=torch.long, device=dev),
                cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device=dev), max_len=1, score_idx=none,
                tok_row=none, tok_col=none, T=1, src=src)


def reduction_weights(loss_type: str, mask_BT, rows_per_batch: int, *, max_completion_length=None, num_items=None):
    """w [N] with sum_i w_i sum_t m_it L_it = the sum over the padded micro-batches (runs of rows_per_batch
    consecutive rows) of reduce_loss(L, m) (r1kernels.reference.grpo); the entropy term's weights we [N]
    (entropy_coef * sum_i we_i sum_t m_it H_it = the sum of each micro-batch's entropy term); and each row's
    share of its padded micro-batch, 1 / rows (a packed micro-batch's entropy mean over the tokens that
    top_entropy_quantile selects counts sum_i share_i times: once where it is a padded micro-batch)."""
    m = mask_BT.float()
    N = m.shape[0]
    grp = torch.arange(N, device=m.device) // rows_per_batch
    n_i = m.sum(1)
    tok_g = torch.zeros(int(grp.max()) + 1 if N else 0, device=m.device).index_add_(0, grp, n_i)
    rows_g = torch.bincount(grp).float()
    tok_i, rows_i = tok_g[grp].clamp(min=1.0), rows_g[grp]
    red = LOSS_REDUCTION[loss_type]
    if red == "sequence":
        w = 1.0 / (rows_i * n_i.clamp(min=1.0))
    elif red == "sequence_sum":
        w = 1.0 / rows_i
    elif red == "tokens":
        w = 1.0 / tok_i
    elif red == "length":
        w = 1.0 / (rows_i * (max_completion_length or mask_BT.shape[1]))
    else:
        # without num_items, reduce_loss divides by its micro-batch's token count (not the rank's)
        w = torch.ones_like(n_i) / num_items.reshape(()).float() if num_items is not None else 1.0 / tok_i
    return w, 1.0 / tok_i, 1.0 / rows_i


# ---- attention over packed rows
def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention-interface signature: q [1, Hq, n, Dq], k [1, Hkv, n, Dq], v [1, Hkv, n, Dv] of
    rows packed back to back (boundaries cu_seq_lens_q) -> ([1, n, Hq, Dv], None), causal within each row."""
    if cu_seq_lens_q is None:
        raise RuntimeError(f"attention {ATTN_NAME!r} needs cu_seq_lens_q (a packed r1train forward)")
    check_attention_kwargs(module, kwargs)
    Hq, Hkv, Dq, Dv = query.shape[1], key.shape[1], query.shape[-1], value.shape[-1]
    if _flash_ok(query, dropout, Dv):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [n, H, D]
        if Dv < Dq:  # DeepSeek-V3's MLA: values narrower than keys
            v = F.pad(v, (0, Dq - Dv))
        kw = {}
        if Hq != Hkv:
            if "enable_gqa" in _varlen_params():
                kw["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
        window = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                          window_size=window, **kw)
        return out[..., :Dv][None], None
    # elsewhere: the rows scattered into a padded [b, H, Lmax, D] batch for one sdpa call (causal, keys past
    # a row's end masked), then gathered back; the projections and MLP around it stay packed
    cu = cu_seq_lens_q.to(query.device).long()
    lens = cu[1:] - cu[:-1]
    b, L, n = lens.numel(), int(max_length_q), query.shape[2]
    row = torch.repeat_interleave(torch.arange(b, device=query.device), lens, output_size=n)
    col = torch.arange(n, device=query.device) - cu[:-1][row]

    def rows_of(x):  # [1, H, n, D] -> [b, H, L, D]
        out = x.new_zeros(b, L, x.shape[1], x.shape[3])
        return out.index_put((row, col), x[0].transpose(0, 1)).transpose(1, 2)
    i = torch.arange(L, device=query.device)
    mask = (i[None, :, None] >= i[None, None, :]) & (i[None, None, :] < lens[:, None, None])  # [b, Lq, Lk]
    if sliding_window is not None:
        mask = mask & (i[:, None] - i[None] < sliding_window)[None]
    out = F.scaled_dot_product_attention(rows_of(query), rows_of(key), rows_of(value), attn_mask=mask[:, None],
                                         scale=scaling, dropout_p=dropout, enable_gqa=Hq != Hkv)
    return out.transpose(1, 2)[row, col][None], None  # [1, n, Hq, Dv]


# attention keywords that change the math (transformers' attention-interface names): Gemma 2's logit soft-capping
# (softcap), gpt-oss's sinks (s_aux, sinks), a relative position bias (position_bias), a non-causal layer
# (is_causal=False); each maps to the one value it may take besides None. Packed attention is plain causal softmax
# attention over each row: any other value is an error.
_UNPACKABLE = {"softcap": None, "s_aux": None, "sinks": None, "position_bias": None, "is_causal": True}


def check_attention_kwargs(module, kwargs: dict):
    """Packed attention is causal softmax attention: a keyword of _UNPACKABLE with another value, or a module
    whose is_causal attribute is False (transformers' sdpa reads it, e.g. Gemma 3's bidirectional attention), is
    a ValueError naming padding_free."""
    bad = {k: kwargs[k] for k, ok in _UNPACKABLE.items() if k in kwargs and kwargs[k] is not None
           and kwargs[k] is not ok}
    if getattr(module, "is_causal", True) is False:
        bad["is_causal"] = False
    if bad:
        what = ", ".join(f"{k}={v!r}" if not torch.is_tensor(v) else f"{k} (a tensor)" for k, v in bad.items())
        raise ValueError(f"padding_free: {type(module).__name__}'s attention passes {what}, which r1train's packed "
                         "attention does not implement; set padding_free=false")


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset:
    """Keyword names of torch's varlen_attn (empty without it). The packed path needs window_size (causal
    masking); enable_gqa is newer (torch 2.11's varlen_attn rejects it: heads are then repeated)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def _flash_ok(query, dropout, Dv) -> bool:
    if not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0):
        return False
    D = query.shape[-1]
    return not (D % 8 or D > 256 or Dv > D) and "window_size" in _varlen_params()


_REGISTERED = []


def register():
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, packed_attention_forward)
        _REGISTERED.append(True)


@contextlib.contextmanager
def packed_attention(*models):
    """The models' attention runs packed_attention_forward inside (re-entrant). transformers builds no mask
    for a name it has no mask function for, so no [n, n] mask exists. Hold it over the backward too:
    activation checkpointing re-runs the attention there."""
    register()
    cfgs = {id(m.config): m.config for m in models if m is not None}
    cfgs = [c for c in cfgs.values() if c._attn_implementation != ATTN_NAME]
    old = [c._attn_implementation for c in cfgs]
    for c in cfgs:
        c._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        for c, o in zip(cfgs, old):
            c._attn_implementation = o


@torch.no_grad()
def packed_logprobs(policy, packs, completion_ids_BT, *, temperature=1.0, backend="auto"):
    """Per-token log p of the scored completion tokens under `policy` (called like the engine) from packed
    forwards, fp32 [N, T] (0 past each row's scored tokens)."""
    from .rollout import logprob_fn

    out = torch.zeros(completion_ids_BT.shape, dtype=torch.float32, device=completion_ids_BT.device)
    for pk in packs:
        lp_1C = policy(pk.input_ids, None, 0, logprob_fn(pk.gather(completion_ids_BT), temperature, backend=backend),
                       pack=pk)
        out[pk.rows[pk.tok_row], pk.tok_col] = lp_1C[0].float()
    return out
