"""One SFT step on the same engine: token-level NLL of the completion given the prompt (TRL
prompt-completion format, completion_only_loss; with completion_only_loss=false of every token after the
first), through r1kernels' fused hidden->log-prob kernel."""

from __future__ import annotations

import contextlib

import torch

from .data import TokenCache, sft_collate, sft_tokens
from .engine import Trainer
from .grpo import _all_sum
from .packing import build_packs, packed_attention
from .rollout import logprob_fn


class SFTTrainer(Trainer):
    def __init__(self, cfg, model, tokenizer, train_rows, *args, **kwargs):
        self.tokens = TokenCache(tokenizer)
        # a bad row (a bad completion, or no token to train on: a prompt that fills max_length, a completion that
        # tokenizes to nothing): an error naming its dataset index before any work, as TRL's SFTTrainer tokenizes
        # its dataset up front (sft_collate, mid-training, only knows a row's position in its batch)
        for i, r in enumerate(train_rows):
            sft_tokens(tokenizer, r, i, **self.token_keys(cfg))  # checks the completion too (the cache keeps the ids)
        super().__init__(cfg, model, tokenizer, train_rows, *args, **kwargs)

    def longest_row(self, cfg, rows):
        """max_length holds every row; a smaller budget is held to the training rows themselves, tokenized as
        training will."""
        if cfg.max_tokens_per_batch >= cfg.max_length:
            return cfg.max_length, "max_length"
        n, i = max((sum(map(len, sft_tokens(self.tok, r, i, **self.token_keys(cfg)))), i)
                   for i, r in enumerate(rows)) if rows else (0, None)
        return n, f"the longest SFT row's tokens (row {i}; max_length={cfg.max_length} holds every row)"

    def token_keys(self, cfg) -> dict:
        return dict(completion_column=cfg.completion_column, max_length=cfg.max_length,
                    max_prompt_length=cfg.max_prompt_length, completion_only_loss=cfg.completion_only_loss is not False,
                    cache=self.tokens)

    def train_step(self, step, rows):
        cfg = self.cfg
        # completion_only_loss=false: the "completion" side holds every token after each row's first (data.sft_tokens)
        p_ids, p_mask, c_ids, c_mask = sft_collate(self.tok, rows, **self.token_keys(cfg))
        ids_BL = torch.cat([p_ids, c_ids], 1).to(self.dev)
        attn_BL = torch.cat([p_mask, c_mask], 1).to(self.dev)
        c_ids, c_mask = c_ids.to(self.dev), c_mask.to(self.dev)
        # token-level mean over the global batch (see grpo.py for the GA * world factor)
        n_items = max(_all_sum(c_mask.sum(), self.dev), 1.0) / (cfg.gradient_accumulation_steps * self.world)
        mb, losses, gn, moe = cfg.per_device_train_batch_size, [], None, {}
        # padding_free: each micro-batch is one packed sequence of its rows' real tokens (r1train/packing.py);
        # the loss is a plain sum over completion tokens, so the packs' losses add up to the padded ones
        packs = build_packs(ids_BL, p_mask, c_mask, rows_per_batch=mb,
                            max_tokens=cfg.max_tokens_per_batch) if cfg.padding_free else None
        micro = packs or [slice(s, s + mb) for s in range(0, ids_BL.shape[0], mb)]
        with packed_attention(self.model) if packs else contextlib.nullcontext():
            for j, part in enumerate(micro):
                if packs:
                    self.expert_load.token_mask = None  # every packed token is real
                    # the optimizer steps after the last pack, as after the padded run's last micro-batch
                    self.engine.set_gradient_accumulation_boundary(j == len(micro) - 1)
                    fn = logprob_fn(part.gather(c_ids), 1.0, backend=cfg.kernel_backend)
                    lp = self.engine(part.input_ids, None, 0, fn, pack=part)
                    loss = -(lp * part.gather(c_mask)).sum() / n_items
                else:
                    self.expert_load.token_mask = attn_BL[part].reshape(-1).bool()  # MoE routers: real tokens
                    fn = logprob_fn(c_ids[part], 1.0, backend=cfg.kernel_backend)
                    lp = self.engine(ids_BL[part], attn_BL[part], c_ids.shape[1], fn)
                    loss = -(lp * c_mask[part]).sum() / n_items
                self.engine.backward(loss)
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.engine.step()
                if boundary:
                    moe = self.expert_load.step()
                    gn = self.engine.get_global_grad_norm()
                losses.append(loss.item())
        # each micro-batch's loss is its tokens' share times gradient_accumulation_steps (n_items), so their
        # sum over GA is the step's token mean, whatever the count of packs
        m = {"loss": _all_sum(sum(losses) / cfg.gradient_accumulation_steps, self.dev) / self.world,
             "tokens": _all_sum(attn_BL.sum(), self.dev)}  # prompt + completion tokens of the step (all ranks)
        if gn is not None:
            m["grad_norm"] = float(gn)
        m.update(moe)
        return m
