"""r1kernels.integrations.trl against the installed TRL: a few GRPOTrainer steps on a tiny Qwen2 with and
without use_r1kernels see the same completions (the second run replays the first run's generations) and
must give the same loss, metrics and gradients (TOLERANCES[float32]). Plain SGD: Adam's first step is
sign(grad), which turns a 1e-7 difference in a near-zero gradient entry into a full-size step. Unsupported
options warn once and run TRL's loss code. A soft-capped Gemma 2 policy takes the fused head and loss with its
final_logit_softcapping: the model's own log-probs, TRL's loss and gradients."""
from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from conftest import assert_close

pytest.importorskip("trl")
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from r1kernels.integrations.trl import unsupported_options, use_r1kernels  # noqa: E402
from r1kernels.patch.lm_head import FusedLMHeadOutput  # noqa: E402

METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
           "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "reward")


def digit_share(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _save_tiny(tmp_path_factory, name, num_layers):
    """A random tiny model (fresh weights each run) and the character tokenizer, saved where TRL can load
    the reference model from."""
    from r1train.tasks.models import tiny_model
    from r1train.tasks.tokenizer import char_tokenizer

    path = tmp_path_factory.mktemp(name)
    tok = char_tokenizer()
    tiny_model(name, tok, seed=int(torch.randint(0, 2**31 - 1, ()).item()), hidden_size=32,
               num_layers=num_layers).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory, "tiny-qwen2", 1)


class _Grads(TrainerCallback):
    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _trainer(model_dir, tmp_path, **cfg):
    from datasets import Dataset

    path, tok = model_dir
    opts = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=2,
                logging_steps=1, learning_rate=0.1, optim="sgd", report_to="none", use_cpu=True, bf16=False,
                save_strategy="no", disable_tqdm=True, seed=_fresh_seed())
    opts.update(cfg)
    ds = Dataset.from_list([{"prompt": f"{i}*{i + 3}="} for i in range(8)])
    grads = _Grads()
    tr = GRPOTrainer(model=path, reward_funcs=digit_share, train_dataset=ds, processing_class=tok,
                     args=GRPOConfig(output_dir=str(tmp_path), **opts), callbacks=[grads])
    return tr, grads


def _record(tr):
    """Generations and the torch RNG state after each: TRL shuffles the generation buffer into micro-batches
    with torch's RNG, which sampling advanced, so a replay restores it (else another partition changes the
    per-micro-batch means of kl and entropy: measured up to 8e-2 relative)."""
    recorded, generate = [], tr._generate

    def record(prompts):
        recorded.append((generate(prompts), torch.get_rng_state()))
        return recorded[-1][0]
    tr._generate = record
    return recorded


def _replay(tr, recorded):
    it = iter(recorded)

    def replay(prompts):
        out, rng = next(it)
        torch.set_rng_state(rng)
        return out
    tr._generate = replay


def _train(model_dir, tmp_path, ours, replay=None, **cfg):
    """(log rows, per-step gradients, generations); with `replay`, the generations of an earlier run."""
    tr, grads = _trainer(model_dir, tmp_path, **cfg)
    if replay is None:
        recorded = _record(tr)
    else:
        recorded = replay
        _replay(tr, replay)
    if ours:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a supported setting must not fall back
            use_r1kernels(tr)
    tr.train()
    return [h for h in tr.state.log_history if "loss" in h], grads.grads, recorded


def _assert_same_training(a, b):
    """Every logged step at the fp32 table: with the same micro-batch partition (see _record) the runs'
    weights differ only by fp32 rounding of the update (measured at step 1: grads 1.5e-6, kl 2.5e-6
    relative; near-zero losses are covered by ATOL)."""
    (rows_a, grads_a, _), (rows_b, grads_b, _) = a, b
    assert len(rows_a) == len(rows_b) > 0 and len(grads_a) == len(grads_b) > 0
    min_len = min(r["completions/min_length"] for r in rows_a if "completions/min_length" in r)
    for step, (ra, rb) in enumerate(zip(rows_a, rows_b)):
        assert_close(torch.tensor(rb["loss"]), torch.tensor(ra["loss"]), name=f"loss, step {step}")
        for k in METRICS:
            assert (k in ra) == (k in rb), k
            if k in ra and "clip_ratio" in k:
                # a ratio within float error of a clip bound may land on either side: one token's weight
                assert abs(rb[k] - ra[k]) <= 1.0 / max(min_len, 1) + 1e-6, (k, step, ra[k], rb[k])
            elif k in ra:
                assert_close(torch.tensor(rb[k]), torch.tensor(ra[k]), name=f"{k}, step {step}")
    for step, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        assert set(ga) == set(gb)
        for n in ga:
            assert_close(gb[n], ga[n].double(), name=f"grad {n}, step {step}")


@pytest.mark.parametrize("cfg", [
    dict(loss_type="dapo", beta=0.04, num_iterations=2, gradient_accumulation_steps=2),  # bias-corrected KL
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False, num_iterations=2),
    dict(loss_type="grpo", importance_sampling_level="sequence", num_iterations=2, epsilon_high=0.28),
    dict(loss_type="dr_grpo", delta=1.5, gradient_accumulation_steps=2, temperature=0.7),
    dict(loss_type="dapo", delta=1.05, epsilon=0.02, epsilon_high=0.1, num_iterations=2),  # clip metrics after delta
    dict(loss_type="cispo", epsilon_high=5.0, num_iterations=2),
    dict(loss_type="sapo", num_iterations=2),
    dict(loss_type="sapo", num_iterations=2, sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
    dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2, beta=0.04),
    dict(loss_type="bnpo", beta=0.1, use_bias_correction_kl=False),
    # micro-batches of one completion (a common setting for large models): the fused kernel's row chunks
    dict(loss_type="grpo", beta=0.04, per_device_train_batch_size=1, num_generations=2, gradient_accumulation_steps=2),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items() if k in ("loss_type", "beta", "use_bias_correction_kl",
                                                                   "sapo_temperature_pos", "delta",
                                                                   "per_device_train_batch_size")))
