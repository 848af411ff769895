"""padding_free / max_tokens_per_batch (r1train/packing.py): the packed forward equals per-sequence forwards;
packed micro-batches give the padded batch's loss and gradients for every loss type and normalization
(fresh random rows of varied lengths, with and without a token budget); a few GRPO steps packed and padded
agree (losses, parameter updates, optimizer steps), with top_entropy_quantile < 1 too (every logged metric; under a
budget the threshold is each pack's, as the padded path's on that pack's rows); bad values are errors naming the key.
plan returns at least min_batches bins, plan_all_ranks gives ranks of different row counts as many micro-batches,
and a filler pack adds no loss or gradient. SFT on two gloo processes of uneven row counts (padded, packed, under a
budget, MoE) runs, steps once and logs the metrics and makes the update of one process on all the rows."""

import random
import threading

import pytest
import torch
import torch.distributed as torch_dist
import train_helpers as H
from conftest import TOLERANCES, assert_close

from r1kernels.reference.grpo import LOSS_TYPES, reduce_loss
from r1train import packing
from r1train.config import ConfigError, check_grpo_config, load_config
from r1train.packing import build_packs, packed_attention, packed_logprobs, plan, reduction_weights
from r1train.rollout import Policy, Rollout, sequence_logprobs


def _rows(B, P, T, V, *, min_prompt=1, min_completion=0):
    """Random rows: left-padded prompts of 1..P tokens, completions of 0..T tokens."""
    p = torch.randint(min_prompt, P + 1, (B,))
    c = torch.randint(min_completion, T + 1, (B,))
    pm = (torch.arange(P)[None] >= P - p[:, None]).long()
    cm = (torch.arange(T)[None] < c[:, None]).long()
    return torch.randint(3, V, (B, P + T)), pm, cm


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama", "tiny-deepseek-v3"])
def test_packed_forward_equals_per_sequence(tmp_path, name):
    """One packed [1, n] forward (positions restarting per row, no mask) gives each row's logits of its own
    unpadded forward, and the padded batch's log-probs, with and without a token budget."""
    cfg = load_config(overrides=H.FAST + [f"model_name_or_path={name}", f"output_dir={tmp_path}",
                                          "model_num_layers=2"])
    from r1train.loading import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(cfg)
    model.eval()
    B, P, T, V = 7, 6, 9, model.config.vocab_size
    ids, pm, cm = _rows(B, P, T, V)
    cm[0] = 0  # a row with no completion token (its prompt still runs)
    comp = ids[:, P:]
    keep = lambda x: x  # noqa: E731  (fn for Policy: the scored tokens' logits as they come)
    with torch.no_grad():
        for budget in (None, 2 * (P + T)):
            packs = build_packs(ids, pm, cm, rows_per_batch=3, max_tokens=budget)
            assert sorted(torch.cat([pk.rows for pk in packs]).tolist()) == list(range(B))
            for pk in packs:
                got = Policy(model, "logits")(pk.input_ids, None, 0, keep, pack=pk)[0]
                for j, i in enumerate(pk.rows.tolist()):
                    n = int(cm[i].sum())
                    if n == 0:
                        continue
                    seq = ids[i][torch.cat([pm[i], cm[i]]).bool()][None, :-1]  # the row alone, unpadded
                    want = model(input_ids=seq).logits[0, -n:]
                    assert_close(got[pk.tok_row == j], want, name=f"{name} row {i} logits")
            for impl in ("linear", "logits"):
                pol = Policy(model, impl)
                want = sequence_logprobs(pol, ids, torch.cat([pm, cm], 1), comp, backend="torch")
                got = packed_logprobs(pol, packs, comp, backend="torch")
                m = cm.bool()
                assert_close(got[m], want[m], name=f"{name} {impl} log-probs")
                assert (got[~m] == 0).all()


# (config overrides, passes sampling log-probs): every reduction, the sequence-level quantities, both the
# fused-on-packed-tokens path (token-local + num_items: dapo/cispo) and the per-row-weight path
CASES = [
    (dict(loss_type="dapo", vllm_importance_sampling_mode="token_truncate"), True),
    (dict(loss_type="dapo"), True),  # sequence_mask rollout correction
    (dict(loss_type="grpo", beta=0.04), False),
    (dict(loss_type="bnpo", beta=0.04, kl_estimator="k1", use_bias_correction_kl=False), False),
    (dict(loss_type="dr_grpo"), False),
    (dict(loss_type="cispo", epsilon_high=5.0), False),
    (dict(loss_type="sapo"), False),
    (dict(loss_type="luspo", importance_sampling_level="sequence"), False),
    (dict(loss_type="vespo", vllm_importance_sampling_mode="token_mask"), True),
    (dict(loss_type="grpo", importance_sampling_level="sequence", vllm_importance_sampling_mode="sequence_truncate"),
     True),
    (dict(loss_type="bnpo", off_policy_mask_threshold=0.02), True),
    (dict(loss_type="grpo", entropy_coef=0.01), False),
    (dict(loss_type="dapo", entropy_coef=-0.02, delta=1.5, epsilon_high=0.28), False),
    # the entropy quantile is per micro-batch: equal to the padded run's only without a budget (under one it is
    # per pack: test_packed_entropy_quantile_under_a_budget_is_per_pack)
    (dict(loss_type="bnpo", top_entropy_quantile=0.5, entropy_coef=0.01), False),
]


