"""LoRA through peft (use_peft): only the adapters train and the reward rises; the reference is the base
model with the adapters disabled (equal to an untouched copy of the base); checkpoints hold the adapter;
the rollout engine runs the adapted model; bad keys are errors naming them."""

import copy

import pytest
import torch
import train_helpers as H

pytest.importorskip("peft")

from r1train.config import ConfigError, load_config  # noqa: E402
from r1train.loading import load_model_and_tokenizer  # noqa: E402
from r1train.rollout import Policy, sequence_logprobs  # noqa: E402


def test_lora_grpo_trains_adapters_only_and_reward_rises(tmp_path):
    """Adapters on every attention/MLP linear layer plus a trained copy of lm_head (lora_modules_to_save):
    the base weights never move."""
    t = H.grpo_trainer(tmp_path, "use_peft=true", "lora_modules_to_save=lm_head", "max_steps=14",
                       "num_generations=8", "per_device_train_batch_size=32", "learning_rate=0.01", "seed=3",
                       reward_funcs=[H.digit_share])
    peft_model = t.engine.module.model
    trained = lambda n: "lora_" in n or "modules_to_save" in n  # noqa: E731
    base0 = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not trained(n)}
    lora0 = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    assert lora0 and all(p.requires_grad == trained(n) for n, p in peft_model.named_parameters())
    hist = t.train()
    r = [h["reward"] for h in hist]
    assert sum(r[-3:]) / 3 > sum(r[:3]) / 3 + 0.15, r
    now = dict(peft_model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in base0.items())
    assert all(not torch.equal(now[n], v) for n, v in lora0.items() if "lora_B" in n)
    t.finish()
    ck = tmp_path / "checkpoint-14"
    assert (ck / "adapter_config.json").exists() and (ck / "adapter_model.safetensors").exists()


def test_reference_is_the_base_with_adapters_disabled(tmp_path):
    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}"])
    base, _ = load_model_and_tokenizer(cfg)
    base = copy.deepcopy(base).eval()
    t = H.grpo_trainer(tmp_path / "run", "use_peft=true", "beta=0.04", "max_steps=2", "learning_rate=0.05",
                       reward_funcs=[H.digit_share])
    assert t.ref is None  # no second copy of the model
    t.train()  # the adapters move away from zero
    rows, _ = t.rows_for(0)
    ro = t.make_batch(0, rows)[0]
    args = (ro.input_ids, torch.cat([ro.prompt_mask_BP, ro.completion_mask_BT], 1), ro.completion_ids_BT)
    got = sequence_logprobs(t.ref_policy(), *args, backend="torch")
    with torch.no_grad():
        want = sequence_logprobs(Policy(base), *args, backend="torch")
        adapted = sequence_logprobs(t.engine, *args, backend="torch")
    m = ro.completion_mask_BT.bool()
    torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)
    assert (adapted[m] - want[m]).abs().max() > 1e-4  # the policy itself is not the base


@pytest.mark.parametrize("ov,key", [(["lora_r=0"], "lora_r"), (["lora_dropout=1.0"], "lora_dropout"),
                                    (["lora_target_modules=q_proj,lm_head", "loss_impl=linear"], "lora_target_modules"),
                                    (["sync_ref_model=true", "beta=0.1"], "sync_ref_model")])
def test_bad_lora_keys(ov, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=["use_peft=true", *ov])


@pytest.mark.parametrize("rslora", [False, True])
def test_use_rslora_scales_by_the_root_of_the_rank(rslora):
    """use_rslora (TRL's / peft's key; it was an unknown-key error): each adapter's output is scaled by
    alpha / sqrt(r), else alpha / r, checked on the adapted layer's output against its base and its A, B."""
    from r1train.loading import apply_lora

    cfg = load_config(overrides=H.FAST + ["use_peft=true", "lora_r=4", "lora_alpha=8", "lora_dropout=0.0",
                                          "lora_target_modules=q_proj", f"use_rslora={str(rslora).lower()}"])
    model, _ = load_model_and_tokenizer(cfg)
    adapted = apply_lora(model, cfg).eval()
    layer = next(m for n, m in adapted.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A"))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
        x = torch.randn(5, layer.in_features)
        delta = layer(x) - layer.get_base_layer()(x)
        low_rank = x @ layer.lora_A["default"].weight.t() @ layer.lora_B["default"].weight.t()
        torch.testing.assert_close(delta, low_rank * (8 / 4 ** 0.5 if rslora else 8 / 4), rtol=1e-4, atol=1e-5)


def test_lora_sft_loss_falls(tmp_path):
    from r1train.loading import load_datasets
    from r1train.sft import SFTTrainer

    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path}", "max_steps=25", "learning_rate=0.01",
                                          "model_hidden_size=64", "per_device_train_batch_size=16",
                                          "use_peft=true", "lora_modules_to_save=lm_head"])
    model, tok = load_model_and_tokenizer(cfg)
    train, ev = load_datasets(cfg, sft=True)
    t = SFTTrainer(cfg, model, tok, train, ev)
    hist = t.train()
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"], [h["loss"] for h in hist]
    assert type(t.engine.module.model).__name__.startswith("Peft")