def test_grpo_trainer_same_loss_and_grads(model_dir, tmp_path, cfg):
    cfg = dict(cfg, seed=_fresh_seed())  # one seed: the same shuffle of the generation buffer into micro-batches
    base = _train(model_dir, tmp_path / "trl", False, **cfg)
    ours = _train(model_dir, tmp_path / "r1k", True, replay=base[2], **cfg)
    _assert_same_training(base, ours)


def test_unsupported_option_warns_once_and_runs_trl_loss(model_dir, tmp_path):
    cfg = dict(loss_type="vespo", max_steps=1, seed=_fresh_seed())
    base = _train(model_dir, tmp_path / "trl", False, **cfg)
    tr, grads = _trainer(model_dir, tmp_path / "r1k", **cfg)
    _replay(tr, base[2])
    assert unsupported_options(tr) == ["loss_type='vespo'"]
    with pytest.warns(UserWarning, match="TRL's loss code runs for loss_type='vespo'") as rec:
        use_r1kernels(tr)
        use_r1kernels(tr)  # a second call is a no-op: no second warning
    assert len([w for w in rec if "r1kernels" in str(w.message)]) == 1
    tr.train()
    ours = ([h for h in tr.state.log_history if "loss" in h], grads.grads, None)
    _assert_same_training(base, ours)


def test_trainer_models_get_the_fused_head(model_dir, tmp_path):
    tr, _ = _trainer(model_dir, tmp_path, beta=0.04, temperature=0.8)
    use_r1kernels(tr, backend="torch")
    for m in (tr.model, tr.ref_model):
        assert m._r1k_lm_head["temperature"] == 0.8 and m._r1k_lm_head["backend"] == "torch"
    assert tr.ref_model._r1k_lm_head["return_entropy"] is False
    ids = torch.randint(0, 100, (2, 9))
    labels = ids.masked_fill(torch.rand(2, 9) < 0.3, -100)
    out = tr.model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert isinstance(out, FusedLMHeadOutput)
    logits = tr.model(input_ids=ids).logits[:, :-1].double() / 0.8
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] * (labels[:, 1:] != -100)
    assert_close(out.log_probs, ref)


def test_bad_input():
    with pytest.raises(ValueError, match="trainer must be a trl.GRPOTrainer"):
        use_r1kernels(object())