def _padded_and_packed(t, batch, mb, GA, budget, entropy_coef):
    """(loss, grads) summed over the padded micro-batches (runs of mb rows, as train_step), then over the packs."""
    ids, pm, cm, mask, adv, old, ref, samp = batch
    comp, attn = ids[:, pm.shape[1]:], torch.cat([pm, cm], 1)
    n_items = mask.sum().float().reshape(1).clamp(min=1.0) / GA
    params = [p for p in t.engine.module.parameters() if p.requires_grad]
    res = []
    for packed in (False, True):
        total = 0.0
        if not packed:
            pos = torch.arange(1, mask.shape[1] + 1)
            for s in range(0, ids.shape[0], mb):
                sl = slice(s, s + mb)
                T = max(int((mask[sl].any(0) * pos).max()), 1)
                out, _ = t.micro_step(ids[sl], attn[sl], comp[sl], adv[sl], mask[sl], old if old is None else old[sl],
                                      ref if ref is None else ref[sl], n_items, T,
                                      samp_BT=samp if samp is None else samp[sl], entropy_coef=entropy_coef)
                total = total + out.loss
            t.engine.backward(total)
        else:
            packs = build_packs(ids, pm, mask, rows_per_batch=mb, max_tokens=budget)
            w = reduction_weights(t.cfg.loss_type, mask, mb, max_completion_length=t.cfg.max_completion_length,
                                  num_items=n_items)
            with packed_attention(t.model):  # held over the backward (activation checkpointing recomputes)
                for pk in packs:
                    out, _ = t.micro_step_packed(pk, comp, adv, mask, old, ref, samp, n_items, w, entropy_coef)
                    total = total + out.loss
                t.engine.backward(total)
        res.append((total.detach(), [p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
    return res


def test_packed_loss_and_grads_equal_padded(tmp_path):
    """Fresh random rows of varied lengths (some fully masked), old/ref/sampling log-probs near the policy's:
    for each loss configuration, the packed micro-batches' summed loss and its gradients equal the padded
    micro-batches' (both shapes; no budget = the padded partition, a budget = other compositions); also with the
    head keywords of a logit-scaled and of a soft-capped model."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "gradient_checkpointing=false", "model_num_layers=2",
                       "max_completion_length=9", reward_funcs=[H.digit_share])
    V = t.model.config.vocab_size
    runs = [(i, impl, {}) for i in range(len(CASES)) for impl in ("linear", "logits") if impl == "linear" or i < 3]
    # the head keywords of a logit-scaled or a soft-capped model (rollout.Policy.head_kwargs): the packed head fns
    # must score with them as the padded ones do
    # (case 0 is token-local: the fused packed loss; case 1 is not: the packed log-prob fn). A small cap: the tiny
    # model's head outputs are near 0, where a cap of 1.5 moved the loss by only 5x the tolerance
    runs += [(i, "linear", kw) for i in (0, 1) for kw in ({"logit_scale": 0.5}, {"softcap": 0.1})]
    for i, impl, head_kw in runs:
        (mb, GA, P, T), (case, with_samp) = [(4, 2, 6, 9), (3, 3, 5, 7)][i % 2], CASES[i]
        t.engine.module.impl, t.engine.module.head_kwargs = impl, head_kw
        for k, v in {**dict(loss_type="dapo", beta=0.0, importance_sampling_level="token", entropy_coef=0.0,
                            vllm_importance_sampling_mode="sequence_mask", kl_estimator="k3", delta=None,
                            use_bias_correction_kl=True, off_policy_mask_threshold=None, epsilon_high=None,
                            top_entropy_quantile=1.0),
                     **case}.items():
            setattr(t.cfg, k, v)
        t.cfg.validate()
        B = mb * GA
        ids, pm, cm = _rows(B, P, T, V, min_completion=1)
        mask = cm.clone()
        mask[torch.randperm(B)[:1]] = 0  # a failed sample: no loss, still in its micro-batch's row count
        adv = torch.randn(B)
        with torch.no_grad():
            now = sequence_logprobs(t.engine.module, ids, torch.cat([pm, cm], 1), ids[:, P:], backend="torch")
        old, ref, samp = (((now + s * torch.randn_like(now)) * cm).detach() for s in (0.05, 0.1, 0.05))
        batch = (ids, pm, cm, mask, adv, old, ref if case.get("beta") else None, samp if with_samp else None)
        ec = case.get("entropy_coef", 0.0)
        for budget in (None, P + T + 3):
            (l0, g0), (l1, g1) = _padded_and_packed(t, batch, mb, GA, budget, ec)
            tag = f"{case} {impl} {head_kw} mb={mb} budget={budget}"
            assert torch.isfinite(l0) and l0.abs() > 0, tag
            if case.get("top_entropy_quantile", 1.0) < 1.0 and budget is not None:
                assert torch.isfinite(l1) and all(torch.isfinite(g).all() for g in g1), tag
                continue
            assert_close(l1, l0, name=f"loss {tag}")
            assert_close(torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g0]),
                         name=f"grads {tag}")
    t.engine.module.impl, t.engine.module.head_kwargs = "linear", {}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_items", [False, True])
def test_reduction_weights_equal_padded_micro_batches(loss_type, with_items):
    """reduction_weights against r1kernels' reduce_loss summed over the padded micro-batches, every loss type,
    with and without num_items (the "items" losses without it divide by each micro-batch's own token count)."""
    N, T, mb = random.randint(3, 9), random.randint(1, 7), random.randint(1, 4)
    m = (torch.rand(N, T, dtype=torch.float64) > 0.4).double()
    m[random.randrange(N)] = 0  # a row with no loss token
    L = torch.randn(N, T, dtype=torch.float64)
    items = m.sum().clamp(min=1.0).reshape(1) / 3 if with_items else None
    w, _, _ = reduction_weights(loss_type, m, mb, max_completion_length=T, num_items=items)
    packed = (w.double() * (m * L).sum(1)).sum()
    padded = sum(reduce_loss(L[s:s + mb], m[s:s + mb], loss_type, T, items) for s in range(0, N, mb))
    assert abs(float(packed - padded)) <= TOLERANCES[torch.float32] * max(abs(float(padded)), 1.0)


def _varied_lengths(monkeypatch, truncate: bool = False):
    """Rollouts whose completions stop (eos) at a length drawn from the row's seed, 1..max_new_tokens: a random
    tiny model never stops by itself. truncate: every third seed's row runs to max_new_tokens without an eos
    (truncated: mask_truncated_completions zeroes its loss mask, its real tokens stay)."""
    import r1train.grpo as G

    orig = G.sample

    def sample(model, p_ids, p_mask, *, max_new_tokens, eos_id, pad_id, seeds_B, **kw):
        ro = orig(model, p_ids, p_mask, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                  seeds_B=seeds_B, **kw)
        B, T = ro.completion_ids_BT.shape
        trunc = torch.tensor([truncate and s % 3 == 0 for s in seeds_B], device=p_ids.device)
        n = torch.tensor([1 + s % T for s in seeds_B], device=p_ids.device).masked_fill(trunc, T)
        col = torch.arange(T, device=p_ids.device)[None]
        eos = eos_id if isinstance(eos_id, int) else eos_id[0]  # the rollout's eos ids (rollout.eos_ids)
        comp = ro.completion_ids_BT.masked_fill((col == n[:, None] - 1) & ~trunc[:, None], eos)
        comp = comp.masked_fill(col >= n[:, None], pad_id)
        mask = (col < n[:, None]).long()
        return Rollout(ro.prompt_ids_BP, ro.prompt_mask_BP, comp, mask, trunc,
                       None if ro.logprobs_BT is None else ro.logprobs_BT * mask)
    monkeypatch.setattr(G, "sample", sample)


def _route_counts(t) -> list:
    """Each optimizer step's expert counts [routers, E] (read before expert_load.step resets them), appended to
    the returned list as the trainer steps."""
    seen, orig = [], t.expert_load.step

    def step():
        seen.append(torch.stack([r.tokens_per_expert.clone() for r in t.expert_load.routers]))
        return orig()
    t.expert_load.step = step
    return seen


def _biases(t) -> torch.Tensor:
    """The routers' e_score_correction_bias [routers, E]."""
    return torch.stack([r.e_score_correction_bias.detach().clone() for r in t.expert_load.routers])


def _assert_same_routing(runs, tag):
    """runs: per run (counts per optimizer step, final biases); a real MoE layer routed tokens in every step, and
    every run counted the first's tokens per expert and ended with its biases."""
    (c0, b0) = runs[0]
    assert c0 and all(c.shape[0] >= 1 and c.sum() > 0 for c in c0), tag
    assert not torch.equal(b0, torch.zeros_like(b0)), f"{tag}: the biases never moved"
    for c, b in runs[1:]:
        assert len(c) == len(c0), tag
        for k, (x, y) in enumerate(zip(c, c0)):
            assert torch.equal(x, y), f"{tag} optimizer step {k}: routed {x.sum(-1).tolist()} != {y.sum(-1).tolist()}"
        assert torch.equal(b, b0), f"{tag}: e_score_correction_bias differs"


def _trained_params(t):
    """The trainable parameters, flat (gathered under ZeRO-3)."""
    import contextlib

    import deepspeed

    from r1train.checkpoint import zero3

    ps = [p for p in t.engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(ps) if zero3(t.engine) else contextlib.nullcontext():
        return torch.cat([p.detach().flatten().clone() for p in ps])


# AdamW with epsilon >> |grad|: the update is linear in the gradient, so updates compare gradients. With
# 1e-8, Adam's early steps are ~sign(grad) and a 1e-7 difference in a near-zero gradient entry becomes a
# full-size step (measured: 4.4e-2 relative on the updates of exactly equal packed and padded losses).
ADAM_LINEAR = "adam_epsilon=1.0"

# the MoE runs: tiny-deepseek-v3's layer 0 is dense (first_k_dense_replace=1), layer 1 an MoE layer; with
# moe_bias_update_rate > 0 its router counts its tokens and moves its bias (the runs compare both)
MOE = ["model_name_or_path=tiny-deepseek-v3", "model_num_layers=2", "moe_bias_update_rate=0.001"]
RUNS = [
    ["loss_type=bnpo", "beta=0.04", "num_iterations=2", "gradient_checkpointing=true", "zero_stage=2"],
    ["model_name_or_path=tiny-deepseek-v3", "model_num_layers=2", "moe_bias_update_rate=0", "loss_type=grpo",
     "use_peft=true", "beta=0.04", "zero_stage=3", "lora_dropout=0"],
    [*MOE, "loss_type=grpo", "zero_stage=2", "mask_truncated_completions=true"],
]


@pytest.mark.parametrize("ov", RUNS, ids=["dense-zero2-ref-mu2-gc", "moe-lora-zero3-ref", "moe-zero2-masked-truncated"])
def test_grpo_steps_packed_equal_padded(tmp_path, monkeypatch, ov):
    """Two GRPO steps on rows of varied length, padded and packed under a token budget (more, and differently
    composed, micro-batches than the padded run's): the same logged losses, the same optimizer steps, the
    same parameter updates (activation checkpointing recomputes packed attention in the backward). MoE: the
    router counts each optimizer step's tokens of the padded run per expert (each row's last completion token,
    and the real tokens of truncated rows whose loss mask is zeroed, up to the padded micro-batch's trim) and
    ends with its e_score_correction_bias."""
    moe = "moe_bias_update_rate=0.001" in ov
    _varied_lengths(monkeypatch, truncate="mask_truncated_completions=true" in ov)
    base = ["max_steps=2", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
            "max_completion_length=10", "max_prompt_length=18", "learning_rate=0.003", ADAM_LINEAR, *ov]
    res, routing = [], []
    for extra in ([], ["padding_free=true", "max_tokens_per_batch=30"]):
        t = H.grpo_trainer(tmp_path / str(len(res)), *base, *extra, reward_funcs=[H.digit_share])
        counts = _route_counts(t) if moe else None
        p0 = _trained_params(t)
        hist = t.train()
        upd = _trained_params(t) - p0
        res.append((hist, upd, t.engine.global_steps, t.cfg.num_iterations))
        routing.append((counts, _biases(t) if moe else None))
    (h0, u0, s0, mu) = res[0]
    lens = [h["completions/mean_length"] for h in h0]
    assert 1 < min(lens) and max(lens) < 10, lens
    for hist, upd, steps, _ in res[1:]:
        assert steps == s0 == 2 * mu
        for a, b in zip(h0, hist):
            assert a["completions/mean_length"] == b["completions/mean_length"]
            assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), name="loss")
            assert not moe or a["moe/max_load_ratio"] == b["moe/max_load_ratio"]
        assert_close(upd, u0, name="parameter update")
    if "mask_truncated_completions=true" in ov:
        assert any(h["completions/clipped_ratio"] > 0 for h in h0), "no truncated row"
    if moe:
        _assert_same_routing(routing, "GRPO packed vs padded")


@pytest.mark.parametrize("ov", [["zero_stage=2", "gradient_checkpointing=true"], [*MOE, "zero_stage=3"]],
                         ids=["dense-zero2-gc", "moe-zero3"])
def test_sft_steps_packed_equal_padded(tmp_path, ov):
    """Two SFT steps on worked solutions of 2..5 terms (varied lengths), padded, packed, and packed under a
    token budget (another count of micro-batches): the same logged losses, optimizer steps and updates. MoE:
    the router counts each optimizer step's tokens of the padded run per expert (every real token, each row's
    final completion token too) and ends with its e_score_correction_bias."""
    from r1train.config import load_config
    from r1train.loading import load_datasets, load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    moe = "moe_bias_update_rate=0.001" in ov
    base = ["max_steps=2", "gradient_accumulation_steps=2", "per_device_train_batch_size=4", "task_min_terms=2",
            "task_max_terms=5", "max_prompt_length=40", "learning_rate=0.003", ADAM_LINEAR, *ov]
    res, routing = [], []
    for extra in ([], ["padding_free=true"], ["padding_free=true", "max_tokens_per_batch=90"]):
        cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / str(len(res))}", *base, *extra])
        model, tok = load_model_and_tokenizer(cfg)
        t = SFTTrainer(cfg, model, tok, load_datasets(cfg, sft=True)[0], [])
        counts = _route_counts(t) if moe else None
        p0 = _trained_params(t)
        hist = t.train()
        res.append((hist, _trained_params(t) - p0, t.engine.global_steps))
        routing.append((counts, _biases(t) if moe else None))
    (h0, u0, s0) = res[0]
    lens = [sum(len(r["solution"]) for r in t.train_rows[:8]) / 8, max(len(r["solution"]) for r in t.train_rows)]
    assert lens[1] > 1.3 * lens[0], lens  # rows of varied length: padding to remove
    for hist, upd, steps in res[1:]:
        assert steps == s0 == 2
        for a, b in zip(h0, hist):
            assert a["tokens"] == b["tokens"]
            assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), name="loss")
            assert not moe or a["moe/max_load_ratio"] == b["moe/max_load_ratio"]
        assert_close(upd, u0, name="parameter update")
    if moe:
        _assert_same_routing(routing, "SFT packed vs padded")


