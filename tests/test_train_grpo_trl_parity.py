"""TRL 1.16 GRPOTrainer parity of three loss-side quantities: the top_entropy_quantile threshold over every
process's tokens (get_high_entropy_mask's gather), the adaptive entropy controller's window over the selected
tokens (_entropy_window_stats), and clip_ratio/*_mean counting sequences at importance_sampling_level=sequence
(global_masked_mean of a [B, 1] indicator). Each against an independent float64 computation of TRL's formula
on fresh random inputs (or the values a run produced). Then the step's logged keys and their reductions over a
step's optimizer steps (TRL's row at logging_steps = num_iterations): kl only with a KL term, entropy always,
num_tokens, entropy_coef and grad_norm."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import train_helpers as H
from conftest import TOLERANCES

import r1kernels as rk
import r1kernels.reference.grpo as RG

Q = 0.3  # top_entropy_quantile of the runs below
TOL = TOLERANCES[torch.float32]  # the runs' entropies, log-probs and metrics are fp32


def _torchrun(tmp_path, worker, *args):
    from r1train.engine import free_port

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", __file__, worker, str(tmp_path), *args],
                       env=H.env(), cwd=H.ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]


def _global_selection(hs, ms, q):
    """TRL's get_high_entropy_mask over the processes' [b, T] entropies hs and masks ms (float64, numpy's
    linear quantile of every process's masked entropies together) -> each process's selection."""
    h_all = np.concatenate([np.asarray(h, dtype=np.float64)[np.asarray(m) > 0] for h, m in zip(hs, ms)])
    if h_all.size == 0:
        return [np.zeros_like(np.asarray(m, dtype=np.float64)) for m in ms]
    thr = np.quantile(h_all, 1.0 - q)
    return [((np.asarray(h, dtype=np.float64) >= thr) & (np.asarray(m) > 0)).astype(np.float64)
            for h, m in zip(hs, ms)]


# ---- 1. the threshold over every process's entropies

def _gather_worker(out_dir, seed):
    """One process of test_high_entropy_mask_over_a_process_group: random entropies of a size that differs by
    rank (rank 1 also has a call with no masked-in token), masks by high_entropy_mask with the world group."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(int(seed) * 2 + rank)
    out = []
    for case in range(3):
        B, T = (3, 5 + 4 * rank) if case < 2 else (2, 4)
        # rank 1's entropies lie 1.5 higher: the global threshold then differs from each rank's own (with equal
        # distributions a seed could make them select alike, and the test's last assertion failed once in a suite)
        h = torch.rand(B, T, generator=g, dtype=torch.float64) * 3 + 1.5 * rank
        m = (torch.rand(B, T, generator=g) < 0.7).double()
        if case == 2 and rank == 1:
            m.zero_()  # no token here: the other process's tokens still set the threshold
        sel = RG.high_entropy_mask(h.float(), m.float(), Q, dist.group.WORLD)
        got = RG.gather_varsize(h[m > 0], dist.group.WORLD)
        out.append({"h": h.tolist(), "m": m.tolist(), "sel": sel.tolist(), "gathered": got.tolist(),
                    "local": RG.high_entropy_mask(h.float(), m.float(), Q).tolist()})
    with open(f"{out_dir}/rank{rank}.json", "w") as fh:
        json.dump(out, fh)
    dist.destroy_process_group()


def test_high_entropy_mask_over_a_process_group(tmp_path):
    """Two gloo processes with different token counts: gather_varsize gives both processes' values in rank
    order, and high_entropy_mask(..., group) selects on each process what TRL's quantile of all processes'
    masked entropies together selects; without a group (and with one process) it stays per call."""
    ranks = _torchrun(tmp_path, "_gather_worker", str(torch.randint(0, 2**20, ()).item()))
    for case in range(3):
        calls = [r[case] for r in ranks]
        hs = [np.asarray(c["h"], dtype=np.float32).astype(np.float64) for c in calls]  # the fp32 values used
        want = _global_selection(hs, [c["m"] for c in calls], Q)
        for k, c in enumerate(calls):
            np.testing.assert_array_equal(np.asarray(c["sel"]), want[k], err_msg=f"case {case} rank {k}")
            np.testing.assert_array_equal(np.asarray(c["local"]), _global_selection([hs[k]], [c["m"]], Q)[0])
            every = np.concatenate([np.asarray(x["h"])[np.asarray(x["m"]) > 0] for x in calls])
            np.testing.assert_array_equal(np.asarray(c["gathered"]), every)
    assert np.asarray(ranks[1][2]["sel"]).sum() == 0 and np.asarray(ranks[0][2]["sel"]).sum() > 0
    assert any(not np.array_equal(np.asarray(r[c]["sel"]), np.asarray(r[c]["local"])) for r in ranks
               for c in range(2))  # the global threshold selects differently from a per-process one here


def test_gather_is_a_no_op_without_a_group():
    x = torch.randn(5)
    assert RG.gather_varsize(x, None) is x
    h, m = torch.rand(2, 6), (torch.rand(2, 6) < 0.6).float()
    assert torch.equal(RG.high_entropy_mask(h, m, Q, None), RG.high_entropy_mask(h, m, Q))


# temperature 0.1: the random tiny model's token entropies spread (near log V each at temperature 1)
ENTROPY_RUN = ["max_steps=1", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
               "max_completion_length=12", f"top_entropy_quantile={Q}", "use_adaptive_entropy=true",
               "entropy_coef=0.01", "entropy_target=100.0", "temperature=0.1"]
# padding_free with a token budget: packs of other compositions than the padded micro-batches
PACKED = ["max_prompt_length=20", "padding_free=true", "max_tokens_per_batch=40"]


def _spy_entropy_masks(t):
    """Record every high_entropy_mask call of the trainer's loss (entropy, mask) in order; completions stop
    at every 7th token id, so micro-batches (and processes) hold different token counts."""
    eos = {i for i in range(t.model.config.vocab_size) if i % 7 == 0} | {t.tok.eos_token_id}
    t.model.generation_config.eos_token_id = sorted(eos)
    calls, real = [], RG.high_entropy_mask

    def spy(entropy, mask, *args, **kw):
        out = real(entropy, mask, *args, **kw)
        calls.append({"h": entropy.detach().double().tolist(), "m": mask.double().tolist(),
                      "sel": out.double().tolist()})
        return out
    return calls, spy, real


def _entropy_worker(out_dir, packed):
    """One process of test_two_processes_select_on_every_process_tokens: a GRPO step with
    top_entropy_quantile and adaptive entropy control; writes the loss's entropies and masks per call and the
    controller's measured entropy."""
    import torch.distributed as dist

    extra = PACKED if packed == "packed" else []
    t = H.grpo_trainer(out_dir, *ENTROPY_RUN, *extra, reward_funcs=[H.digit_share])
    calls, spy, real = _spy_entropy_masks(t)
    RG.high_entropy_mask = spy
    try:
        t.train_step(0, t.rows_for(0)[0])
    finally:
        RG.high_entropy_mask = real
    with open(f"{out_dir}/rank{dist.get_rank()}.json", "w") as fh:
        json.dump({"calls": calls, "last_entropy": t.last_entropy}, fh)
    # a rank that exits while the other still uses the group aborted once in a full suite ("terminate called
    # without an active exception", exit -6): both end together, the group destroyed
    from r1train.engine import teardown_distributed

    teardown_distributed()


def _window_entropy(calls_per_rank, q):
    """TRL's adaptive-entropy measure of one optimizer step: per micro-batch the selection over every
    process's tokens, then sum(H * selected) / sum(selected) over all micro-batches and processes."""
    num = den = 0.0
    for calls in zip(*calls_per_rank):
        hs, ms = [c["h"] for c in calls], [c["m"] for c in calls]
        for h, sel in zip(hs, _global_selection(hs, ms, q)):
            num += float((np.asarray(h) * sel).sum())
            den += float(sel.sum())
    return num / max(den, 1.0)


@pytest.mark.parametrize("packed", ["padded", "packed"])
def test_two_processes_select_on_every_process_tokens(tmp_path, packed):
    """Two processes (gloo), micro-batches with different token counts: each micro-batch's high-entropy
    selection is the one of TRL's quantile over both processes' tokens of that micro-batch, and adaptive
    entropy control measures the step's entropy over both processes' selected tokens."""
    ranks = _torchrun(tmp_path, "_entropy_worker", packed)
    a, b = ranks[0]["calls"], ranks[1]["calls"]
    assert len(a) == len(b) >= 2
    differs = False
    for ca, cb in zip(a, b):
        want = _global_selection([ca["h"], cb["h"]], [ca["m"], cb["m"]], Q)
        for c, w in zip((ca, cb), want):
            np.testing.assert_array_equal(np.asarray(c["sel"]), w)
            differs |= not np.array_equal(_global_selection([c["h"]], [c["m"]], Q)[0], w)
    want_h = _window_entropy([a, b], Q)
    for r in ranks:
        assert r["last_entropy"] == pytest.approx(want_h, rel=TOL), (r["last_entropy"], want_h)
    assert differs  # a per-process threshold would select other tokens in this run




# ---- 2. adaptive entropy control's window over the selected tokens (one process)

@pytest.mark.parametrize("packed", ["padded", "packed"])
def test_adaptive_entropy_measures_the_selected_tokens(tmp_path, packed):
    """With top_entropy_quantile < 1 TRL's controller accumulates sum(H * selected) and the selected tokens'
    count over the step's micro-batches (not the selected mean weighted by every scored token): the step's
    measured entropy (last_entropy) is that ratio, from the loss's own entropies and masks."""
    extra = PACKED if packed == "packed" else []
    t = H.grpo_trainer(tmp_path, *ENTROPY_RUN, "gradient_accumulation_steps=3", *extra,
                       reward_funcs=[H.digit_share])
    calls, spy, real = _spy_entropy_masks(t)
    RG.high_entropy_mask = spy
    try:
        m = t.train_step(0, t.rows_for(0)[0])
    finally:
        RG.high_entropy_mask = real
    assert len(calls) >= 3
    for c in calls:  # one process: each call's own quantile
        np.testing.assert_array_equal(np.asarray(c["sel"]), _global_selection([c["h"]], [c["m"]], Q)[0])
    assert t.last_entropy == pytest.approx(_window_entropy([calls], Q), rel=TOL)
    assert m["entropy_coef"] == pytest.approx(0.01 + 0.005)  # far below the target: the coefficient grows


# ---- 3. clip_ratio/*_mean count sequences at importance_sampling_level=sequence

def _seq_clip_shares(logp, old, adv, mask, eps_low, eps_high):
    """TRL 1.16 at importance_sampling_level=sequence, float64: coef = exp(masked mean of logp - old) per
    row; (low, high, region) = the share of the B rows (every row counts) with coef < 1 - eps_low and A < 0,
    coef > 1 + eps_high and A > 0, either."""
    lp, o, m, a = (x.detach().double() for x in (logp, old, mask, adv))
    coef = (((lp - o) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).exp()
    low, high = (coef < 1 - eps_low) & (a < 0), (coef > 1 + eps_high) & (a > 0)
    B = max(len(coef), 1)
    return [float(x.double().sum()) / B for x in (low, high, low | high)]


def _token_clip_shares(logp, old, adv, mask, eps_low, eps_high):
    """The same clipped sequences counted per scored token (what the metric was): for contrast only."""
    lp, o, m, a = (x.detach().double() for x in (logp, old, mask, adv))
    coef = (((lp - o) * m).sum(-1) / m.sum(-1).clamp(min=1.0)).exp()
    low, high = (coef < 1 - eps_low) & (a < 0), (coef > 1 + eps_high) & (a > 0)
    n = m.sum(-1)
    return [float((x.double() * n).sum() / n.sum().clamp(min=1.0)) for x in (low, high, low | high)]


CLIP_KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sequence_level_clip_metrics_count_sequences(backend):
    """rk.grpo_loss at importance_sampling_level=sequence: clip_ratio/*_mean are shares of the B sequences
    (a row without scored tokens counts, unclipped), on fresh random logits and old log-probs whose sequence
    ratios lie outside the clip range, in either direction, and rows of different lengths."""
    B, T, V = 8, 7, 11
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    lens = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T)[None] < lens[:, None]).float()
    mask[0] = 0  # no scored token: still one of the B sequences
    adv = torch.randn(B)
    logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
    shift = (0.2 + 0.3 * torch.rand(B, 1)) * torch.randint(0, 2, (B, 1)).mul(2).sub(1)  # |log ratio| > 0.2
    shift[1], adv[1] = shift[1].abs(), -adv[1].abs()  # ratio < 1 - epsilon, A < 0: low-clipped
    shift[2], adv[2] = -shift[2].abs(), adv[2].abs()  # ratio > 1 + epsilon_high, A > 0: high-clipped
    old = (logp + shift).float()
    out = rk.grpo_loss(logits, ids, adv, mask, old_logprobs=old, epsilon=0.1, epsilon_high=0.15,
                       loss_type="grpo", importance_sampling_level="sequence", backend=backend)
    want = _seq_clip_shares(logp, old, adv, mask, 0.1, 0.15)
    for k, w in zip(CLIP_KEYS, want):
        assert float(out.metrics[k]) == pytest.approx(w, rel=TOL, abs=TOL), (k, float(out.metrics[k]), w)
    assert want[0] > 0 and want[1] > 0 and want[2] < 1  # both kinds clipped; row 0 is not


