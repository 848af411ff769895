"""Rollouts: G completions per prompt through the generation engine (r1train.generation), masks, and the
old/ref log-prob passes.

A completion depends only on (model, prompt, seed): the engine's sampler draws row b's token at
position t from noise keyed by (seeds_B[b], t), so 1- and N-process runs and resumed runs see the same
samples, whatever batch a row is generated in (on a GPU up to the last bits of bf16 logits, whose GEMM
kernels depend on the batch's row count: r1train.generation.engine, step 3).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

import r1kernels as rk
from r1kernels.patch.lm_head import logit_scaling

from .generation import SamplingParams, eos_tuple, generate
from .generation.attention import position_ids


@dataclass
class Rollout:
    prompt_ids_BP: torch.Tensor  # left-padded prompts
    prompt_mask_BP: torch.Tensor
    completion_ids_BT: torch.Tensor  # right-padded with pad_id after eos
    completion_mask_BT: torch.Tensor  # 1 up to and including the first eos
    truncated_B: torch.Tensor  # bool: no eos within max_new_tokens
    logprobs_BT: torch.Tensor | None = None  # fp32 log-prob of each token under the sampling distribution
    routing: object = None  # moe_router_replay: the rollout's expert ids (r1train.moe_replay.RoutingRecord)
    eos_ids: tuple = ()  # the ids that ended a completion (sample's eos_id); decode_completions drops them
    prompt_texts: list | None = None  # sample_rows: each row's prompt as rendered for sampling (rewards' prompts_text)

    @property
    def input_ids(self):
        return torch.cat([self.prompt_ids_BP, self.completion_ids_BT], 1)

    @property
    def attention_mask(self):
        return torch.cat([self.prompt_mask_BP, self.completion_mask_BT], 1)


def row_seed(*parts) -> int:
    """A seed from ints/strings that is the same in every process (unlike hash() of a str)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def eos_ids(model, tok) -> list[int]:
    """The ids that end a completion, as TRL 1.16's GRPOTrainer takes them: the tokenizer's eos, then every eos
    id of the model's generation_config (e.g. an end-of-turn token)."""
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if gen is None else [gen] if isinstance(gen, int) else list(gen)
    return ids if tok.eos_token_id in ids else [tok.eos_token_id, *ids]


def sample(model, prompt_ids_BP, prompt_mask_BP, *, max_new_tokens: int, eos_id, pad_id: int,
           seeds_B, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
           greedy: bool = False, engine: str = "r1train", ds_engine=None, backend: str = "auto",
           check_finite: bool = True) -> Rollout:
    """Sample one completion per row (seeds_B: one int seed per row); eos_id: a token id or a sequence of them
    (eos_ids(model, tok)). ds_engine: the DeepSpeed engine under ZeRO-3 (parameters gathered once for the
    rollout). check_finite: NaN logits are an error (r1train.generation.generate)."""
    sp = SamplingParams(max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        greedy=greedy)
    comp_BT, logp_BT = generate(model, prompt_ids_BP, prompt_mask_BP, seeds_B, sp, eos_id=eos_id,
                                pad_id=pad_id, engine=engine, ds_engine=ds_engine, backend=backend,
                                check_finite=check_finite)
    dev, eos = comp_BT.device, eos_tuple(eos_id)
    is_eos_BT = torch.isin(comp_BT, torch.tensor(eos, device=dev))
    if comp_BT.shape[1] == 0:  # no rows (a rank with nothing to sample in a dynamic-sampling round)
        first_eos_B = torch.zeros(comp_BT.shape[0], dtype=torch.long, device=dev)
    else:
        first_eos_B = torch.where(is_eos_BT.any(1), is_eos_BT.float().argmax(1), comp_BT.shape[1])
    mask_BT = (torch.arange(comp_BT.shape[1], device=dev)[None] <= first_eos_B[:, None]).long()
    return Rollout(prompt_ids_BP, prompt_mask_BP, comp_BT, mask_BT, ~is_eos_BT.any(1), logp_BT * mask_BT,
                   eos_ids=eos)


def sampling_kwargs(cfg, ds_engine=None) -> dict:
    """The config's sampling keys as `sample` arguments."""
    return dict(top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p, engine=cfg.rollout_engine,
                ds_engine=ds_engine, backend=cfg.kernel_backend)


def sample_rows(model, tok, rows, *, num_samples: int, cfg, seed_key=(), index=lambda i: i, greedy=False,
                temperature=None, ds_engine=None, batch_size: int = 64):
    """Sample num_samples completions for each row's prompt, batch by batch. Yields (start, chunk, rollout,
    texts); completion j of row i sits at i * num_samples + j and is seeded by (seed_key, index(i), j). Each
    prompt is rendered once: rollout.prompt_texts holds the rendering per completion."""
    from .data import decode_completions, encode_rendered_prompts

    for name, v in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    dev = next(model.parameters()).device
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        ids, mask, shown = encode_rendered_prompts(tok, [r["prompt"] for r in chunk], cfg.max_prompt_length,
                                                   cfg.chat_template_kwargs)
        seeds = [row_seed(*seed_key, index(s + i), j) for i in range(len(chunk)) for j in range(num_samples)]
        ro = sample(model, ids.repeat_interleave(num_samples, 0).to(dev),
                    mask.repeat_interleave(num_samples, 0).to(dev), seeds_B=seeds,
                    max_new_tokens=cfg.max_completion_length, eos_id=eos_ids(model, tok), pad_id=tok.pad_token_id,
                    temperature=cfg.temperature if temperature is None else temperature, greedy=greedy,
                    **sampling_kwargs(cfg, ds_engine))
        ro.prompt_texts = [t for t in shown for _ in range(num_samples)]
        yield s, chunk, ro, decode_completions(tok, ro)


