"""multi_objective_aggregation='normalize_then_sum' (GDPO, TRL's formula) against a plain-Python float64
computation, with None rewards, failed samples, groups with fewer than two usable values; and a GRPO step
with two rewards under it."""

import math
import random

import pytest
import torch
import train_helpers as H

from r1train.grpo import normalize_then_sum


def _std(xs):
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _independent(vals, failed, w, G):
    N, R = len(vals), len(w)
    z = [[float("nan")] * R for _ in range(N)]
    for g0 in range(0, N, G):
        for k in range(R):
            col = [vals[i][k] for i in range(g0, g0 + G) if vals[i][k] is not None and not failed[i]]
            mean, sd = (sum(col) / len(col) if col else float("nan")), _std(col)
            for i in range(g0, g0 + G):
                if vals[i][k] is not None and not failed[i]:
                    z[i][k] = (vals[i][k] - mean) / (sd + 1e-4)
    tot = []
    for i in range(N):
        usable = [z[i][k] * w[k] for k in range(R) if vals[i][k] is not None and not failed[i]]
        tot.append(sum(x for x in usable if not math.isnan(x)) if usable else None)
    ok = [t for t in tot if t is not None]
    mean, sd = sum(ok) / len(ok), _std(ok)
    return [0.0 if t is None or math.isnan((t - mean) / (sd + 1e-4)) else (t - mean) / (sd + 1e-4) for t in tot]


@pytest.mark.parametrize("G,groups,R", [(4, 3, 2), (8, 2, 3), (2, 5, 1)])
def test_normalize_then_sum_matches_independent(G, groups, R):
    rng = random.Random(G * 100 + R)
    N = G * groups
    vals = [[None if rng.random() < 0.15 else rng.choice([0.0, 1.0, rng.gauss(0, 2)]) for _ in range(R)]
            for _ in range(N)]
    vals[0] = [None] * R  # unscorable
    for i in range(G):  # a group whose first reward has a single usable value
        vals[G + i][0] = 1.0 if i == 0 else None
    failed = [rng.random() < 0.1 for _ in range(N)]
    w = [rng.uniform(0.2, 2.0) for _ in range(R)]
    t = torch.tensor([[float("nan") if v is None else v for v in row] for row in vals])
    got = normalize_then_sum(t, torch.tensor(failed), torch.tensor(w), G)
    want = torch.tensor(_independent(vals, failed, w, G), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got[0] == 0 and torch.isfinite(got).all()


def _even_digit_share(prompts, completions, **_):
    from r1train.rewards import completion_text

    texts = [completion_text(c) for c in completions]
    return [sum(ch in "02468" for ch in c) / max(len(c), 1) for c in texts]


def test_grpo_step_with_normalize_then_sum(tmp_path):
    """Two weighted rewards under normalize_then_sum: the advantages the trainer gives its first batch equal the
    plain-Python computation (_independent) over the two rewards scored here on that batch's completions (the
    rewards, their weights and the groups reach the formula); then it trains."""
    t = H.grpo_trainer(tmp_path, "max_steps=2", "multi_objective_aggregation=normalize_then_sum",
                       "reward_weights=[1.0,0.5]", reward_funcs=[H.digit_share, _even_digit_share])
    rows, _ = t.rows_for(0)
    _, adv_N, _, _, samples = t.make_batch(0, list(rows))
    comps = [s["completion"] for s in samples]
    vals = [list(v) for v in zip(H.digit_share(None, comps), _even_digit_share(None, comps))]
    assert all(len({v[k] for v in vals}) > 1 for k in range(2))  # both vary: the weights matter
    want = _independent(vals, [False] * len(vals), [1.0, 0.5], t.cfg.num_generations)
    torch.testing.assert_close(adv_N.cpu().double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    hist = t.train()
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