def test_a_subclass_loss_runs_as_written(model_dir, tmp_path):
    """A GRPOTrainer subclass with its own _compute_loss keeps it (it was replaced by the instance attribute
    without a word: the subclass's loss and metrics were gone), with a warning naming it."""
    class Mine(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return super()._compute_loss(model, inputs) * 0.0 + 123.0

    tr, _ = _trainer(model_dir, tmp_path)
    tr.__class__ = Mine
    with pytest.warns(UserWarning, match="Mine._compute_loss overrides TRL's and runs as written"):
        use_r1kernels(tr, backend="torch")
    assert "_compute_loss" not in vars(tr)
    assert tr._compute_loss.__func__ is Mine._compute_loss


def test_remove_and_call_again(model_dir, tmp_path):
    """remove_r1kernels gives the trainer TRL's loss and the policy its own generate back (a later trainer on the
    same model object rolled out through r1train's engine); a second use_r1kernels with other options warns that it
    changes nothing; after a remove it applies them."""
    from r1kernels.integrations.trl import remove_r1kernels

    tr, _ = _trainer(model_dir, tmp_path)
    use_r1kernels(tr, backend="torch")
    assert "_compute_loss" in vars(tr) and "generate" in vars(tr.model)
    with pytest.warns(UserWarning, match="changes nothing"):
        use_r1kernels(tr, backend="torch", rollout_engine="transformers")
    assert "generate" in vars(tr.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        use_r1kernels(tr, backend="torch")  # the same options: silent
    assert remove_r1kernels(tr) is tr
    assert "_compute_loss" not in vars(tr) and "generate" not in vars(tr.model)
    assert tr._compute_loss.__func__ is GRPOTrainer._compute_loss
    use_r1kernels(tr, backend="torch", rollout_engine="transformers")
    assert "_compute_loss" in vars(tr) and "generate" not in vars(tr.model)
    assert remove_r1kernels(remove_r1kernels(tr)) is tr


def test_zero3_wrapped_reference_keeps_hf_moe_layers(monkeypatch):
    """TRL wraps its ZeRO-3 reference model in a DeepSpeed engine at construction, whose parameter-gathering hooks
    sit on the modules it has: a router put in afterwards would run with partitioned parameters. Such a model keeps
    transformers' MoE layers, with a warning; an unwrapped one (the policy, wrapped later in train()) is patched."""
    import transformers.integrations.deepspeed as hf_ds
    from test_patch_deepseek_v3 import _tiny

    from r1kernels.integrations import trl as it
    from r1kernels.patch.deepseek_v3 import routers, routers_to_patch

    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: True)
    engine = types.SimpleNamespace(module=_tiny())
    with pytest.warns(UserWarning, match="ZeRO-3 already wraps this model"):
        it._patch_model(engine, None, False, "torch")
    assert routers_to_patch(engine.module) and not routers(engine.module)
    policy = _tiny()
    it._patch_model(policy, None, False, "torch")
    assert routers(policy) and not routers_to_patch(policy)


def test_engine_bound_model_pickles_and_copies(model_dir, tmp_path):
    """torch.save of the policy after use_r1kernels (its generate bound to the engine) failed on load
    ('no attribute _engine_generate'); the loaded model's and a deepcopy's generate run the engine on themselves."""
    import copy
    import inspect
    import io

    from transformers import GenerationConfig

    tr, _ = _trainer(model_dir, tmp_path)
    use_r1kernels(tr, backend="torch")
    buf = io.BytesIO()
    torch.save(tr.model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ids = torch.randint(3, 100, (2, 5))
    for m in (loaded, copy.deepcopy(tr.model)):
        assert m.generate.model is m
        assert list(inspect.signature(m.generate).parameters)[:3] == ["input_ids", "attention_mask",
                                                                       "generation_config"]
        for p, q in zip(m.parameters(), tr.model.parameters()):
            assert torch.equal(p, q)
        gc = GenerationConfig(max_new_tokens=3, do_sample=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="r1kernels: transformers' generate")  # the engine runs
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        want = type(tr.model).generate(tr.model, input_ids=ids, attention_mask=torch.ones_like(ids),
                                       generation_config=gc)
        assert torch.equal(out, want)


def test_bad_backend(model_dir, tmp_path):
    tr, _ = _trainer(model_dir, tmp_path)
    with pytest.raises(ValueError, match="backend"):
        use_r1kernels(tr, backend="fastest")


@pytest.fixture(scope="module")
def dsv3_dir(tmp_path_factory):
    return _save_tiny(tmp_path_factory, "tiny-deepseek-v3", 2)  # layer 1 is MoE


def test_deepseek_v3_routes_with_r1kernels(dsv3_dir, tmp_path):
    from r1kernels.patch.deepseek_v3 import R1KRouter

    cfg = dict(loss_type="dapo", max_steps=1, seed=_fresh_seed())
    base = _train(dsv3_dir, tmp_path / "trl", False, **cfg)
    tr, grads = _trainer(dsv3_dir, tmp_path / "r1k", **cfg)
    _replay(tr, base[2])
    use_r1kernels(tr)
    assert isinstance(tr.model.model.layers[1].mlp.gate, R1KRouter) and hasattr(tr.model, "_r1k_lm_head")
    tr.train()
    _assert_same_training(base, ([h for h in tr.state.log_history if "loss" in h], grads.grads, None))


@pytest.fixture
def direct_trainer(model_dir, tmp_path):
    """A patched trainer whose two _compute_loss (TRL's and r1kernels') are called directly on built
    micro-batches: edge cases without a training run each. One per test: conftest destroys the process group
    after each test, and a trainer whose accelerator set one up (when an earlier test left RANK / WORLD_SIZE in
    the environment) could not reduce its metrics after that."""
    tr, _ = _trainer(model_dir, tmp_path, beta=0.04)
    use_r1kernels(tr)
    tr.current_gradient_accumulation_steps = 2  # set by Trainer's training loop
    return tr


def _micro_batch(tr, B, T, masked_rows):
    """A micro-batch as TRL's _prepare_inputs gives one: random prompts and completions, the model's own
    log-probs plus noise as old / reference log-probs (0 where the completion is padding, as TRL's are)."""
    V = tr.model.config.vocab_size
    mask = (torch.rand(B, T) < 0.8).long()
    mask[:, 0] = 1
    mask[:masked_rows] = 0  # e.g. mask_truncated_completions
    inp = dict(prompt_ids=torch.randint(3, V, (B, 5)), prompt_mask=torch.ones(B, 5, dtype=torch.long),
               completion_ids=torch.randint(3, V, (B, T)), completion_mask=mask, advantages=torch.randn(B),
               num_items_in_batch=mask.sum() * 2)
    with torch.no_grad():
        logp, _, _ = tr._get_per_token_logps_and_entropies(
            tr.model, torch.cat([inp["prompt_ids"], inp["completion_ids"]], 1),
            torch.cat([inp["prompt_mask"], mask], 1), T)
    for k in ("old_per_token_logps", "ref_per_token_logps"):
        inp[k] = (logp + 0.3 * torch.randn_like(logp)) * mask
    inp["old_per_token_logps"] = _away_from_clip_bounds(tr, logp, inp["old_per_token_logps"], mask)
    return inp


def _away_from_clip_bounds(tr, logp, old, mask):
    """old moved (5e-3 at a time, completion tokens only) until no log-ratio logp - old (its masked row mean at
    importance_sampling_level 'sequence') lies within 1e-3 of a clip bound: the two implementations' ratios differ
    by float rounding only, so they clip the same tokens and the clip metrics compare exactly."""
    bounds = torch.tensor([math.log(1 - tr.epsilon_low), math.log(1 + tr.epsilon_high)])
    for _ in range(20):
        d = logp - old
        if tr.importance_sampling_level == "sequence":
            d = ((d * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(d)
        near = ((d[..., None] - bounds).abs() < 1e-3).any(-1) & (mask > 0)
        if not near.any():
            return old
        old = old - 5e-3 * near
    raise AssertionError("could not move the old log-probs off the clip bounds")


def _loss_grads_metrics(tr, compute_loss, inp):
    tr._metrics["train"].clear()
    tr.model.zero_grad()
    loss = compute_loss(tr.model, inp)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: list(v) for k, v in tr._metrics["train"].items()}


@pytest.mark.parametrize("B,T,masked_rows,level,loss_type", [
    (1, 7, 0, "token", "dapo"), (1, 7, 0, "token", "grpo"),  # the fused token kernel on one completion
    (4, 1, 1, "token", "dapo"), (4, 1, 1, "sequence", "grpo"),
    (4, 7, 2, "sequence", "grpo"),
], ids=["batch-of-one-dapo", "batch-of-one-grpo", "completions-of-one-token-dapo",
        "completions-of-one-token-sequence-grpo", "masked-rows-sequence-grpo"])
def test_compute_loss_edge_micro_batches(direct_trainer, B, T, masked_rows, level, loss_type):
    """r1kernels' _compute_loss vs TRL's on the same micro-batch: loss, gradients and every logged metric
    (a metric's value, and its presence). Completions of one token: TRL's metrics read [B, 1] tensors as one
    value per sequence, padded rows included."""
    tr = direct_trainer
    tr.loss_type, tr.importance_sampling_level = loss_type, level
    tr.model.train()
    inp = _micro_batch(tr, B, T, masked_rows)
    want = _loss_grads_metrics(tr, tr._r1k_trl_compute_loss, inp)
    got = _loss_grads_metrics(tr, tr._compute_loss, inp)
    assert_close(got[0], want[0].double(), name="loss")
    assert set(got[1]) == set(want[1])
    for n in want[1]:
        assert_close(got[1][n], want[1][n].double(), name=f"grad {n}")
    assert set(got[2]) == set(want[2])
    _assert_same_metrics(want[2], got[2])


def _assert_same_metrics(want, got):
    """Every logged metric equal within the tolerance table (the clip metrics too: _micro_batch keeps each ratio off
    the clip bounds); a metric NaN on both sides (e.g. clip_ratio/low_min over no clipped sequence) is equal."""
    for k in want:
        a, b = torch.tensor(want[k]), torch.tensor(got[k])
        if not (a.isnan().all() and b.isnan().all()):
            assert_close(b, a.double(), name=k)


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """A random tiny Gemma 2 (final_logit_softcapping=2.0; head logits of the cap's size, so that the cap changes
    the log-probs) and the character tokenizer, saved where TRL loads policy and reference from."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from r1train.tasks.tokenizer import char_tokenizer

    path = tmp_path_factory.mktemp("tiny-gemma2")
    tok = char_tokenizer()
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(15)  # tied to the embeddings: they scale too
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def test_gemma2_trains_through_the_fused_head_with_its_softcap(gemma2_dir, tmp_path):
    """use_r1kernels on a Gemma 2 policy (logits 2 * tanh(z / 2)): policy and reference get the fused head (no
    warning; Gemma 2 was refused: 'its forward soft-caps its logits') and the loss is r1kernels'. The fused
    log-probs (TRL's old / reference log-probs) equal log_softmax of each model's own logits / T (the cap matters:
    the uncapped head's differ); on one micro-batch the loss, gradients and metrics equal TRL's own code with TRL's
    own fused head (its final_logit_softcapping)."""
    tr, _ = _trainer(gemma2_dir, tmp_path, beta=0.04, temperature=0.8,
                     model_init_kwargs={"attn_implementation": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (rollout_engine='r1train' warns: r1train's engine does not serve Gemma 2)
        use_r1kernels(tr, rollout_engine="transformers")
    assert hasattr(tr, "_r1k_trl_compute_loss")
    assert all(getattr(m, "_r1k_lm_head", None) is not None for m in (tr.model, tr.ref_model))  # both patched
    ids = torch.randint(3, tr.model.config.vocab_size, (2, 9))
    labels = ids.masked_fill(torch.rand(2, 9) < 0.3, -100)
    keep = labels[:, 1:] != -100
    for m in (tr.model, tr.ref_model):
        out = m(input_ids=ids, labels=labels, fused_lm_head=True)
        with torch.no_grad():
            logits = m(input_ids=ids).logits[:, :-1].double() / 0.8
            z = m.lm_head(m.model(input_ids=ids).last_hidden_state)[:, :-1].double() / 0.8
        ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0] * keep
        assert_close(out.log_probs, ref, name="log_probs")
        uncapped = torch.log_softmax(z, -1).gather(-1, ids[:, 1:, None])[..., 0] * keep
        assert (uncapped - ref).abs().max() > 0.1
    tr.current_gradient_accumulation_steps = 2  # set by Trainer's training loop
    tr.model.train()
    inp = _micro_batch(tr, 3, 6, 0)
    with pytest.MonkeyPatch.context() as mp:  # TRL's own code throughout: its fused forward, under ours
        mp.setattr(tr.model, "forward", tr.model._r1k_lm_head["forward"].original_forward())
        want = _loss_grads_metrics(tr, tr._r1k_trl_compute_loss, inp)
    got = _loss_grads_metrics(tr, tr._compute_loss, inp)
    assert_close(got[0], want[0].double(), name="loss")
    assert set(got[1]) == set(want[1]) and set(got[2]) == set(want[2])
    for n in want[1]:
        assert_close(got[1][n], want[1][n].double(), name=f"grad {n}")
    _assert_same_metrics(want[2], got[2])


def _prompts(tok, n):
    """Left-padded prompt ids / mask of n prompts of different lengths (TRL's layout for generate)."""
    rows = [tok("".join(str(int(d)) for d in torch.randint(0, 10, (i + 1,))) + "*7=")["input_ids"] for i in range(n)]
    P = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (P - len(r)) + r for r in rows])
    return ids, (torch.arange(P)[None] >= torch.tensor([P - len(r) for r in rows])[:, None]).long()


def test_rollout_engine_greedy_equals_transformers_generate(model_dir, tmp_path):
    """rollout_engine='r1train': the policy's generate (TRL's rollout without vLLM) runs r1train's engine; greedy
    (do_sample=False) it returns what transformers' own generate returns for left-padded prompts of different
    lengths: the prompt then the completion, pad after a row's eos (eos set to a token the rows do emit)."""
    _greedy_equals_transformers(model_dir, tmp_path, dict(), "torch")


@pytest.mark.gpu
def test_rollout_engine_greedy_equals_transformers_generate_gpu(model_dir, tmp_path):
    """The same on the GPU (fp32 weights): the engine's kernels and captured decode steps inside TRL's trainer."""
    _greedy_equals_transformers(model_dir, tmp_path, dict(use_cpu=False), "auto")


def _greedy_equals_transformers(model_dir, tmp_path, cfg, backend):
    from transformers import GenerationConfig

    import r1train.generation as gen

    tr, _ = _trainer(model_dir, tmp_path, **cfg)
    use_r1kernels(tr, rollout_engine="r1train", backend=backend)
    model = tr.model
    with torch.no_grad():  # larger random weights: greedy rows that differ (the saved tiny model repeats a token)
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else None
    ids, mask = (t.to(model.device) for t in _prompts(model_dir[1], 5))
    with torch.no_grad():
        # an eos id no row can emit: eos_token_id=None would take the model's own eos (rows could stop there)
        free = type(model).generate(model, input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=model.config.vocab_size))
    new = free[:, ids.shape[1]:].tolist()

    def stops(t):  # each row's first position of t (len: never)
        return {r.index(t) if t in r else len(r) for r in new}
    eos = max({t for r in new for t in r}, key=lambda t: len(stops(t)))  # rows ending at the most different steps
    gc = GenerationConfig(do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=eos)
    calls = []
    real = gen.generate
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
        with torch.no_grad():
            got = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    with torch.no_grad():
        want = type(model).generate(model, input_ids=ids, attention_mask=mask, generation_config=gc)
    assert calls == [1]
    assert torch.equal(got, want)
    # eos ids that stop every row within 3 steps: transformers stops there, the engine's extra columns are cut
    gc.eos_token_id = sorted({r[2] for r in new})
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        want = type(model).generate(model, input_ids=ids, attention_mask=mask, generation_config=gc)
    assert got.shape[1] <= ids.shape[1] + 3 and torch.equal(got, want)
    # ids the call's config leaves unset are the model's own (its generation_config), as in transformers
    for unset in ("pad_token_id", "eos_token_id"):
        setattr(gc, unset, None)
        with torch.no_grad():
            got = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
            want = type(model).generate(model, input_ids=ids, attention_mask=mask, generation_config=gc)
        assert torch.equal(got, want), unset


def test_rollout_engine_samples_follow_torch_seed_and_layout(model_dir, tmp_path):
    """Sampling (TRL's generation_config, T = 1.3, top_k, top_p): the same torch seed gives the same rollout and
    another seed another one; each row starts with its prompt, holds eos at most once and pad only after it."""
    tr, _ = _trainer(model_dir, tmp_path, temperature=1.3, top_k=20, top_p=0.9, max_completion_length=12)
    use_r1kernels(tr, rollout_engine="r1train", backend="torch")
    ids, mask = _prompts(model_dir[1], 6)
    gc = tr.generation_config
    eos = set(gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id])

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return tr.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    s = _fresh_seed()
    a, b, c = run(s), run(s), run(s + 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :ids.shape[1]], ids) and a.shape[1] <= ids.shape[1] + 12
    for row in a[:, ids.shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), len(row))
        assert all(t == gc.pad_token_id for t in row[stop + 1:])


