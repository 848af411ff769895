"""transformers' own `generate` as the fallback rollout engine (rollout_engine=transformers), for models
the engine does not support. Its draws are the engine's: rk.sample_tokens on each step's logits with the row's
seed at its generation position (one logits processor, `_Draw`, leaves the drawn token the only finite score and
transformers decodes greedily), so a completion depends only on (model, prompt, seed), as with the engine (it
came from one torch generator seeded by the whole batch's seeds: another batch, or the rows split over N
processes, drew other completions).

Same outputs as the engine: a token is drawn from softmax(logits / temperature) over the tokens top-k / top-p /
min-p keep (r1kernels.reference.sampling.kept_mask); greedy takes its argmax. Its log-prob is z[token] -
logsumexp(z over the kept set), z = raw logits / temperature, as the engine and (with no truncation) the
training forward compute it. Nothing from the model's generation_config applies (repetition_penalty,
no_repeat_ngram_size, bad_words_ids, suppress_tokens, forced bos/eos, its top_k / temperature, num_beams,
stop_strings, ...): see `_Exact`.
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

import r1kernels as rk
from r1kernels.reference.sampling import kept_mask

from .engine import check_arguments, check_prompt_rows, check_rope, eos_tuple, eval_mode


class _Exact(GenerationConfig):
    """A GenerationConfig complete as built. generate() fills a passed config's unset (None) fields from
    model.generation_config (transformers 5.x `_prepare_generation_config`: update(defaults_only=True)), and several
    processors (bad_words_ids, sequence_bias, forced_bos/eos_token_id, exponential_decay_length_penalty,
    suppress_tokens, top_h, min_p, watermarking_config) are on whenever their field is not None, so no neutral value
    could be set for them: this config takes no such defaults (nor transformers' global ones: `_config` sets what
    the sampling loop needs), and None leaves every one of them off. Should a later transformers merge the model's
    config some other way, the tests named test_transformers_fallback_* fail."""

    def update(self, defaults_only=False, allow_custom_entries=False, **kwargs):
        if defaults_only:
            return kwargs
        return super().update(allow_custom_entries=allow_custom_entries, **kwargs)


def kept_logits(logits_BV, sp):
    """logits -> fp32 logits / temperature, -inf outside the kept set: what the engine samples from."""
    z = logits_BV.float() / sp.temperature
    return z.masked_fill(~kept_mask(z, sp.top_k, sp.top_p, sp.min_p), float("-inf"))


class _Draw(LogitsProcessor):
    """The engine's draw of each row (rk.sample_tokens: its seed, generation position t = the columns after the
    P prompt columns) -> scores 0 at the drawn token, -inf elsewhere (transformers' greedy step takes it)."""

    def __init__(self, sp, seeds_B, P: int, backend: str):
        # "auto" on a CPU: the torch reference (the same draws; the kernel runs there only under the interpreter)
        cpu = seeds_B.device.type == "cpu"
        self.sp, self.seeds_B, self.P = sp, seeds_B, P
        self.backend = "torch" if backend == "auto" and cpu else backend

    def __call__(self, input_ids, scores):
        pos_B = torch.full_like(self.seeds_B, input_ids.shape[1] - self.P)
        tok_B, _ = rk.sample_tokens(scores, self.seeds_B, pos_B, backend=self.backend, **self.sp.kernel_kwargs())
        return torch.full_like(scores, float("-inf")).scatter_(-1, tok_B[:, None], 0.0)


def _config(sp, eos: tuple, pad_id: int) -> _Exact:
    stops = [e for e in eos if e >= 0]
    return _Exact(do_sample=False, num_beams=1, num_return_sequences=1, use_cache=True,  # _Draw draws
                  max_new_tokens=sp.max_new_tokens, min_length=0, eos_token_id=stops or None, pad_token_id=pad_id,
                  repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                  encoder_no_repeat_ngram_size=0, remove_invalid_values=False, renormalize_logits=False,
                  output_logits=True, return_dict_in_generate=True)


@torch.no_grad()
def hf_generate(model, prompt_ids_BP, prompt_mask_BP, seeds_B, sp, *, eos_id, pad_id: int, backend: str = "auto"):
    """-> (tokens [B, T'], fp32 log-probs [B, T']); eos_id an int or a sequence of ints; after a row's first eos
    its tokens are pad_id and its log-probs 0. backend: rk.sample_tokens' (the draw)."""
    seeds = check_arguments(prompt_ids_BP, prompt_mask_BP, seeds_B, pad_id, model=model)
    P = prompt_ids_BP.shape[1]
    check_prompt_rows(prompt_mask_BP, prompt_ids_BP, model, pad_id)
    check_rope(model.config, P, sp.max_new_tokens)
    prompt_ids_BP = prompt_ids_BP.masked_fill(~prompt_mask_BP.bool(), pad_id)  # padding is embedded, not read
    eos = eos_tuple(eos_id)  # negative ids never match
    dev = prompt_ids_BP.device
    # no draw from a global generator: the caller's state of it is left alone (it was left reseeded: the
    # trainer's later draws were a function of the rollout's seeds)
    with eval_mode(model):
        out = model.generate(input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP,
                             generation_config=_config(sp, eos, pad_id),
                             logits_processor=LogitsProcessorList([_Draw(sp, seeds.to(dev), P, backend)]))
    tok_BT = out.sequences[:, P:]
    logp_BT = torch.zeros(tok_BT.shape, dtype=torch.float32, device=tok_BT.device)
    for t, logits_BV in enumerate(out.logits):  # the raw logits, not the processed scores
        zk_BV = kept_logits(logits_BV, sp)
        logp_BT[:, t] = zk_BV.gather(-1, tok_BT[:, t, None]).squeeze(-1) - torch.logsumexp(zk_BV, -1)
    is_eos = torch.isin(tok_BT, torch.tensor(eos, dtype=tok_BT.dtype, device=tok_BT.device))
    after_eos = is_eos.long().cumsum(1) - is_eos.long() > 0
    return tok_BT.masked_fill(after_eos, pad_id), logp_BT.masked_fill(after_eos, 0.0)
