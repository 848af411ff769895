"""One GRPO step: sample G completions per prompt, score them, group advantages, clipped loss.

Shapes: P prompts on this rank, N = P*G completions, micro-batches of per_device_train_batch_size rows;
all advantages/normalizers are computed over the global batch (all ranks) so 1 process with
gradient accumulation and k processes without it see the same loss. padding_free: the micro-batches are
packed sequences (r1train/packing.py), max_tokens_per_batch of them under a token budget; each row keeps
the loss weight of its padded micro-batch, so the loss and the optimizer steps are the padded run's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os

import torch
import torch.distributed as dist

import r1kernels as rk
from r1kernels.reference.grpo import (
    EXTRA_DEFAULTS,
    LOSS_REDUCTION,
    grpo_loss_from_logprobs,
    grpo_token_loss,
    needs_entropy,
    rollout_is_weights,
    token_local,
    vespo_weights,
)

from . import moe_replay
from .config import check_grpo_batch, grpo_longest_row
from .data import decode_completions, encode_rendered_prompts, grpo_template_kwargs, reward_columns
from .engine import LOOP_METRICS, Trainer
from .generation import release as release_engine
from .loading import check_reward_columns
from .metrics import PhaseClock
from .packing import build_packs, packed_attention, packed_logprobs, reduction_weights
from .rewards import RewardError, RewardRunner
from .rollout import Rollout, eos_ids, row_seed, sample, sampling_kwargs, sequence_logprobs

log = logging.getLogger("r1train.grpo")

# TRL's token-mean metrics (global_masked_mean): per micro-batch, the sum over every process's scored tokens over
# their count, then averaged over the micro-batches
TOKEN_MEAN_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
# the loss types TRL 1.16 logs clip_ratio/* for (the others' clipping is not two-sided: none of these keys)
CLIP_EXTREME_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# with importance_sampling_level=sequence TRL's clip_ratio/*_mean count sequences (every row of the micro-batch)
CLIP_MEAN_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
# a loss call's [sum of H over the tokens the loss trains on, their count] (top_entropy_quantile < 1; popped from
# its metrics by train_step, never logged): adaptive entropy control's window, as TRL's _entropy_window_stats
ENTROPY_WINDOW = "entropy/window"
# a loss call's loss before its entropy term (set only where the loss has one; popped by train_step, which logs
# TRL's policy_loss from it)
POLICY_LOSS = "policy_loss"


def selected_entropy_window(h, mask, ent_mask) -> torch.Tensor:
    """[sum of the entropy over mask * ent_mask, that mask's count] in float64 (detached)."""
    eff = (mask * ent_mask).double()
    return torch.stack([(h.detach().double() * eff).sum(), eff.sum()])


def importance_ratio(logp_bT, old_bT, mask_bT, cfg):
    """TRL's coef_1, detached: exp(log-prob - old log-prob) per token [b, T], or of the sequence's masked mean
    [b, 1] with importance_sampling_level=sequence; 1 where old_bT is None (the first iteration). -> (ratio,
    the float mask)."""
    m = mask_bT.float()
    lr = torch.zeros_like(m) if old_bT is None else (logp_bT.detach().float() - old_bT.float()) * m
    if cfg.importance_sampling_level == "sequence":
        lr = lr.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    return lr.exp(), m


@torch.no_grad()
def cispo_clipped(logp_bT, old_bT, adv_b, mask_bT, cfg) -> torch.Tensor:
    """One micro-batch's [clipped, counted] of TRL's cispo_clip_ratio: scored tokens (sequences, at sequence
    level) whose ratio exceeds epsilon_high with a positive advantage (the tokens CISPO's clamp changes)."""
    r, m = importance_ratio(logp_bT, old_bT, mask_bT, cfg)
    adv = adv_b[:, None] if adv_b.dim() == 1 else adv_b
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    hit = ((r > eps_high) & (adv > 0)).double()
    if cfg.importance_sampling_level == "sequence":  # not r's width: a trimmed micro-batch may be 1 token wide
        return torch.stack([hit.sum(), hit.new_full((), hit.shape[0])])
    return torch.stack([(hit * m).sum(), m.double().sum()])


@torch.no_grad()
def vespo_phi(logp_bT, old_bT, adv_b, mask_bT, samp_bT, cfg) -> torch.Tensor:
    """One micro-batch's [sum, count] of TRL's vespo/phi_seq_mean: the loss's gamma weight phi [b, 1]
    (vespo_weights, with the rollout-correction weights the loss used: samp_bT the sampling log-probs) summed
    over the sequences, every row counted. old_bT None: the policy's own log-probs (the first iteration)."""
    lp = logp_bT.detach().float()
    m, valid = mask_bT.to(lp.dtype), mask_bT.bool()
    old = lp if old_bT is None else torch.where(valid, old_bT.float(), lp)  # as grpo_token_loss pads them
    is_w = None
    if samp_bT is not None and cfg.vllm_importance_sampling_correction:
        is_w = rollout_is_weights(old, torch.where(valid, samp_bT.float(), lp), m, cfg.vllm_importance_sampling_mode,
                                  cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max)
    adv = (adv_b[:, None] if adv_b.dim() == 1 else adv_b).float()
    phi = vespo_weights(adv, lp - old, m, is_w, cfg.vespo_k_pos, cfg.vespo_lambda_pos, cfg.vespo_k_neg,
                        cfg.vespo_lambda_neg).double()
    return torch.stack([phi.sum(), phi.new_full((), phi.shape[0])])


@torch.no_grad()
def clip_extremes(logp_bT, old_bT, adv_b, mask_bT, cfg) -> torch.Tensor:
    """One micro-batch's inputs of TRL's clip_ratio/low_min and clip_ratio/high_max: each sequence's share of
    low-clipped (ratio < 1 - epsilon, advantage < 0) and high-clipped (ratio > 1 + epsilon_high, advantage > 0)
    scored tokens (TRL's masked_seq_mean; one value per sequence with importance_sampling_level=sequence), the
    least low share and the greatest high share over this process's sequences -> [2] = (low, -high), inf where
    no sequence has a share (sequences without scored tokens are left out: TRL's nanmin / nanmax). old_bT None:
    the ratio is 1 (the first iteration), nothing is clipped."""
    r, m = importance_ratio(logp_bT, old_bT, mask_bT, cfg)
    if cfg.delta is not None:
        r = r.clamp(max=cfg.delta)  # TRL counts clipping on the ratio after the delta clamp
    adv = adv_b[:, None] if adv_b.dim() == 1 else adv_b
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    low, high = ((r < 1 - cfg.epsilon) & (adv < 0)).float(), ((r > 1 + eps_high) & (adv > 0)).float()
    if cfg.importance_sampling_level == "sequence":  # the sequence's own value (not r's width: see cispo_clipped)
        low_b, high_b = low[:, 0], high[:, 0]
    else:
        n_b = m.sum(-1)
        low_b, high_b = (low * m).sum(-1) / n_b, (high * m).sum(-1) / n_b  # NaN: no scored token
    inf = m.new_full((1,), math.inf)  # a fill, not a host-to-device copy (a stream sync on CUDA)
    return torch.stack([torch.cat([low_b.nan_to_num(math.inf), inf]).min(),
                        torch.cat([-high_b.nan_to_num(-math.inf), inf]).min()])


def loss_keys(cfg) -> dict:
    """The config's loss options beyond the clipped core (TRL names; r1kernels.reference.grpo EXTRA_DEFAULTS),
    entropy_coef and the sampling log-probs aside (set per step), compute_entropy too (set per loss call)."""
    return {k: getattr(cfg, k) for k in EXTRA_DEFAULTS if k not in ("sampling_logprobs", "entropy_coef",
                                                                    "compute_entropy")}


def adaptive_entropy_step(coef: float, entropy: float, cfg) -> float:
    """Skywork-OR1 / TRL adaptive control, once per optimizer step: coef + delta (at most entropy_coef_max)
    when the step's entropy <= entropy_target, else coef - delta (at least entropy_coef_min)."""
    if entropy <= cfg.entropy_target:
        return min(coef + cfg.entropy_coef_delta, cfg.entropy_coef_max)
    return max(coef - cfg.entropy_coef_delta, cfg.entropy_coef_min)


def _gather_rows(x_NR: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x_NR
    parts = [torch.empty_like(x_NR) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x_NR.contiguous())
    return torch.cat(parts)


def _all_sum(x: float, dev) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64, device=dev)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def _nanstd(x, dim):
    """Bessel-corrected std ignoring NaNs; NaN where fewer than two values (TRL's nanstd)."""
    n = (~x.isnan()).sum(dim, keepdim=True)
    var = (x - x.nanmean(dim, keepdim=True)).square().nanmean(dim, keepdim=True) * n / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt(), torch.full_like(var, float("nan")))