def test_rollout_engine_falls_back_for_what_it_does_not_implement(model_dir, tmp_path):
    """A repetition penalty (TRL's repetition_penalty) is not the engine's: one warning, then transformers'
    generate, the same tokens as calling it directly with the same torch seed."""
    tr, _ = _trainer(model_dir, tmp_path, repetition_penalty=1.3)
    use_r1kernels(tr, rollout_engine="r1train", backend="torch")
    ids, mask = _prompts(model_dir[1], 3)
    gc, s = tr.generation_config, _fresh_seed()
    torch.manual_seed(s)
    with pytest.warns(UserWarning, match="repetition_penalty=1.3"), torch.no_grad():
        got = tr.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    torch.manual_seed(s)
    with torch.no_grad():
        want = type(tr.model).generate(tr.model, input_ids=ids, attention_mask=mask, generation_config=gc)
    assert torch.equal(got, want)


@pytest.mark.parametrize("field, value", [("force_words_ids", [[5]]), ("constraints", ["c"]), ("use_mtp", True)])
def test_rollout_engine_falls_back_for_constraints_and_mtp(model_dir, tmp_path, field, value):
    """generation_kwargs the engine does not implement and that were missing from its list (the engine sampled
    without them, silently; transformers' generate, TRL's own path, refuses or runs them): a fallback naming the
    field. The same config without it takes the engine."""
    from transformers import GenerationConfig

    from r1kernels.integrations import trl as it

    tr, _ = _trainer(model_dir, tmp_path)
    use_r1kernels(tr, rollout_engine="r1train", backend="torch")
    ids, mask = _prompts(model_dir[1], 2)
    gc = GenerationConfig(do_sample=False, max_new_tokens=4, pad_token_id=0)
    kw = {"input_ids": ids, "attention_mask": mask}
    assert it._fallback_reason(tr.model, gc, kw) is None
    setattr(gc, field, value)  # set after construction: GenerationConfig's validation is transformers' business
    assert f"generation_config.{field}" in it._fallback_reason(tr.model, gc, kw)