def test_merge_equals_the_adapted_model(tmp_path):
    """`r1train merge`: base + adapter (with a trained lm_head copy) -> a plain model whose logits equal the
    adapted model's."""
    from transformers import AutoModelForCausalLM

    t = H.grpo_trainer(tmp_path / "run", "use_peft=true", "lora_modules_to_save=lm_head", "max_steps=3",
                       "learning_rate=0.05", reward_funcs=[H.digit_share])
    t.train()
    t.finish()
    adapted = t.engine.module.model.eval()
    r = H.run_cli(["merge", *H.FAST, f"adapter_path={tmp_path / 'run' / 'checkpoint-3'}",
                   f"output_dir={tmp_path / 'merged'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(3, 40, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4,
                                   atol=1e-4)
    r = H.run_cli(["merge", *H.FAST, f"adapter_path={tmp_path}", f"output_dir={tmp_path / 'x'}"])
    assert r.returncode != 0 and "adapter_path" in r.stderr
    # an adapter of another base (another hidden size): one error naming the key, not peft's traceback
    r = H.run_cli(["merge", *H.FAST, "model_hidden_size=48", f"adapter_path={tmp_path / 'run' / 'checkpoint-3'}",
                   f"output_dir={tmp_path / 'y'}"])
    assert r.returncode == 2 and "model_hidden_size=48" in r.stderr and "pass model_hidden_size=32" in r.stderr, \
        r.stderr[-2000:]
    # the adapter files alone (no trainer_state.json to read the base from): peft's size mismatch, named
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in (tmp_path / "run" / "checkpoint-3").glob("adapter_*"):
        shutil.copy(f, bare / f.name)
    r = H.run_cli(["merge", *H.FAST, "model_hidden_size=48", f"adapter_path={bare}", f"output_dir={tmp_path / 'z'}"])
    assert r.returncode == 2 and "does not fit model_name_or_path" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("targets", ["embed_tokens,q_proj", "q_proj,lm_head", "q_proj,v_proj"])
def test_merge_with_tied_embeddings_equals_the_adapted_model(tmp_path, targets):
    """The tiny model ties embed_tokens and lm_head (as Qwen2.5-0.5B / 1.5B do): an adapter on either one merged
    into the shared weight also moved the other (logits ~3 off the adapted model's); saved and reloaded, the
    merged model equals the adapted one. Adapters on other modules keep the tie."""
    from transformers import AutoModelForCausalLM

    from r1train.loading import apply_lora, merge_adapters

    cfg = load_config(overrides=H.FAST + ["use_peft=true", f"lora_target_modules={targets}", "lora_dropout=0.0"])
    model, _ = load_model_and_tokenizer(cfg)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    adapted = apply_lora(model, cfg).eval()
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)  # a trained adapter (lora_B starts at 0)
        ids = torch.randint(3, 40, (3, 11))
        want = adapted(input_ids=ids).logits
        merge_adapters(adapted).save_pretrained(tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    tied = merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    assert tied == ("embed_tokens" not in targets and "lm_head" not in targets)


def test_recipe_hands_on_a_merged_model(tmp_path):
    """The R1 recipe with use_peft: a stage's adapters are merged into the model it hands to the next stage
    (logits equal the adapted model's), whose own LoRA then trains new adapters on it; under ZeRO-3 (the
    checkpoint would hold only the adapter) the recipe refuses use_peft before any stage runs."""
    from r1train import pipeline

    ov = H.FAST + [f"output_dir={tmp_path}", "use_peft=true", "lora_modules_to_save=lm_head", "max_steps=2",
                   "learning_rate=0.05", "lora_dropout=0.0"]
    c1 = pipeline.stage_cfg(load_config(overrides=ov, section="sft"), "1")
    c2 = pipeline.stage_cfg(load_config(overrides=ov, section="grpo"), "2")
    model, tok = load_model_and_tokenizer(c1)
    t, _ = pipeline.run_sft(c1, model, tok, evaluate=False)
    adapted = t.engine.module.model.eval()
    ids = torch.randint(3, 40, (3, 11))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
    handed = pipeline._handoff(t, c1, c2)
    assert not type(handed).__name__.startswith("Peft")
    with torch.no_grad():
        torch.testing.assert_close(handed.eval()(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    t2, _, _ = pipeline.run_grpo(c2, handed, tok)
    names = [n for n, p in t2.engine.module.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    assert not any("base_model.model.base_model.model" in n for n in names)  # one level of adapters
    y = tmp_path / "r.yaml"
    y.write_text("use_peft: true\nzero_stage: 3\n")
    with pytest.raises(ConfigError, match="use_peft with zero_stage=3"):
        pipeline.recipe(str(y), H.FAST + [f"output_dir={tmp_path / 'z3'}"])


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
def test_generate_with_an_adapter_on_the_embedding(engine):
    """peft's LoRA embedding wraps nn.Embedding (no num_embeddings of its own): generate()'s prompt-id check reads
    the wrapped layer's size, and samples the same tokens as the adapter-free model (a fresh adapter adds 0)."""
    from r1train.generation import SamplingParams, generate
    from r1train.loading import apply_lora

    cfg = load_config(overrides=[*H.FAST, "use_peft=true", "lora_target_modules=embed_tokens,q_proj"])
    model, tok = load_model_and_tokenizer(cfg)
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    kw = dict(eos_id=-1, pad_id=0, engine=engine)
    want, _ = generate(model, ids, mask, [0, 1], SamplingParams(3, greedy=True), **kw)
    got, _ = generate(apply_lora(model, cfg), ids, mask, [0, 1], SamplingParams(3, greedy=True), **kw)
    assert torch.equal(got, want)


def test_all_linear_as_a_one_item_list():
    """lora_target_modules=all-linear (a one-item list, as TRL's ModelConfig reads it and then unwraps) adapts
    the same modules as leaving it unset (peft failed: no module named 'all-linear'); a one-item module name
    stays a suffix match (q_proj: every layer's q_proj)."""
    from r1train.loading import apply_lora

    def adapted(*extra):
        cfg = load_config(overrides=[*H.FAST, "use_peft=true", *extra])
        model, _ = load_model_and_tokenizer(cfg)
        return sorted(n for n, _ in apply_lora(model, cfg).named_modules() if n.endswith(".lora_A"))

    every = adapted()
    assert every == adapted("lora_target_modules=all-linear") and len(every) > 1
    q = adapted("lora_target_modules=q_proj")
    assert q and all(n.endswith("q_proj.lora_A") for n in q) and set(q) < set(every)


def test_lora_on_a_moe_model_keeps_its_router_balancing(tmp_path):
    """On transformers 5 peft maps all-linear to the v4 names, the MoE router ("gate") among them, and wrapped
    DeepSeek-V3's router weight: the aux-loss-free balancing then found no router (no bias update, no moe/*
    metrics), silently. Now the router keeps no adapter (every other module and expert weight still gets one),
    its bias moves after a step and the load is logged; an explicit target on the router is an error."""
    from r1train.loading import apply_lora

    ov = ["model_name_or_path=tiny-deepseek-v3", "model_num_layers=2", "lora_dropout=0.0"]
    t = H.grpo_trainer(tmp_path, "use_peft=true", "max_steps=1", "moe_bias_update_rate=0.01", *ov,
                       reward_funcs=[H.digit_share])
    names = [n for n, _ in t.engine.module.model.named_parameters() if "lora_" in n]
    assert any("experts" in n for n in names) and not any(n.split(".lora_")[0].endswith("mlp.gate") for n in names)
    assert t.expert_load.routers
    bias0 = [r.e_score_correction_bias.clone() for r in t.expert_load.routers]
    m = t.train()[-1]
    assert "moe/max_load_ratio" in m
    assert any(not torch.equal(r.e_score_correction_bias, b) for r, b in zip(t.expert_load.routers, bias0))
    t.finish()
    cfg = load_config(overrides=[*H.FAST, *ov, "use_peft=true", "lora_target_modules=[q_proj,gate]"])
    model, _ = load_model_and_tokenizer(cfg)
    with pytest.raises(ConfigError, match="MoE router"):
        apply_lora(model, cfg)


def test_merge_onto_a_tiny_base_built_with_other_values_is_an_error(tmp_path):
    """A built-in tiny model's weights come from its name, seed and sizes: merging an adapter trained on one
    built with seed=7 into the default seed's gave another model silently (logits 0.6 off). An error naming the
    key and the value the adapter was trained with; with that value the merge runs."""
    t = H.grpo_trainer(tmp_path / "run", "use_peft=true", "max_steps=1", "seed=7", reward_funcs=[H.digit_share])
    t.train()
    t.finish()
    ckpt = tmp_path / "run" / "checkpoint-1"
    r = H.run_cli(["merge", *H.FAST, f"adapter_path={ckpt}", f"output_dir={tmp_path / 'm0'}"])
    assert r.returncode == 2 and "seed=42" in r.stderr and "pass seed=7" in r.stderr, r.stderr[-2000:]
    r = H.run_cli(["merge", *H.FAST, "seed=7", f"adapter_path={ckpt}", f"output_dir={tmp_path / 'm7'}"])
    assert r.returncode == 0, r.stderr[-2000:]
