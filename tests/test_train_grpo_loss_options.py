"""The trainer's GRPO loss keys (TRL 1.16 names): validation naming the key, the adaptive entropy
controller's rule, and short runs that train with rollout correction, luspo, vespo and entropy controls."""
from __future__ import annotations

import math

import pytest
import train_helpers as H

from r1train.config import ConfigError, load_config
from r1train.grpo import adaptive_entropy_step


@pytest.mark.parametrize("override,key", [
    ("vllm_importance_sampling_mode=token_clip", "vllm_importance_sampling_mode"),
    ("top_entropy_quantile=-0.1", "top_entropy_quantile"),
    ("top_entropy_quantile=1.5", "top_entropy_quantile"),
    ("loss_type=luspo", "importance_sampling_level"),
    ("vllm_importance_sampling_clip_min=4.0", "vllm_importance_sampling_clip_min"),
    ("sapo_temperature_neg=0", "sapo_temperature_neg"),
    ("vespo_lambda_pos=-1", "vespo_lambda_pos"),
    ("off_policy_mask_threshold=-0.5", "off_policy_mask_threshold"),
    ("entropy_coef_delta=-0.1", "entropy_coef_delta"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override]).validate()


def test_adaptive_entropy_rule():
    """+delta (capped at max) when entropy <= target, -delta (floored at min) otherwise."""
    cfg = load_config(None, ["use_adaptive_entropy=true", "entropy_coef=0.5", "entropy_coef_delta=0.3",
                             "entropy_coef_max=0.7", "entropy_coef_min=0.1", "entropy_target=1.0"]).validate()
    for coef, ent in [(0.5, 0.9), (0.5, 1.0), (0.5, 1.1), (0.2, 5.0), (0.6, 0.0)]:
        up = ent <= 1.0
        expect = min(coef + 0.3, 0.7) if up else max(coef - 0.3, 0.1)
        assert math.isclose(adaptive_entropy_step(coef, ent, cfg), expect)


@pytest.mark.parametrize("overrides", [
    ("vllm_importance_sampling_mode=token_truncate", "beta=0.04"),
    ("loss_type=luspo", "importance_sampling_level=sequence", "off_policy_mask_threshold=0.5"),
    ("loss_type=vespo", "vllm_importance_sampling_mode=token_mask"),
    ("top_entropy_quantile=0.5", "use_adaptive_entropy=true", "entropy_target=100.0", "entropy_coef=0.01"),
], ids=["token_is", "luspo", "vespo", "entropy"])
def test_grpo_step_runs(tmp_path, overrides):
    """One optimizer step per configuration: finite loss; the adaptive controller's coefficient moves by
    entropy_coef_delta (entropy far below the target of 100 nats)."""
    t = H.grpo_trainer(tmp_path, "max_steps=2", *overrides, reward_funcs=[H.digit_share])
    rows = [t.train_step(s, t.rows_for(s)[0]) for s in range(2)]
    assert all(math.isfinite(r["loss"]) for r in rows)
    for r in rows:  # rollout correction's weights: the engine samples with the trained weights (on-policy),
        lo, mean, hi = (r[f"sampling/importance_sampling_ratio/{k}"] for k in ("min", "mean", "max"))
        assert lo <= mean <= hi and abs(lo - 1) < 1e-3 and abs(hi - 1) < 1e-3, r  # so every weight is ~1
    if "use_adaptive_entropy=true" in overrides:
        assert rows[0]["entropy_coef"] == pytest.approx(0.01 + 0.005)
        assert rows[1]["entropy_coef"] == pytest.approx(0.01 + 2 * 0.005)
        assert 0.0 < rows[1]["entropy"] < 100.0


@pytest.mark.parametrize("overrides,said", [
    ([], ""), (["top_p=0.9"], "top_p=0.9"), (["top_k=20", "min_p=0.05"], "top_k=20, min_p=0.05"),
    (["top_p=0.9", "vllm_importance_sampling_correction=false"], ""),
    (["top_k=5", "vllm_importance_sampling_mode=token_mask"], "top_k=5"),
])
def test_correction_with_truncated_sampling_warns(tmp_path, caplog, overrides, said):
    """The rollout correction beside top_p / top_k / min_p weights each token by its kept probability mass (the
    rollout log-probs are the truncated distribution's): one warning naming those keys at the trainer's start."""
    import logging

    with caplog.at_level(logging.WARNING, logger="r1train"):
        t = H.grpo_trainer(tmp_path, "max_steps=1", *overrides)
    warned = [r.getMessage() for r in caplog.records if "kept probability mass" in r.getMessage()]
    assert len(warned) == (1 if said else 0)
    if said:
        assert f"with {said}:" in warned[0]
        assert ("with the completion's length" in warned[0]) == t.cfg.vllm_importance_sampling_mode.startswith(
            "sequence")
