"""GRPO on the tiny model in-process: a short seeded run whose reward rises; every loss variant runs a
step with finite values; SFT lowers its loss."""

import math

import pytest
import torch
import train_helpers as H

from r1train.config import load_config
from r1train.loading import load_datasets, load_model_and_tokenizer
from r1train.metrics import STEP_PHASES
from r1train.sft import SFTTrainer


def test_grpo_reward_rises(tmp_path):
    t = H.grpo_trainer(tmp_path, "max_steps=14", "num_generations=8", "per_device_train_batch_size=32",
              "learning_rate=0.01", "seed=3", reward_funcs=[H.digit_share])
    hist = t.train()
    r = [h["reward"] for h in hist]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    assert last > first + 0.15, r
    assert all(k in hist[0] for k in ("reward_std", "rewards/digit_share/mean", "frac_reward_zero_std", "kl",
                                       "entropy", "clip_ratio/region_mean", "completions/mean_length",
                                       "completions/clipped_ratio", "step_time", "loss"))
    t.finish(save=False)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "completions.jsonl").exists()


VARIANTS = [
    ["loss_type=grpo"], ["loss_type=bnpo"], ["loss_type=dr_grpo"], ["loss_type=cispo", "epsilon_high=5.0"],
    ["loss_type=sapo"], ["importance_sampling_level=sequence", "num_iterations=2"],
    ["loss_impl=logits", "num_iterations=2", "epsilon_high=0.28", "delta=2.0"],
    ["beta=0.04", "sync_ref_model=true", "ref_model_sync_steps=1", "kl_estimator=low_var_kl"],
    ["mask_truncated_completions=true", "scale_rewards=batch"], ["scale_rewards=none", "bf16=true"],
]


@pytest.mark.parametrize("ov", VARIANTS, ids=["+".join(v) for v in VARIANTS])
def test_grpo_variants_step(tmp_path, ov):
    t = H.grpo_trainer(tmp_path, "max_steps=2", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
              *ov, reward_funcs=[H.digit_share, "format"])
    hist = t.train()
    for h in hist:
        for k in ("loss", "kl", "entropy", "reward"):
            assert math.isfinite(h[k]), (k, h)
    if "mask_truncated_completions=true" in ov:
        assert hist[0]["completions/clipped_ratio"] > 0
    for h in hist:  # the step's phases partition its time inside train_step (PhaseClock)
        phases = [h[f"time/{p}"] for p in STEP_PHASES]
        assert all(t > 0 for t in phases), h
        assert sum(phases) <= h["step_time"], h


def test_phase_clock_sums_each_phase_intervals():
    """On CPU a phase's seconds are the perf_counter intervals it was open, summed over its reopenings."""
    import time

    import torch

    from r1train.metrics import PhaseClock

    c = PhaseClock(torch.device("cpu"))
    t0 = time.perf_counter()
    for phase, dt in [("a", 0.03), ("b", 0.01), ("a", 0.02), (None, 0.01), ("b", 0.0)]:
        c.mark(phase)
        time.sleep(dt)
    c.mark(None)
    total = time.perf_counter() - t0
    s = c.seconds()
    assert set(s) == {"a", "b"} and s["a"] >= 0.05 and s["b"] >= 0.01, s
    assert s["a"] + s["b"] <= total - 0.01, (s, total)


@pytest.mark.gpu
def test_phase_clock_charges_queued_device_work():
    """On CUDA a phase is charged the device time of the work queued in it, though the host leaves it at once:
    20 matmuls queued in "gemm" take longer than one small add queued in "tail", whose mark comes right after."""
    import torch

    from r1train.metrics import PhaseClock

    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    c = PhaseClock(torch.device("cuda"))
    c.mark("gemm")
    for _ in range(20):
        a = a @ a / 64.0
    c.mark("tail")
    a += 1
    c.mark(None)
    s = c.seconds()
    assert s["gemm"] > 10 * s["tail"] > 0, s


def test_sft_loss_falls(tmp_path):
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_steps=25", "learning_rate=0.01",
                                          "model_hidden_size=64", "per_device_train_batch_size=16"])
    model, tok = load_model_and_tokenizer(cfg)
    train, ev = load_datasets(cfg, sft=True)
    hist = SFTTrainer(cfg, model, tok, train, ev).train()
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"], [h["loss"] for h in hist]