def test_sequence_level_clip_metrics_in_training(tmp_path):
    """The trainer's clip_ratio/*_mean at importance_sampling_level=sequence: per micro-batch the share of its
    sequences (TRL's global_masked_mean of a [B, 1] indicator), averaged over the micro-batches; from each
    micro-batch's log-probs, old log-probs and advantages. Completions of different lengths, so counting
    tokens would give other values."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "gradient_accumulation_steps=2", "per_device_train_batch_size=4",
                       "num_iterations=2", "learning_rate=0.05", "max_completion_length=12",
                       "importance_sampling_level=sequence", "loss_type=grpo", "epsilon=0.004",
                       "epsilon_high=0.006", reward_funcs=[H.digit_share])
    eos = {i for i in range(t.model.config.vocab_size) if i % 7 == 0} | {t.tok.eos_token_id}
    t.model.generation_config.eos_token_id = sorted(eos)
    seq, tok, micro = [], [], t.micro_step

    def spy(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, **kw):
        out, ent = micro(ids_BL, attn_BL, comp_BT, adv_B, mask_BT, old_BT, ref_BT, n_items, T, **kw)
        lp = out.per_token_logprobs
        old = lp.detach() if old_BT is None else old_BT[:, :T]
        args = (lp, old, adv_B, mask_BT[:, :T], 0.004, 0.006)
        seq.append(_seq_clip_shares(*args))
        tok.append(_token_clip_shares(*args))
        return out, ent

    t.micro_step = spy
    m = t.train_step(0, t.rows_for(0)[0])
    assert len(seq) == 4
    for j, k in enumerate(CLIP_KEYS):
        want = sum(s[j] for s in seq) / len(seq)
        assert m[k] == pytest.approx(want, rel=TOL, abs=TOL), (k, m[k], want)
    assert m["clip_ratio/region_mean"] > 0  # the second iteration clips some sequences
    # token counting would give other values
    assert any(abs(a - b) > 10 * TOL for s, x in zip(seq, tok) for a, b in zip(s, x))



# ---- 4. the logged keys, and their reductions over a step's num_iterations optimizer steps

@pytest.mark.parametrize("run", [["beta=0.0"], ["beta=0.04"], ["beta=0.0", *PACKED]], ids=["beta0", "kl", "packed"])
def test_kl_only_with_a_kl_term_entropy_always(tmp_path, run):
    """TRL 1.16's _compute_loss logs kl only when beta != 0 (no reference model, no KL term otherwise) and
    entropy at every loss call, whatever the loss options."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_iterations=2", *run, reward_funcs=[H.digit_share])
    m = t.train_step(0, t.rows_for(0)[0])
    assert ("kl" in m) == (t.cfg.beta != 0), sorted(m)
    assert math.isfinite(m["entropy"]) and m["entropy"] > 0


