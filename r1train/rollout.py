"""Sampling G completions per prompt (a KV-cache loop over the HF model), masks, old/ref log-probs.

Sampling is batch-invariant: row b draws its uniforms from its own generator seeded with seeds_B[b] and
picks the token by inverse CDF, so a completion depends only on (model, prompt, seed), not on which rank
or micro-batch it was generated in (this is what makes 1-process and 2-process runs, and resumed runs,
see the same samples).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

import r1kernels as rk

try:  # newer transformers renamed the KV-cache argument `past_key_values` -> `cache`
    from transformers.utils.generic import _rename_kwargs_for_bc  # noqa: F401

    CACHE_KW = "cache"
except ImportError:
    CACHE_KW = "past_key_values"


@dataclass
class Rollout:
    prompt_ids_BP: torch.Tensor  # left-padded prompts
    prompt_mask_BP: torch.Tensor
    completion_ids_BT: torch.Tensor  # right-padded with pad_id after eos
    completion_mask_BT: torch.Tensor  # 1 up to and including the first eos
    truncated_B: torch.Tensor  # bool: no eos within max_new_tokens

    @property
    def input_ids(self):
        return torch.cat([self.prompt_ids_BP, self.completion_ids_BT], 1)

    @property
    def attention_mask(self):
        return torch.cat([self.prompt_mask_BP, self.completion_mask_BT], 1)


def row_seed(*parts) -> int:
    """A seed from ints/strings that is the same in every process (unlike hash() of a str)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def position_ids(mask_BL: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what HF generate uses)."""
    return (mask_BL.long().cumsum(-1) - 1).clamp(min=0)


def _pick(logits_BV, u_B, temperature, top_p, greedy):
    if greedy:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, -1)
    if top_p < 1.0:
        sorted_BV, idx_BV = probs_BV.sort(-1, descending=True)
        keep_BV = sorted_BV.cumsum(-1) - sorted_BV < top_p  # always keeps the top token
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, idx_BV, sorted_BV * keep_BV)
    cdf_BV = probs_BV.cumsum(-1)
    tok_B = torch.searchsorted(cdf_BV, (u_B * cdf_BV[:, -1]).unsqueeze(-1)).squeeze(-1)
    return tok_B.clamp(max=logits_BV.shape[-1] - 1)


@torch.no_grad()
def sample(model, prompt_ids_BP, prompt_mask_BP, *, max_new_tokens: int, eos_id: int, pad_id: int,
           seeds_B, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           sync_ranks: bool = False) -> Rollout:
    """Sample one completion per row. sync_ranks: keep stepping until every rank is done (ZeRO-3 needs
    all ranks in every forward)."""
    from transformers import DynamicCache

    B = prompt_ids_BP.shape[0]
    dev = prompt_ids_BP.device
    u_BT = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds_B]).to(dev) if B else torch.zeros(0, max_new_tokens, device=dev)
    was_training = model.training
    model.eval()
    mask_BL = prompt_mask_BP.long()
    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt_ids_BP, attention_mask=mask_BL, position_ids=position_ids(mask_BL),
                use_cache=True, logits_to_keep=1, **{CACHE_KW: cache})
    pos_B = position_ids(mask_BL)[:, -1] + 1
    done_B = torch.zeros(B, dtype=torch.bool, device=dev)
    toks = []
    for t in range(max_new_tokens):
        tok_B = _pick(out.logits[:, -1], u_BT[:, t], temperature, top_p, greedy)
        tok_B = torch.where(done_B, torch.full_like(tok_B, pad_id), tok_B)
        toks.append(tok_B)
        done_B |= tok_B == eos_id
        all_done = bool(done_B.all())
        if sync_ranks:
            flag = torch.tensor([0.0 if all_done else 1.0], device=dev)
            dist.all_reduce(flag)
            all_done = flag.item() == 0
        if all_done or t == max_new_tokens - 1:
            break
        mask_BL = torch.cat([mask_BL, (~done_B | (tok_B == eos_id)).long()[:, None]], 1)
        out = model(input_ids=tok_B[:, None], attention_mask=mask_BL, position_ids=pos_B[:, None],
                    use_cache=True, **{CACHE_KW: cache})
        pos_B = pos_B + 1
    model.train(was_training)
    comp_BT = torch.stack(toks, 1) if toks else torch.zeros(B, 0, dtype=torch.long, device=dev)
    is_eos_BT = comp_BT == eos_id
    first_eos_B = torch.where(is_eos_BT.any(1), is_eos_BT.float().argmax(1), comp_BT.shape[1])
    mask_BT = (torch.arange(comp_BT.shape[1], device=dev)[None] <= first_eos_B[:, None]).long()
    return Rollout(prompt_ids_BP, prompt_mask_BP, comp_BT, mask_BT, ~is_eos_BT.any(1))


def sample_rows(model, tok, rows, *, num_samples: int, cfg, seed_key=(), index=lambda i: i, greedy=False,
                temperature=None, sync_ranks=False, batch_size: int = 64):
    """Sample num_samples completions for each row's prompt, batch by batch. Yields (start, chunk, rollout,
    texts); completion j of row i sits at i * num_samples + j and is seeded by (seed_key, index(i), j)."""
    from .data import decode_completions, encode_prompts

    dev = next(model.parameters()).device
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        ids, mask = encode_prompts(tok, [r["prompt"] for r in chunk], cfg.max_prompt_length)
        seeds = [row_seed(*seed_key, index(s + i), j) for i in range(len(chunk)) for j in range(num_samples)]
        ro = sample(model, ids.repeat_interleave(num_samples, 0).to(dev),
                    mask.repeat_interleave(num_samples, 0).to(dev), seeds_B=seeds,
                    max_new_tokens=cfg.max_completion_length, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                    temperature=cfg.temperature if temperature is None else temperature, top_p=cfg.top_p,
                    greedy=greedy, sync_ranks=sync_ranks)
        yield s, chunk, ro, decode_completions(tok, ro)


class Policy(torch.nn.Module):
    """Wraps a causal LM so that "prompt+completion -> per-token quantity" runs inside ONE forward.

    forward(..., fn) calls fn(hidden_BTH, weight_VH, bias_V) (impl "linear": the fused kernels never build
    [B, T, V]) or fn(logits_BTV) (impl "logits"), where index t scores completion token t. Running fn inside
    the forward is what lets ZeRO-3 gather the lm_head weight (registered as an external parameter) for
    both the forward and the backward.
    """

    def __init__(self, model, impl: str = "linear"):
        super().__init__()
        if impl not in ("linear", "logits"):
            raise ValueError(f"loss_impl must be 'linear' or 'logits', got {impl!r}")
        self.model, self.impl = model, impl

    @property
    def head(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids_BL, attention_mask_BL, T: int, fn):
        pos_BL = position_ids(attention_mask_BL)
        if self.impl == "logits":
            out = self.model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=pos_BL,
                             logits_to_keep=T + 1)
            return fn(out.logits[:, :-1])
        base = getattr(self.model, self.model.base_model_prefix)
        h_BLH = base(input_ids=input_ids_BL, attention_mask=attention_mask_BL,
                     position_ids=pos_BL).last_hidden_state
        return fn(h_BLH[:, -T - 1:-1], self.head.weight, getattr(self.head, "bias", None))


def logprob_fn(completion_ids_BT, temperature: float, return_entropy: bool = False, backend: str = "auto"):
    """fn for Policy.forward that returns fp32 log p(completion) [B, T] (, entropy [B, T])."""
    def fn(x, weight=None, bias=None):
        if weight is None:
            return rk.token_logprobs(x, completion_ids_BT, temperature=temperature,
                                     return_entropy=return_entropy, backend=backend)
        return rk.linear_token_logprobs(x, weight, completion_ids_BT, bias=bias, temperature=temperature,
                                        return_entropy=return_entropy, backend=backend)
    return fn


@torch.no_grad()
def sequence_logprobs(policy, input_ids_BL, attention_mask_BL, completion_ids_BT, *, temperature=1.0,
                      micro_batch: int = 0, backend: str = "auto"):
    """Per-token log p of the completion under `policy` (old policy or reference), fp32 [B, T]."""
    T, B = completion_ids_BT.shape[1], input_ids_BL.shape[0]
    step = micro_batch or max(B, 1)
    outs = [policy(input_ids_BL[s:s + step], attention_mask_BL[s:s + step], T,
                   logprob_fn(completion_ids_BT[s:s + step], temperature, backend=backend))
            for s in range(0, B, step)]
    return torch.cat(outs) if outs else torch.zeros(0, T)