@pytest.mark.slow
def test_deepseek_v3_bias_update_balances_experts(tmp_path):
    """Routers start skewed (experts 0 and 1 get +0.3 bias: max/mean load > 2); the
    aux-loss-free bias update after each optimizer step moves the biases against the load and it falls."""
    t = H.grpo_trainer(tmp_path, "model_name_or_path=tiny-deepseek-v3", "model_num_layers=2", "max_steps=12",
              "moe_bias_update_rate=0.03", "patch_model=false", "learning_rate=0.001", reward_funcs=[H.digit_share])
    assert len(t.expert_load.routers) == 1
    for r in t.expert_load.routers:
        r.e_score_correction_bias[:2] = 0.3
    hist = t.train()
    ratios = [h["moe/max_load_ratio"] for h in hist]
    assert ratios[0] > 2.0 and sum(ratios[-3:]) / 3 < 0.75 * ratios[0], ratios
    b = t.expert_load.routers[0].e_score_correction_bias
    assert (b[:2] < 0.3).all() and b[2:].mean() > 0
    assert all(math.isfinite(h["loss"]) for h in hist)


def _flaky(prompts, completions, completion_ids=None, **_):
    """Raises on any batch holding a completion whose first token id is odd (the runner then retries
    sample by sample and skips exactly those)."""
    if any(ids and ids[0] % 2 for ids in completion_ids):
        raise RuntimeError("flaky reward")
    return [1.0] * len(completions)


def test_failing_reward_skips_samples_not_the_run(tmp_path):
    t = H.grpo_trainer(tmp_path, "max_steps=2", reward_funcs=[H.digit_share, _flaky])
    hist = t.train()
    assert sum(h["rewards/failed"] for h in hist) > 0
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert t.rewards.failures["_flaky"] == sum(h["rewards/failed"] for h in hist)