def test_num_tokens_counts_every_prompt_and_completion_token(tmp_path):
    """TRL's num_tokens: the running sum over the generated batches of each completion's prompt length (its
    prompt's ids, unpadded, once per completion) plus its length up to and including its eos (all of it where
    it has none); logged after every step, continued by a resume (trainer_state)."""
    from r1train.data import prompt_ids

    t = H.grpo_trainer(tmp_path, "max_steps=2", "max_completion_length=12", reward_funcs=[H.digit_share])
    eos = {i for i in range(t.model.config.vocab_size) if i % 7 == 0} | {t.tok.eos_token_id}
    t.model.generation_config.eos_token_id = sorted(eos)
    want, lens, got, real = [], [], [], t._rollout

    def rollout(step, rows, gidx):
        out = real(step, rows, gidx)
        n = sum(len(prompt_ids(t.tok, r["prompt"])) for r in rows) * t.cfg.num_generations
        for ids in out[0].completion_ids_BT.tolist():
            lens.append(next((j + 1 for j, x in enumerate(ids) if x in eos), len(ids)))
            n += lens[-1]
        want.append(n)
        return out
    t._rollout = rollout
    for s in range(2):
        got.append(t.train_step(s, t.rows_for(s)[0])["num_tokens"])
    assert got == [want[0], want[0] + want[1]]
    assert min(lens) < max(lens)  # completions of different lengths: a count of padded widths would differ
    t2 = H.grpo_trainer(tmp_path / "b", "max_steps=2", reward_funcs=[H.digit_share])
    t2.load_trainer_state(json.loads(json.dumps(t.trainer_state())))
    assert t2.num_tokens == got[-1]


