"""One SFT step on the same engine: token-level NLL of the completion given the prompt (TRL
prompt-completion format, completion_only_loss; with completion_only_loss=false of every token after the
first), through r1kernels' fused hidden->log-prob kernel."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError
from .data import DatasetError, TokenCache, sft_collate, sft_tokens, validate_rows
from .engine import Trainer
from .grpo import _all_sum
from .packing import build_packs, packed_attention
from .rollout import logprob_fn

_TOP1_CHUNK_BYTES = 1 << 28  # the no-grad top-1 pass's fp32 temporaries (mean_token_accuracy; loss_impl linear)
_MM_OUT_FP32 = [True]  # torch.mm(..., out_dtype=fp32) on CUDA bf16/fp16 operands (torch >= 2.8)


def _mm_fp32(a_NH, b_VH):
    """a @ b.T as fp32 on CUDA bf16/fp16 operands (fp32 accumulation, output not rounded to the operands' dtype);
    None where the device or torch lacks it."""
    if a_NH.is_cuda and a_NH.dtype == b_VH.dtype and a_NH.dtype in (torch.bfloat16, torch.float16) \
            and _MM_OUT_FP32[0]:
        try:
            return torch.mm(a_NH, b_VH.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_FP32[0] = False
    return None


def top1_ids(x_NH, weight_VH, bias_V=None) -> torch.Tensor:
    """[N] first argmax of the fp32 logits x @ weight.T (+ bias), in chunks of rows (no [N, V] logits): the
    operands' exact products accumulated and kept in fp32, as TRL's top-1 (logits rounded to bf16 tie
    near-equal maxima, and a tie's first index is often not the label). CUDA bf16/fp16: one fp32-output GEMM
    per chunk; elsewhere the operands upcast, the weight in blocks of vocab rows (each block's first maximum
    replaces the running one only where strictly larger: the first index overall). Each temporary (a logits
    chunk, an fp32 weight block) stays within _TOP1_CHUNK_BYTES."""
    N, H = x_NH.shape
    V = weight_VH.shape[0]
    rows = max(1, _TOP1_CHUNK_BYTES // (4 * V))
    vstep = max(1, _TOP1_CHUNK_BYTES // (4 * H))
    b_V = None if bias_V is None else bias_V.float()
    out = []
    for s in range(0, N, rows):
        x = x_NH[s:s + rows]
        lg = _mm_fp32(x, weight_VH)
        if lg is not None:
            if b_V is not None:
                lg += b_V
            out.append(lg.argmax(-1))
            continue
        x32 = x.float()
        for v in range(0, V, vstep):
            lg = x32 @ weight_VH[v:v + vstep].float().t()
            if b_V is not None:
                lg += b_V[v:v + vstep]
            m, i = lg.max(-1)  # the block's first maximum
            if v == 0:
                best, top = m, i
            else:  # strictly larger only: a tie keeps the earlier block's index
                new = m > best
                best, top = torch.where(new, m, best), torch.where(new, i + v, top)
        out.append(top)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x_NH.device)


def top1_fn(ids_BT, fn):
    """fn for Policy.forward: (fn's output, whether each target token is its position's first argmax) [B, T],
    TRL's is_top1 (mean_token_accuracy), from the logits (loss_impl logits: the model's own, whose dtype an fp32
    copy would not change: widening is exact and keeps every tie) or, without grad, from the hidden states
    through the head as fp32 logits in chunks of rows (loss_impl linear, top1_ids: one more head GEMM, no [N, V]
    logits; Policy's head_kwargs go to fn; the head's argmax is the logits' argmax: a scale s > 0 and a
    soft-cap keep the order)."""
    def wrapped(x, weight=None, bias=None, **head):
        out = fn(x) if weight is None else fn(x, weight, bias, **head)
        with torch.no_grad():
            if weight is None:
                top = x.argmax(-1)
            else:  # a filler pack scores no token (0 rows)
                top = top1_ids(x.detach().reshape(-1, x.shape[-1]), weight, bias).reshape(x.shape[:-1])
        return out, top == ids_BT
    return wrapped


def _all_max(n: int, dev) -> int:
    """The largest n of any rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.long, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class SFTTrainer(Trainer):
    def __init__(self, cfg, model, tokenizer, train_rows, *args, **kwargs):
        self.tokens = TokenCache(tokenizer)
        self.num_tokens = 0  # TRL's num_tokens: the tokens trained on so far, all ranks (a resumed run continues)
        # a row without a usable prompt (missing, None, not a string or a list of messages) was a KeyError or
        # TypeError with no row index; the checks the CLI's loader makes, naming the row
        if train_rows:
            validate_rows(train_rows, "SFT train_rows")
        # a bad row (a bad completion, or no token to train on: a prompt that fills max_length, a completion that
        # tokenizes to nothing): an error naming its dataset index before any work, as TRL's SFTTrainer tokenizes
        # its dataset up front (sft_collate, mid-training, only knows a row's position in its batch)
        for i, r in enumerate(train_rows):
            sft_tokens(tokenizer, r, i, **self.token_keys(cfg))  # checks the completion too (the cache keeps the ids)
        super().__init__(cfg, model, tokenizer, train_rows, *args, **kwargs)

    def check_resume_state(self, path: str, state: dict):
        """A checkpoint written before SFT kept whole prompts (no sft_whole_prompts in its trainer_state.json)
        trained on each prompt's last max_prompt_length tokens; resuming it with a longer training prompt would
        train that row on other tokens than the run did: a CheckpointError naming the row. Without such a prompt
        both rules tokenize alike and the resume goes on."""
        if state.get("sft_whole_prompts"):
            return
        cut = state.get("config", {}).get("max_prompt_length", self.cfg.max_prompt_length)
        keys = dict(self.token_keys(self.cfg), completion_only_loss=True, max_length=1 << 62)
        for i, r in enumerate(self.train_rows):
            try:
                n = len(sft_tokens(self.tok, r, i, **keys)[0])
            except DatasetError:  # no completion token (a completion_only_loss=false run): its prompt is not cut
                continue
            if n > cut:
                raise CheckpointError(f"resume_from_checkpoint={self.cfg.resume_from_checkpoint}: {path} was written "
                                      f"before SFT kept whole prompts: that run cut each prompt to its last "
                                      f"max_prompt_length={cut} tokens, and train row {i}'s prompt has {n}, so this "
                                      "run would train it on other tokens. Start a fresh run (another output_dir, "
                                      "or overwrite_output_dir=true)")

    def trainer_state(self) -> dict:
        return {"num_tokens": self.num_tokens}

    def load_trainer_state(self, state: dict):
        self.num_tokens = int(state.get("num_tokens", 0))

    def longest_row(self, cfg, rows):
        """max_length holds every row; a smaller budget is held to the training rows themselves, tokenized as
        training will."""
        if cfg.max_tokens_per_batch >= cfg.max_length:
            return cfg.max_length, "max_length"
        n, i = max((sum(map(len, sft_tokens(self.tok, r, i, **self.token_keys(cfg)))), i)
                   for i, r in enumerate(rows)) if rows else (0, None)
        return n, f"the longest SFT row's tokens (row {i}; max_length={cfg.max_length} holds every row)"

    def token_keys(self, cfg) -> dict:
        """sft_tokens' keys: no max_prompt_length, a GRPO key (TRL's SFTTrainer cuts only the whole row)."""
        return dict(completion_column=cfg.completion_column, max_length=cfg.max_length,
                    completion_only_loss=cfg.completion_only_loss is not False, cache=self.tokens)

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
        ent = bool(cfg.log_entropy)
        # TRL's per-forward metrics: [micro-batch, (correct, entropy sum, scored)] of the padded micro-batches
        # (rows j * mb ...), whose ratios TRL averages; packs add their rows' counts to their micro-batches.
        # Every rank runs (and all-reduces) the most padded micro-batches of any rank: ranks may hold uneven
        # row counts, and ZeRO's collectives run in every forward and backward
        n_micro = _all_max(max(1, -(-ids_BL.shape[0] // mb)), self.dev)
        stats = torch.zeros(n_micro, 3, dtype=torch.float64, device=self.dev)
        # padding_free: each micro-batch is one packed sequence of its rows' real tokens (r1train/packing.py),
        # as many on every rank (filler packs); the loss is a plain sum over completion tokens, so the packs'
        # losses add up to the padded ones. Padded: a rank short of rows runs filler micro-batches (None)
        packs = build_packs(ids_BL, p_mask, c_mask, rows_per_batch=mb, max_tokens=cfg.max_tokens_per_batch,
                            routed=bool(self.expert_load)) if cfg.padding_free else None
        micro = packs
        if packs is None:
            micro = [slice(s, s + mb) for s in range(0, ids_BL.shape[0], mb)]
            micro += [None] * (n_micro - len(micro))
        with packed_attention(self.model) if packs else contextlib.nullcontext():
            for j, part in enumerate(micro):
                # the optimizer steps after the last micro-batch, however many this step runs
                self.engine.set_gradient_accumulation_boundary(j == len(micro) - 1)
                if part is None:  # a filler: one scored pad, masked out (loss 0, every gradient 0)
                    self.expert_load.token_mask = torch.zeros(2, dtype=torch.bool, device=self.dev)  # counts none
                    pad = torch.full((1, 2), self.tok.pad_token_id, dtype=ids_BL.dtype, device=self.dev)
                    tgt, mask = pad[:, 1:], torch.zeros_like(pad[:, 1:])
                    fn = top1_fn(tgt, logprob_fn(tgt, 1.0, return_entropy=ent, backend=cfg.kernel_backend))
                    out, top1 = self.engine(pad, torch.ones_like(pad), 1, fn)
                    which = torch.full_like(tgt, j)
                elif packs:
                    # every packed token is real; a filler pack's one token counts for no router
                    self.expert_load.token_mask = None if part.rows.numel() else \
                        torch.zeros(part.tokens, dtype=torch.bool, device=self.dev)
                    tgt, mask = part.gather(c_ids), part.gather(c_mask)
                    fn = top1_fn(tgt, logprob_fn(tgt, 1.0, return_entropy=ent, backend=cfg.kernel_backend))
                    out, top1 = self.engine(part.input_ids, None, 0, fn, pack=part)
                    which = (part.rows[part.tok_row] // mb)[None]  # each scored token's padded micro-batch
                else:
                    self.expert_load.token_mask = attn_BL[part].reshape(-1).bool()  # MoE routers: real tokens
                    tgt, mask = c_ids[part], c_mask[part]
                    fn = top1_fn(tgt, logprob_fn(tgt, 1.0, return_entropy=ent, backend=cfg.kernel_backend))
                    out, top1 = self.engine(ids_BL[part], attn_BL[part], c_ids.shape[1], fn)
                    which = torch.full_like(tgt, j)
                lp, h = out if ent else (out, None)
                loss = -(lp * mask).sum() / n_items
                with torch.no_grad():
                    m_ = mask.double()
                    vals = torch.stack([top1.double() * m_, (h.double() if ent else m_ * 0) * m_, m_], -1)
                    stats.index_add_(0, which.reshape(-1).to(self.dev), vals.reshape(-1, 3))
                self.engine.backward(loss)
                boundary, norm = self.optimizer_step()
                if boundary:
                    moe, gn = self.expert_load.step(), norm
                losses.append(loss.detach())  # read with the step's metrics: no host sync per micro-batch
        # the step's metrics in one all-reduce and one host read: the per-micro-batch counts, the loss sum and
        # the step's prompt + completion tokens, over every rank
        flat = torch.cat([stats.reshape(-1), torch.stack([torch.stack(losses).double().sum(),
                                                          attn_BL.sum().double()]).to(self.dev)])
        if dist.is_initialized():
            dist.all_reduce(flat)
        stats = flat[:-2].view(n_micro, 3)
        # TRL's SFTTrainer.compute_loss: per forward, correct / scored and entropy sum / scored over every
        # rank's tokens (0 where none), averaged over the forwards (here those of the step)
        seen = stats[:, 2].clamp(min=1)
        acc, entropy, loss_sum, step_tokens = torch.cat([(stats[:, :2] / seen[:, None]).mean(0), flat[-2:]]).tolist()
        step_tokens = int(step_tokens)
        self.num_tokens += step_tokens
        # each micro-batch's loss is its tokens' share times gradient_accumulation_steps (n_items), so their
        # sum over GA is the step's token mean, whatever the count of packs
        m = {"loss": loss_sum / cfg.gradient_accumulation_steps / self.world,
             "mean_token_accuracy": acc, "num_tokens": self.num_tokens, "tokens": step_tokens}
        if ent:
            m["entropy"] = entropy
        if gn is not None:
            m["grad_norm"] = float(gn)
        m.update(moe)
        return m
