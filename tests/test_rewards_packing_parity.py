"""completion_text reads a conversational completion as TRL's own rewards do (its first message); packing.plan
returns at least min_batches bins (empty ones last, never fewer), so plan_all_ranks gives every rank the same
number of micro-batches even when ranks hold different numbers of rows, and an empty bin's filler pack runs
forward and backward with no loss and no gradient. Fresh random lengths per run (conftest's printed seed)."""

import random
import threading

import pytest
import torch
import torch.distributed as torch_dist
import train_helpers as H
from conftest import assert_close

from r1train import packing
from r1train import rewards as R
from r1train.packing import build_packs, plan

# ---- 1. completion_text: TRL's completion[0]["content"]

TURNS = [[{"role": "assistant", "content": "<think>2 plus 3</think><answer>5</answer>"},
          {"role": "tool", "content": "calculator: 7"}],
         [{"role": "assistant", "content": "<answer>7</answer>"},
          {"role": "user", "content": "sure?"},
          {"role": "assistant", "content": "<think>check</think><answer>5</answer>"}]]


def test_completion_text_reads_the_first_message_as_trl():
    """A multi-message completion (assistant turn, then a tool or user turn) is scored on its first message,
    as trl.rewards' accuracy_reward / think_format_reward read completion[0]["content"]."""
    assert [R.completion_text(c) for c in TURNS] == [c[0]["content"] for c in TURNS]
    assert R.accuracy_reward(None, TURNS, answer=["5", "5"]) == [1.0, 0.0]
    assert R.format_reward(None, TURNS) == [1.0, 0.0]
    trl_rewards = pytest.importorskip("trl.rewards")
    ours = [[{"role": "assistant", "content": R.completion_text(c)}] for c in TURNS]
    assert trl_rewards.think_format_reward(ours) == trl_rewards.think_format_reward(TURNS) == [1.0, 0.0]


def test_completion_text_keeps_the_missing_text_contract():
    """None, no messages, a first message with None or no content: "" (never "None"); strings and text parts
    as before."""
    for c in (None, [], [{"role": "assistant", "content": None}], [{"role": "assistant"}],
              [{"role": "assistant", "content": None}, {"role": "tool", "content": "x"}]):
        assert R.completion_text(c) == "", c
    assert R.completion_text("<answer>1</answer>") == "<answer>1</answer>"
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert R.completion_text([{"role": "assistant", "content": parts}, {"role": "tool", "content": "c"}]) == "ab"


# ---- 2. plan: at least min_batches bins, exactly that many once there are more than the rows