def test_entropy_coef_is_the_mean_over_the_steps_optimizer_steps(tmp_path):
    """TRL appends entropy_coef after every optimizer step (after the adaptive update) and logs their mean: with
    num_iterations=3 and the entropy always below the target, c + delta, c + 2 delta, c + 3 delta -> c + 2 delta."""
    c, d = 0.01, 0.004
    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_iterations=3", "use_adaptive_entropy=true",
                       f"entropy_coef={c}", f"entropy_coef_delta={d}", "entropy_target=100.0",
                       reward_funcs=[H.digit_share])
    m = t.train_step(0, t.rows_for(0)[0])
    assert m["entropy_coef"] == pytest.approx((3 * c + (1 + 2 + 3) * d) / 3)
    assert t.entropy_coef == pytest.approx(c + 3 * d)  # the controller itself moved three times


def test_grad_norm_is_the_last_optimizer_steps(tmp_path):
    """transformers' Trainer logs the grad_norm of the last optimizer step before the log (not a mean over the
    logging interval): with num_iterations=2, the second optimizer step's norm."""
    t = H.grpo_trainer(tmp_path, "max_steps=1", "num_iterations=2", "zero_stage=1", "learning_rate=0.05",
                       reward_funcs=[H.digit_share])
    norms, real = [], t.engine.step

    def step(*a, **k):
        out = real(*a, **k)
        norms.append(float(t.engine.get_global_grad_norm()))
        return out
    t.engine.step = step
    m = t.train_step(0, t.rows_for(0)[0])
    assert len(norms) == 2 and abs(norms[0] - norms[1]) > 1e-3 * norms[1]  # a mean would differ
    assert m["grad_norm"] == pytest.approx(norms[1], rel=1e-6)


