"""DAPO dynamic sampling in the GRPO step: groups whose rewards are all equal are redrawn with new prompts
(per batch slot, a function of (seed, step, round, slot)) until they vary or the rounds run out."""

import pytest
import torch
import train_helpers as H

from r1train.config import ConfigError, load_config


def _trainer(tmp_path, *ov):
    return H.grpo_trainer(tmp_path, "max_steps=1", "num_generations=4", "per_device_train_batch_size=16",
                          "dynamic_sampling=true", *ov, reward_funcs=[H.half_constant])


def _constant(t, rows):
    return [bool(H.half_constant([r["prompt"]], ["x"])[0] == 0.5) for r in rows]


@pytest.mark.parametrize("rounds", [1, 2, 6])
def test_constant_groups_are_redrawn(tmp_path, rounds):
    t = _trainer(tmp_path, f"max_dynamic_sampling_rounds={rounds}")
    rows, gidx = t.rows_for(0)
    G, n = t.cfg.num_generations, t.prompts_per_rank * t.world
    ro, adv_N, mask_BT, m, samples = t.make_batch(0, list(rows))
    # independent replay of the rule: slot i keeps its prompt while constant, else draws (seed, step, r, slot)
    final, drawn, dropped, used = [], 0, 0, 1
    for i, r0 in enumerate(rows):
        row, g, r = r0, gidx[i], 0
        drawn += 1
        while _constant(t, [row])[0]:
            dropped += 1
            r += 1
            if r >= rounds:
                break
            row, g = t._extra_row(0, r, gidx[i]), gidx[i] + r * n
            drawn += 1
        used = max(used, min(r + 1, rounds))
        final.append((row, g))
    assert dropped > 0  # the fixed seed's first batch holds constant groups: the rule is exercised
    assert m["dynamic_sampling/drop_rate"] == pytest.approx(dropped / drawn)
    assert m["dynamic_sampling/rounds"] == used
    assert m["dynamic_sampling/constant_groups_kept"] == sum(_constant(t, [r for r, _ in final]))
    text = lambda p: p if isinstance(p, str) else p[-1]["content"]  # noqa: E731
    assert [s["prompt"] for s in samples] == [text(r["prompt"]) for r, _ in final for _ in range(G)]
    if rounds == 1:
        assert dropped == sum(_constant(t, rows)) and final == list(zip(rows, gidx))
    # each final group's completions are what a rollout of its prompt and seed gives alone
    for i in {0, len(final) - 1, *[k for k, (r, _) in enumerate(final) if r is not rows[k]][:2]}:
        row, g = final[i]
        ro1 = t._rollout(0, [row], [g])[0]
        sl = slice(i * G, (i + 1) * G)
        T = ro1.completion_ids_BT.shape[1]
        assert torch.equal(ro.completion_ids_BT[sl, :T], ro1.completion_ids_BT)
        assert (ro.completion_mask_BT[sl, T:] == 0).all()
        P = ro1.prompt_ids_BP.shape[1]
        assert torch.equal(ro.prompt_ids_BP[sl, -P:], ro1.prompt_ids_BP)
        assert (ro.prompt_mask_BP[sl, :-P] == 0).all()
        assert torch.allclose(ro.logprobs_BT[sl, :T], ro1.logprobs_BT)
    # constant groups left after the last round have advantage 0
    for i, (row, _) in enumerate(final):
        if _constant(t, [row])[0]:
            assert (adv_N[i * G:(i + 1) * G] == 0).all()


def test_step_runs_and_off_by_default(tmp_path):
    t = _trainer(tmp_path / "on", "max_dynamic_sampling_rounds=3")
    hist = t.train()
    assert 0 <= hist[0]["dynamic_sampling/drop_rate"] <= 1 and hist[0]["loss"] == hist[0]["loss"]
    t2 = H.grpo_trainer(tmp_path / "off", "max_steps=1", reward_funcs=[H.half_constant])
    assert not t2.cfg.dynamic_sampling and "dynamic_sampling/drop_rate" not in t2.train()[0]


def test_bad_rounds():
    with pytest.raises(ConfigError, match="max_dynamic_sampling_rounds"):
        load_config(overrides=["max_dynamic_sampling_rounds=0"])


def none_or_one(prompts, completions, completion_ids=None, **_):
    """1.0, or None (unscorable: the only reward) for completions with an odd checksum: every group is
    constant on its scored samples, whatever its unscorable ones."""
    import zlib

    from r1train.rewards import completion_text

    return [None if zlib.crc32(completion_text(c).encode()) % 2 else 1.0 for c in completions]


def test_unscorable_samples_are_no_variation(tmp_path):
    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_generations=4", "per_device_train_batch_size=16",
                       "dynamic_sampling=true", "max_dynamic_sampling_rounds=1", reward_funcs=[none_or_one])
    # unscorable and failed samples are left out, as from the advantages (None beside a value counts 0)
    assert t._varied([[1.0], [None], [1.0], [1.0]], [False] * 4) == [False]
    assert t._varied([[1.0], [None], [0.0], [1.0]], [False] * 4) == [True]
    assert t._varied([[1.0], [0.0], [1.0], [1.0]], [False, True, False, False]) == [False]
    rows, _ = t.rows_for(0)
    ro, adv_N, mask_BT, m, samples = t.make_batch(0, list(rows))
    G, vals = t.cfg.num_generations, none_or_one(None, [s["completion"] for s in samples])
    mixed = sum(None in vals[i:i + G] and 1.0 in vals[i:i + G] for i in range(0, len(vals), G))
    assert mixed > 0  # groups of 1.0 and unscorable samples: what None-as-0 took for variation
    assert m["dynamic_sampling/drop_rate"] == 1.0 and m["dynamic_sampling/constant_groups_kept"] == len(rows)
    assert (adv_N == 0).all()


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("G,R", [(2, 2), (4, 3), (8, 2)])
def test_varied_means_nonzero_advantages(aggregation, G, R):
    """A group counts as varied exactly when its advantages (computed alone) are not all 0: under
    normalize_then_sum equal weighted totals can still carry signal ([[2, 0], [0, 1]], weights [1, 2])."""
    import types

    from r1train.grpo import GRPOTrainer, advantages

    gen = torch.Generator().manual_seed(G * 10 + R)
    for _ in range(60):
        w_R = torch.randint(-2, 3, (R,), generator=gen).double()
        table = [[None if torch.rand((), generator=gen) < 0.15 else float(torch.randint(0, 3, (), generator=gen))
                  for _ in range(R)] for _ in range(G)]
        failed = [bool(torch.rand((), generator=gen) < 0.1) for _ in range(G)]
        t = types.SimpleNamespace(cfg=types.SimpleNamespace(num_generations=G, multi_objective_aggregation=aggregation),
                                  reward_w_R=w_R)
        vals = torch.tensor([[float("nan") if v is None else v for v in row] for row in table])
        adv, _ = advantages(vals, torch.tensor(failed), w_R, G, scale="group", aggregation=aggregation)
        assert GRPOTrainer._varied(t, table, failed) == [bool(adv.abs().max() > 1e-3)], (table, failed, w_R)
    t = types.SimpleNamespace(cfg=types.SimpleNamespace(num_generations=2, multi_objective_aggregation=aggregation),
                              reward_w_R=torch.tensor([1.0, 2.0]))
    assert GRPOTrainer._varied(t, [[2.0, 0.0], [0.0, 1.0]], [False, False]) == [aggregation == "normalize_then_sum"]