def unmask_completions(mask_BL: torch.Tensor, T: int) -> torch.Tensor:
    """The training forwards' attention mask: the prompts' left padding only, the last T (completion) columns
    all ones. A completion's padding is right padding (after its eos), and under causal attention no real
    token attends to a later position, so unmasking it changes no scored token's output; the masked
    positions' outputs are never scored. With no left padding the mask is then all ones and HF runs its
    unmasked causal attention, as for a batch where no row stopped early. Measured on the H200 (2026-12-03):
    a run's first masked sdpa call builds a cuDNN attention graph (0.2-2.6 s), which made the first step
    with an early eos 0.5-3 s slower than its neighbours; with this, no slower."""
    if T <= 0 or mask_BL is None:
        return mask_BL
    out = mask_BL.clone()
    out[:, -T:] = 1
    return out


class Policy(torch.nn.Module):
    """Wraps a causal LM so that "prompt+completion -> per-token quantity" runs inside ONE forward.

    forward(..., fn) calls fn(hidden_BTH, weight_VH, bias_V) (impl "linear": the fused kernels never build
    [B, T, V]) or fn(logits_BTV) (impl "logits"), where index t scores completion token t. Running fn inside
    the forward is what lets ZeRO-3 gather the lm_head weight (registered as an external parameter) for
    both the forward and the backward. impl "linear" on a model whose forward changes lm_head's output z
    (r1kernels.patch.lm_head.logit_scaling) adds its head_kwargs: logit_scale=s for logits s * z (fn scores at
    temperature T / s, as log_softmax(s * z / T) is the head's log_softmax at T / s) and softcap for soft-capped
    logits (Gemma 2), so fn computes the model's own log-probs. The impl comes from
    r1train.loading.loss_impl_for; a model whose logits the kernels cannot compute (unknown rules) takes "logits".
    """

    def __init__(self, model, impl: str = "linear"):
        super().__init__()
        if impl not in ("linear", "logits"):
            raise ValueError(f"loss_impl must be 'linear' or 'logits', got {impl!r}")
        self.model, self.impl, self.head_kwargs = model, impl, {}
        if impl == "linear":
            scaling = logit_scaling(model)
            if scaling.unfused_reason is not None:
                raise ValueError(f"loss_impl='linear': {type(model).__name__}: {scaling.unfused_reason}; use 'logits'")
            self.head_kwargs = scaling.head_kwargs

    @property
    def head(self):
        return self.model.get_output_embeddings()

    def _head_fn(self, fn, h):
        """fn on hidden states h scored by the head (impl "linear")."""
        return fn(h, self.head.weight, getattr(self.head, "bias", None), **self.head_kwargs)

    def forward(self, input_ids_BL, attention_mask_BL, T: int, fn, pack=None):
        if pack is not None:
            return self._forward_packed(pack, fn)
        attention_mask_BL = unmask_completions(attention_mask_BL, T)
        pos_BL = position_ids(attention_mask_BL)
        if self.impl == "logits":
            out = self.model(input_ids=input_ids_BL, attention_mask=attention_mask_BL, position_ids=pos_BL,
                             logits_to_keep=T + 1)
            return fn(out.logits[:, :-1])
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft
        base = getattr(hf, hf.base_model_prefix)
        h_BLH = base(input_ids=input_ids_BL, attention_mask=attention_mask_BL,
                     position_ids=pos_BL).last_hidden_state
        return self._head_fn(fn, h_BLH[:, -T - 1:-1])

    def _forward_packed(self, pk, fn):
        """A packed micro-batch (r1train.packing.Pack): one [1, n] sequence, no attention mask; fn gets the
        scored tokens only: hidden [1, C, H] (impl "linear") or logits [1, C, V]."""
        from .packing import packed_attention

        kw = dict(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False, **pk.attn_kwargs())
        with packed_attention(self.model):
            if self.impl == "logits":
                return fn(self.model(**kw, logits_to_keep=pk.score_idx).logits)
            hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            h_1NH = getattr(hf, hf.base_model_prefix)(**kw).last_hidden_state
        return self._head_fn(fn, h_1NH[:, pk.score_idx])


def logprob_fn(completion_ids_BT, temperature: float, return_entropy: bool = False, backend: str = "auto"):
    """fn for Policy.forward that returns fp32 log p(completion) [B, T] (, entropy [B, T]) at `temperature`
    (logit_scale, softcap: Policy's head_kwargs, what the model's forward applies to the head's output)."""
    def fn(x, weight=None, bias=None, logit_scale=1.0, softcap=None):
        if weight is None:
            return rk.token_logprobs(x, completion_ids_BT, temperature=temperature,
                                     return_entropy=return_entropy, backend=backend)
        return rk.linear_token_logprobs(x, weight, completion_ids_BT, bias=bias, temperature=temperature / logit_scale,
                                        softcap=softcap,
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
