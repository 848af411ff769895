"""The GRPO step's rewards -> advantages and reward metrics against TRL 1.16's own formula
(GRPOTrainer._generate_and_score_completions, transcribed below with TRL's nanstd): a completion for which
every reward returns None (unscorable) and a completion whose reward failed (raised; TRL has no such case,
so it is given to TRL as unscorable) are left out of the group's (the batch's) mean and std and get
advantage 0; `reward` and `reward_std` are over the batch's scored rows; frac_reward_zero_std is the share of
rows whose advantage scale (TRL's std_rewards) is 0."""

import math
import random
import zlib

import pytest
import torch
import train_helpers as H
from trl.trainer.utils import nanstd

from r1train.grpo import advantages
from r1train.rewards import RewardError, completion_text


def trl_advantages(rewards_per_func, weights, G, scale="group", aggregation="sum_then_normalize"):
    """TRL 1.16 grpo_trainer.py, from `unscorable_mask = ...` to the logged reward metrics (float32, as TRL)."""
    rewards_per_func, weights = rewards_per_func.float(), torch.as_tensor(weights, dtype=torch.float32)
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        if scale in ["group", "none"]:
            std_rewards = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        else:
            std_rewards = nanstd(rewards).expand_as(rewards)
        adv = rewards - mean_grouped_rewards
        if scale != "none":
            adv = adv / (std_rewards + 1e-4)
    else:
        grouped = rewards_per_func.view(-1, G, len(weights))
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, len(weights))
        rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = nanstd(rewards).expand_as(rewards)
        adv = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    adv = torch.nan_to_num(adv, nan=0.0)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    metrics = {"reward": torch.nanmean(rewards).item(), "reward_std": nanstd(rewards).item(),
               "frac_reward_zero_std": is_std_zero.float().mean().item()}
    return adv, is_std_zero, metrics


def _as_trl(vals, failed):
    """The table TRL would see: None -> NaN, and a failed row unscorable (left out, as r1train does)."""
    t = torch.tensor([[float("nan") if v is None else v for v in row] for row in vals], dtype=torch.float64)
    t[torch.tensor(failed, dtype=torch.bool)] = float("nan")
    return t


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("excluded", [True, False], ids=["excluded-rows", "all-scored"])
@pytest.mark.parametrize("G,groups,R", [(4, 5, 2), (8, 3, 1), (2, 6, 3)])
def test_advantages_match_trl(G, groups, R, excluded, scale, aggregation):
    rng = random.Random(G * 1000 + groups * 10 + R)
    N = G * groups
    vals = [[rng.choice([None, 0.0, 1.0, round(rng.gauss(0, 2), 3)]) for _ in range(R)] for _ in range(N)]
    for row in vals:  # all-scored: some reward applies to every row (None only beside a value)
        if all(v is None for v in row):
            row[0] = 0.5
    for i in range(G):
        vals[i] = [0.5] * R  # a constant group
    failed = [False] * N
    if excluded:
        vals[G] = [None] * R  # unscorable: one row of a group, a whole group, a single scored row left
        for i in range(2 * G, 3 * G):
            vals[i] = [None] * R
        failed[3] = True  # a constant group with a failed row stays constant
        failed[G + 1] = True
        for i in range(G * (groups - 1), N - 1):
            failed[i] = True
    w = [round(rng.uniform(0.2, 2.0), 3) for _ in range(R)]
    t = torch.tensor([[float("nan") if v is None else v for v in row] for row in vals])
    adv, std_N = advantages(t, torch.tensor(failed), torch.tensor(w), G, scale=scale, aggregation=aggregation)
    want, zero, _ = trl_advantages(_as_trl(vals, failed), w, G, scale, aggregation)
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isclose(std_N, torch.zeros_like(std_N)), zero)
    if excluded:  # left-out rows: advantage 0
        assert (adv[torch.tensor(failed) | t.isnan().all(1)] == 0).all()


def _crc(x) -> int:
    return zlib.crc32(completion_text(x).encode())


def mixed(prompts, completions, completion_ids=None, **_):
    """None (unscorable: the only reward) for a quarter of the completions; 2.0 for every completion of an
    odd-checksum prompt (a group constant but for its unscorable rows); else a value of the completion."""
    return [None if _crc(c) % 4 == 0 else 2.0 if _crc(p) % 2 else float(_crc(c) % 7)
            for p, c in zip(prompts, completions)]


def flaky(prompts, completions, completion_ids=None, **_):
    """mixed, but raising where mixed returns None (the runner retries per sample: those samples fail)."""
    out = mixed(prompts, completions)
    if None in out:
        raise RuntimeError("bad sample")
    return out


@pytest.mark.parametrize("reward, scale", [(mixed, "group"), (mixed, "batch"), (flaky, "group"),
                                           (flaky, "batch")])