def _check_plan(lengths, budget, min_batches):
    bins = plan(lengths, 4, max_tokens=budget, min_batches=min_batches)
    tag = f"lengths={lengths} budget={budget} min_batches={min_batches}"
    n = len(lengths)
    assert sorted(i for b in bins for i in b) == list(range(n)), tag  # every row exactly once
    assert all(sum(lengths[i] for i in b) <= budget for b in bins), tag
    assert len(bins) >= max(min_batches, 1, -(-sum(lengths) // budget)), tag
    if min_batches >= n:  # as many bins as rows always fit: exactly min_batches, none dropped
        assert len(bins) == max(min_batches, 1), tag
    filled = [bool(b) for b in bins]
    assert filled == sorted(filled, reverse=True), f"empty bins last: {tag}"
    if min(lengths, default=1) > 0:  # rows of >= 1 token fill min(rows, bins) bins
        assert sum(filled) == min(n, len(bins)), tag
    return bins


@pytest.mark.parametrize("n", [0, 1, 3, 8, 37])
def test_plan_returns_at_least_min_batches(n):
    budget = random.randint(40, 120)
    lengths = [random.randint(1, budget) for _ in range(n)]
    fewest = len(_check_plan(lengths, budget, 1))
    for m in sorted({1, fewest, n, n + 1, n + 5, 2 * n + 3}):
        _check_plan(lengths, budget, m)
    if n:  # rows of 0 tokens (no rank's pack has them, plan allows them) are still covered
        lengths[random.randrange(n)] = 0
        for m in (1, n, n + 2):
            _check_plan(lengths, budget, m)


# ---- plan_all_ranks over a fake world: threads as ranks, all_reduce through a barrier

class FakeDist:
    """torch.distributed's calls that plan_all_ranks makes, for `world` threads (rank: thread-local). A rank
    that all-reduces more than max_rounds times raises (the old plan_all_ranks looped forever)."""
    ReduceOp = torch_dist.ReduceOp

    def __init__(self, world, max_rounds=50):
        self.world, self.max_rounds = world, max_rounds
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots, self.local = [None] * world, threading.local()

    def is_initialized(self):
        return True

    def get_world_size(self):
        return self.world

    def all_reduce(self, t, op):
        assert op == self.ReduceOp.MAX
        self.local.rounds = getattr(self.local, "rounds", 0) + 1
        if self.local.rounds > self.max_rounds:  # every rank gets here in the same round: none waits
            raise RuntimeError(f"plan_all_ranks: no agreement after {self.max_rounds} all-reduces")
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        t.copy_(torch.stack(self.slots).amax(0))
        self.barrier.wait()


def _on_ranks(monkeypatch, fn, per_rank):
    """fn(rank, arg) on one thread per rank under a FakeDist -> the results (a rank's exception re-raised)."""
    fake = FakeDist(len(per_rank))
    monkeypatch.setattr(packing, "dist", fake)
    out = [None] * len(per_rank)

    def run(rank):
        fake.local.rank = rank
        try:
            out[rank] = fn(rank, per_rank[rank])
        except Exception as e:  # noqa: BLE001 -- re-raised in the test's thread
            out[rank] = e

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(per_rank))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    for o in out:
        if isinstance(o, Exception):
            raise o
    return out


def test_plan_all_ranks_agrees_when_ranks_hold_different_row_counts(monkeypatch):
    """A rank with few rows (or none) beside one whose rows need many bins: every rank plans the same number
    of micro-batches (the short ones padded with empty bins), each rank's rows covered once, in budget."""
    budget = random.randint(20, 60)
    ranks = [[random.randint(1, budget) for _ in range(2)],
             [budget] * random.randint(4, 9),  # one bin per row
             [],
             [random.randint(1, budget) for _ in range(random.randint(5, 30))]]
    got = _on_ranks(monkeypatch, lambda r, lens: packing.plan_all_ranks(lens, 4, budget, "cpu"), ranks)
    assert len({len(b) for b in got}) == 1, [len(b) for b in got]
    assert len(got[0]) >= len(ranks[1])
    for lens, bins in zip(ranks, got):
        assert sorted(i for b in bins for i in b) == list(range(len(lens)))
        assert all(sum(lens[i] for i in b) <= budget for b in bins)


def test_build_packs_on_unequal_ranks_gives_fillers(monkeypatch):
    """build_packs through plan_all_ranks: as many packs on every rank; an empty bin is a filler pack of one
    token with no rows and no scored tokens."""
    P, T = 5, 7
    per_rank = []
    for B in (1, 6, 3):
        pm = torch.ones(B, P, dtype=torch.long)
        full = torch.full((B, 1), T) if B == 6 else torch.randint(1, T + 1, (B, 1))  # B=6: a pack per row
        cm = (torch.arange(T)[None] < full).long()
        per_rank.append((torch.randint(3, 50, (B, P + T)), pm, cm))
    budget = P + T - 1  # a full row feeds its prompt and all but its last completion token
    got = _on_ranks(monkeypatch, lambda r, b: build_packs(*b, rows_per_batch=2, max_tokens=budget), per_rank)
    assert len({len(p) for p in got}) == 1 and len(got[0]) >= 6, [len(p) for p in got]
    for (ids, _, _), packs in zip(per_rank, got):
        assert sorted(torch.cat([pk.rows for pk in packs]).tolist()) == list(range(ids.shape[0]))
        for pk in packs:
            assert pk.tokens <= budget and pk.tokens >= 1
            if not pk.rows.numel():
                assert pk.tokens == 1 and pk.score_idx.numel() == 0 and pk.cu_seqlens.tolist() == [0, 1]


@pytest.mark.parametrize("loss", [["loss_type=grpo", "beta=0.04"], ["loss_type=dapo"]], ids=["grpo-ref", "dapo-fused"])
def test_filler_packs_add_nothing_to_the_loss_or_gradients(tmp_path, monkeypatch, loss):
    """GRPO micro-steps over packs with filler packs appended (what a rank short of rows runs), on the per-row
    weight path and dapo's fused one: each filler's loss is 0 with finite metrics, and the summed loss and
    gradients equal the padded run's."""
    from test_train_packing import _padded_and_packed, _rows

    from r1train.rollout import sequence_logprobs

    t = H.grpo_trainer(tmp_path, "max_steps=1", "gradient_checkpointing=false", "model_num_layers=2",
                       "max_completion_length=9", *loss, reward_funcs=[H.digit_share])
    mb, GA, P, T = 3, 2, 5, 7
    ids, pm, cm = _rows(mb * GA, P, T, t.model.config.vocab_size, min_completion=1)
    adv = torch.randn(mb * GA)
    with torch.no_grad():
        now = sequence_logprobs(t.engine.module, ids, torch.cat([pm, cm], 1), ids[:, P:], backend="torch")
    old, ref = (((now + s * torch.randn_like(now)) * cm).detach() for s in (0.05, 0.1))
    orig = packing.plan_all_ranks
    monkeypatch.setattr(packing, "plan_all_ranks", lambda *a: orig(*a) + [[], []])
    packs = build_packs(ids, pm, cm, rows_per_batch=mb, max_tokens=P + T)
    filler = packs[-1]
    assert filler.rows.numel() == 0
    n_items = cm.sum().float().reshape(1) / GA
    w = packing.reduction_weights(t.cfg.loss_type, cm, mb, num_items=n_items)
    with packing.packed_attention(t.model):
        out, _ = t.micro_step_packed(filler, ids[:, P:], adv, cm, old, ref, None, n_items, w)
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in out.metrics.values()), out.metrics
    ref = ref if t.cfg.beta else None
    (l0, g0), (l1, g1) = _padded_and_packed(t, (ids, pm, cm, cm, adv, old, ref, None), mb, GA, P + T, 0.0)
    assert torch.isfinite(l0) and l0.abs() > 0
    assert_close(l1, l0, name="loss with filler packs")
    assert_close(torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g0]),
                 name="grads with filler packs")