def test_rollout_engine_takes_an_empty_eos_list_as_no_stop_token(model_dir, tmp_path):
    """generation_kwargs={"eos_token_id": []}: no stop token, as transformers' generate (it was a ValueError from
    eos_tuple naming eos_id, not generation_kwargs): the engine runs and equals transformers' greedy rows."""
    from transformers import GenerationConfig

    import r1train.generation as gen

    tr, _ = _trainer(model_dir, tmp_path)
    use_r1kernels(tr, rollout_engine="r1train", backend="torch")
    model = tr.model
    ids, mask = (t.to(model.device) for t in _prompts(model_dir[1], 3))
    gc = GenerationConfig(do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=[])
    calls = []
    real = gen.generate
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(gen, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    with torch.no_grad():
        want = type(model).generate(model, input_ids=ids, attention_mask=mask, generation_config=gc)
    assert calls == [1] and torch.equal(got, want) and got.shape[1] == ids.shape[1] + 6


def test_grpo_trainer_trains_with_the_engine_rollout(model_dir, tmp_path):
    """TRL's GRPOTrainer with use_r1kernels(rollout_engine='r1train'): every rollout goes through r1train's engine
    (no fallback warning), and the steps log a finite loss and completions within max_completion_length."""
    import r1train.generation as gen

    tr, _ = _trainer(model_dir, tmp_path, max_steps=2)
    calls = []
    real = gen.generate
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mp.setattr(gen, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
        use_r1kernels(tr, rollout_engine="r1train")
        tr.train()
    assert not [w for w in rec if "r1kernels" in str(w.message)]
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(calls) >= 1 and len(logs) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) and h["completions/max_length"] <= 6 for h in logs)