@pytest.mark.parametrize("trainer,bf16", [("grpo", False), ("sft", False), ("sft", True)])
def test_grad_norm_at_zero0_fp32_is_the_pre_clip_norm(tmp_path, trainer, bf16):
    """At ZeRO-0 without DeepSpeed's mixed precision (the default; and bf16 weights with configs/ds_zero0_bf16.json)
    DeepSpeed keeps no gradient norm, and grad_norm was never logged (transformers logs it always): it is the
    global L2 norm of the gradients the optimizer step applies, before clipping (max_grad_norm far below it
    here), read off the parameters just before each step in float64 (bf16 gradients: within fp32 summation)."""
    from r1train.config import CONFIG_DIR, load_config
    from r1train.loading import load_datasets, load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    ov = ["max_steps=1", "max_grad_norm=0.001", "zero_stage=0", f"bf16={str(bf16).lower()}"]
    if bf16:
        ov.append(f"deepspeed={CONFIG_DIR}/ds_zero0_bf16.json")
    if trainer == "grpo":
        t = H.grpo_trainer(tmp_path, *ov, reward_funcs=[H.digit_share])
    else:
        cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", *ov])
        model, tok = load_model_and_tokenizer(cfg)
        t = SFTTrainer(cfg, model, tok, *load_datasets(cfg, sft=True))
    norms, real = [], t.engine.step

    def step(*a, **k):
        if t.engine.is_gradient_accumulation_boundary():
            g = [p.grad.double().norm() for p in t.engine.module.parameters() if p.grad is not None]
            norms.append(float(torch.stack(g).norm()))
        return real(*a, **k)
    t.engine.step = step
    m = t.train_step(0, t.rows_for(0)[0])
    assert norms and norms[-1] > 0.01
    assert m["grad_norm"] == pytest.approx(norms[-1], rel=1e-5)  # a bf16 sum would be off by ~1e-3


if __name__ == "__main__":  # a worker process of the tests above: test_train_grpo_trl_parity.py <worker> <args>
    globals()[sys.argv[1]](*sys.argv[2:])


@pytest.mark.parametrize("q", [0.0, 0.2, 0.7, 1.0])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (5, 2)])
def test_high_entropy_mask_quantiles(q, B, T):
    """high_entropy_mask at TRL's whole range [0, 1] (0: the highest-entropy token(s) only) against numpy's
    quantile of the masked entropies; ties at the top all count, as in TRL."""
    h = torch.rand(B, T)
    if B * T > 2:
        h.view(-1)[1] = h.max()  # a tie at the top
    m = (torch.rand(B, T) < 0.7).float()
    m.view(-1)[0] = 1.0
    want = _global_selection([h.double().numpy()], [m.numpy()], q)[0]
    np.testing.assert_array_equal(RG.high_entropy_mask(h, m, q).numpy(), want)
    if q == 0.0:
        assert want.sum() >= 1 and (h * m)[want > 0].min() == (h * m).max()