def test_old_logprobs_are_the_pre_update_policy(tmp_path):
    """num_iterations=2: the old log-probs of iteration 1 (taken from iteration 0's forward) equal an
    independent forward of a copy of the model made before the step, and iteration 0 passes none."""
    import copy

    import torch
    from conftest import assert_close

    from r1train.rollout import sequence_logprobs

    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_iterations=2", "gradient_accumulation_steps=2",
                       "per_device_train_batch_size=4", "learning_rate=0.05", reward_funcs=[H.digit_share])
    before = copy.deepcopy(t.engine.module).eval()
    seen, micro = [], t.micro_step

    def spy(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, **kw):
        seen.append((ids_BL, attn_BL, comp_BT, mask_BT, old_BT, T))
        return micro(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, **kw)

    t.micro_step = spy
    t.train()
    assert len(seen) == 4 and all(s[4] is None for s in seen[:2]) and all(s[4] is not None for s in seen[2:])
    for ids_BL, attn_BL, comp_BT, mask_BT, old_BT, T in seen[2:]:
        cut = ids_BL.shape[1] - comp_BT.shape[1] + T
        args = (ids_BL[:, :cut], attn_BL[:, :cut], comp_BT[:, :T])
        with torch.no_grad():
            ref_BT = sequence_logprobs(before, *args, backend="torch")
            now_BT = sequence_logprobs(t.engine.module, *args, backend="torch")
        m = mask_BT[:, :T].bool()
        assert_close(old_BT[:, :T][m], ref_BT[m], name="old log-probs")
        assert (old_BT[:, :T][m] - now_BT[m]).abs().max() > 1e-4  # the step changed the policy


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-llama"])
def test_gradient_checkpointing_same_loss_and_grads(tmp_path, model):
    """gradient_checkpointing=true (TRL's default) recomputes activations in backward: the same batch gives
    the same loss and gradients as without it, within the tolerance table."""
    import torch
    from conftest import assert_close

    res = []
    for gc in ("false", "true"):
        t = H.grpo_trainer(tmp_path / gc, f"model_name_or_path={model}", f"gradient_checkpointing={gc}",
                           "model_num_layers=2", "max_steps=1", reward_funcs=[H.digit_share])
        rows, _ = t.rows_for(0)
        ro, adv_N, mask_BT, _, _ = t.make_batch(0, rows)
        attn_BL = torch.cat([ro.prompt_mask_BP, ro.completion_mask_BT], 1)
        out, _ = t.micro_step(ro.input_ids, attn_BL, ro.completion_ids_BT, adv_N, mask_BT, None, None,
                              mask_BT.sum().float().reshape(1), mask_BT.shape[1])
        t.engine.backward(out.loss)
        mod = t.engine.module
        assert all(getattr(m, "gradient_checkpointing", False) == (gc == "true")
                   for m in mod.modules() if hasattr(m, "gradient_checkpointing"))
        res.append((out.loss.detach(), ro.completion_ids_BT, [p.grad.clone() for p in mod.parameters()
                                                               if p.grad is not None]))
    (l0, c0, g0), (l1, c1, g1) = res
    assert torch.equal(c0, c1) and len(g0) == len(g1) > 0
    assert_close(l1, l0, torch.float32, name="loss")
    for a, b in zip(g0, g1):
        assert_close(b, a, torch.float32, name="grad")


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("impl", ["linear", "logits"])
@pytest.mark.parametrize("left_padded", [False, True])
def test_policy_logprobs_equal_each_row_alone(family, impl, left_padded):
    """The training forward (Policy) of a batch whose completions stop early (right padding after eos, its
    attention mask unmasked by unmask_completions) and whose prompts are left-padded or not gives every real
    completion token the log-prob of a forward of its row alone, without any padding."""
    import torch
    import transformers
    from conftest import assert_close

    from r1train.rollout import Policy, logprob_fn, unmask_completions
    from r1train.tasks.models import tiny_config

    V, B, P, T = 61, 4, 6, 7
    cfg = tiny_config(f"tiny-{family}", V, hidden_size=32, num_layers=2, num_heads=4, max_position=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    p_len = torch.randint(2, P + 1, (B,)) if left_padded else torch.full((B,), P)
    c_len = torch.randint(1, T + 1, (B,))
    c_len[0] = T  # one row runs to the end, so the batch's completion width is T
    ids_BL = torch.randint(0, V, (B, P + T))  # pad positions hold arbitrary ids: they must not matter
    mask_BL = torch.zeros(B, P + T, dtype=torch.long)
    for b in range(B):
        mask_BL[b, P - p_len[b]:P + c_len[b]] = 1
    comp_BT = ids_BL[:, P:]
    out_BT = Policy(model, impl)(ids_BL, mask_BL, T, logprob_fn(comp_BT, 1.0, backend="torch"))
    assert torch.equal(unmask_completions(mask_BL, T)[:, P:], torch.ones(B, T, dtype=torch.long))
    for b in range(B):
        row = ids_BL[b, P - p_len[b]:P + c_len[b]][None]
        with torch.no_grad():
            logits = model(input_ids=row).logits[0, p_len[b] - 1:-1].double()
        want = logits.log_softmax(-1).gather(-1, comp_BT[b, :c_len[b], None])[:, 0]
        assert_close(out_BT[b, :c_len[b]], want, torch.float32, name=f"row {b} log-probs")


def test_out_of_memory_names_the_keys_that_cut_memory(tmp_path):
    """An out-of-memory error in the training step stays a torch.OutOfMemoryError, keeps the original text and
    names the memory keys this run has off (and not those it has on)."""
    import torch

    t = H.grpo_trainer(tmp_path, "max_steps=1", "gradient_checkpointing=false", "beta=0.04",
                       reward_funcs=[H.digit_share])
    orig = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.37 GiB.")

    def step(*_):
        raise orig
    t.train_step = step
    with pytest.raises(torch.OutOfMemoryError) as e:
        t.train()
    msg = str(e.value)
    assert e.value.__cause__ is orig and msg.startswith("CUDA out of memory. Tried to allocate 28.37 GiB.")
    for key in ("gradient_checkpointing=true", "use_peft=true", "rollout_release_memory=true", "beta=0"):
        assert key in msg, key
    t2 = H.grpo_trainer(tmp_path / "b", "max_steps=1", "gradient_checkpointing=true", "beta=0",
                        "rollout_release_memory=true", reward_funcs=[H.digit_share])
    t2.train_step = step
    with pytest.raises(torch.OutOfMemoryError) as e2:
        t2.train()
    for key in ("gradient_checkpointing=true", "rollout_release_memory=true", "beta=0"):
        assert key not in str(e2.value), key


def test_rollout_stops_at_every_eos_id_of_the_model(tmp_path):
    """The GRPO rollout ends a completion at any eos id of the model's generation_config (TRL 1.16), not only
    the tokenizer's: with every token id declared an eos id, each completion is its first token."""
    t = H.grpo_trainer(tmp_path, "max_steps=1")
    assert t.train()[0]["completions/mean_length"] > 1.0  # the tokenizer's eos alone: longer completions
    t2 = H.grpo_trainer(tmp_path / "b", "max_steps=1")
    t2.model.generation_config.eos_token_id = list(range(t2.model.config.vocab_size))
    assert t2.train()[0]["completions/mean_length"] == 1.0


def test_sync_ref_model_pairs_parameters_and_buffers_by_name(tmp_path):
    """sync_ref_model with a DeepseekV3 policy whose routers ExpertLoad patched after the reference was copied
    (extra token-count buffers): a full sync (alpha 1) makes every reference parameter and buffer equal to the
    policy's of the same name, and the reference's logits equal the policy's (buffers paired by position
    wrote the rotary inv_freq and the routers' biases into the wrong buffers)."""
    t = H.grpo_trainer(tmp_path, "model_name_or_path=tiny-deepseek-v3", "model_num_layers=4", "beta=0.04",
                       "sync_ref_model=true", "ref_model_sync_steps=1", "ref_model_mixup_alpha=0.5", "max_steps=2",
                       "moe_bias_update_rate=0.01")
    t.train()
    t.sync_ref(1.0)
    pol, ref = t.engine.module, t.ref.module
    ref_bufs = dict(ref.named_buffers())
    ref_params = dict(ref.named_parameters())
    assert all(torch.equal(ref_params[n], p) for n, p in pol.named_parameters())
    shared = [n for n, _ in pol.named_buffers() if n in ref_bufs]
    assert any("inv_freq" in n for n in shared) and any("e_score_correction_bias" in n for n in shared)
    assert all(torch.equal(ref_bufs[n], b) for n, b in pol.named_buffers() if n in ref_bufs)
    ids = torch.randint(3, 20, (2, 9))
    with torch.no_grad():
        pm, rm = pol.model.eval(), ref.model.eval()
        torch.testing.assert_close(rm(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_ref_sync_counts_optimizer_steps_as_trl(tmp_path):
    """3 GRPO steps of num_iterations 2 (gradient accumulation 2): 6 optimizer steps, so ref_model_sync_steps=3
    syncs after optimizer steps 3 and 6 (TRL), each time ref <- alpha * policy + (1 - alpha) * ref with the
    policy of that moment. Counting GRPO steps synced once, after step 3 (optimizer step 6)."""
    t = H.grpo_trainer(tmp_path, "max_steps=3", "num_iterations=2", "gradient_accumulation_steps=2",
                       "per_device_train_batch_size=4", "beta=0.04", "sync_ref_model=true", "ref_model_sync_steps=3",
                       "ref_model_mixup_alpha=0.5")
    alpha, real = 0.5, t.sync_ref
    want = {n: p.detach().clone() for n, p in t.ref.module.named_parameters()}
    synced_at = []

    def spy(a):
        synced_at.append(t.engine.global_steps)  # DeepSpeed's count of optimizer steps taken
        for n, p in t.engine.module.named_parameters():
            want[n].mul_(1 - alpha).add_(p.detach(), alpha=alpha)
        real(a)

    t.sync_ref = spy
    t.train()
    assert t.engine.global_steps == 6
    assert synced_at == [3, 6]
    for n, r in t.ref.module.named_parameters():
        torch.testing.assert_close(r, want[n], rtol=0, atol=0, msg=n)


def test_completion_length_metrics_are_trls(tmp_path):
    """TRL 1.16's completions/* metrics: mean/min/max length over every completion (its eos counted),
    clipped_ratio the share with no eos, and mean/min/max_terminated_length over those that ended with an
    eos (0 when none did). With every fifth token id declared an eos id, the batch mixes both kinds."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "max_completion_length=8", "per_device_train_batch_size=16",
                       reward_funcs=[H.digit_share])
    eos = {i for i in range(t.model.config.vocab_size) if i % 5 == 0} | {t.tok.eos_token_id}
    t.model.generation_config.eos_token_id = sorted(eos)
    rows, _ = t.rows_for(0)
    ro, _, _, m, _ = t.make_batch(0, list(rows))
    lens, ended = [], []
    for ids in ro.completion_ids_BT.tolist():  # independently: the first eos id ends a completion
        first = next((k for k, x in enumerate(ids) if x in eos), None)
        lens.append(8 if first is None else first + 1)
        ended.append(first is not None)
    term = [n for n, e in zip(lens, ended) if e]
    assert 0 < len(term) < len(lens) and len(set(term)) > 1  # both kinds, terminated lengths that differ
    assert m["completions/mean_length"] == pytest.approx(sum(lens) / len(lens))
    assert m["completions/min_length"] == min(lens) and m["completions/max_length"] == max(lens)
    assert m["completions/clipped_ratio"] == pytest.approx(1 - len(term) / len(lens))
    assert m["completions/mean_terminated_length"] == pytest.approx(sum(term) / len(term))
    assert m["completions/min_terminated_length"] == min(term)
    assert m["completions/max_terminated_length"] == max(term)
    t2 = H.grpo_trainer(tmp_path / "b", "max_steps=1", "max_completion_length=3", reward_funcs=[H.digit_share])
    t2.model.generation_config.eos_token_id = [t2.tok.eos_token_id]
    _, _, _, m2, _ = t2.make_batch(0, list(t2.rows_for(0)[0]))
    assert m2["completions/clipped_ratio"] == 1.0  # no completion ended: TRL logs 0 for the terminated lengths
    assert [m2[f"completions/{k}_terminated_length"] for k in ("mean", "min", "max")] == [0.0, 0.0, 0.0]


TOKEN_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
CLIP_EXTREMES = ("clip_ratio/low_min", "clip_ratio/high_max")


def _token_metrics_worker(out_dir):
    """One process of test_token_metrics_are_global_token_means: a GRPO step (two micro-batches, two
    iterations) whose completions stop at every 7th token id, so the ranks' micro-batches hold different token
    counts; writes each micro-batch's token metrics, its scored-token count and the step's logged metrics."""
    import json

    import torch.distributed as dist

    t = H.grpo_trainer(out_dir, "max_steps=1", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
                       "num_iterations=2", "learning_rate=0.05", "max_completion_length=12", "beta=0.04",
                       reward_funcs=[H.digit_share])
    eos = {i for i in range(t.model.config.vocab_size) if i % 7 == 0} | {t.tok.eos_token_id}
    t.model.generation_config.eos_token_id = sorted(eos)
    seen, micro = [], t.micro_step

    def spy(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, **kw):
        out, ent = micro(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, **kw)
        vals = {k: float(out.metrics[k]) for k in TOKEN_METRICS if k != "entropy"}
        # TRL's per-sequence clipped shares (masked_seq_mean of is_low_clipped / is_high_clipped), in float64
        lp, m_BT = out.per_token_logprobs.detach().double(), mask_BT[:, :T].double()
        coef = torch.ones_like(lp) if old_BT is None else (lp - old_BT[:, :T].double()).exp()
        adv = adv_B.double()[:, None]
        eps, eps_high = t.cfg.epsilon, t.cfg.epsilon_high or t.cfg.epsilon
        low = (((coef < 1 - eps) & (adv < 0)) * m_BT).sum(-1) / m_BT.sum(-1)
        high = (((coef > 1 + eps_high) & (adv > 0)) * m_BT).sum(-1) / m_BT.sum(-1)
        seen.append({"n": float(mask_BT[:, :T].sum()), "entropy": float(ent), "low": low.tolist(),
                     "high": high.tolist(), **vals})
        return out, ent

    t.micro_step = spy
    m = t.train_step(0, t.rows_for(0)[0])
    with open(f"{out_dir}/rank{dist.get_rank()}.json", "w") as fh:
        json.dump({"micro": seen, "m": {k: m[k] for k in TOKEN_METRICS + CLIP_EXTREMES}}, fh)


def test_token_metrics_are_global_token_means(tmp_path):
    """TRL 1.16's kl, entropy and clip_ratio/*_mean are, per micro-batch, token means over every process's
    tokens of that micro-batch (global_masked_mean: sums and counts all-reduced), averaged over the
    micro-batches: with two processes whose micro-batches hold different token counts, not the plain mean of
    the per-process means. clip_ratio/low_min and high_max: the extremes over both processes' sequences."""
    import json
    import subprocess
    import sys

    from r1train.engine import free_port

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", __file__, "_token_metrics_worker", str(tmp_path)],
                       env=H.env(), cwd=H.ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    a, b = ranks[0]["micro"], ranks[1]["micro"]
    assert len(a) == len(b) == 4 and any(x["n"] != y["n"] for x, y in zip(a, b))  # the ranks' counts differ
    for k in TOKEN_METRICS:
        want = sum((x[k] * x["n"] + y[k] * y["n"]) / max(x["n"] + y["n"], 1.0) for x, y in zip(a, b)) / len(a)
        for rk in ranks:
            assert rk["m"][k] == pytest.approx(want, rel=1e-5, abs=1e-7), (k, rk["m"][k], want)
    assert ranks[0]["m"]["clip_ratio/region_mean"] > 0  # the second iteration clips some tokens
    # TRL's clip_ratio/low_min (high_max): per micro-batch the least (greatest) share over both processes'
    # sequences (NaN shares of sequences without scored tokens left out), then the mean over the micro-batches
    for k, key, pick in (("clip_ratio/low_min", "low", min), ("clip_ratio/high_max", "high", max)):
        per_micro = [pick(v for v in x[key] + y[key] if v == v) for x, y in zip(a, b)]
        want = sum(per_micro) / len(per_micro)
        for rk in ranks:
            assert rk["m"][k] == pytest.approx(want, rel=1e-6, abs=1e-9), (k, rk["m"][k], want)
    assert ranks[0]["m"]["clip_ratio/high_max"] > 0 or ranks[0]["m"]["clip_ratio/low_min"] > 0 or \
        ranks[0]["m"]["clip_ratio/low_mean"] > 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_clip_ratio_as_trl(tmp_path, level):
    """loss_type=cispo logs TRL's cispo_clip_ratio: per micro-batch the share of scored tokens (sequences, at
    sequence level) whose ratio exceeds epsilon_high with a positive advantage, averaged over the micro-batches;
    against a float64 computation of TRL's formula from each micro-batch's log-probs."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
                       "num_iterations=2", "learning_rate=0.05", "loss_type=cispo", "epsilon_high=1.02",
                       f"importance_sampling_level={level}", reward_funcs=[H.digit_share])
    shares, micro = [], t.micro_step

    def spy(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, **kw):
        out, ent = micro(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, **kw)
        lp, m_BT = out.per_token_logprobs.detach().double(), mask_BT[:, :T].double()
        lr = torch.zeros_like(lp) if old_BT is None else (lp - old_BT[:, :T].double()) * m_BT
        if level == "sequence":
            coef = (lr.sum(-1) / m_BT.sum(-1).clamp(min=1.0)).exp()
            shares.append(float(((coef > 1.02) & (adv_B > 0)).double().mean()))
        else:
            hit = (lr.exp() > 1.02) & (adv_B.double()[:, None] > 0)
            shares.append(float((hit * m_BT).sum() / m_BT.sum().clamp(min=1.0)))
        return out, ent

    t.micro_step = spy
    m = t.train_step(0, t.rows_for(0)[0])
    assert len(shares) == 4 and max(shares) > 0  # the second iteration's ratios pass 1.02
    assert m["cispo_clip_ratio"] == pytest.approx(sum(shares) / len(shares), rel=1e-6, abs=1e-9)


if __name__ == "__main__":  # a worker process of the tests above: test_train_grpo.py <worker> <args>
    import sys

    globals()[sys.argv[1]](*sys.argv[2:])