@pytest.mark.parametrize("mode", ["default", "transformers", "vllm", "continuous_batching"])
def test_rollout_engine_default_binding(model_dir, tmp_path, mode):
    """use_r1kernels(trainer) runs TRL's rollout on r1train's engine by default; rollout_engine='transformers' keeps
    transformers' generate; a trainer whose rollout is vLLM or continuous batching (TRL never calls the policy's
    generate there) is left as it is, without a warning."""
    tr, _ = _trainer(model_dir, tmp_path)
    if mode == "vllm":
        tr.use_vllm = True
    if mode == "continuous_batching":
        tr.use_transformers_continuous_batching = True
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        use_r1kernels(tr, **({"rollout_engine": "transformers"} if mode == "transformers" else {}))
    # (with use_vllm TRL's vLLM importance-sampling correction is on: its loss-code warning is not the engine's)
    assert not [w for w in rec if "rollout" in str(w.message) or "generate" in str(w.message)]
    assert ("generate" in vars(tr.model)) == (mode == "default")


def _bare_policy(config_cls, **cfg):
    """A random tiny causal LM with r1train's engine bound as TRL's rollout would have it (backend torch)."""
    from transformers import AutoModelForCausalLM

    from r1kernels.integrations import trl as it

    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                        bos_token_id=2, **cfg)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else None
    m.generate = types.MethodType(it._engine_generate, m)
    m._r1k_rollout_backend = "torch"
    return m


