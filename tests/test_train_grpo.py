"""GRPO on the tiny model in-process: a short seeded run whose reward rises; every loss variant runs a
step with finite values; SFT lowers its loss."""

import math

import pytest
import torch
import train_helpers as H

import r1kernels.reference.grpo as RG
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
    assert all(k in hist[0] for k in ("reward_std", "rewards/digit_share/mean", "frac_reward_zero_std",
                                       "entropy", "clip_ratio/region_mean", "completions/mean_length",
                                       "completions/clipped_ratio", "step_time", "loss", "num_tokens"))
    assert "kl" not in hist[0]  # beta 0: no KL term, TRL logs no kl
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
        for k in ("loss", "entropy", "reward", *(("kl",) if t.cfg.beta else ())):
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


@pytest.mark.gpu
def test_evaluate_on_cuda(tmp_path):
    """On CUDA the process group is NCCL's (one process too), which reduces no CPU tensor: evaluate's totals were
    one ("No backend type associated with device type cpu": `r1train grpo` stopped at its evaluation before the
    first step). Its metrics come back, the same in two calls (seeds from (seed, row, sample))."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "task_eval_size=6", "eval_num_samples=2")
    assert t.dev.type == "cuda"
    first = t.evaluate()
    assert set(first) == {"eval/accuracy", "eval/accuracy_greedy"} and all(0.0 <= v <= 1.0 for v in first.values())
    assert t.evaluate() == first


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


# TRL 1.16's loss types with two-sided clipping: the only ones it logs clip_ratio/* for
TRL_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
CLIP_ALL = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
            "clip_ratio/high_max")
LOSS_RUNS = {"luspo": ["importance_sampling_level=sequence"], "vespo": ["vllm_importance_sampling_mode=token_truncate"],
             "cispo": ["epsilon_high=5.0"]}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"])
def test_clip_ratio_metrics_only_for_trls_clipped_losses(tmp_path, loss_type):
    """TRL 1.16 logs clip_ratio/{low,high,region}_mean, low_min and high_max only for grpo, bnpo, dr_grpo, dapo
    and luspo; cispo logs cispo_clip_ratio instead, vespo vespo/phi_seq_mean, sapo neither. Without the entropy
    bonus there is no policy_loss."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_iterations=2", f"loss_type={loss_type}",
                       *LOSS_RUNS.get(loss_type, []), reward_funcs=[H.digit_share])
    m = t.train_step(0, t.rows_for(0)[0])
    for k in CLIP_ALL:
        assert (k in m) == (loss_type in TRL_CLIPPED), (k, loss_type)
    assert ("cispo_clip_ratio" in m) == (loss_type == "cispo")
    assert ("vespo/phi_seq_mean" in m) == (loss_type == "vespo")
    assert "policy_loss" not in m  # no entropy bonus: TRL logs none


def _trl_is_ratio(old, samp, m, cfg):
    """TRL 1.16's vllm_importance_sampling_ratio (float64): exp(old - sampling log-prob) per scored token (summed
    per sequence in sequence modes), clamped (truncate) or zeroed outside [clip_min, clip_max] (mask)."""
    d = ((old - samp) * m).nan_to_num(0.0)
    if cfg.vllm_importance_sampling_mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    r = d.exp()
    lo, hi = cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max
    if cfg.vllm_importance_sampling_mode.endswith("truncate"):
        return r.clamp(min=lo, max=hi)
    return r.masked_fill((r < (-math.inf if lo is None else lo)) | (r > (math.inf if hi is None else hi)), 0.0)


