"""One SFT step on the same engine: token-level NLL of the completion given the prompt (TRL
prompt-completion format, completion_only_loss), through r1kernels' fused hidden->log-prob kernel."""

from __future__ import annotations

import torch

from .data import sft_collate
from .engine import Trainer
from .grpo import _all_sum
from .rollout import logprob_fn


class SFTTrainer(Trainer):
    def train_step(self, step, rows):
        cfg = self.cfg
        p_ids, p_mask, c_ids, c_mask = sft_collate(self.tok, rows, completion_column=cfg.completion_column,
                                                   max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        ids_BL = torch.cat([p_ids, c_ids], 1).to(self.dev)
        attn_BL = torch.cat([p_mask, c_mask], 1).to(self.dev)
        c_ids, c_mask = c_ids.to(self.dev), c_mask.to(self.dev)
        # token-level mean over the global batch (see grpo.py for the GA * world factor)
        n_items = max(_all_sum(c_mask.sum(), self.dev), 1.0) / (cfg.gradient_accumulation_steps * self.world)
        mb, losses, gn, moe = cfg.per_device_train_batch_size, [], None, {}
        for s in range(0, ids_BL.shape[0], mb):
            sl = slice(s, s + mb)
            T = c_ids.shape[1]
            self.expert_load.token_mask = attn_BL[sl].reshape(-1).bool()  # MoE routers count real tokens only
            fn = logprob_fn(c_ids[sl], 1.0, backend=cfg.kernel_backend)
            lp_BT = self.engine(ids_BL[sl], attn_BL[sl], T, fn)
            loss = -(lp_BT * c_mask[sl]).sum() / n_items
            self.engine.backward(loss)
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.step()
            if boundary:
                moe = self.expert_load.step()
                gn = self.engine.get_global_grad_norm()
            losses.append(loss.item())
        m = {"loss": _all_sum(sum(losses) / len(losses), self.dev) / self.world,
             "tokens": _all_sum(attn_BL.sum(), self.dev)}  # prompt + completion tokens of the step (all ranks)
        if gn is not None:
            m["grad_norm"] = float(gn)
        m.update(moe)
        return m
