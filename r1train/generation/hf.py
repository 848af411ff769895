"""transformers' own `generate` as the fallback rollout engine (rollout_engine=transformers), for models
the engine does not support. Its noise comes from one torch generator seeded by the batch's row seeds,
so a completion depends on its batch too (not on the row alone, as with the engine)."""
from __future__ import annotations

import zlib

import torch


@torch.no_grad()
def hf_generate(model, prompt_ids_BP, prompt_mask_BP, seeds_B, sp, *, eos_id: int, pad_id: int):
    B, P = prompt_ids_BP.shape
    torch.manual_seed(zlib.crc32(repr([int(s) for s in seeds_B]).encode()))
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP, do_sample=not sp.greedy,
                             temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                             min_p=sp.min_p or None, max_new_tokens=sp.max_new_tokens, eos_token_id=eos_id,
                             pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True)
    finally:
        model.train(was_training)
    tok_BT = out.sequences[:, P:]
    # scores are the processed logits the token was drawn from (temperature, top-k/p, min-p applied)
    logp_BT = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)
    logp_BT = logp_BT.gather(-1, tok_BT[..., None]).squeeze(-1)
    after_eos = (tok_BT == eos_id).long().cumsum(1) - (tok_BT == eos_id).long() > 0
    return tok_BT.masked_fill(after_eos, pad_id), logp_BT.masked_fill(after_eos, 0.0)
