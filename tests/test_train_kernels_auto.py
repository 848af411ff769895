"""A few GRPO steps of the tiny model with kernel_backend=auto (the Triton kernels, under the interpreter
on CPU) match kernel_backend=torch (the reference) within the tolerance table, metric by metric; with
patch_model=true the policy's and the reference's forwards also run the fused layer ops (rk.patch)."""
from __future__ import annotations

import math

import pytest
import torch
import train_helpers as H
from conftest import SEED, TOLERANCES

from r1kernels import _backend

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not (_backend.TRITON_INTERPRET or torch.cuda.is_available()),
                                reason="needs the Triton interpreter or a GPU")

TRAIN_OPS = ("grpo_loss", "linear_grpo_loss", "token_logprobs", "linear_token_logprobs", "group_advantages")


def digit_share(prompts, completions, **_):
    """Share of digits in each completion (plain text or TRL's conversational format)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def _run(tmp_path, backend, overrides, monkeypatch):
    picked = set()
    pick = _backend.pick

    def recording_pick(op, *a, **k):
        fn = pick(op, *a, **k)
        if fn is not None:
            picked.add(op)
        return fn

    monkeypatch.setattr(_backend, "pick", recording_pick)
    t = H.grpo_trainer(tmp_path / backend, "max_steps=2", "seed=5", "per_device_train_batch_size=4",
                       "num_generations=4", f"kernel_backend={backend}", *overrides, reward_funcs=[digit_share])
    hist = t.train()
    fused = {type(m).__name__ for m in t.engine.module.modules() if getattr(type(m), "_r1k_layers", False)}
    assert fused == ({"Qwen2RMSNorm", "Qwen2MLP", "Qwen2Attention"} if "patch_model=true" in overrides else set())
    t.finish(save=False)
    monkeypatch.setattr(_backend, "pick", pick)
    return hist, picked


@pytest.mark.parametrize("overrides", [
    [],
    ["loss_impl=logits", "loss_type=grpo", "beta=0.04", "importance_sampling_level=sequence", "num_iterations=2"],
    ["patch_model=true", "beta=0.04", "num_iterations=2"],
], ids=["default", "logits+sequence+kl", "fused-layers"])
def test_auto_matches_torch(tmp_path, monkeypatch, overrides):
    auto, picked = _run(tmp_path, "auto", overrides, monkeypatch)
    ref, picked_ref = _run(tmp_path, "torch", overrides, monkeypatch)
    assert not picked_ref
    loss_op = "grpo_loss" if "loss_impl=logits" in overrides else "linear_grpo_loss"
    assert loss_op in picked, picked  # the kernels ran
    assert len(auto) == len(ref) == 2  # the second step samples and trains from the first one's updated weights
    for step, (a, r) in enumerate(zip(auto, ref)):
        assert set(a) == set(r)
        for k, v in r.items():
            if H.is_timing(k) or not isinstance(v, (int, float)):
                continue
            assert math.isfinite(a[k]), (step, k, a[k])
            # the loss and the step's metrics are O(1)-scaled means whose terms cancel (advantages have zero
            # mean per group), so the loss itself can be ~1e-7: the float32 tolerance applies at scale >= 1
            tol = TOLERANCES[torch.float32] * max(abs(v), 1.0)
            assert abs(a[k] - v) <= tol, f"step {step} {k}: {a[k]} vs {v} (tolerance {tol:.2e}, seed {SEED})"
