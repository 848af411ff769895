"""Optimizer memory: `optim=adamw_torch_8bit` (torchao's AdamW8bit under DeepSpeed's fp32 master weights)
trains like fp32 AdamW with 8-bit moments, resumes exactly, and quantizes a flat ZeRO partition whose
length is not a multiple of the block size; the pure-bf16 DeepSpeed config (TRL's bf16 layout) runs; with
beta = 0 there is no reference model."""

import pytest
import torch
import train_helpers as H

from r1train.config import ConfigError, load_config
from r1train.optim import state_bytes

SFT = H.FAST + ["model_hidden_size=64", "per_device_train_batch_size=16", "learning_rate=0.003", "bf16=true",
                "zero_stage=2", "max_steps=12"]


def _sft(tmp_path, *ov):
    from r1train.loading import load_datasets, load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    cfg = load_config(overrides=SFT + [f"output_dir={tmp_path}", *ov])
    model, tok = load_model_and_tokenizer(cfg)
    train, ev = load_datasets(cfg, sft=True)
    return SFTTrainer(cfg, model, tok, train, ev)


def test_adamw_8bit_keeps_fp32_master_and_tracks_fp32_adamw(tmp_path):
    """Same SFT run (bf16 weights, ZeRO-2) with torch AdamW and with AdamW8bit: the 8-bit moments take
    ~2 bytes per parameter instead of 8, the master partition stays fp32, and the losses agree within 1%
    (measured max 0.2% over 12 steps at lr 3e-3)."""
    pytest.importorskip("torchao")
    runs = {}
    for optim in ("adamw_torch", "adamw_torch_8bit"):
        t = _sft(tmp_path / optim, f"optim={optim}")
        runs[optim] = [h["loss"] for h in t.train()]
        zo, opt = t.engine.optimizer, t.engine.optimizer.optimizer
        assert all(p.dtype == torch.float32 for p in zo.single_partition_of_fp32_groups)  # fp32 master
        n = sum(p.numel() for g in opt.param_groups for p in g["params"])
        per_param = state_bytes(opt) / n
        if optim == "adamw_torch":
            assert per_param == 8.0
        else:
            st = next(iter(opt.state.values()))
            assert type(st["exp_avg"]).__name__ == "OptimState8bit"
            assert per_param < 2.3, per_param  # 2 x (1 byte + 4/256 scale) + the fp32 tail
    a, b = runs["adamw_torch"], runs["adamw_torch_8bit"]
    assert b[-1] < 0.8 * b[0], b
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.01, (a, b)


def test_adamw_8bit_head_and_tail():
    """A length that is not a multiple of the block: the head is quantized, the tail (37 values) keeps fp32
    moments and steps exactly like torch AdamW; the head stays close to it."""
    pytest.importorskip("torchao")
    from r1train.optim import adamw_8bit_class

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4096 + 37, generator=g)
    grads = [torch.randn(w0.shape, generator=g) for _ in range(5)]
    p8, pt = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    o8 = adamw_8bit_class()([p8], lr=1e-2, weight_decay=0.01)
    ot = torch.optim.AdamW([pt], lr=1e-2, weight_decay=0.01)
    for gr in grads:
        for p, o in ((p8, o8), (pt, ot)):
            p.grad = gr.clone()
            o.step()
    st = o8.state[p8]
    assert st["exp_avg"].shape == (4096,) and st["exp_avg_tail"].shape == (37,)
    torch.testing.assert_close(p8.data[4096:], pt.data[4096:], rtol=1e-5, atol=1e-6)
    move8, movet = p8.data[:4096] - w0[:4096], pt.data[:4096] - w0[:4096]
    assert ((move8 - movet).norm() / movet.norm()).item() < 0.05