def reward_table(table, R: int, dtype) -> torch.Tensor:
    """The rollout's reward table (a row of R values per completion, None where a function gave none) as [N, R]
    of dtype, NaN for None."""
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in table],
                        dtype=dtype).reshape(-1, R)


def reward_totals(vals_NR, failed_N, w_R):
    """Each row's weighted reward sum in float64 (TRL's nansum: None counts 0 beside a value); NaN for a row
    left out of every statistic: unscorable (every reward None; TRL's unscorable_mask) or failed (a reward
    raised or timed out). Such a row gets advantage 0 and no share of the logged reward metrics."""
    v = vals_NR.double()
    total = (v * w_R.double()).nansum(1)
    total[v.isnan().all(1) | failed_N] = float("nan")
    return total


def _gdpo_totals(vals_NR, failed_N, w_R, G: int):
    v = vals_NR.double().clone()
    v[failed_N] = float("nan")
    g = v.view(-1, G, v.shape[1])
    z = ((g - g.nanmean(1, keepdim=True)) / (_nanstd(g, 1) + 1e-4)).view_as(v)
    total = (z * w_R.double()).nansum(1)
    total[v.isnan().all(1)] = float("nan")
    return total


def normalize_then_sum(vals_NR, failed_N, w_R, G: int):
    """Advantages of multi_objective_aggregation='normalize_then_sum' (GDPO, TRL's formula): each reward
    normalized within its group ((r - mean) / (std + 1e-4), None and failed samples left out), the weighted
    sum over rewards, then normalized over the batch; a row with no usable reward gets advantage 0."""
    total = _gdpo_totals(vals_NR, failed_N, w_R, G)
    adv = (total - total.nanmean()) / (_nanstd(total, 0) + 1e-4)
    return adv.nan_to_num(0.0).float()


def advantages(vals_NR, failed_N, w_R, G: int, *, scale: str, aggregation: str, backend: str = "torch"):
    """TRL 1.16's advantages over the global batch (GRPOTrainer._generate_and_score_completions), float64
    inside -> (advantages fp32 [N], std_N: the std each row is scaled by, TRL's std_rewards: the group's
    for scale_rewards group and none, the batch's for batch and for normalize_then_sum; frac_reward_zero_std
    counts the rows where it is 0). Rows with NaN reward_totals (unscorable, failed) are left out of the
    means and stds and get advantage 0. With none of them, rk.group_advantages (the kernel_backend's op)
    computes the sum_then_normalize advantages."""
    # float64 stds overflow past this magnitude (advantages 0, silently): rk.group_advantages checks it, but the
    # paths below with NaN rows or per-reward normalization compute without it
    mag = (vals_NR.double().abs() * w_R.double().abs()).nan_to_num(0.0).sum(1).amax() if len(vals_NR) else 0.0
    if scale != "none" and float(mag) > rk.F64_REWARD_MAX:
        raise RewardError(f"scale_rewards={scale}: weighted rewards of magnitude > {rk.F64_REWARD_MAX:g} overflow the "
                          "float64 std of the advantages (they would be 0); scale the rewards or reward_weights down")
    if aggregation == "normalize_then_sum":
        return normalize_then_sum(vals_NR, failed_N, w_R, G), _nanstd(_gdpo_totals(vals_NR, failed_N, w_R, G),
                                                                      0).expand(len(vals_NR))
    total = reward_totals(vals_NR, failed_N, w_R)
    g = total.view(-1, G)
    std_N = _nanstd(total, 0).expand_as(total) if scale == "batch" else _nanstd(g, 1).expand_as(g).reshape(-1)
    if not total.isnan().any():
        try:  # host tensors: the library's overflow check raises (no device assert)
            adv = rk.group_advantages(vals_NR.nan_to_num(0.0), G, scale=scale, reward_weights=w_R, backend=backend)
        except rk.AdvantageOverflowError as e:  # past float32 (scale none; the float64 bound is checked above)
            raise _overflow_error(scale) from e
    else:
        adv = (g - g.nanmean(1, keepdim=True)).reshape(-1)
        if scale != "none":
            adv = adv / (std_N + 1e-4)
        adv = adv.nan_to_num(0.0).float()
    return adv, std_N


def _check_extra_columns(extra: list[dict]):
    """log_extra's columns (one dict per completion) may not take the completions log's own names."""
    own = {"step", "prompt", "completion", "reward", "advantage"} & {k for e in extra for k in e}
    if own:
        raise RewardError(f"log_extra: columns {sorted(own)} are the completions log's own; log them under other "
                          "names")


def _overflow_error(scale: str) -> RewardError:
    return RewardError(f"advantages overflow float32 with scale_rewards={scale}: a weighted reward minus its "
                       "group's mean is beyond float32's range (3.4e38); scale the rewards or reward_weights down, or "
                       "scale the advantages (scale_rewards=group)")


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _pad_to(x, width, value, left):
    pad = width - x.shape[1]
    if pad <= 0:
        return x
    fill = x.new_full((x.shape[0], pad), value)
    return torch.cat([fill, x] if left else [x, fill], 1)


def _replace_groups(got, new, slots, G, pad_id):
    """got with the G samples of each group slots[k] replaced by new's group k (rollout tensors re-padded:
    prompts on the left, completions on the right)."""
    ro, ro2 = got[0], new[0]
    P, T = max(ro.prompt_ids_BP.shape[1], ro2.prompt_ids_BP.shape[1]), max(
        ro.completion_ids_BT.shape[1], ro2.completion_ids_BT.shape[1])
    rows = torch.tensor([slots[k] * G + j for k in range(len(slots)) for j in range(G)], dtype=torch.long,
                        device=ro.prompt_ids_BP.device)
    fields = []
    for name, width, value, left in (("prompt_ids_BP", P, pad_id, True), ("prompt_mask_BP", P, 0, True),
                                     ("completion_ids_BT", T, pad_id, False), ("completion_mask_BT", T, 0, False),
                                     ("logprobs_BT", T, 0.0, False)):
        a, b = getattr(ro, name), getattr(ro2, name)
        if a is None or b is None:
            fields.append(None)
            continue
        a, b = _pad_to(a, width, value, left), _pad_to(b, width, value, left)
        fields.append(a.index_copy(0, rows, b.to(a.dtype)))
    trunc = ro.truncated_B.index_copy(0, rows, ro2.truncated_B)
    out = Rollout(*fields[:4], trunc, fields[4])
    if ro.routing is not None:  # moe_router_replay: the groups' routing records follow their rows
        out.routing = ro.routing.replace_rows(ro2.routing, rows)
    lists = [list(x) for x in got[1:]]
    for k, i in enumerate(slots):
        for x, y in zip(lists, new[1:]):
            x[i * G:(i + 1) * G] = y[k * G:(k + 1) * G]
    return [out, *lists]