def test_bad_values_name_the_key(tmp_path):
    base = H.FAST + [f"output_dir={tmp_path}", "max_prompt_length=20", "max_completion_length=8"]
    for v, msg in (("0", "positive"), ("-4", "positive")):
        with pytest.raises(ConfigError, match=f"max_tokens_per_batch.*{msg}"):
            load_config(overrides=base + ["padding_free=true", f"max_tokens_per_batch={v}"])
    # below a GRPO row: the grpo command's check (an SFT run is held to its own rows at its trainer's init)
    with pytest.raises(ConfigError, match="max_tokens_per_batch must be >= max_prompt_length"):
        check_grpo_config(load_config(overrides=base + ["padding_free=true", "max_tokens_per_batch=27"]))
    with pytest.raises(ConfigError, match="max_tokens_per_batch=64 needs padding_free"):
        load_config(overrides=base + ["max_tokens_per_batch=64"])
    assert load_config(overrides=base + ["padding_free=true", "max_tokens_per_batch=28"]).max_tokens_per_batch == 28
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="max_tokens_per_batch=5 is less than the longest row"):
        plan([3, 6, 2], 2, max_tokens=5)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        plan([3], 2, max_tokens=0)


def test_plan_fits_the_budget_and_covers_every_row():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 50, (37,), generator=g).tolist()
    for budget in (50, 64, 200, 10_000):
        bins = plan(lens, 4, max_tokens=budget)
        assert sorted(i for b in bins for i in b) == list(range(37))
        assert all(sum(lens[i] for i in b) <= budget for b in bins)
        assert len(bins) >= -(-sum(lens) // budget)
        assert len(plan(lens, 4, max_tokens=budget, min_batches=len(bins) + 2)) >= len(bins) + 2
    assert plan(lens, 4) == [list(range(s, min(s + 4, 37))) for s in range(0, 37, 4)]


def test_help_config_lists_the_keys(capsys):
    from r1train.cli import main

    assert main(["grpo", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "padding_free = False: GRPO and SFT: training forwards without padding" in out
    assert "max_tokens_per_batch = None: padding_free: a token budget per micro-batch" in out


def test_train_gpu_bench_flags_tiny(tmp_path):
    """benchmarks/train_gpu.py --tiny with --varied-lengths --padding-free --max-tokens-per-batch: eos forced
    at the drawn lengths, the flags in the JSON."""
    from benchmarks import train_gpu

    out = str(tmp_path / "t.json")
    res = train_gpu.main([out, "--tiny", "--steps", "1", "--prompts", "2", "--num-generations", "4",
                          "--micro-batch", "4", "--num-iterations", "1", "--varied-lengths", "--padding-free",
                          "--max-tokens-per-batch", "40"])
    assert res["args"]["padding_free"] and res["args"]["max_tokens_per_batch"] == 40
    assert res["args"]["varied_lengths"] and res["workload"] == "varied"
    lens = res["completion_lengths"]
    assert len(lens) == 8 and min(lens) >= 2 and max(lens) <= 16 and len(set(lens)) > 1
    assert res["steps"][0]["completions/mean_length"] == pytest.approx(sum(lens) / len(lens))
    # the rollout's log-probs against the training forward's (the engine returns them): in the step's record
    assert res["steps"][0]["sampling/sampling_logp_difference/max"] >= 0.0



def test_train_gpu_bench_early_eos_tiny(tmp_path):
    """benchmarks/train_gpu.py --tiny --early-eos L --early-eos-steps 2: eos forced at length L in one row of
    step 2 only (the lengths live on the device, read by the decode step); every step lists its Triton
    compiles."""
    from benchmarks import train_gpu

    out = str(tmp_path / "t.json")
    res = train_gpu.main([out, "--tiny", "--steps", "3", "--prompts", "2", "--num-generations", "4",
                          "--micro-batch", "4", "--num-iterations", "1", "--early-eos", "5", "--early-eos-steps", "2"])
    n, T = 8, res["args"]["completion_length"]
    assert res["workload"] == "early_eos" and res["completion_lengths"] == [5] + [T] * (n - 1)
    means = [s["completions/mean_length"] for s in res["steps"]]
    assert means[1] == pytest.approx((5 + (n - 1) * T) / n)  # a random tiny model draws no eos of its own here
    assert means[0] == means[2] == T
    assert all(isinstance(s["triton_compiles"], list) for s in res["steps"])

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-deepseek-v3"])
def test_packed_varlen_flash_bf16(tmp_path, name):
    """CUDA bf16: the packed forward runs torch's varlen flash attention (GQA; DeepSeek-V3's narrower values
    padded) and gives the padded batch's log-probs within the bf16 tolerance; its backward runs."""
    from r1train import packing
    from r1train.loading import load_model_and_tokenizer

    cfg = load_config(overrides=H.FAST + [f"model_name_or_path={name}", f"output_dir={tmp_path}",
                                          "model_num_layers=2", "model_hidden_size=128"])
    model, _ = load_model_and_tokenizer(cfg)
    model = model.to("cuda", torch.bfloat16)
    B, P, T, V = 9, 40, 70, model.config.vocab_size
    ids, pm, cm = (x.cuda() for x in _rows(B, P, T, V))
    comp, pol = ids[:, P:], Policy(model, "linear")
    used = []
    orig = packing._flash_ok
    packing._flash_ok = lambda *a: used.append(orig(*a)) or used[-1]
    try:
        with torch.no_grad():
            want = sequence_logprobs(pol, ids, torch.cat([pm, cm], 1), comp)
            packs = build_packs(ids, pm, cm, rows_per_batch=4, max_tokens=3 * (P + T))
            got = packed_logprobs(pol, packs, comp)
        m = cm.bool()
        with torch.no_grad():
            want32 = sequence_logprobs(Policy(model.float(), "linear"), ids, torch.cat([pm, cm], 1), comp)
        model.to(torch.bfloat16)
        assert_close(got[m], want32[m], torch.bfloat16, lowp=want[m], name=f"{name} packed bf16 log-probs")
        pk = packs[0]
        with packed_attention(model):
            lp = pol(pk.input_ids, None, 0, packing_logprob_fn(pk.gather(comp)), pack=pk)
            lp.sum().backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        packing._flash_ok = orig
    assert used and all(used), "varlen flash attention was not used"


def packing_logprob_fn(ids_1C):
    from r1train.rollout import logprob_fn

    return logprob_fn(ids_1C, 1.0)


# ---- plan: at least min_batches bins, exactly that many once there are more than the rows

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


def test_plan_all_ranks_without_a_budget_agrees_too(monkeypatch):
    """Without a token budget (padding_free alone) ranks of uneven row counts planned ceil(rows / mb) runs
    each, unequal counts of micro-batches; now every rank plans the most, its own runs of mb consecutive rows
    first, then empty bins."""
    mb = random.randint(1, 4)
    ranks = [[random.randint(1, 50) for _ in range(n)] for n in (0, random.randint(1, 5), random.randint(6, 20))]
    got = _on_ranks(monkeypatch, lambda r, lens: packing.plan_all_ranks(lens, mb, None, "cpu"), ranks)
    most = -(-len(ranks[-1]) // mb)
    for lens, bins in zip(ranks, got):
        runs = [list(range(s, min(s + mb, len(lens)))) for s in range(0, len(lens), mb)]
        assert bins == runs + [[]] * (most - len(runs)), (len(lens), bins)


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
    budget = P + T  # a full row feeds its prompt and its whole completion
    got = _on_ranks(monkeypatch, lambda r, b: build_packs(*b, rows_per_batch=2, max_tokens=budget), per_rank)
    assert len({len(p) for p in got}) == 1 and len(got[0]) >= 6, [len(p) for p in got]
    for (ids, _, _), packs in zip(per_rank, got):
        assert sorted(torch.cat([pk.rows for pk in packs]).tolist()) == list(range(ids.shape[0]))
        for pk in packs:
            assert pk.tokens <= budget and pk.tokens >= 1
            if not pk.rows.numel():
                assert pk.tokens == 1 and pk.score_idx.numel() == 0 and pk.cu_seqlens.tolist() == [0, 1]


@pytest.mark.parametrize("B,P,T,mb", [(7, 5, 9, 3), (12, 8, 6, 4), (5, 3, 12, 2), (9, 1, 4, 1)])
def test_build_packs_feed_the_tokens_the_padded_forward_routes(B, P, T, mb):
    """Fresh random rows (prompts of 1..P tokens, completions of 0..T, some rows' loss mask zeroed): every
    scored token is fed (the token after its scoring position is the token itself, each row's last loss token
    included), and the packs feed exactly the real tokens the padded forward routes: SFT's (loss mask =
    completion mask), every real token; GRPO's with completion_mask_BT, the real tokens of each padded
    micro-batch trimmed to max(1, its longest loss length) completion columns, rows whose loss mask is zeroed
    included. Within a budget of the longest row (prompt + completion tokens). A policy without routers (routed
    False) feeds each row's prompt and its completion up to the token before its last loss token."""
    ids, pm, cm = _rows(B, P, T, 50)
    mask = cm.clone()
    mask[torch.randperm(B)[:max(1, B // 3)]] = 0  # failed or truncated rows: real tokens, no loss
    attn = torch.cat([pm, cm], 1).bool()
    n = packing.loss_lengths(mask)
    trim = [max(1, int(n[s:s + mb].max())) for s in range(0, B, mb)]
    routed = attn.clone()  # GRPO's padded forward: micro-batch s // mb cut to P + its trim columns
    for s, tr in zip(range(0, B, mb), trim):
        routed[s:s + mb, P + tr:] = False
    dense = attn.clone()  # no routers: nothing past the token before each row's last loss token
    dense[:, P:] &= torch.arange(T)[None] < (packing.loss_lengths(cm) - 1)[:, None]
    for budget in (None, P + T, 2 * (P + T)):
        for what, loss_BT, want, kw in (("SFT", cm, attn, {"routed": True}),
                                        ("GRPO", mask, routed, {"routed": True, "completion_mask_BT": cm}),
                                        ("dense", cm, dense, {})):
            packs = build_packs(ids, pm, loss_BT, rows_per_batch=mb, max_tokens=budget, **kw)
            tag = f"{what} B={B} P={P} T={T} mb={mb} budget={budget}"
            src = torch.cat([pk.src for pk in packs])
            assert sorted(src.tolist()) == want.reshape(-1).nonzero()[:, 0].tolist(), tag
            for pk in packs:
                assert budget is None or pk.tokens <= budget, tag
                assert torch.equal(pk.input_ids[0], ids.reshape(-1)[pk.src]), tag
                m_1C = pk.gather(loss_BT)
                assert m_1C.numel() == int(packing.loss_lengths(loss_BT)[pk.rows].sum()), tag
                if kw:  # routed: each scored token is fed too
                    assert (pk.score_idx + 1 < pk.tokens).all(), tag
                    assert torch.equal(pk.input_ids[0, pk.score_idx + 1], pk.gather(ids[:, P:])[0]), tag


@pytest.mark.parametrize("loss", [["loss_type=grpo", "beta=0.04"], ["loss_type=dapo"]], ids=["grpo-ref", "dapo-fused"])
def test_filler_packs_add_nothing_to_the_loss_or_gradients(tmp_path, monkeypatch, loss):
    """GRPO micro-steps over packs with filler packs appended (what a rank short of rows runs), on the per-row
    weight path and dapo's fused one: each filler's loss is 0 with finite metrics, and the summed loss and
    gradients equal the padded run's."""
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


# ---- SFT on ranks of uneven row counts: two gloo processes against one

UNEVEN_MODES = {"padded": [], "packed": ["padding_free=true"],
                "budget": ["padding_free=true", "max_tokens_per_batch=64"],
                "moe": ["model_name_or_path=tiny-deepseek-v3", "model_num_layers=2", "padding_free=true",
                        "max_tokens_per_batch=64"]}  # layer 0 is dense
UNEVEN_SPLIT = {1: [range(9)], 2: [range(3), range(3, 9)]}  # world size -> each rank's rows


def _uneven_sft_worker(out_dir, seed):
    """One process of test_sft_on_ranks_of_uneven_row_counts: per mode, one SFT step (ZeRO-2, 2 rows a
    micro-batch, gradient_accumulation_steps=2) on 9 rows of 36..64 tokens (each fills one 64-token pack):
    all of them in one process, 3 on rank 0 and 6 on rank 1 in two. Saves the step's metrics, optimizer
    steps, parameter update and filler packs, and per row (NLL sum, correct top-1, entropy sum, scored)
    under the initial model, from its full logits (an HF forward, log_softmax, argmax)."""
    import copy

    from r1train.data import sft_tokens
    from r1train.loading import load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    fillers, real_filler = [], packing._filler_pack

    def counted(flat):
        fillers.append(1)
        return real_filler(flat)

    packing._filler_pack = counted
    rng = random.Random(int(seed))
    digits = lambda n: "".join(rng.choice("0123456789+") for _ in range(n))  # noqa: E731
    rows = [{"prompt": f"What is {digits(rng.randint(25, 35))}?", "completion": f"<answer>{digits(rng.randint(5, 20))}"
             "</answer>"} for _ in range(9)]
    for mode, ov in UNEVEN_MODES.items():
        cfg = load_config(overrides=H.FAST + [f"output_dir={out_dir}/{mode}", "per_device_train_batch_size=2",
                                              "gradient_accumulation_steps=2", "zero_stage=2", "max_length=64",
                                              "learning_rate=0.003", ADAM_LINEAR, *ov])
        model, tok = load_model_and_tokenizer(cfg)
        init = copy.deepcopy(model).eval()
        t = SFTTrainer(cfg, model, tok, rows, [])
        p0, fillers[:] = _trained_params(t), []
        m = t.train_step(0, [rows[i] for i in UNEVEN_SPLIT[t.world][t.rank]])
        upd = _trained_params(t) - p0
        hand = []
        with torch.no_grad():
            for i, r in enumerate(rows):
                p, c = sft_tokens(tok, r, i, completion_column="completion", max_length=64)
                logits = init(torch.tensor([p + c])).logits[0, len(p) - 1:-1].double()
                logp, tgt = torch.log_softmax(logits, -1), torch.tensor(c)
                hand.append((-logp.gather(1, tgt[:, None]).sum().item(), (logits.argmax(-1) == tgt).sum().item(),
                             -(logp.exp() * logp).sum().item(), len(c)))
        torch.save({"m": m, "upd": upd, "hand": hand, "steps": t.engine.global_steps, "fillers": len(fillers)},
                   f"{out_dir}/{mode}_rank{t.rank}.pt")


def _uneven_want(hand, world):
    """TRL's SFT metrics of rows split as UNEVEN_SPLIT[world], from per-row (NLL, correct, entropy, scored):
    the token-mean NLL; per forward j (every rank's rows 2j, 2j + 1) correct / scored and entropy / scored,
    averaged over the forwards."""
    loss = sum(h[0] for h in hand) / sum(h[3] for h in hand)
    micro = {}
    for rows in UNEVEN_SPLIT[world]:
        for k, i in enumerate(rows):
            micro.setdefault(k // 2, []).append(hand[i])
    acc = sum(sum(h[1] for h in g) / sum(h[3] for h in g) for g in micro.values()) / len(micro)
    ent = sum(sum(h[2] for h in g) / sum(h[3] for h in g) for g in micro.values()) / len(micro)
    return loss, acc, ent


@pytest.mark.slow
def test_sft_on_ranks_of_uneven_row_counts(tmp_path):
    """SFT with 3 rows on rank 0 and 6 on rank 1 (2 rows a micro-batch: 2 and 3 micro-batches), padded,
    packed, and packed under a token budget (one row a pack: 3 and 6 packs): every rank runs as many
    micro-batches and collectives (rank 0 runs fillers: before, ZeRO-2's per-backward reductions hung), the
    optimizer steps once (one process with 5 micro-batches and gradient_accumulation_steps=2 stepped twice),
    both ranks make the update of one process that trains on all 9 rows (token-mean NLL: the same gradient
    whatever the split), and log the loss, mean_token_accuracy and entropy of the rows' full logits and (MoE)
    the expert loads of one process: the fillers count in no metric (a filler pack's token was routed)."""
    import os
    import signal
    import subprocess
    import sys

    from r1train.engine import free_port

    seed, procs = random.randrange(2**31), {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        out.mkdir()
        launch = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node=2",
                                        f"--master_port={free_port()}"]
        err = open(tmp_path / f"n{nproc}.stderr", "w+")
        procs[nproc] = (err, subprocess.Popen([sys.executable, *launch, __file__, "_uneven_sft_worker", str(out),
                                               str(seed)], env=H.env(), cwd=H.ROOT, stdout=subprocess.DEVNULL,
                                              stderr=err, start_new_session=True))
    try:
        for nproc, (err, proc) in procs.items():
            try:
                rc = proc.wait(timeout=420)
            except subprocess.TimeoutExpired:
                rc = "timeout (a rank waits in a collective the other never runs)"
            err.seek(0)
            assert rc == 0, f"{nproc} process(es): {rc}\n{err.read()[-3000:]}"
    finally:
        for err, proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers (their own session)
                proc.wait()
            err.close()
    for mode in UNEVEN_MODES:
        one = torch.load(tmp_path / "n1" / f"{mode}_rank0.pt")
        two = [torch.load(tmp_path / "n2" / f"{mode}_rank{r}.pt") for r in range(2)]
        assert [r["fillers"] for r in two] == [{"padded": 0, "packed": 1}.get(mode, 3), 0], mode
        for world, res in ((1, one), (2, two[0]), (2, two[1])):
            loss, acc, ent = _uneven_want(one["hand"], world)
            assert res["steps"] == 1, (mode, world, res["steps"])
            assert res["m"]["loss"] == pytest.approx(loss, rel=1e-5), (mode, world)
            assert res["m"]["mean_token_accuracy"] == pytest.approx(acc, abs=1e-9), (mode, world)
            assert res["m"]["entropy"] == pytest.approx(ent, rel=1e-4, abs=1e-5), (mode, world)  # fp32 kernel
            assert res["m"]["tokens"] == one["m"]["tokens"], (mode, world)
            assert_close(res["upd"], one["upd"], name=f"{mode}: parameter update")
            for k in (k for k in one["m"] if k.startswith("moe/")):  # the routers' loads: real tokens only
                assert float(res["m"][k]) == pytest.approx(float(one["m"][k]), rel=1e-6), (k, world)
        assert mode != "moe" or "moe/max_load_ratio" in one["m"]
        assert two[0]["m"] == two[1]["m"], mode  # every metric all-reduced: the same on both ranks
        assert torch.equal(two[0]["upd"], two[1]["upd"]), mode



def test_grpo_step_with_filler_packs_logs_and_trains_as_without(tmp_path, monkeypatch):
    """A whole GRPO step whose plan ends in filler packs (what a rank with fewer packs than another runs), with
    the rollout's log-probs, entropy selection and MoE experts: the same logged metrics and parameter update as
    the plan without them (a filler's empty log-prob difference failed in max(); its zero entropy entered the
    per-micro-batch means; its token entered the expert loads)."""
    _varied_lengths(monkeypatch)
    base = ["max_steps=1", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
            "max_completion_length=10", "max_prompt_length=18", "learning_rate=0.003", ADAM_LINEAR,
            "model_name_or_path=tiny-deepseek-v3", "model_num_layers=2", "loss_type=grpo", "beta=0.04",
            "top_entropy_quantile=0.5", "padding_free=true", "max_tokens_per_batch=30"]
    orig = packing.plan_all_ranks
    res = []
    for fillers in (0, 2):
        monkeypatch.setattr(packing, "plan_all_ranks", lambda *a, n=fillers: orig(*a) + [[]] * n)
        t = H.grpo_trainer(tmp_path / str(fillers), *base, reward_funcs=[H.digit_share])
        p0 = _trained_params(t)
        hist = t.train()
        res.append((hist[-1], _trained_params(t) - p0))
    (m0, u0), (m1, u1) = res
    keys = sorted(k for k in m0 if isinstance(m0[k], float) and not k.startswith("time") and "time" not in k)
    assert "sampling/sampling_logp_difference/max" in keys and "entropy/selected_mean" in keys, keys
    assert any(k.startswith("moe/") for k in keys), keys
    for k in keys:
        assert_close(torch.tensor(m1[k], dtype=torch.float64), torch.tensor(m0[k], dtype=torch.float64), name=k)
    assert_close(u1, u0, name="parameter update")


@pytest.mark.parametrize("ov", [["loss_type=grpo", "beta=0.04", "num_iterations=2"],
                                ["loss_type=dapo", "importance_sampling_level=sequence"]],
                         ids=["grpo-ref-mu2", "dapo-sequence"])
def test_grpo_step_entropy_quantile_packed_equals_padded(tmp_path, monkeypatch, ov):
    """top_entropy_quantile < 1 without a token budget: the packs are the padded micro-batches (the same rows),
    so the high-entropy selection is the same and the whole step is the padded one's: every logged metric
    (loss, entropy, entropy/selected_mean, the adaptive coefficient moved by the selected tokens' entropy
    window) and the parameter update, on rows of varied length."""
    _varied_lengths(monkeypatch)
    base = ["max_steps=2", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
            "max_completion_length=10", "max_prompt_length=18", "learning_rate=0.003", ADAM_LINEAR,
            "gradient_checkpointing=false", "top_entropy_quantile=0.5", "entropy_coef=0.01",
            "use_adaptive_entropy=true", "entropy_target=1.0", "entropy_coef_delta=0.003", *ov]
    res = []
    for extra in ([], ["padding_free=true"]):
        t = H.grpo_trainer(tmp_path / str(len(res)), *base, *extra, reward_funcs=[H.digit_share])
        p0 = _trained_params(t)
        hist = t.train()
        res.append((hist, _trained_params(t) - p0))
    (h0, u0), (h1, u1) = res
    for a, b in zip(h0, h1):
        keys = sorted(k for k in a if isinstance(a[k], float) and "time" not in k)
        assert "entropy/selected_mean" in keys and "entropy_coef" in keys and sorted(
            k for k in b if isinstance(b[k], float) and "time" not in k) == keys
        for k in keys:
            assert_close(torch.tensor(b[k], dtype=torch.float64), torch.tensor(a[k], dtype=torch.float64), name=k)
    assert_close(u1, u0, name="parameter update")


def test_packed_entropy_quantile_under_a_budget_is_per_pack(tmp_path):
    """With max_tokens_per_batch the packs hold other rows than the padded micro-batches, and
    top_entropy_quantile's threshold is taken over each pack's tokens: each pack's loss, gradients,
    entropy/selected_mean and entropy window equal the padded path's on one micro-batch of exactly that pack's
    rows (dapo / cispo: every token weighs 1/num_items in both; the entropy bonus, the pack's selected-token
    mean, counts as many padded micro-batches as the pack's rows fill: len(rows) / mb)."""
    from r1train.grpo import ENTROPY_WINDOW

    t = H.grpo_trainer(tmp_path, "max_steps=1", "gradient_checkpointing=false", "model_num_layers=2",
                       "max_completion_length=9", reward_funcs=[H.digit_share])
    V = t.model.config.vocab_size
    mb, GA, P, T = 4, 2, 6, 9
    B = mb * GA
    params = [p for p in t.engine.module.parameters() if p.requires_grad]
    for loss_type, coef in (("dapo", 0.0), ("dapo", 0.02), ("cispo", -0.01)):
        for k, v in dict(loss_type=loss_type, top_entropy_quantile=0.4, epsilon_high=5.0 if loss_type == "cispo"
                         else None, beta=0.0, entropy_coef=coef).items():
            setattr(t.cfg, k, v)
        t.cfg.validate()
        ids, pm, cm = _rows(B, P, T, V, min_completion=1)
        comp, attn = ids[:, P:], torch.cat([pm, cm], 1)
        adv = torch.randn(B)
        with torch.no_grad():
            now = sequence_logprobs(t.engine.module, ids, attn, comp, backend="torch")
        old = ((now + 0.05 * torch.randn_like(now)) * cm).detach()
        n_items = cm.sum().float().reshape(1) / GA
        w = reduction_weights(loss_type, cm, mb, max_completion_length=t.cfg.max_completion_length, num_items=n_items)
        packs = build_packs(ids, pm, cm, rows_per_batch=mb, max_tokens=P + T + 3)
        runs = [pk.rows.tolist() for pk in packs]
        assert len(packs) > GA and all(r != list(range(s, s + mb)) for r, s in zip(runs, range(0, B, mb))), runs
        for pk in packs:
            rows = pk.rows
            res = []
            for packed in (True, False):
                if packed:
                    with packed_attention(t.model):
                        out, ent = t.micro_step_packed(pk, comp, adv, cm, old, None, None, n_items, w, coef)
                        t.engine.backward(out.loss)
                else:
                    Tr = int(packing.loss_lengths(cm[rows]).max())
                    out, ent = t.micro_step(ids[rows], attn[rows], comp[rows], adv[rows], cm[rows], old[rows], None,
                                            n_items, Tr, entropy_coef=coef * len(rows) / mb)
                    t.engine.backward(out.loss)
                res.append((out.loss.detach(), out.metrics, ent, torch.cat([p.grad.flatten() for p in params])))
                for p in params:
                    p.grad = None
            (l1, m1, e1, g1), (l0, m0, e0, g0) = res
            tag = f"{loss_type} coef={coef} rows={rows.tolist()}"
            assert_close(l1, l0, name=f"loss {tag}")
            assert_close(g1, g0, name=f"grads {tag}")
            assert_close(e1, e0, name=f"entropy {tag}")
            assert m0[ENTROPY_WINDOW][1] > 0 and torch.equal(m1[ENTROPY_WINDOW][1], m0[ENTROPY_WINDOW][1]), tag
            assert_close(m1[ENTROPY_WINDOW], m0[ENTROPY_WINDOW], name=f"window {tag}")
            assert_close(m1["entropy/selected_mean"], m0["entropy/selected_mean"], name=f"selected_mean {tag}")


if __name__ == "__main__":  # a worker process of the tests above: test_train_packing.py <worker> <args>
    import sys

    globals()[sys.argv[1]](*sys.argv[2:])