@pytest.mark.parametrize("n", [4096 * 3 + 37, 4096 * 2])
def test_adamw_8bit_chunks_equal_one_call(n):
    """The update over chunks (chunk_elements, a block multiple; here 1536 and 4096 values) is bit-identical to
    one call over the whole quantized head: same parameters and same 8-bit moment codes and scales."""
    pytest.importorskip("torchao")
    from r1train.optim import adamw_8bit_class

    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(n, generator=g)
    grads = [torch.randn(n, generator=g) for _ in range(3)]
    cls = adamw_8bit_class()
    runs = []
    for chunk in (2 ** 30, 1536, 4096, 1000):  # 1000 rounds down to 768: whole blocks only
        p = torch.nn.Parameter(w0.clone())
        o = cls([p], lr=1e-2, weight_decay=0.01)
        o.chunk_elements = chunk
        for gr in grads:
            p.grad = gr.clone()
            o.step()
        runs.append((p.detach(), o.state[p]))
    p1, st1 = runs[0]
    for p, st in runs[1:]:
        assert torch.equal(p, p1)
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k].codes, st1[k].codes) and torch.equal(st[k].scale, st1[k].scale)


def test_adamw_8bit_resume_is_exact(tmp_path):
    pytest.importorskip("torchao")
    full = [h["loss"] for h in _sft(tmp_path / "a", "optim=adamw_torch_8bit", "max_steps=4").train()]
    t = _sft(tmp_path / "b", "optim=adamw_torch_8bit", "max_steps=2")
    t.train()
    t.finish()
    t2 = _sft(tmp_path / "b", "optim=adamw_torch_8bit", "max_steps=4",
              f"resume_from_checkpoint={tmp_path / 'b' / 'checkpoint-2'}")
    assert type(next(iter(t2.engine.optimizer.optimizer.state.values()))["exp_avg"]).__name__ == "OptimState8bit"
    assert [h["loss"] for h in t2.train()] == full[2:]


def test_resume_with_another_optim_is_an_error(tmp_path):
    t = _sft(tmp_path, "max_steps=1", "bf16=false")
    t.train()
    t.finish()
    with pytest.raises(ConfigError, match="optim"):
        _sft(tmp_path, "max_steps=2", "bf16=false", "optim=adamw_torch_8bit",
             f"resume_from_checkpoint={tmp_path / 'checkpoint-1'}")


def test_pure_bf16_deepspeed_config_runs(tmp_path):
    """r1train/configs/ds_zero2_bf16.json: DeepSpeed's bf16 master weights, gradients and optimizer states
    (TRL's bf16 AdamW layout, for equal-settings comparisons): 4 bytes of state per parameter, no fp32."""
    import os

    from r1train.config import CONFIG_DIR

    t = _sft(tmp_path, "max_steps=3", f"deepspeed={os.path.join(CONFIG_DIR, 'ds_zero2_bf16.json')}")
    hist = t.train()
    zo, opt = t.engine.optimizer, t.engine.optimizer.optimizer
    assert all(p.dtype == torch.bfloat16 for p in zo.single_partition_of_fp32_groups)
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert state_bytes(opt) / n == 4.0 and all(h["loss"] == h["loss"] for h in hist)