def _engine_vs_transformers(m, ids, gc):
    """(the bound generate's output, transformers' generate's, the fallback warnings)."""
    with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        want = type(m).generate(m, input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return got, want, [str(w.message) for w in rec if "r1kernels" in str(w.message)]


@pytest.mark.parametrize("window", ["passed", "within", "none"])
def test_rollout_engine_sliding_window(window):
    """A Mistral model's sliding window (every layer): prompt + max_new_tokens past it runs transformers' generate
    after one warning (the engine attended to every position and returned other tokens, silently); within it, or
    with no window, the engine's greedy tokens equal transformers'."""
    from transformers import GenerationConfig, MistralConfig

    P, T = int(torch.randint(6, 11, ())), int(torch.randint(6, 13, ()))
    # P + T - 1 positions are attended (the last sampled token is not fed back)
    w = {"passed": P + T - int(torch.randint(2, 6, ())), "within": P + T - 1, "none": None}[window]
    m = _bare_policy(MistralConfig, sliding_window=w)
    gc = GenerationConfig(max_new_tokens=T, do_sample=False, pad_token_id=0, eos_token_id=63)
    got, want, warned = _engine_vs_transformers(m, torch.randint(3, 64, (3, P)), gc)
    assert torch.equal(got, want)
    # one message, naming the window and the lengths window_passed compared (not a sum recomputed beside it)
    said = (f"r1kernels: transformers' generate runs this rollout (the model's {w}-token sliding window, which "
            f"prompt + max_new_tokens - 1 ({P} + {T} - 1) pass)")
    assert warned == ([said] if window == "passed" else [])
    assert _engine_vs_transformers(m, torch.randint(3, 64, (3, P)), gc)[2] == []  # once a model, not per call


@pytest.mark.parametrize("past", [True, False])
def test_rollout_engine_dynamic_rope(past):
    """Dynamic rope scaling rescales by each forward's longest row once past the original length, step by step in
    transformers' generate: a rollout reaching past it runs transformers' generate after one warning naming
    rope_scaling (TRL's own behaviour); within it the engine's greedy tokens equal transformers'."""
    from transformers import GenerationConfig, LlamaConfig

    P, T = int(torch.randint(6, 11, ())), int(torch.randint(6, 13, ()))
    m = _bare_policy(LlamaConfig, rope_parameters=dict(rope_type="dynamic", factor=4.0, rope_theta=10000.0,
                                                        original_max_position_embeddings=P + T - (2 if past else 1)))
    gc = GenerationConfig(max_new_tokens=T, do_sample=False, pad_token_id=0, eos_token_id=63)
    got, want, warned = _engine_vs_transformers(m, torch.randint(3, 64, (3, P)), gc)
    assert torch.equal(got, want)
    assert len(warned) == past and (not past or "rope_scaling rope_type='dynamic'" in warned[0])


def test_sliding_window_of_configs():
    """transformers' rules: Mistral's window applies to every layer when set; Qwen2's only with
    use_sliding_window (layer_types then names sliding layers); Llama has none."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from r1train.generation.engine import sliding_window

    w = int(torch.randint(8, 4096, ()))
    assert sliding_window(MistralConfig(sliding_window=w)) == w
    assert sliding_window(MistralConfig(sliding_window=None)) is None
    assert sliding_window(Qwen2Config(sliding_window=w)) is None
    assert sliding_window(Qwen2Config(use_sliding_window=True, sliding_window=w, max_window_layers=1,
                                      num_hidden_layers=2)) == w
    assert sliding_window(LlamaConfig()) is None


def test_rollout_engine_reads_the_models_generation_config():
    """transformers' generate takes every field the call's config leaves unset from the model's generation_config
    (suppress_tokens, no_repeat_ngram_size here): the engine does not implement them, so the call runs transformers'
    generate after one warning (the engine ignored them, silently); with none set the engine runs it."""
    from transformers import GenerationConfig, Qwen2Config

    m = _bare_policy(Qwen2Config)
    ids = torch.randint(3, 64, (3, 6))
    gc = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=[1])
    got, want, warned = _engine_vs_transformers(m, ids, gc)
    assert torch.equal(got, want) and warned == []
    m.generation_config.suppress_tokens = want[:, 6:].flatten().unique().tolist()[:3]
    m.generation_config.no_repeat_ngram_size = 2
    got2, want2, warned2 = _engine_vs_transformers(m, ids, gc)
    assert torch.equal(got2, want2) and not torch.equal(want2, want)
    assert len(warned2) == 1 and "generation_config.suppress_tokens" in warned2[0]


@pytest.mark.parametrize("case", ["fsdp", "quantized"])
def test_rollout_engine_not_bound_for_fsdp_or_quantized_models(model_dir, tmp_path, case):
    """FSDP (per-module gathers a captured decode step cannot follow) and quantized weights (4-bit / 8-bit layers
    the engine's fused projections would read as plain weights): one warning, transformers' generate kept."""
    tr, _ = _trainer(model_dir, tmp_path)
    if case == "fsdp":
        tr.is_fsdp_enabled = True
    else:
        tr.model.config.quantization_config = {"load_in_4bit": True}
    with pytest.warns(UserWarning, match="FSDP" if case == "fsdp" else "quantized"):
        use_r1kernels(tr)
    assert "generate" not in vars(tr.model)


@pytest.mark.parametrize("release", [False, True])
def test_rollout_release_memory(model_dir, tmp_path, release):
    """use_r1kernels(rollout_release_memory=True): after each rollout the engine holds no KV cache or buffers
    (r1train's key of that name); by default it keeps them for the next rollout. The tokens are the same."""
    from transformers import GenerationConfig

    from r1train.generation import engine_for

    tr, _ = _trainer(model_dir, tmp_path)
    use_r1kernels(tr, backend="torch", rollout_release_memory=release)
    ids, mask = _prompts(model_dir[1], 3)
    gc = GenerationConfig(do_sample=False, max_new_tokens=5, pad_token_id=0, eos_token_id=tr.model.config.vocab_size)
    with torch.no_grad():
        outs = [tr.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    eng = engine_for(tr.model, backend="torch", cuda_graphs=False)
    assert (eng.cache is None and eng.memory_bytes() == 0) == release


def test_bad_rollout_engine(model_dir, tmp_path):
    tr, _ = _trainer(model_dir, tmp_path)
    with pytest.raises(ValueError, match="rollout_engine"):
        use_r1kernels(tr, rollout_engine="vllm")
    with pytest.raises(ValueError, match="rollout_release_memory"):
        use_r1kernels(tr, rollout_release_memory="yes")


def test_rollout_engine_with_a_lora_policy(model_dir, tmp_path):
    """A PEFT LoRA policy (TRL's peft_config): its generate reaches the base model's, which runs r1train's engine
    through the LoRA layers (nonzero adapters here): greedy equals transformers' generate of the same PeftModel."""
    peft = pytest.importorskip("peft")
    from datasets import Dataset
    from transformers import GenerationConfig

    import r1train.generation as gen

    path, tok = model_dir
    tr = GRPOTrainer(model=path, reward_funcs=digit_share, processing_class=tok,
                     train_dataset=Dataset.from_list([{"prompt": "1*2="}] * 4),
                     args=GRPOConfig(output_dir=str(tmp_path / "lora"), per_device_train_batch_size=4,
                                     num_generations=4, max_completion_length=6, max_steps=1, report_to="none",
                                     use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True),
                     peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    use_r1kernels(tr, rollout_engine="r1train", backend="torch")
    with torch.no_grad():
        for n, p in tr.model.named_parameters():
            if "lora_" in n or p.dim() > 1:
                p.normal_(0, 0.5)  # adapters that change the output; rows that differ (see the greedy test)
    ids, mask = _prompts(tok, 4)
    gc = GenerationConfig(do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    calls = []
    real = gen.generate
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(gen, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = tr.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    base = tr.model.get_base_model()
    del base.generate  # transformers' own generate for the same PeftModel
    with torch.no_grad():
        want = tr.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    assert calls == [1] and torch.equal(got, want)


def test_rollout_engine_not_bound_where_trl_does_not_gather_zero3_parameters(model_dir, tmp_path, monkeypatch):
    """ZeRO-3 with ds3_gather_for_generation=False keeps the parameters sharded during generate (per-layer gathers
    the engine's captured steps cannot follow): one warning, and the policy keeps transformers' generate."""
    from r1kernels.integrations import trl as it

    tr, _ = _trainer(model_dir, tmp_path, ds3_gather_for_generation=False)
    monkeypatch.setattr(it, "_zero3", lambda: True)
    with pytest.warns(UserWarning, match="ds3_gather_for_generation=False"):
        use_r1kernels(tr, rollout_engine="r1train")
    assert "generate" not in vars(tr.model)


@pytest.mark.parametrize("where", ["attention_dropout", "lora_dropout"])
def test_rollout_engine_falls_back_for_dropout_in_training_mode(where):
    """TRL generates its rollout with the policy in training mode (Trainer.training_step calls model.train() before
    _prepare_inputs), so transformers' generate samples through the policy's dropout: an attention_dropout, or a
    LoRA adapter's lora_dropout (TRL's disable_dropout=False default; it zeroes nn.Dropout only). The engine runs
    the model in eval mode (no dropout, another distribution, silently): the call runs transformers' generate after
    one warning, the same tokens as calling it directly with the same torch seed; in eval mode the engine runs it."""
    from transformers import GenerationConfig, Qwen2Config

    from r1kernels.integrations import trl as it

    m = _bare_policy(Qwen2Config, attention_dropout=0.5 if where == "attention_dropout" else 0.0)
    policy = m
    if where == "lora_dropout":
        peft = pytest.importorskip("peft")
        del m.generate  # bound again below, on the base model the PeftModel's generate reaches (as _use_engine)
        policy = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                        target_modules="all-linear"))
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.5)  # adapters that change the output, so that their dropout does
        m.generate = types.MethodType(it._engine_generate, m)
    ids = torch.randint(3, 64, (4, 6))
    gc = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=[1])
    s = _fresh_seed()

    def run(transformers_generate):
        torch.manual_seed(s)
        with torch.no_grad(), warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if transformers_generate:
                with pytest.MonkeyPatch.context() as mp:
                    mp.delattr(m, "generate")
                    out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            else:
                out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        return out, [str(w.message) for w in rec if "r1kernels" in str(w.message)]

    policy.eval()
    eval_got, eval_warned = run(False)
    assert torch.equal(eval_got, run(True)[0]) and eval_warned == []  # no dropout in eval mode: the engine's
    policy.train()
    got, warned = run(False)
    want, _ = run(True)
    assert not torch.equal(want, eval_got)  # the dropout changes transformers' tokens here
    assert torch.equal(got, want)
    assert len(warned) == 1 and "dropout" in warned[0]


@pytest.mark.parametrize("prepatched", [False, True])
def test_a_reference_patch_that_raises_leaves_the_trainer_and_models_as_they_were(model_dir, tmp_path, monkeypatch,
                                                                                prepatched):
    """The policy is patched before the reference model: a reference patch that raises left the policy patched
    (the docstring promised the trainer as it was). Now the policy is unpatched again -- unless it was patched before
    the call (rk.patch by the user), which is left as it was -- and no loss or engine is bound."""
    import r1kernels as rk
    import r1kernels.integrations.trl as T
    from r1kernels.patch import is_patched

    tr, _ = _trainer(model_dir, tmp_path, beta=0.04)
    if prepatched:
        rk.patch(tr.model, backend="torch")
    before = tr.model.forward
    real = T._patch_model

    def failing(model, trainer, return_entropy, backend):
        if model is trainer.ref_model:
            raise RuntimeError("the reference model's patch")
        return real(model, trainer, return_entropy, backend)

    monkeypatch.setattr(T, "_patch_model", failing)
    with pytest.raises(RuntimeError, match="the reference model's patch"):
        use_r1kernels(tr, backend="torch")
    assert (getattr(tr.model, "_r1k_lm_head", None) is not None) == prepatched
    assert is_patched(tr.model) == prepatched and not is_patched(tr.ref_model)
    if not prepatched:
        assert tr.model.forward == before  # TRL's own fused-head forward, as the trainer set it
    assert "_compute_loss" not in vars(tr) and "generate" not in vars(tr.model)
    assert getattr(tr, "_r1k_options", None) is None