def test_step_advantages_and_reward_metrics_match_trl(tmp_path, caplog, reward, scale):
    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_generations=4", "per_device_train_batch_size=32",
                       f"scale_rewards={scale}", reward_funcs=[reward])
    rows, _ = t.rows_for(0)
    ro, adv, mask, m, samples = t.make_batch(0, list(rows))
    G = t.cfg.num_generations
    prompts = [r["prompt"] for r in rows for _ in range(G)]
    vals = [[v] for v in mixed(prompts, [s["completion"] for s in samples])]  # recomputed independently
    left_out = [v[0] is None for v in vals]
    failed = left_out if reward is flaky else [False] * len(vals)
    # the batch exercises the rule: left-out rows, a group constant but for them, a group that varies
    assert any(left_out) and not all(left_out)
    groups = [[v[0] for v in vals[i:i + G] if v[0] is not None] for i in range(0, len(vals), G)]
    assert any(len(g) > 1 and len(set(g)) == 1 and len(g) < G for g in groups) and any(len(set(g)) > 1 for g in groups)
    want, _, want_m = trl_advantages(_as_trl(vals, failed), [1.0], G, scale)
    torch.testing.assert_close(adv.cpu(), want, rtol=1e-5, atol=1e-5)
    for k in ("reward", "reward_std", "frac_reward_zero_std"):
        assert m[k] == pytest.approx(want_m[k], rel=1e-5), k
    assert m["rewards/failed"] == sum(failed)
    # TRL's warning names the unscorable rows; failed ones are counted in rewards/failed, not as unscorable
    warned = [r.getMessage() for r in caplog.records if "got None from every reward" in r.getMessage()]
    assert warned == ([] if reward is flaky else [f"{sum(left_out)} of {len(vals)} completions got None from every "
                                                  "reward function: unscorable, advantage 0 (TRL's rule); check "
                                                  "that some reward applies to every row"])
    assert [s["reward"] for s in samples] == [None if v[0] is None else v[0] for v in vals]
    assert mask.any(1).tolist() == [not f and bool(k) for f, k in zip(failed, ro.completion_mask_BT.any(1))]


def _py_mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def near_max(prompts, completions, completion_ids=None, **_):
    """3e38 (within float32's range; twice it is not) for even-checksum completions, else 0."""
    return [3e38 if _crc(c) % 2 == 0 else 0.0 for c in completions]


def near_max_too(prompts, completions, completion_ids=None, **_):
    return near_max(prompts, completions)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_rewards_near_float32_max(tmp_path, scale):
    """Rewards within float32's range whose sums are not: advantages and metrics as a plain-Python
    float64 computation of TRL's formula (TRL's float32 table would hold inf); with scale_rewards=none the
    advantages themselves do not fit float32: an error naming scale_rewards, not inf."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_generations=4", "per_device_train_batch_size=16",
                       f"scale_rewards={scale}", reward_funcs=[near_max, near_max_too])
    rows, _ = t.rows_for(0)
    if scale == "none":
        with pytest.raises(RewardError, match="advantages overflow float32 with scale_rewards=none"):
            t.make_batch(0, list(rows))
        return
    ro, adv, mask, m, samples = t.make_batch(0, list(rows))
    G, vals = t.cfg.num_generations, near_max(None, [s["completion"] for s in samples])
    tot = [2.0 * v for v in vals]
    assert 0 < vals.count(0.0) < len(vals)
    want = []
    for i in range(0, len(tot), G):
        mean, std = _py_mean_std(tot[i:i + G])
        std = std if scale == "group" else _py_mean_std(tot)[1]
        want += [(x - mean) / (std + 1e-4) for x in tot[i:i + G]]
    torch.testing.assert_close(adv.cpu().double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert m["reward"] == pytest.approx(_py_mean_std(tot)[0])
    assert m["reward_std"] == pytest.approx(_py_mean_std(tot)[1])
    assert m["rewards/near_max/mean"] == pytest.approx(_py_mean_std(vals)[0])
    assert m["rewards/near_max/std"] == pytest.approx(_py_mean_std(vals)[1], rel=1e-6)
    assert [s["reward"] for s in samples] == pytest.approx(tot)


def first_only(prompts, completions, completion_ids=None, **_):
    """A value for the batch's first completion only (None, unscorable by this reward, for the others)."""
    return [float(_crc(completions[0]) % 7 + 1)] + [None] * (len(completions) - 1)


def scored(prompts, completions, completion_ids=None, **_):
    return [float(_crc(c) % 5) for c in completions]


def test_reward_metrics_of_a_reward_with_fewer_than_two_values(tmp_path):
    """rewards/<name>/std with one scored value is NaN (TRL's nanstd: Bessel's correction over one value), not
    0; its mean is that value; a reward that scores every row keeps its std."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_generations=4", "per_device_train_batch_size=8",
                       reward_funcs=[first_only, scored])
    rows, _ = t.rows_for(0)
    _, _, _, m, samples = t.make_batch(0, list(rows))
    comps = [s["completion"] for s in samples]
    assert math.isnan(m["rewards/first_only/std"])
    assert m["rewards/first_only/mean"] == pytest.approx(first_only(None, comps)[0])
    assert m["rewards/scored/std"] == pytest.approx(_py_mean_std(scored(None, comps))[1], rel=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch"])
@pytest.mark.parametrize("case", ["plain", "failed_row", "normalize_then_sum"])
def test_float64_std_overflow_is_named_as_such(scale, case):
    """float64 weighted rewards past rk's F64_REWARD_MAX (their std overflows float64: advantages 0, silently): a
    RewardError naming scale_rewards and the float64 bound, not the float32 message (whose advice is
    scale_rewards=group), also where a failed row or per-reward normalization skips rk.group_advantages."""
    G = int(torch.randint(2, 5, ()))
    v = torch.randn(2 * G, 1, dtype=torch.float64)
    v[int(torch.randint(0, 2 * G, ())), 0] = float(torch.rand(()) + 1) * 1e200
    failed = torch.zeros(2 * G, dtype=torch.bool)
    if case == "failed_row":
        failed[int(torch.randint(0, 2 * G, ()))] = True
        v[failed] = float("nan")
    agg = "normalize_then_sum" if case == "normalize_then_sum" else "sum_then_normalize"
    if v.abs().nan_to_num(0.0).max() <= 1e145:  # the failed row took the large one
        v[(~failed).nonzero()[0, 0], 0] = 1e200
    with pytest.raises(RewardError, match=f"scale_rewards={scale}: weighted rewards of magnitude > 1e\\+145") as e:
        advantages(v, failed, torch.ones(1, dtype=torch.float64), G, scale=scale, aggregation=agg)
    assert "float32" not in str(e.value)