def reward_runner(cfg, reward_funcs=None) -> tuple[RewardRunner, torch.Tensor]:
    """The RewardRunner of reward_funcs (as GRPOTrainer takes them) and their weights, float32 [R]: an error naming
    reward_funcs or reward_weights when there is no function or not one weight per function."""
    if reward_funcs is None:
        reward_funcs = cfg.reward_funcs
    elif not isinstance(reward_funcs, list):  # one function, as TRL takes it
        reward_funcs = [reward_funcs]
    if not reward_funcs:
        raise ValueError("reward_funcs: an empty list; pass at least one reward function (None: the config's "
                         "reward_funcs)")
    runner = RewardRunner(reward_funcs, cfg, timeout=cfg.reward_timeout)
    w = [1.0] * len(reward_funcs) if cfg.reward_weights is None else cfg.reward_weights
    if len(w) != len(reward_funcs):
        raise ValueError(f"reward_weights has {len(w)} entries for the {len(reward_funcs)} reward functions "
                         f"passed ({', '.join(runner.names)}); give one weight per function")
    return runner, torch.tensor(w, dtype=torch.float32)


def truncated_sampling_correction(cfg) -> str:
    """The truncating sampling options (top_p < 1, top_k > 0, min_p > 0) set beside the rollout correction, as
    text; '' when none is or the correction is off."""
    if not cfg.vllm_importance_sampling_correction:
        return ""
    return ", ".join(f"{k}={v}" for k, v, on in (("top_p", cfg.top_p, cfg.top_p < 1.0), ("top_k", cfg.top_k,
                     cfg.top_k > 0), ("min_p", cfg.min_p, cfg.min_p > 0.0)) if on)