def _trl_phi(lp, old, adv, m, isr, cfg):
    """TRL 1.16's get_gamma_weights (float64) -> phi_seq [B, 1]."""
    lo = math.log(1e-8)
    seq = ((lp - old).clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
    if isr is not None:
        seq = seq + isr.log().clamp(lo, 20.0).sum(-1, keepdim=True)
    log_w = seq.clamp(lo, 20.0)
    pos = adv[:, None] >= 0
    k = torch.where(pos, cfg.vespo_k_pos, cfg.vespo_k_neg).double()
    lam = torch.where(pos, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).double().clamp(min=1e-4)
    return (lam + k * log_w - lam * log_w.exp()).exp().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _micro_inputs(lp, old_BT, ref_BT, samp_BT, adv, m_BT):
    """A micro-batch's float64 inputs as TRL holds them: old log-probs = the policy's on the first iteration;
    old/ref/sampling log-probs on unscored positions (TRL's are finite there, masked out) = the policy's."""
    lp, m = lp.detach().double(), m_BT.double()
    fill = lambda x: None if x is None else torch.where(m > 0, x.double(), lp)  # noqa: E731
    return lp, lp if old_BT is None else fill(old_BT), fill(ref_BT), fill(samp_BT), adv.double(), m


def _noisy_sampling_logprobs(t, scale):
    """Perturb the rollout engine's log-probs (uniform in +-scale) so the rollout-correction weights are not ~1."""
    real = t.make_batch

    def make_batch(*a, **k):
        got = real(*a, **k)
        lp = got[0].logprobs_BT
        assert lp is not None  # the engine returns its sampling log-probs
        lp.add_((torch.rand_like(lp) - 0.5) * 2 * scale)
        return got
    t.make_batch = make_batch


def _spy_rows(t, record):
    """Call record(lp [b, T], old, ref, samp, adv [b], mask [b, T], rows, T, entropy_coef, ent) per micro-batch (packed
    or padded), with every tensor the micro-batch's rows; rows: their indices (None: the padded micro-batch)."""
    micro, packed = t.micro_step, t.micro_step_packed
    sl = lambda x, r, T: None if x is None else x[r, :T]  # noqa: E731

    def spy(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, samp_BT=None, entropy_coef=0.0):
        out, ent = micro(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, samp_BT=samp_BT,
                         entropy_coef=entropy_coef)
        a = slice(None)
        record(out.per_token_logprobs, sl(old_BT, a, T), sl(ref_BT, a, T), sl(samp_BT, a, T), adv_B,
               mask_BT[:, :T], None, T, entropy_coef, ent)
        return out, ent

    def spy_packed(pk, comp_BT, adv_N, mask_BT, old_BT, ref_BT, samp_BT, n_items, weights, entropy_coef=0.0):
        out, ent = packed(pk, comp_BT, adv_N, mask_BT, old_BT, ref_BT, samp_BT, n_items, weights, entropy_coef)
        r, T = pk.rows, pk.T
        record(out.per_token_logprobs, sl(old_BT, r, T), sl(ref_BT, r, T), sl(samp_BT, r, T), adv_N[r],
               mask_BT[r, :T], r, T, entropy_coef, ent)
        return out, ent
    t.micro_step, t.micro_step_packed = spy, spy_packed


VESPO_RUNS = {
    "token_truncate": ["vllm_importance_sampling_mode=token_truncate", "vllm_importance_sampling_clip_min=0.5",
                       "vllm_importance_sampling_clip_max=2.0", "vespo_k_pos=1.5", "vespo_lambda_pos=2.5",
                       "vespo_k_neg=2.5", "vespo_lambda_neg=1.5"],
    "token_mask+sequence": ["vllm_importance_sampling_mode=token_mask", "vllm_importance_sampling_clip_min=0.8",
                            "importance_sampling_level=sequence", "per_device_train_batch_size=2",
                            "gradient_accumulation_steps=4"],
    "no_correction": ["vllm_importance_sampling_correction=false", "vespo_k_neg=1.0", "vespo_lambda_neg=0.5"],
    "packed": ["vllm_importance_sampling_mode=token_truncate", "vllm_importance_sampling_clip_min=0.5",
               "max_prompt_length=20", "padding_free=true", "max_tokens_per_batch=40"],
}


@pytest.mark.parametrize("run", list(VESPO_RUNS))
def test_vespo_phi_seq_mean_as_trl(tmp_path, run):
    """loss_type=vespo logs TRL's vespo/phi_seq_mean: per micro-batch (pack, with padding_free) the mean of the
    VESPO gamma weight phi over its sequences (every row), phi from the sequence's summed log-ratio to the old
    policy and the token rollout-correction weights the loss used, averaged over the micro-batches; against
    TRL's get_gamma_weights in float64 on each micro-batch's log-probs, perturbed sampling log-probs, completions
    of different lengths and two iterations (ratios != 1)."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
                       "num_iterations=2", "learning_rate=0.05", "max_completion_length=12", "loss_type=vespo",
                       *VESPO_RUNS[run], reward_funcs=[H.digit_share])
    eos = {i for i in range(t.model.config.vocab_size) if i % 7 == 0} | {t.tok.eos_token_id}
    t.model.generation_config.eos_token_id = sorted(eos)
    _noisy_sampling_logprobs(t, 0.3)
    cfg, phis = t.cfg, []

    def record(lp, old, ref, samp, adv, m_BT, rows, T, coef, ent):
        lp, old, _, samp, adv, m = _micro_inputs(lp, old, ref, samp, adv, m_BT)
        isr = _trl_is_ratio(old, samp, m, cfg) if cfg.vllm_importance_sampling_correction else None
        phis.append(_trl_phi(lp, old, adv, m, isr, cfg)[:, 0])
    _spy_rows(t, record)
    m = t.train_step(0, t.rows_for(0)[0])
    assert len(phis) >= 4
    every = torch.cat(phis)
    assert every.min() < 0.99 and every.max() > 0  # ratios and weights away from 1: phi differs from 1
    want = sum(float(p.mean()) for p in phis) / len(phis)
    assert m["vespo/phi_seq_mean"] == pytest.approx(want, rel=1e-5, abs=1e-8)


def _trl_policy_loss(lp, old, ref, samp, adv, m, ent_mask, cfg, num_items):
    """TRL 1.16's policy_loss of one micro-batch (float64): the reduced policy term (+ beta * KL), before the
    entropy bonus and before the gradient-accumulation division; dapo/cispo/vespo normalized by num_items
    (the generation batch's scored tokens over the processes)."""
    log_ratio = lp - old
    if cfg.importance_sampling_level == "sequence":
        log_ratio = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    coef_1, a = log_ratio.exp(), adv[:, None]
    eps_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
    if cfg.loss_type == "sapo":
        tau = torch.where(a > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg).double()
        L = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a
    elif cfg.loss_type == "cispo":
        L = -coef_1.clamp(max=eps_high) * a * lp
    else:
        coef_2 = coef_1.clamp(1 - cfg.epsilon, 1 + eps_high)
        c1 = coef_1 if cfg.delta is None else coef_1.clamp(max=cfg.delta)
        L = -torch.min(c1 * a, coef_2 * a)
    L = L.expand_as(m)
    if ent_mask is not None:
        L = L * ent_mask
    if samp is not None and cfg.vllm_importance_sampling_correction:
        L = L * _trl_is_ratio(old, samp, m, cfg)
    if cfg.beta != 0.0:
        kl = (ref - lp).exp() - (ref - lp) - 1
        L = L + cfg.beta * (kl * coef_1 if cfg.use_bias_correction_kl else kl)
    if cfg.loss_type in ("grpo", "sapo"):
        return float(((L * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean())
    if cfg.loss_type == "bnpo":
        return float((L * m).sum() / m.sum().clamp(min=1.0))
    if cfg.loss_type == "dr_grpo":
        return float((L * m).sum() / (L.shape[0] * cfg.max_completion_length))
    return float((L * m).sum() / max(num_items, 1.0))


POLICY_RUNS = {
    "grpo+kl": ["loss_type=grpo", "entropy_coef=0.01", "beta=0.04", "vllm_importance_sampling_correction=false"],
    "dapo": ["loss_type=dapo", "entropy_coef=0.02", "vllm_importance_sampling_mode=token_truncate",
             "vllm_importance_sampling_clip_min=0.5"],
    "sapo+sequence_is": ["loss_type=sapo", "entropy_coef=-0.01", "per_device_train_batch_size=2",
                         "gradient_accumulation_steps=4"],
    "adaptive+quantile": ["loss_type=bnpo", "use_adaptive_entropy=true", "entropy_coef=0.01",
                          "entropy_target=100.0", "top_entropy_quantile=0.5"],
    "dapo+packed": ["loss_type=dapo", "entropy_coef=0.02", "beta=0.04", "max_prompt_length=20", "padding_free=true",
                    "max_tokens_per_batch=40"],
    "grpo+packed": ["loss_type=grpo", "entropy_coef=0.02", "importance_sampling_level=sequence",
                    "max_prompt_length=20", "padding_free=true", "max_tokens_per_batch=40"],
}


@pytest.mark.parametrize("run", list(POLICY_RUNS))
def test_policy_loss_as_trl(tmp_path, run):
    """With the entropy bonus on (entropy_coef != 0 or use_adaptive_entropy) TRL logs policy_loss: per micro-batch
    the loss's policy term (KL included) before the entropy bonus, grpo/bnpo/dr_grpo/sapo/luspo before the
    gradient-accumulation division, dapo/cispo/vespo normalized by the generation batch's scored tokens, averaged
    over the micro-batches (the padded run's, with padding_free). Against TRL's formulas in float64 on each
    micro-batch's log-probs; the logged loss is TRL's too (padded runs): the micro-batches' losses, each less the
    applied coefficient times its mean entropy over the tokens trained on, summed per optimizer step (TRL's
    loss / gradient_accumulation_steps per micro-batch), averaged over the iterations' optimizer steps."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
                       "num_iterations=2", "learning_rate=0.05", "max_completion_length=12",
                       *POLICY_RUNS[run], reward_funcs=[H.digit_share])
    eos = {i for i in range(t.model.config.vocab_size) if i % 7 == 0} | {t.tok.eos_token_id}
    t.model.generation_config.eos_token_id = sorted(eos)
    _noisy_sampling_logprobs(t, 0.3)
    cfg, GA, mb = t.cfg, t.cfg.gradient_accumulation_steps, t.cfg.per_device_train_batch_size
    seen, masks = [], []
    real_mb, real_hem = t.make_batch, RG.high_entropy_mask

    def make_batch(*a, **k):
        got = real_mb(*a, **k)
        seen.append(float(got[2].sum()))  # the generation batch's scored tokens: TRL's num_items_in_batch
        return got

    def hem(entropy, mask, *a, **k):
        out = real_hem(entropy, mask, *a, **k)
        masks.append((entropy.detach().double(), out.double()))
        return out
    t.make_batch = make_batch
    micro = []

    def record(lp, old, ref, samp, adv, m_BT, rows, T, coef, ent):
        ent_mask = masks.pop() if masks else None
        micro.append((_micro_inputs(lp, old, ref, samp, adv, m_BT), rows, coef, ent, ent_mask))
    _spy_rows(t, record)
    RG.high_entropy_mask = hem
    try:
        m = t.train_step(0, t.rows_for(0)[0])
    finally:
        RG.high_entropy_mask = real_hem
    num_items = seen[0]
    if not cfg.padding_free:
        pol, loss = [], 0.0
        for (lp, old, ref, samp, adv, mm), _, coef, ent, em in micro:
            p = _trl_policy_loss(lp, old, ref, samp, adv, mm, None if em is None else em[1], cfg, num_items)
            h = float(ent) if em is None else float((em[0] * em[1]).sum() / em[1].sum().clamp(min=1.0))
            pol.append(p)
            loss += (p if RG.LOSS_REDUCTION[cfg.loss_type] == "items" else p / GA) - coef * h / GA
        assert m["loss"] == pytest.approx(loss / cfg.num_iterations, rel=1e-5, abs=1e-7)
    else:  # the padded micro-batches, from the packs' rows
        assert all(em is None for *_, em in micro)
        N, Tm = t.cfg.num_generations * t.prompts_per_rank, max(x[0][0].shape[1] for x in micro)
        per_it = len(micro) // cfg.num_iterations
        full = [[torch.zeros(N, Tm, dtype=torch.float64) for _ in range(6)] for _ in range(cfg.num_iterations)]
        for j, ((lp, old, ref, samp, adv, mm), rows, _, _, _) in enumerate(micro):
            buf = full[j // per_it]
            for b, x in zip(buf, (lp, old, ref, samp, adv[:, None].expand_as(lp), mm)):
                if x is not None:
                    b[rows, :x.shape[1]] = x
        pol = [_trl_policy_loss(lp[s:s + mb], old[s:s + mb], ref[s:s + mb], samp[s:s + mb], adv[s:s + mb, 0],
                                mm[s:s + mb], None, cfg, num_items)
               for lp, old, ref, samp, adv, mm in full for s in range(0, N, mb)]
        assert len(pol) == GA * cfg.num_iterations
    want = sum(pol) / len(pol)
    assert abs(want - m["loss"]) > 1e-3  # the entropy term (and dapo's normalizer) set them apart
    assert m["policy_loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)



if __name__ == "__main__":  # a worker process of the tests above: test_train_grpo.py <worker> <args>
    import sys

    globals()[sys.argv[1]](*sys.argv[2:])


@pytest.mark.parametrize("T", [1, 2, 5])
def test_clip_metrics_read_the_level_from_the_config_not_the_width(T):
    """Token-level clip_ratio/low_min, high_max and cispo_clip_ratio at any micro-batch width: a micro-batch
    trimmed to one token (every row with at most one scored token) was read as sequence level (width 1), counting
    the masked rows. Against the per-sequence shares computed here over the scored tokens."""
    from r1train.grpo import cispo_clipped, clip_extremes

    g = torch.Generator().manual_seed(T)
    cfg = load_config(overrides=["epsilon=0.2", "epsilon_high=0.28"])
    b = 6
    old = torch.randn(b, T, generator=g, dtype=torch.float64).float()
    logp = old + torch.randn(b, T, generator=g).mul(0.5)
    adv = torch.tensor([-1.0, 1.0, -1.0, 1.0, 2.0, -2.0])
    mask = (torch.rand(b, T, generator=g) < 0.7).float()
    mask[0, 0], mask[1, 0], mask[2:4] = 1.0, 1.0, 0.0  # two rows with a scored token, two with none
    r = (logp - old).exp()
    low = ((r < 0.8) & (adv[:, None] < 0)).double()
    high = ((r > 1.28) & (adv[:, None] > 0)).double()
    seen = mask.sum(1) > 0
    low_b, high_b = [(x * mask).sum(1)[seen] / mask.sum(1)[seen] for x in (low, high)]
    got = clip_extremes(logp, old, adv, mask, cfg)
    assert got.tolist() == pytest.approx([low_b.min().item(), -high_b.max().item()])
    hit = ((r > 0.28) & (adv[:, None] > 0)).double()
    assert cispo_clipped(logp, old, adv, mask, cfg).tolist() == pytest.approx([(hit * mask).sum().item(),
                                                                              mask.sum().item()])
    # every scored token low-clipped: the least share is 1 (a masked row's 0 was taken)
    assert clip_extremes(old - 1.0, old, -adv.abs(), mask, cfg)[0].item() == 1.0
    # sequence level: one ratio a row (the masked mean of its log-ratio), every row counted
    cfg = load_config(overrides=["epsilon=0.2", "epsilon_high=0.28", "importance_sampling_level=sequence",
                                 "loss_type=grpo"])
    rs = (((logp - old) * mask).sum(1) / mask.sum(1).clamp(min=1)).exp()
    hit = ((rs > 0.28) & (adv > 0)).double()
    assert cispo_clipped(logp, old, adv, mask, cfg).tolist() == pytest.approx([hit.sum().item(), float(b)])
