"""Token sampling from logits rows: temperature, top-k, top-p, min-p, greedy; counter-based noise.

Spec (every backend draws the same token from the same row, seed and position, up to exact ties of
the float keys):
- z = logits / temperature in fp32.
- kept set: top_k > 0 keeps z >= the k-th largest z; top_p < 1 keeps, among those, the tokens with
  z >= tau_p, tau_p the largest value such that the kept-by-k probability mass at or above it is
  >= top_p (the smallest nucleus, ties at its edge kept); min_p > 0 keeps z >= max z + log(min_p).
  The mass is summed in fp32 in each backend's order: a top_p within its rounding of a cumulative mass (~1e-7
  relative) may keep one token more or less on one backend than on another.
- token = argmax over the kept set of z + g, g = -log(-log(u)) (Gumbel-max: an exact draw from
  softmax over the kept set), ties to the lower index; greedy: argmax of z over the kept set.
- u = ((x >> 9) + 0.5) * 2^-23 in (0, 1), x = word v mod 4 of Philox4x32-10 with counter
  (v div 4, position, 0, 0) and key (seed low 32 bits, seed high 32 bits): one Philox call gives the noise
  of 4 consecutive tokens; the noise is a function of (seed, position, v) only, so a row draws the same
  token in any batch, on any rank, and after a resume.
- logprob = z[token] - logsumexp(z over the kept set): the log-probability under the distribution
  sampled from (with no truncation, log softmax(logits / T)[token], what the training forward computes),
  computed as (z[token] - max z) - log(sum exp(z - max z)) (its fp32 error does not grow with |z|).
- A row with no distribution (no_distribution: z holds NaN or +inf, or is -inf everywhere) draws token 0 with
  log-prob NaN, whatever the options: the NaN marks the row for the caller (r1train's generate(check_finite=True)
  reads the log-probs once after a rollout); found on the device, no host sync.
"""
from __future__ import annotations

import torch

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox4(c0, c1, k0, k1, rounds: int = 10):
    """Philox4x32 words (x0, x1, x2, x3) for counters (c0, c1, 0, 0) and key (k0, k1); int64 tensors holding
    uint32 values (products wrap mod 2^64 in two's complement, so hi/lo 32-bit halves stay exact)."""
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = k0 + torch.zeros_like(c0)
    k1 = k1 + torch.zeros_like(c0)
    for _ in range(rounds):
        p0, p1 = c0 * PHILOX_M0, c2 * PHILOX_M1
        hi0, lo0 = (p0 >> 32) & MASK32, p0 & MASK32
        hi1, lo1 = (p1 >> 32) & MASK32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def uniforms(seeds_B, positions_B, V: int):
    """fp32 u [B, V] in (0, 1): the noise for vocabulary entry v of row b at its position."""
    s = seeds_B.long()
    k0, k1 = (s & MASK32)[:, None], ((s >> 32) & MASK32)[:, None]
    n = -(-V // 4)  # Philox counters per row
    c = torch.arange(n, device=seeds_B.device, dtype=torch.int64)[None, :]
    words = philox4(c, (positions_B.long() & MASK32)[:, None], k0, k1)
    x = torch.stack(words, -1).reshape(s.shape[0], 4 * n)[:, :V]  # token v: word v % 4 of counter v // 4
    return ((x >> 9).float() + 0.5) * (2.0 ** -23)


def kept_mask(z_BV, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """bool [B, V]: the tokens the truncations keep (see the module docstring)."""
    keep = torch.ones_like(z_BV, dtype=torch.bool)
    V = z_BV.shape[-1]
    if 0 < top_k < V:
        kth = z_BV.topk(top_k, dim=-1).values[:, -1:]
        keep &= z_BV >= kth
    if top_p < 1.0:
        zk = z_BV.masked_fill(~keep, float("-inf"))
        # sorted by z, not by p: distinct z can round to equal fp32 p, and a p-sort orders those arbitrarily,
        # taking tau from the smaller z (a token the rule excludes kept); equal z give equal tau in any order
        sz, idx = zk.sort(-1, descending=True)
        sp = torch.softmax(zk, -1).gather(-1, idx)
        before = sp.cumsum(-1) - sp  # mass strictly above each sorted token
        edge = torch.where(before < top_p, sp.new_zeros(()), sp.new_ones(())).argmax(-1, keepdim=True) - 1
        edge = edge.where(edge >= 0, torch.full_like(edge, V - 1))  # every prefix < top_p: keep all
        keep &= z_BV >= sz.gather(-1, edge)
    if min_p > 0.0:
        keep &= z_BV >= z_BV.max(-1, keepdim=True).values + torch.log(torch.tensor(min_p))
    return keep


def no_distribution(logits_BV, temperature: float):
    """bool [B]: the rows whose z = logits / temperature holds NaN or +inf (a NaN logit, or one that overflows
    float32 at this temperature) or is -inf everywhere: max z is not finite (amax propagates NaN; the division by
    a positive temperature is monotone, so it is the max of z). One read of the logits."""
    return ~torch.isfinite(logits_BV.amax(-1).float() / temperature)


def mark_no_distribution(logits_BV, temperature: float, tok_B, logp_B):
    """(tokens, log-probs) with the rows of no_distribution set to token 0 and log-prob NaN (the spec's rule, applied
    after any backend's draw: what a backend draws from such a row is its own)."""
    bad = no_distribution(logits_BV, temperature)
    return tok_B.masked_fill(bad, 0), logp_B.masked_fill(bad, float("nan"))


def sample_tokens(logits_BV, seeds_B, positions_B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                  greedy=False):
    """-> (tokens int64 [B], fp32 log-prob [B] under the sampled distribution)."""
    z = logits_BV.float() / temperature
    keep = kept_mask(z, top_k, top_p, min_p)
    zk = z.masked_fill(~keep, float("-inf"))
    if greedy:
        key = zk
    else:
        u = uniforms(seeds_B, positions_B, z.shape[-1])
        key = zk - torch.log(-torch.log(u))
    tok = key.argmax(-1)  # first maximum: ties to the lower index
    # (z - max) - log(sum exp(z - max)): z - logsumexp(z) would round max + log(sum) at large |z|
    m = zk.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    logp = (zk.gather(-1, tok[:, None]) - m).squeeze(-1) - torch.log(torch.exp(zk - m).sum(-1))
    return mark_no_distribution(logits_BV, temperature, tok, logp)