def test_pure_bf16_config_with_a_reference_model(tmp_path):
    """GRPO with beta > 0 on the pure-bf16 config: the reference engine (stage 0, no optimizer) drops the
    optimizer-side bf16 keys, which DeepSpeed rejects at stage 0 (the H200 memory bench failed on this)."""
    import os

    from r1train.config import CONFIG_DIR
    from r1train.engine import reference_config

    path = os.path.join(CONFIG_DIR, "ds_zero2_bf16.json")
    t = H.grpo_trainer(tmp_path, "beta=0.04", "max_steps=1", "bf16=true", f"deepspeed={path}",
                       reward_funcs=[H.digit_share])
    assert t.ref is not None and len(t.train()) == 1
    rc = reference_config({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}, "gradient_clipping": 1.0,
                           "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                 "offload_param": {"device": "cpu"}}})
    assert rc == {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}


def test_bf16_params_config_steps_the_bf16_weights(tmp_path):
    """r1train/configs/ds_zero0_bf16.json with bf16=true: DeepSpeed's mixed precision off, so the torch
    optimizer steps the bf16 parameters themselves (TRL's layout without DeepSpeed: no master copy, bf16
    gradients and moments, 4 bytes of state per parameter); the loss falls; GRPO with a reference model runs."""
    import os

    from r1train.config import CONFIG_DIR

    path = os.path.join(CONFIG_DIR, "ds_zero0_bf16.json")
    t = _sft(tmp_path / "sft", "max_steps=6", "zero_stage=0", f"deepspeed={path}")
    hist = t.train()
    opt = t.engine.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    assert isinstance(opt, torch.optim.Optimizer) and params
    assert {p.data_ptr() for p in params} == {p.data_ptr() for p in t.engine.module.parameters()}  # no copy
    assert all(p.dtype == torch.bfloat16 and (p.grad is None or p.grad.dtype == torch.bfloat16) for p in params)
    assert {v.dtype for st in opt.state.values() for v in st.values() if v.dim()} == {torch.bfloat16}
    assert state_bytes(opt) / sum(p.numel() for p in params) == 4.0
    assert hist[-1]["loss"] < hist[0]["loss"], [h["loss"] for h in hist]
    g = H.grpo_trainer(tmp_path / "grpo", "beta=0.04", "max_steps=1", "bf16=true", "zero_stage=0", f"deepspeed={path}",
                       reward_funcs=[H.digit_share])
    assert g.ref is not None and len(g.train()) == 1


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_reference_model_only_with_beta(tmp_path, beta):
    t = H.grpo_trainer(tmp_path, f"beta={beta}", "max_steps=1", reward_funcs=[H.digit_share])
    assert (t.ref is None) == (beta == 0) and (t.ref_policy() is None) == (beta == 0)
    assert len(t.train()) == 1


def test_rollout_release_memory_frees_the_engine_and_changes_no_sample(tmp_path):
    """rollout_release_memory=true: after each rollout the engine holds nothing (the next one allocates
    again), and the run's samples, rewards and losses equal the run that keeps the engine's buffers."""
    from r1train.generation.engine import _ENGINES

    hist, held = {}, {}
    for flag in ("false", "true"):
        t = H.grpo_trainer(tmp_path / flag, "max_steps=2", f"rollout_release_memory={flag}",
                           reward_funcs=[H.digit_share])
        hist[flag] = t.train()
        held[flag] = _ENGINES[t.model].memory_bytes()
    assert held["true"] == 0 < held["false"]
    for a, b in zip(hist["false"], hist["true"]):
        for k in ("loss", "reward", "completions/mean_length"):
            assert a[k] == b[k], k


def test_bad_optim_is_an_error():
    with pytest.raises(ConfigError, match="optim"):
        load_config(overrides=["optim=adamw_bnb_8bit"])


def test_adamw_fused_is_the_default_and_equals_foreach(tmp_path):
    """`optim` defaults to transformers' adamw_torch_fused; the fused kernel and the multi-tensor path give the
    same parameters on fresh random inputs (fp32 rounding), at several sizes and hyper-parameters."""
    from r1train.optim import make_optimizer

    cfg = load_config(overrides=SFT + [f"output_dir={tmp_path}"])
    assert cfg.optim == "adamw_torch_fused"
    for n, wd in ((7, 0.0), (1000, 0.1), (4099, 0.01)):
        c = load_config(overrides=SFT + [f"output_dir={tmp_path}", f"weight_decay={wd}"])
        ps = {o: torch.nn.Parameter(torch.randn(n, dtype=torch.float64).float()) for o in ("fused", "foreach")}
        ps["foreach"].data.copy_(ps["fused"].data)
        start = ps["fused"].detach().clone()
        opts = {"fused": make_optimizer(c, [ps["fused"]]),
                "foreach": make_optimizer(load_config(overrides=SFT + [f"output_dir={tmp_path}", "optim=adamw_torch",
                                                                      f"weight_decay={wd}"]), [ps["foreach"]])}
        assert opts["fused"].defaults["fused"] and not opts["foreach"].defaults["fused"]
        p64, m, v = start.double(), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        b1, b2, lr = c.adam_beta1, c.adam_beta2, c.learning_rate
        for t in range(1, 6):
            g = torch.randn(n)
            for o, p in ps.items():
                p.grad = g.clone()
                opts[o].step()
            # AdamW in float64 (decoupled weight decay, bias-corrected moments): an independent computation
            m, v = b1 * m + (1 - b1) * g.double(), b2 * v + (1 - b2) * g.double() ** 2
            p64 = p64 * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + c.adam_epsilon)
        torch.testing.assert_close(ps["fused"], ps["foreach"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ps["fused"].double(), p64, rtol=1e-5, atol=1e-6)
        assert not torch.equal(ps["fused"].detach(), start)  # the steps were taken (5 steps of ~lr each)
    with pytest.raises(ConfigError, match="optim"):
        load_config(overrides=SFT + [f"output_dir={tmp_path}", "optim=adamw_torch_fuse"])


def test_zero0_single_process_skips_the_gradient_all_reduce(tmp_path, monkeypatch):
    """ZeRO-0 in one process sets enable_backward_allreduce off (DeepSpeed's all-reduce over a world of one
    only makes flat transient copies); the trained weights are bitwise those of a run that keeps it on."""
    import os

    import deepspeed

    from r1train.config import CONFIG_DIR

    path = os.path.join(CONFIG_DIR, "ds_zero0_bf16.json")
    calls = []
    orig = deepspeed.DeepSpeedEngine.allreduce_gradients
    monkeypatch.setattr(deepspeed.DeepSpeedEngine, "allreduce_gradients",
                        lambda self, *a, **k: (calls.append(1), orig(self, *a, **k))[1])
    runs = {}
    for keep in (False, True):
        t = _sft(tmp_path / str(keep), "max_steps=3", "zero_stage=0", f"deepspeed={path}")
        assert t.engine.enable_backward_allreduce is False
        t.engine.enable_backward_allreduce = keep
        calls.clear()
        t.train()
        assert bool(calls) == keep
        runs[keep] = [p.detach().clone() for p in t.engine.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(runs[False], runs[True], strict=True))
    z2 = _sft(tmp_path / "z2", "max_steps=1")  # ZeRO-2 keeps its reduce path (it fills the partitions)
    assert z2.engine.enable_backward_allreduce is True


def test_weight_decay_skips_biases_and_norms_as_transformers(tmp_path):
    """weight_decay (a TrainingArguments key) decayed every parameter, the RMSNorm weights and attention biases
    too; transformers' Trainer (TRL's) puts those in a group without decay (get_decay_parameter_names). Under
    ZeRO-2 the two groups train."""
    import math

    from transformers import Trainer

    from r1train.loading import load_datasets, load_model_and_tokenizer
    from r1train.sft import SFTTrainer

    cfg = load_config(overrides=H.FAST + [f"output_dir={tmp_path / 'z0'}", "weight_decay=0.1", "max_steps=1"])
    model, tok = load_model_and_tokenizer(cfg)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    names = {id(p): n for n, p in model.named_parameters()}
    assert 0 < len(decay) < len(names)  # tiny-qwen2 has q/k/v biases and RMSNorm weights
    train, ev = load_datasets(cfg, sft=True)
    t = SFTTrainer(cfg, model, tok, train, ev)
    got = {names[id(p)]: g["weight_decay"] for g in t.engine.basic_optimizer.param_groups for p in g["params"]}
    assert got == {n: 0.1 if n in decay else 0.0 for n in names.values()}
    # weight_decay 0: one group, as before (the same update and checkpoint layout)
    t2 = _sft(tmp_path / "z2", "weight_decay=0.0", "max_steps=1")
    assert len(t2.engine.basic_optimizer.param_groups) == 1
    t3 = _sft(tmp_path / "z2wd", "weight_decay=0.1", "max_steps=2")
    assert len(t3.engine.basic_optimizer.param_groups) == 2
    assert all(math.isfinite(h["loss"]) for h in t3.train())