class GRPOTrainer(Trainer):
    def __init__(self, cfg, model, tokenizer, train_rows, eval_rows=None, reward_funcs=None):
        """reward_funcs: TRL's, a list of reward functions (or one); None: cfg.reward_funcs. cfg.reward_weights
        holds one weight per function of those (TRL's rule: per function passed, whatever cfg.reward_funcs)."""
        check_grpo_batch(cfg)
        # before Trainer.__init__, which prepares output_dir (overwrite_output_dir: deletes the last run's outputs)
        self.rewards, self.reward_w_R = reward_runner(cfg, reward_funcs)
        train_rows = list(train_rows)  # read here and by Trainer.__init__: not a one-shot iterator
        # rows given in code too: a column may not replace a reward argument
        check_reward_columns(cfg, train_rows, "GRPOTrainer's train_rows")
        if cfg.chat_template_kwargs:  # a bad value is an error before any work, not at the first rollout
            grpo_template_kwargs(tokenizer, [r["prompt"] for r in train_rows], cfg.chat_template_kwargs)
        # adaptive entropy control; set before Trainer.__init__, whose resume calls load_trainer_state
        self.entropy_coef, self.last_entropy = cfg.entropy_coef, float("inf")
        self.num_tokens = 0  # TRL's num_tokens: prompt + completion tokens of every rank's batches so far
        if not cfg.moe_router_replay:  # a model handed on by a replay stage records no rollout of this one
            moe_replay.disable(model)
        super().__init__(cfg, model, tokenizer, train_rows, eval_rows, optimizer_steps=cfg.num_iterations)
        truncating = truncated_sampling_correction(cfg)
        if self.rank == 0 and truncating:
            seq = cfg.vllm_importance_sampling_mode.startswith("sequence")
            log.warning("vllm_importance_sampling_correction with %s: the rollout log-probs are the truncated "
                        "sampling distribution's, so each token's weight exp(l_old - l_rollout) is its kept "
                        "probability mass (< 1) and a %s weight shrinks the loss%s; set "
                        "vllm_importance_sampling_correction=false to train at full strength (TRL's default "
                        "without vLLM)", truncating, "sequence's" if seq else "token's",
                        " with the completion's length (0.9^256 at 90% kept a token)" if seq else "")
        # moe_router_replay: the engine records each rollout's expert ids (a model with no MoE: ConfigError) until
        # finish()
        self.replay = moe_replay.enable(self.model) if cfg.moe_router_replay else None

    def finish(self, save: bool = True):
        """Trainer.finish; then the model's router replay is off (moe_replay.disable), so its later rollouts (the
        next stage's, rejection sampling) record nothing."""
        try:
            super().finish(save)
        finally:
            if self.replay is not None:
                moe_replay.disable(self.model)
                self.replay = None

    def trainer_state(self) -> dict:
        """Adaptive entropy control's state (last_entropy null before any step) and num_tokens: a resumed run
        continues them."""
        last = self.last_entropy if math.isfinite(self.last_entropy) else None
        return {"entropy_coef": self.entropy_coef, "last_entropy": last, "num_tokens": self.num_tokens}

    def load_trainer_state(self, state: dict):
        self.num_tokens = int(state.get("num_tokens", 0))
        if "entropy_coef" in state:
            self.entropy_coef = float(state["entropy_coef"])
            last = state.get("last_entropy")
            self.last_entropy = float("inf") if last is None else float(last)

    def applied_entropy_coef(self) -> float:
        """The entropy term's coefficient for this optimizer step: entropy_coef; with use_adaptive_entropy
        only while the last step's entropy is <= entropy_target (TRL: none before the first measurement)."""
        if self.cfg.use_adaptive_entropy and not self.last_entropy <= self.cfg.entropy_target:
            return 0.0
        return self.entropy_coef

    def compute_prompts_per_rank(self):
        return self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps // self.cfg.num_generations

    def needs_ref(self):
        return self.cfg.beta > 0

    # ---- 1. rollout + rewards + advantages
    def _rollout(self, step, rows, gidx):
        """This rank's G completions of each row (seeded by (seed, step, gidx[i], j)) and their rewards."""
        cfg, G, tok = self.cfg, self.cfg.num_generations, self.tok
        p_ids, p_mask, p_texts = encode_rendered_prompts(tok, [r["prompt"] for r in rows], cfg.max_prompt_length,
                                                         cfg.chat_template_kwargs)
        seeds = [row_seed(cfg.seed, step, g, j) for g in gidx for j in range(G)]
        ro = sample(self.model, p_ids.repeat_interleave(G, 0).to(self.dev), p_mask.repeat_interleave(G, 0).to(
            self.dev), max_new_tokens=cfg.max_completion_length, eos_id=eos_ids(self.model, tok),
            pad_id=tok.pad_token_id, seeds_B=seeds, temperature=cfg.temperature, check_finite=False,  # see below
            **sampling_kwargs(cfg, self.engine))
        # NaN logits (diverged weights) are not an error here: their NaN log-probs make the step's loss non-finite
        # on every rank, and the loop's divergence check stops the run there (TrainingDiverged, its row logged)
        if self.replay is not None:  # a rank with no rows (a dynamic-sampling round) sampled nothing to record
            ro.routing = self.replay.take() if rows else None
        texts = decode_completions(tok, ro)
        ids_list = [[t for t, k in zip(i, m) if k] for i, m in zip(ro.completion_ids_BT.tolist(),
                                                                     ro.completion_mask_BT.tolist())]
        cols = reward_columns(rows, G, cfg.answer_column)  # `answer` from answer_column, as evaluation reads
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        table, failed, extra, err = [], [], [], None
        try:
            if rows:
                # with chat-message prompts the runner passes completions as TRL does: [{"role": "assistant", ...}];
                # the prompts as rendered for sampling too (a template ending them with <think> opens the thought)
                table, failed = self.rewards(prompts, texts, ids_list, cols, trainer_state=self.reward_state(step),
                                             prompts_text=[t for t in p_texts for _ in range(G)])
                extra = self.rewards.last_extra
                _check_extra_columns(extra)
        except RewardError as e:  # this rank's reward output only: every rank must stop, not wait in a collective
            err = e
        self._stop_together(err)
        return [ro, texts, ids_list, table, failed, extra]

    def _stop_together(self, err: RewardError | None):
        """Raise err here and a RewardError naming it on every other rank, when any rank has one: a reward's bad
        output (RewardRunner's checks, log_extra's columns) is found on the rank that scored it, and the others
        would wait for it in the step's next collective until the launcher's timeout. One flag all-reduced per
        rollout (its rewards are host values already), the messages gathered only when a rank failed."""
        if dist.is_initialized() and self.world > 1:
            flag = torch.tensor([float(err is not None)], device=self.dev)
            dist.all_reduce(flag)
            if flag.item():
                every = [None] * self.world
                dist.all_gather_object(every, None if err is None else str(err))
                if err is None:
                    r, msg = next((r, m) for r, m in enumerate(every) if m is not None)
                    raise RewardError(f"rank {r} stopped on its rewards: {msg}")
        if err is not None:
            raise err

    def longest_row(self, cfg, rows):
        return grpo_longest_row(cfg)

    def reward_state(self, step):
        """TRL's trainer_state for the reward functions of `step` (0-based): a transformers.TrainerState as at
        that step's generation in TRL: global_step the steps done (r1train's steps: one generation batch
        each; max_steps counts the same), epoch the epochs done, num_train_epochs, the intervals."""
        from transformers import TrainerState

        cfg, n, N = self.cfg, self.prompts_per_rank * self.world, len(self.train_rows)
        return TrainerState(epoch=step * n / N, global_step=step, max_steps=self.max_steps,
                            num_train_epochs=math.ceil(self.max_steps * n / N), logging_steps=cfg.logging_steps,
                            eval_steps=cfg.eval_steps, save_steps=cfg.save_steps,
                            train_batch_size=cfg.per_device_train_batch_size, is_world_process_zero=self.rank == 0,
                            is_local_process_zero=int(os.environ.get("LOCAL_RANK", "0")) == 0)

    def _logged_metrics(self) -> dict:
        """The step's log_metric values by name, averaged over every rank's calls (TRL: sum / count)."""
        got = self.rewards.take_metrics()
        names = sorted(got)
        if dist.is_initialized() and self.world > 1:  # every rank reduces the same names
            every = [None] * self.world
            dist.all_gather_object(every, names)
            names = sorted(set().union(*every))
        if not names:
            return {}
        sums = torch.tensor([[sum(got.get(k, [])), len(got.get(k, []))] for k in names], dtype=torch.float64,
                            device=self.dev)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(sums)
        return {k: s / c for k, (s, c) in zip(names, sums.tolist())}

    def _add_logged_metrics(self, m: dict):
        """The step's log_metric values (_logged_metrics: its reward calls') join its metrics m (the trainer's,
        complete but for LOOP_METRICS); a name the trainer logs itself is an error (its value would be overwritten).
        The same names on every rank: every rank raises."""
        user = self._logged_metrics()
        taken = sorted(k for k in user if k in m or k in LOOP_METRICS)
        if taken:
            raise RewardError(f"log_metric: {taken} are metrics the trainer logs itself; log them under other names")
        m.update(user)

    def _varied(self, table, failed) -> list[bool]:
        """Per group of G samples: would its advantages differ from 0? The totals the advantages normalize:
        the weighted rewards (sum_then_normalize) or the weighted sum of each reward normalized within the
        group (normalize_then_sum: equal weighted totals can still carry signal, [[2, 0], [0, 1]] with weights
        [1, 2]). Failed and unscorable samples (every reward None) are left out, as from the advantages: they
        give a group no signal."""
        G, w = self.cfg.num_generations, self.reward_w_R.tolist()
        if self.cfg.multi_objective_aggregation == "normalize_then_sum":
            tot = [None if t != t else t for t in _gdpo_totals(reward_table(table, len(w), torch.float64),
                                                                torch.tensor(failed, dtype=torch.bool),
                                                                torch.tensor(w), G).tolist()]
        else:
            tot = [None if f or all(v is None for v in row) else sum(wj * v for wj, v in zip(w, row) if v is not None)
                   for row, f in zip(table, failed)]
        out = []
        for g in range(len(tot) // G):
            vals = [t for t in tot[g * G:(g + 1) * G] if t is not None]
            out.append(len(vals) > 1 and max(vals) - min(vals) > 1e-6)
        return out

    def _extra_row(self, step, rnd, j):
        """Dynamic sampling's prompt for batch slot j in round rnd >= 1: a function of (seed, step, rnd, j)."""
        return self.train_rows[row_seed(self.cfg.seed, "dynamic", step, rnd, j) % len(self.train_rows)]

    def _dynamic_sampling(self, step, rows, gidx, got, m):
        """DAPO dynamic sampling, per batch slot: a slot whose G rewards are all equal (no learning signal)
        is re-drawn with a new prompt, up to max_dynamic_sampling_rounds rounds in all. A slot lives on one
        rank and its prompts depend only on (seed, step, round, slot), so 1 and N processes keep the same
        groups. Slots still constant after the last round stay (their advantages are 0)."""
        cfg, G, n_global = self.cfg, self.cfg.num_generations, self.prompts_per_rank * self.world
        rows, gidx = list(rows), list(gidx)
        ok = self._varied(got[3], got[4])
        counts = torch.zeros(3, dtype=torch.float64, device=self.dev)  # groups drawn, dropped, rounds
        counts[0], counts[1] = len(ok), ok.count(False)
        for rnd in range(1, cfg.max_dynamic_sampling_rounds):
            todo = torch.tensor([float(ok.count(False))], device=self.dev)
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(todo)  # every rank runs the same rounds (ZeRO-3 rollouts gather together)
            if todo.item() == 0:
                break
            counts[2] += 1
            slots = [i for i, k in enumerate(ok) if not k]
            new_rows = [self._extra_row(step, rnd, gidx[i] % n_global) for i in slots]
            new_gidx = [gidx[i] % n_global + rnd * n_global for i in slots]  # distinct seeds per round
            new = self._rollout(step, new_rows, new_gidx)
            new_ok = self._varied(new[3], new[4])
            counts[0] += len(slots)
            counts[1] += new_ok.count(False)
            if slots:
                got = _replace_groups(got, new, slots, G, self.tok.pad_token_id)
            for k, i in enumerate(slots):
                rows[i], gidx[i], ok[i] = new_rows[k], new_gidx[k], new_ok[k]
        counts = torch.cat([counts, torch.tensor([float(ok.count(False))], dtype=torch.float64,
                                                 device=self.dev)])
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(counts)
        c = counts.tolist()
        m["dynamic_sampling/drop_rate"] = c[1] / max(c[0], 1.0)
        m["dynamic_sampling/rounds"] = 1 + c[2] / self.world
        m["dynamic_sampling/constant_groups_kept"] = c[3]
        return rows, got

    def make_batch(self, step, rows, clock=None):
        """clock: the step's PhaseClock (generate, rewards)."""
        cfg, G = self.cfg, self.cfg.num_generations
        clock = PhaseClock(self.dev) if clock is None else clock
        _, gidx = self.rows_for(step)
        m = {}
        clock.mark("generate")
        got = self._rollout(step, rows, gidx)
        if cfg.dynamic_sampling:
            rows, got = self._dynamic_sampling(step, rows, gidx, got, m)
        ro, texts, ids_list, table, failed, extra = got
        if cfg.rollout_release_memory:
            release_engine(self.model)
        clock.mark("rewards")
        prompts = [r["prompt"] for r in rows for _ in range(G)]
        R = len(self.rewards.names)
        vals_NR = reward_table(table, R, torch.float32)
        failed_N = torch.tensor(failed, dtype=torch.float32)
        all_NR = _gather_rows(torch.cat([vals_NR, failed_N[:, None]], 1).to(self.dev)).cpu()
        vals_all, failed_all = all_NR[:, :R], all_NR[:, R] > 0
        if failed_all.all():  # the same global verdict on every rank: all of them stop
            raise self.rewards.all_failed_error(failed_all.numel())
        # TRL's advantages: None ("not applicable") counts 0 beside another reward's value (nansum); a row
        # with no reward at all (unscorable) or a failed reward is left out of the group's (the batch's) mean
        # and std and gets advantage 0; a failed row also gets no loss weight (below)
        adv_all, std_all = advantages(vals_all, failed_all, self.reward_w_R, G, scale=cfg.scale_rewards,
                                      aggregation=cfg.multi_objective_aggregation, backend=cfg.kernel_backend)
        if not torch.isfinite(adv_all).all():  # scale_rewards=none: reward differences beyond float32
            raise _overflow_error(cfg.scale_rewards)
        total_N = reward_totals(vals_all, failed_all, self.reward_w_R)
        unscorable = int((vals_all.isnan().all(1) & ~failed_all).sum())  # a failed row is counted as failed
        if unscorable and self.rank == 0:
            log.warning("%d of %d completions got None from every reward function: unscorable, advantage 0 "
                        "(TRL's rule); check that some reward applies to every row", unscorable, len(total_N))
        lo = self.rank * len(rows) * G
        adv_N = adv_all[lo:lo + len(rows) * G]
        mask_BT = ro.completion_mask_BT.clone()
        if cfg.mask_truncated_completions:
            mask_BT[ro.truncated_B] = 0
        mask_BT[failed_N.bool().to(mask_BT.device)] = 0
        m.update(self.reward_metrics(vals_all, total_N, std_all, failed_all, ro))
        samples = [{"prompt": p if isinstance(p, str) else p[-1]["content"], "completion": c,
                    "reward": _finite_or_none(total_N[lo + i]), "advantage": float(adv_N[i])}
                   for i, (p, c) in enumerate(zip(prompts, texts))]
        cols = list(dict.fromkeys(k for e in extra for k in e))  # log_extra's columns (None where not logged)
        for smp, e in zip(samples, extra):
            smp.update((k, e.get(k)) for k in cols)
        return ro, adv_N.to(self.dev), mask_BT, m, samples

    def reward_metrics(self, vals_NR, total_N, std_N, failed_N, ro):
        """TRL's: reward and reward_std over the batch's scored rows (unscorable and failed rows left out),
        frac_reward_zero_std the share of rows whose advantage scale (std_N, TRL's std_rewards) is 0;
        num_tokens the running count of every rank's prompt + completion tokens, this batch's added."""
        m = {"reward": total_N.nanmean().item(), "reward_std": _nanstd(total_N, 0).item(),
             "frac_reward_zero_std": torch.isclose(std_N, torch.zeros_like(std_N)).double().mean().item(),
             "rewards/failed": failed_N.sum().item()}
        for j, name in enumerate(self.rewards.names):
            v = vals_NR[:, j].double()  # float32 rewards near its max: their sum in float64
            v = v[~v.isnan()]
            m[f"rewards/{name}/mean"] = v.mean().item() if v.numel() else float("nan")
            m[f"rewards/{name}/std"] = v.std().item() if v.numel() > 1 else float("nan")  # TRL's nanstd
        # TRL's completions/*: lengths (eos counted) over every completion; the terminated ones (an eos, not
        # clipped) apart, all 0 when there are none. One sum and one min all-reduce (max as -min of -x)
        lens = ro.completion_mask_BT.sum(1).double().to(self.dev)
        trunc = ro.truncated_B.to(self.dev)
        term = lens[~trunc]
        def least(t):  # inf on a rank with none: the MIN all-reduce then takes the other ranks' value
            return t.min() if t.numel() else t.new_tensor(float("inf"))

        sums = torch.stack([lens.new_tensor(float(lens.numel())), lens.sum(), trunc.double().sum(),
                            lens.new_tensor(float(term.numel())), term.sum(),
                            ro.prompt_mask_BP.sum().double().to(self.dev)])
        mins = torch.stack([least(lens), least(-lens), least(term), least(-term)])
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(mins, op=dist.ReduceOp.MIN)
        (n, tot, n_trunc, n_term, tot_term, n_prompt), mn = sums.tolist(), mins.tolist()
        self.num_tokens += int(n_prompt + tot)
        m["num_tokens"] = self.num_tokens
        m["completions/mean_length"] = tot / max(n, 1.0)
        m["completions/min_length"], m["completions/max_length"] = (mn[0], -mn[1]) if n else (0.0, 0.0)
        m["completions/clipped_ratio"] = n_trunc / max(n, 1.0)
        m["completions/mean_terminated_length"] = tot_term / n_term if n_term else 0.0
        m["completions/min_terminated_length"] = mn[2] if n_term else 0.0
        m["completions/max_terminated_length"] = -mn[3] if n_term else 0.0
        return m

    # ---- 2. loss over micro-batches, num_iterations passes
    def train_step(self, step, rows):
        cfg = self.cfg
        clock = PhaseClock(self.dev)
        ro, adv_N, mask_BT, m, samples = self.make_batch(step, rows, clock)
        attn_BL = torch.cat([ro.prompt_mask_BP, ro.completion_mask_BT], 1)
        ids_BL = ro.input_ids
        comp_BT = ro.completion_ids_BT
        mb = cfg.per_device_train_batch_size
        clock.mark("logprobs")
        # padding_free: the micro-batches are packs of rows (r1train/packing.py), planned once per step and
        # held over the num_iterations passes. Each packed forward switches its model's attention itself
        # (Policy._forward_packed); the training loop also holds the policy's switch over the backward, where
        # activation checkpointing re-runs the attention. An MoE policy's rows also feed the real completion
        # tokens that the padded forward routes past their last loss token (build_packs' completion_mask_BT): the
        # routers' counts (expert loads, the aux-loss-free bias update) are then the padded run's
        packs = build_packs(ids_BL, ro.prompt_mask_BP, mask_BT, rows_per_batch=mb, max_tokens=cfg.max_tokens_per_batch,
                            routed=bool(self.expert_load), completion_mask_BT=ro.completion_mask_BT) \
            if cfg.padding_free else None
        packed = (lambda: packed_attention(self.model)) if packs else contextlib.nullcontext
        ref_BT = None
        # The old policy is the model of iteration 0: an iteration is exactly gradient_accumulation_steps
        # micro-batches (compute_prompts_per_rank), so the optimizer steps only between iterations and
        # iteration 0's forward log-probs are the old log-probs (no separate pass; TRL makes one).
        old_BT = torch.zeros(comp_BT.shape, dtype=torch.float32, device=comp_BT.device) \
            if cfg.num_iterations > 1 else None
        ref = self.ref_policy()
        if ref is not None and packs:
            ref_BT = packed_logprobs(ref, packs, comp_BT, temperature=cfg.temperature, backend=cfg.kernel_backend)
        elif ref is not None:
            ref_BT = sequence_logprobs(ref, ids_BL, attn_BL, comp_BT, temperature=cfg.temperature,
                                       micro_batch=mb, backend=cfg.kernel_backend)
        # dapo/cispo normalize by the global token count; DeepSpeed divides each micro loss by GA and
        # averages gradients over ranks, so each micro-batch gets N_global / (GA * world)
        n_items = mask_BT.sum().to(torch.float32).reshape(1)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(n_items)
        n_items = n_items.clamp(min=1.0) / (cfg.gradient_accumulation_steps * self.world)
        if packs:  # per row: its padded micro-batch's loss weight; the micro-batches are the packs
            weights = reduction_weights(cfg.loss_type, mask_BT, mb, max_completion_length=cfg.max_completion_length,
                                    num_items=n_items)
            micro = [(pk.rows, pk.T, pk) for pk in packs]
        else:  # each micro-batch is trimmed to its longest completion: every length in one host read
            starts = range(0, ids_BL.shape[0], mb)
            pos_T = torch.arange(1, mask_BT.shape[1] + 1, device=mask_BT.device)
            trims = torch.stack([(mask_BT[s:s + mb].any(0) * pos_T).max() for s in starts]).clamp(min=1).tolist()
            micro = [(slice(s, s + mb), T, None) for s, T in zip(starts, trims)]
        # the logged loss is the padded run's mean micro-batch loss: a pack's share of the sum is scaled
        loss_scale = len(micro) / cfg.gradient_accumulation_steps
        acc = {}  # metric -> per-micro-batch device tensors, reduced with one all-reduce at the end
        tok_acc = {}  # token-mean metric -> per-micro-batch [sum, tokens], all-reduced per micro-batch
        ext = []  # per micro-batch: clip_extremes, min-reduced over the ranks
        # keys TRL does not log: clip_ratio/*_mean outside its two-sided clipped losses, kl without a KL term
        skip = (() if cfg.loss_type in CLIP_EXTREME_LOSSES else CLIP_MEAN_METRICS) + (("kl",) if cfg.beta == 0 else ())
        coefs = []  # the entropy coefficient after each optimizer step (TRL logs their mean)
        bonus, items = cfg.entropy_coef != 0.0 or cfg.use_adaptive_entropy, LOSS_REDUCTION[cfg.loss_type] == "items"
        # TRL's sampling/* metrics of the first pass, on the device: sums [|rollout - training log-prob|,
        # tokens, rollout-correction weight, weights] and maxima [|log-prob difference|, weight, -weight]. The
        # means are over every process's tokens (TRL averages the per-process means: equal with equal token counts)
        samp_sum = torch.zeros(4, dtype=torch.float64, device=self.dev)
        samp_max = torch.tensor([0.0, -math.inf, -math.inf], dtype=torch.float64, device=self.dev)
        ent_window = torch.zeros(2, dtype=torch.float64, device=self.dev)  # adaptive entropy: sum, tokens
        # moe_router_replay: [B, P+T, MoE layers, k] expert ids, armed per micro-batch (flat-indexed for packs)
        routes = None if ro.routing is None else ro.routing.joined()
        if routes is not None and routes.shape[:2] != ids_BL.shape:
            raise RuntimeError(f"moe_router_replay: routing {tuple(routes.shape[:2])} does not match the rollout's "
                               f"input ids {tuple(ids_BL.shape)}")
        with packed():
            for it, j in itertools.product(range(cfg.num_iterations), range(len(micro))):
                clock.mark("forward")
                sl, T, pk = micro[j]
                if routes is not None:
                    ids = routes.flatten(0, 1)[pk.src] if pk is not None else \
                        routes[sl, :ids_BL.shape[1] - comp_BT.shape[1] + T]
                    moe_replay.replay(self.model, ids, check=False)
                samp_BT = ro.logprobs_BT
                if pk is not None:
                    # the optimizer steps after the iteration's last pack, as after the padded run's last
                    # micro-batch (DeepSpeed counts gradient_accumulation_steps otherwise)
                    self.engine.set_gradient_accumulation_boundary(j == len(micro) - 1)
                    out, ent = self.micro_step_packed(pk, comp_BT, adv_N, mask_BT, None if it == 0 else old_BT,
                                                      ref_BT, samp_BT, n_items, weights, self.applied_entropy_coef())
                else:
                    out, ent = self.micro_step(ids_BL[sl], attn_BL[sl], comp_BT[sl], adv_N[sl], mask_BT[sl],
                                               None if old_BT is None or it == 0 else old_BT[sl],
                                               None if ref_BT is None else ref_BT[sl], n_items, T,
                                               samp_BT=None if samp_BT is None else samp_BT[sl],
                                               entropy_coef=self.applied_entropy_coef())
                n_tok = mask_BT[sl].sum().double()  # the micro-batch's scored tokens (metric weights)
                # with importance_sampling_level=sequence TRL's clip_ratio/*_mean weigh each row of the micro-batch
                n_seq = n_tok.new_full((), out.per_token_logprobs.shape[0])  # a fill: no host-to-device copy
                # TRL's adaptive-entropy window: the entropy sum and count of the tokens the loss trains on (the
                # top_entropy_quantile selection; else every scored token)
                win = out.metrics.pop(ENTROPY_WINDOW, None)
                pol = out.metrics.pop(POLICY_LOSS, out.loss).detach()
                if cfg.use_adaptive_entropy and ent is not None:
                    ent_window += win.to(ent_window.device) if win is not None else \
                        torch.stack([ent.detach().double() * n_tok, n_tok])
                old_sl = None if old_BT is None or it == 0 else old_BT[sl, :T]
                if cfg.loss_type in CLIP_EXTREME_LOSSES:
                    ext.append(clip_extremes(out.per_token_logprobs, old_sl, adv_N[sl], mask_BT[sl, :T], cfg))
                elif cfg.loss_type == "cispo":  # TRL's global_masked_mean, as TOKEN_MEAN_METRICS
                    tok_acc.setdefault("cispo_clip_ratio", []).append(
                        cispo_clipped(out.per_token_logprobs, old_sl, adv_N[sl], mask_BT[sl, :T], cfg))
                elif cfg.loss_type == "vespo":  # the same, of phi [b, 1]: every sequence counts
                    tok_acc.setdefault("vespo/phi_seq_mean", []).append(
                        vespo_phi(out.per_token_logprobs, old_sl, adv_N[sl], mask_BT[sl, :T],
                                  None if samp_BT is None else samp_BT[sl, :T], cfg))
                if old_BT is not None and it == 0:
                    old_BT[sl, :T] = out.per_token_logprobs
                if it == 0 and ro.logprobs_BT is not None:
                    m_BT = mask_BT[sl, :T].bool()
                    d_BT = (out.per_token_logprobs - ro.logprobs_BT[sl, :T]).abs().masked_fill(~m_BT, 0.0)
                    samp_sum[:2] += torch.stack([d_BT.sum().double(), m_BT.sum().double()])
                    if d_BT.numel():  # a filler pack has no rows
                        samp_max[0] = torch.maximum(samp_max[0], d_BT.max().double())
                    if cfg.vllm_importance_sampling_correction:
                        w = rollout_is_weights(out.per_token_logprobs.detach(), ro.logprobs_BT[sl, :T], m_BT,
                                               cfg.vllm_importance_sampling_mode,
                                               cfg.vllm_importance_sampling_clip_min,
                                               cfg.vllm_importance_sampling_clip_max)
                        # sequence modes: one weight per row, every row; token modes: the scored tokens. Masked
                        # sums and extremes, no boolean index (its nonzero is a stream sync per micro-batch)
                        w = w.double()
                        seq = cfg.vllm_importance_sampling_mode.startswith("sequence")
                        cnt = torch.ones_like(w, dtype=torch.bool) if seq else m_BT
                        if w.numel():  # a filler pack has no rows
                            samp_sum[2:] += torch.stack([(w * cnt).sum(), cnt.double().sum()])
                            samp_max[1:] = torch.maximum(samp_max[1:], torch.stack(
                                [w.masked_fill(~cnt, -math.inf).max(), -w.masked_fill(~cnt, math.inf).min()]))
                clock.mark("backward")
                self.engine.backward(out.loss)
                clock.mark("optimizer")
                boundary, gn = self.optimizer_step()
                if boundary and cfg.use_adaptive_entropy:  # one host read per optimizer step
                    if dist.is_initialized() and self.world > 1:
                        dist.all_reduce(ent_window)
                    w = ent_window.tolist()
                    self.last_entropy = w[0] / max(w[1], 1.0)
                    self.entropy_coef = adaptive_entropy_step(self.entropy_coef, self.last_entropy, cfg)
                    ent_window.zero_()
                if boundary:  # MoE bias update; its metrics join the step's one device-to-host read
                    for k, v in self.expert_load.step().items():
                        acc.setdefault(k, []).append(v)
                    if gn is not None:  # the last optimizer step's, as transformers logs it
                        acc["grad_norm"] = [torch.as_tensor(gn, dtype=torch.float32)]
                    if bonus:
                        coefs.append(self.entropy_coef)
                # each iteration ends with exactly one optimizer step, so this one is the run's
                # (step * num_iterations + it + 1)-th: TRL's global_step, which its SyncRefModelCallback counts.
                # After the MoE bias update (the policy as the step leaves it); the step's ref log-probs are taken
                if boundary and self.ref is not None and cfg.sync_ref_model and \
                        (step * cfg.num_iterations + it + 1) % cfg.ref_model_sync_steps == 0:
                    self.sync_ref(cfg.ref_model_mixup_alpha)
                clock.mark("forward")  # the micro-step's metric tensors
                filler = pk is not None and not pk.rows.numel()  # its loss 0 is a share; its means are no rows'
                share = loss_scale if pk is not None else 1.0
                # TRL's policy_loss (entropy bonus on): dapo/cispo/vespo's TRL normalizer is GA x n_items
                pol = pol * share / (cfg.gradient_accumulation_steps if items else 1.0) if bonus else None
                for k, v in [("loss", out.loss.detach() * share), ("policy_loss", pol), *out.metrics.items(),
                             ("entropy", ent)]:
                    if v is None or (filler and k not in ("loss", "policy_loss")) or k in skip:
                        continue
                    v = torch.as_tensor(v).detach().reshape(())
                    if k in TOKEN_MEAN_METRICS:  # TRL's global_masked_mean: the micro-batch's sum and count
                        n = n_seq if k in CLIP_MEAN_METRICS and cfg.importance_sampling_level == "sequence" else n_tok
                        tok_acc.setdefault(k, []).append(torch.stack([v.double() * n, n]))
                    else:
                        acc.setdefault(k, []).append(v.float())
        clock.mark(None)
        if routes is not None:
            moe_replay.replay(self.model, None)
            acc.update({k: [v] for k, v in moe_replay.agreement(self.model).items()})
        if acc:
            means = torch.stack([torch.stack([x.to(self.dev) for x in v]).mean() for v in acc.values()])
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(means)
            m.update(zip(acc, (means / self.world).tolist()))
        if tok_acc:  # per micro-batch: every rank's sum over every rank's tokens; then the mean over micro-batches
            st = torch.stack([torch.stack([x.to(self.dev) for x in v]) for v in tok_acc.values()])  # [K, M, 2]
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(st)
            m.update(zip(tok_acc, (st[..., 0] / st[..., 1].clamp(min=1.0)).mean(1).tolist()))
        if ext:  # TRL: per micro-batch the min (max) over every process's sequences, then the mean over those with one
            e = torch.stack(ext)
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(e, op=dist.ReduceOp.MIN)
            for k, col, sign in (("clip_ratio/low_min", 0, 1.0), ("clip_ratio/high_max", 1, -1.0)):
                v = [sign * x for x in e[:, col].tolist() if math.isfinite(x)]
                if v:
                    m[k] = sum(v) / len(v)
        if ro.logprobs_BT is not None:
            if dist.is_initialized() and self.world > 1:
                dist.all_reduce(samp_sum)
                dist.all_reduce(samp_max, op=dist.ReduceOp.MAX)
            su, mx = samp_sum.tolist(), samp_max.tolist()
            m["sampling/sampling_logp_difference/mean"] = su[0] / max(su[1], 1.0)
            m["sampling/sampling_logp_difference/max"] = mx[0]
            if su[3] > 0:  # rollout correction on, some weight seen
                m["sampling/importance_sampling_ratio/min"] = -mx[2]
                m["sampling/importance_sampling_ratio/mean"] = su[2] / su[3]
                m["sampling/importance_sampling_ratio/max"] = mx[1]
        m.update({f"time/{k}": v for k, v in clock.seconds().items()})
        if coefs:
            m["entropy_coef"] = sum(coefs) / len(coefs)
        show = cfg.log_completions and cfg.logging_steps and (step + 1) % cfg.logging_steps == 0
        self.logger.log_completions(step + 1, samples, to_backends=show)
        if show and self.rank == 0:
            for smp in samples[:2]:
                r = "none" if smp["reward"] is None else f"{smp['reward']:.2f}"
                print(f"[step {step + 1}] reward={r} {smp['prompt']!r} -> {smp['completion']!r}")
        self._add_logged_metrics(m)
        return m

    def _loss_kw(self, n_items, entropy_coef, **tensors) -> dict:
        """The loss options of rk.grpo_loss / rk.linear_grpo_loss from the config; tensors: old_logprobs,
        ref_logprobs, sampling_logprobs (the rollout engine's: rollout correction, off-policy mask)."""
        cfg = self.cfg
        return dict(beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
                    loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
                    kl_estimator=cfg.kl_estimator, temperature=cfg.temperature,
                    max_completion_length=cfg.max_completion_length,
                    num_items_in_batch=n_items if LOSS_REDUCTION[cfg.loss_type] == "items" else None,
                    backend=cfg.kernel_backend, **loss_keys(cfg), entropy_coef=entropy_coef, **tensors)

    def _fused_loss(self, comp_BT, adv, mask_BT, kw):
        """fn for Policy.forward: the fused loss on [B, T] -> (GRPOLossOutput, masked mean entropy or None).
        The entropy (log_entropy, use_adaptive_entropy) comes from the loss kernel's own pass over the logits
        (compute_entropy), not from a second head pass."""
        cfg = self.cfg
        kw = dict(kw, compute_entropy=cfg.log_entropy or cfg.use_adaptive_entropy)
        if kw["top_entropy_quantile"] < 1.0:
            return self._quantile_loss(comp_BT, adv, mask_BT, kw)

        def fn(x, weight=None, bias=None, logit_scale=1.0, softcap=None):  # the head's logits (rollout.Policy)
            if weight is None:
                out = rk.grpo_loss(x, comp_BT, adv, mask_BT, **kw)
            else:
                out = rk.linear_grpo_loss(x, weight, comp_BT, adv, mask_BT, bias=bias, softcap=softcap,
                                          **dict(kw, temperature=kw["temperature"] / logit_scale))
            ent = out.metrics.pop("entropy", None)
            if kw["entropy_coef"] != 0.0:  # the loss's entropy term: entropy_coef * the masked mean entropy
                out.metrics[POLICY_LOSS] = out.loss.detach() + kw["entropy_coef"] * ent
            return out, ent
        return fn

    def entropy_group(self):
        """The process group of the top_entropy_quantile threshold: every data-parallel process (TRL gathers
        all processes' entropies); None with one process."""
        return dist.group.WORLD if dist.is_initialized() and self.world > 1 else None

    def _quantile_loss(self, comp_BT, adv, mask_BT, kw):
        """_fused_loss's fn for top_entropy_quantile < 1 (never a token-local loss, so rk.grpo_loss would run
        the same two parts): log-probs and entropy by the log-prob kernel, then the reference loss with the
        entropy threshold over every process's tokens (entropy_group), which rk.grpo_loss cannot gather.
        Its metrics hold ENTROPY_WINDOW (the selected tokens' entropy sum and count)."""
        cfg = self.cfg
        lkw = dict(temperature=cfg.temperature, return_entropy=True, backend=cfg.kernel_backend)
        rkw = {k: v for k, v in kw.items() if k not in ("temperature", "backend", "compute_entropy")}
        group = self.entropy_group()

        def fn(x, weight=None, bias=None, logit_scale=1.0, softcap=None):
            logp, h = rk.token_logprobs(x, comp_BT, **lkw) if weight is None else rk.linear_token_logprobs(
                x, weight, comp_BT, bias=bias, softcap=softcap,
                **dict(lkw, temperature=lkw["temperature"] / logit_scale))
            loss, metrics, ent_mask = grpo_loss_from_logprobs(logp, adv, mask_BT, entropy=h, entropy_group=group,
                                                              return_entropy_mask=True, **rkw)
            metrics = {k: v.detach() for k, v in metrics.items()}
            metrics[ENTROPY_WINDOW] = selected_entropy_window(h, mask_BT.to(h.dtype), ent_mask)
            if rkw["entropy_coef"] != 0.0:  # its entropy term: entropy_coef * the selected tokens' mean entropy
                metrics[POLICY_LOSS] = loss.detach() + rkw["entropy_coef"] * metrics["entropy/selected_mean"]
            return rk.GRPOLossOutput(loss, logp.detach(), metrics), metrics.pop("entropy", None)
        return fn

    def micro_step(self, ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, samp_BT=None,
                   entropy_coef=0.0):
        """Forward + loss for one micro-batch, trimmed to its first T completion tokens (its longest);
        samp_BT: the rollout engine's log-probs (rollout correction, off-policy mask)."""
        cut = ids_BL.shape[1] - comp_BT.shape[1] + T
        ids_BL, attn_BL, comp_BT, mask_BT = ids_BL[:, :cut], attn_BL[:, :cut], comp_BT[:, :T], mask_BT[:, :T]
        kw = self._loss_kw(n_items, entropy_coef, old_logprobs=None if old_BT is None else old_BT[:, :T],
                           ref_logprobs=None if ref_BT is None else ref_BT[:, :T],
                           sampling_logprobs=None if samp_BT is None else samp_BT[:, :T])
        fn = self._fused_loss(comp_BT, adv_B, mask_BT, kw)
        self.expert_load.token_mask = attn_BL.reshape(-1).bool()  # MoE routers count real tokens only
        return self.engine(ids_BL, attn_BL, T, fn)

    def micro_step_packed(self, pk, comp_BT, adv_N, mask_BT, old_BT, ref_BT, samp_BT, n_items, weights,
                          entropy_coef=0.0):
        """Forward + loss for one packed micro-batch (r1train/packing.py): the transformer runs on the pack's
        tokens, the head on its scored tokens only; the loss is the pack's share of the padded micro-batches'
        losses: sum over its rows of w_row * sum_t m*L (weights: reduction_weights'). Returns
        (GRPOLossOutput with per_token_logprobs in the pack's [b, T] layout, masked mean entropy or None)."""
        cfg = self.cfg
        # every packed token is real, but a filler pack's one token (fed only so collectives match) routes none
        self.expert_load.token_mask = None if pk.rows.numel() else \
            torch.zeros(pk.input_ids.numel(), dtype=torch.bool, device=self.dev)
        on_tokens = (lambda x: None if x is None else pk.gather(x))
        kw = self._loss_kw(n_items, entropy_coef, old_logprobs=on_tokens(old_BT), ref_logprobs=on_tokens(ref_BT),
                           sampling_logprobs=on_tokens(samp_BT))
        ids_1C = pk.gather(comp_BT)
        if token_local(kw) and LOSS_REDUCTION[cfg.loss_type] == "items":
            # every token weighs 1/num_items: the fused loss on the packed tokens is exactly their share
            fused = self._fused_loss(ids_1C, adv_N[pk.rows[pk.tok_row]][None], pk.gather(mask_BT), kw)

            def fn_fused(*args, **head):
                out, ent = fused(*args, **head)
                return out._replace(per_token_logprobs=pk.to_rows(out.per_token_logprobs)), ent
            return self.engine(pk.input_ids, None, 0, fn_fused, pack=pk)
        # otherwise the log-prob kernel on the packed tokens (entropy in the same pass), then the loss family's
        # per-token L on the pack's [b, T] layout (r1kernels' reference), reduced with the row weights
        on_rows = (lambda x: None if x is None else pk.rows_T(x))
        tkw = dict(kw, old_logprobs=on_rows(old_BT), ref_logprobs=on_rows(ref_BT), sampling_logprobs=on_rows(samp_BT))
        ent_loss = needs_entropy(kw)
        ent_on = ent_loss or cfg.log_entropy or cfg.use_adaptive_entropy
        m_bT = pk.rows_T(mask_BT).float()
        w_b, we_b, share_b = (w[pk.rows][:, None] for w in weights)
        group = self.entropy_group() if ent_loss else None

        def fn(x, weight=None, bias=None, logit_scale=1.0, softcap=None):
            lkw = dict(temperature=cfg.temperature / logit_scale, return_entropy=ent_on, backend=cfg.kernel_backend)
            lp = rk.token_logprobs(x, ids_1C, **lkw) if weight is None else \
                rk.linear_token_logprobs(x, weight, ids_1C, bias=bias, softcap=softcap, **lkw)
            logp_1C, h_1C = lp if ent_on else (lp, None)
            logp, h = pk.to_rows(logp_1C), None if h_1C is None else pk.to_rows(h_1C)
            L, ent_mask, metrics = grpo_token_loss(logp, adv_N[pk.rows], m_bT, entropy=h if ent_loss else None,
                                                   entropy_group=group, **tkw)
            loss = (L * m_bT * w_b).sum()
            if entropy_coef != 0.0:
                metrics[POLICY_LOSS] = loss.detach()
            ent = None if h is None else (h.detach() * m_bT).sum() / m_bT.sum().clamp(min=1.0)
            if ent_mask is not None:  # top_entropy_quantile: selected among every process's j-th pack's tokens
                eff = m_bT * ent_mask
                win = metrics[ENTROPY_WINDOW] = selected_entropy_window(h, m_bT, ent_mask)
                metrics["entropy/selected_mean"] = (win[0] / win[1].clamp(min=1.0)).to(h.dtype)
                if entropy_coef != 0.0:  # the pack's mean, counted as many padded micro-batches as its rows fill
                    loss = loss - entropy_coef * share_b.sum() * (h * eff).sum() / eff.sum().clamp(min=1.0)
            elif entropy_coef != 0.0:
                loss = loss - entropy_coef * (h * m_bT * we_b).sum()
            return rk.GRPOLossOutput(loss, logp.detach(), metrics), ent
        return self.engine(pk.input_ids, None, 0, fn, pack=pk)
