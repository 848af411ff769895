"""MoE router replay (r1train.moe_replay) on tiny DeepseekV3 models: the replayed training forward equals a
forward whose router top-k is forced to the same ids by monkeypatching torch.topk (logits and gradients,
the router weight's included); the generation engine records the ids a no-cache full forward of the
generated sequence routes to; the agreement metric by hand; bad ids rejected naming `ids`."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close
from test_generation import _model, _prompts
from test_patch_deepseek_v3 import _tiny, checkpointing_on

from r1kernels.patch import deepseek_v3 as dsv3
from r1train import moe_replay
from r1train.config import ConfigError
from r1train.generation import Engine, SamplingParams, generate
from r1train.moe_load import ExpertLoad

pytest.importorskip("transformers")

E, K, M = 16, 4, 2  # _tiny(): 16 experts, top-4, layers 1 and 2 are MoE


def _random_ids(B, L, unrecorded=0.0):
    """Distinct random experts per (token, layer); a share of the tokens -1 (route normally)."""
    ids = torch.rand(B, L, M, E).argsort(-1)[..., :K]
    off = torch.rand(B, L) < unrecorded
    return ids.masked_fill(off[..., None, None], -1)


def _natural_ids(model, x):
    """The routers' own choices [B, L, M, K] in a no-grad forward (a hook on each router)."""
    got = []
    hs = [r.register_forward_hook(lambda m, a, o: got.append(o[2].detach())) for r in moe_replay.moe_routers(model)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    B, L = x.shape
    return torch.stack(got, 1).view(B, L, len(got), -1)


def _forced_topk(monkeypatch, ids_BLMK):
    """torch.topk forced for the HF router's expert choice (its only topk over the E experts): the layer's
    given ids where recorded, the real top-k where -1. Calls cycle over the MoE layers in forward order."""
    real = torch.topk
    calls = []

    def fake(x, k, dim=-1, largest=True, sorted=True):
        if x.dim() != 2 or x.shape[-1] != E or k != K:
            return real(x, k, dim=dim, largest=largest, sorted=sorted)
        j = len(calls) % M
        calls.append(j)
        nat = real(x, k, dim=dim, largest=largest, sorted=sorted)[1]
        want = ids_BLMK[:, :, j].reshape(-1, K)
        idx = torch.where((want >= 0).all(-1, keepdim=True), want, nat)
        return x.gather(1, idx), idx

    monkeypatch.setattr(torch, "topk", fake)
    return calls


def _loss_and_grads(model, x):
    model.zero_grad()
    out = model(x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["hf", "patched", "router_only"])
@pytest.mark.parametrize("unrecorded", [0.0, 0.3])
def test_replay_equals_forced_topk(monkeypatch, variant, unrecorded):
    """Replay on the HF routers, on rk.patch's router+experts (torch backend: the hook sees the same outputs
    whatever backend computed them) and on ExpertLoad's router-only swap equals the
    HF model whose torch.topk is forced to the ids (router gradient included); the natural routing differs."""
    base = _tiny()
    base.train()
    B, L = 2, 9
    x = torch.randint(0, 64, (B, L))
    ids = _random_ids(B, L, unrecorded)
    model = copy.deepcopy(base)
    if variant == "patched":
        dsv3.patch_deepseek_v3(model, backend="torch")
    elif variant == "router_only":
        ExpertLoad(model)
    with moe_replay.replay(model, ids):
        logits, grads = _loss_and_grads(model, x)
    agree = moe_replay.agreement(model)["moe/routing_agreement"].item()
    assert agree < 0.8  # random ids: the replay forced other experts than the router's own
    natural, _ = _loss_and_grads(copy.deepcopy(base), x)
    calls = _forced_topk(monkeypatch, ids)
    ref_logits, ref_grads = _loss_and_grads(base, x)
    assert calls == [0, 1]
    assert (logits - natural).abs().max() > 1e-3
    assert_close(logits, ref_logits.double(), torch.float32, name="logits")
    assert set(grads) == set(ref_grads)
    for n, g in ref_grads.items():
        assert_close(grads[n], g.double(), torch.float32, name=f"grad {n}")
    gate = "model.layers.1.mlp.gate.weight"
    assert ref_grads[gate].abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_replay_under_activation_checkpointing(reentrant):
    """The armed ids stay for backward: checkpointing's recompute replays them (same gradients as without
    checkpointing) and is not counted in the agreement. Reentrant checkpointing runs the layer's forward without
    grad: it is replayed too (before, its logits were the natural routing's and its gradients those of neither).
    The load counter counts each training forward once in both modes (the router's own choice). A no-grad
    forward outside checkpointing still routes normally (log-prob passes)."""
    model = _tiny()
    dsv3.patch_deepseek_v3(model, backend="torch")
    model.train()
    B, L = 3, 7
    x = torch.randint(0, 64, (B, L))
    ids = _random_ids(B, L, 0.2)
    results = []
    for gc in (False, True):
        if gc:
            checkpointing_on(model, reentrant=reentrant)
        for r in dsv3.routers(model):
            r.tokens_per_expert.zero_()
        moe_replay.replay(model, ids)  # armed until the next call: backward runs outside any `with`
        logits, grads = _loss_and_grads(model, x)
        moe_replay.replay(model, None)
        stats = moe_replay.agreement(model)["moe/routing_agreement"]
        results.append((logits, grads, stats, torch.stack([r.tokens_per_expert for r in dsv3.routers(model)])))
    (l0, g0, s0, c0), (l1, g1, s1, c1) = results
    assert c0.sum() == M * B * L * K and torch.equal(c1, c0)
    assert_close(l1, l0.double(), torch.float32, name="logits")
    assert set(g0) == set(g1)
    for n in g0:
        assert_close(g1[n], g0[n].double(), torch.float32, name=f"grad {n}")
    assert torch.equal(s0, s1)
    with moe_replay.replay(model, ids), torch.no_grad():
        plain = model(x).logits
    natural = _loss_and_grads(model, x)[0]
    assert torch.equal(plain, natural) and (plain - l0).abs().max() > 1e-3


def test_routing_agreement_by_hand():
    """Natural ids (k order shuffled: the comparison is per set) agree fully; n entries of the last MoE layer
    replaced by experts the router did not pick lower it by n / recorded entries; -1 tokens do not count;
    counts add over forwards and reset when read."""
    model = _tiny()
    model.train()
    B, L = 3, 8
    x = torch.randint(0, 64, (B, L))
    nat = _natural_ids(model, x)
    ids = nat.gather(-1, torch.rand(nat.shape).argsort(-1))
    off = torch.zeros(B, L, dtype=torch.bool)
    off[0, :3] = off[2, 5] = True
    ids[off] = -1
    recorded = int((~off).sum()) * M * K
    n_bad = 0
    for b, t in [(0, 4), (1, 0), (1, 5), (2, 7), (2, 2)]:
        others = [e for e in range(E) if e not in nat[b, t, M - 1].tolist()]
        for k in range(1 + (b + t) % 3):  # 1-3 entries of this token
            ids[b, t, M - 1, k] = others[k]
            n_bad += 1
    assert moe_replay.agreement(model) == {}
    with moe_replay.replay(model, ids):
        model(x).logits.sum().backward()
        m = moe_replay.agreement(model)
        assert m["moe/routing_agreement"].dtype == torch.float32 and m["moe/routing_agreement"].dim() == 0
        torch.testing.assert_close(m["moe/routing_agreement"].item(), 1 - n_bad / recorded, atol=1e-6, rtol=0)
        for _ in range(2):
            model(x)
        torch.testing.assert_close(moe_replay.agreement(model)["moe/routing_agreement"].item(),
                                   1 - n_bad / recorded, atol=1e-6, rtol=0)
        with torch.no_grad():
            model(x)  # a no-grad pass (log-probs, generation) neither replays nor counts
        model.eval()
        model(x)
        model.train()
    assert moe_replay.agreement(model) == {}
    with moe_replay.replay(model, nat):
        model(x)
    assert moe_replay.agreement(model)["moe/routing_agreement"].item() == 1.0


def _greedy_routing_no_cache(model, seq):
    """Routing of `seq` in one full forward with no cache (hooks on the routers): [len, M, K]."""
    return _natural_ids(model, torch.tensor([seq]))[0]


@pytest.mark.parametrize("patched", [False, True])
def test_engine_records_routing_of_greedy_rollout(patched):
    """The engine's record (prefill + decode step, compaction on) equals the routing a full no-cache forward
    of each generated sequence computes, on every position that reaches the loss; -1 exactly on pads, the eos
    token and after it, and each row's last token."""
    torch.manual_seed(1)
    model = _model("tiny-deepseek-v3")
    if patched:
        dsv3.patch_deepseek_v3(model, backend="torch")
    moe_replay.enable(model)
    lens, T = [6, 2, 5, 1], 9
    ids, mask = _prompts(lens)
    rep = [0, 1, 2, 3, 2, 0]  # repeated prompts: recorded once in the prefill, copied
    ids, mask, lens = ids[rep], mask[rep], [lens[i] for i in rep]
    P = ids.shape[1]
    eng = Engine(model, backend="torch", check_every=2)
    probe, _ = eng.generate(ids[:1], mask[:1], [0], SamplingParams(T, greedy=True), eos_id=-1, pad_id=0)
    moe_replay.take(model)
    eos = int(probe[0, 3])  # row 0 stops at its 4th token: other rows may run on
    tok, _ = eng.generate(ids, mask, list(range(len(lens))), SamplingParams(T, greedy=True), eos_id=eos, pad_id=0)
    rec = moe_replay.take(model)
    Mm, Kk = len(moe_replay.moe_routers(model)), model.config.num_experts_per_tok
    assert rec.prompt.shape == (len(lens), P, Mm, Kk) and rec.prompt.dtype == torch.int16
    assert rec.completion.shape == (len(lens), tok.shape[1], Mm, Kk)
    assert rec.joined().shape[1] == P + tok.shape[1]
    for b, n in enumerate(lens):
        comp = tok[b].tolist()
        end = comp.index(eos) if eos in comp else len(comp) - 1  # the last token fed to the model is end - 1
        seq = ids[b, P - n:].tolist() + comp[:end + 1]
        ref = _greedy_routing_no_cache(model, seq).sort(-1).values
        got = torch.cat([rec.prompt[b, P - n:], rec.completion[b, :end]]).long().sort(-1).values
        assert torch.equal(got, ref[:n + end]), f"row {b}"
        assert (rec.prompt[b, :P - n] == -1).all() and (rec.completion[b, end:] == -1).all(), f"row {b}"
    with pytest.raises(RuntimeError, match="no recorded rollout"):
        moe_replay.take(model)


def test_generation_ignores_armed_replay_and_grows_buffers():
    """Generation (eval, no_grad) routes normally with replay ids armed; a larger rollout reallocates the
    record buffer and still records."""
    torch.manual_seed(2)
    model = _model("tiny-deepseek-v3")
    moe_replay.enable(model)
    ids, mask = _prompts([3, 4])
    eng = Engine(model, backend="torch")
    tok0, _ = eng.generate(ids, mask, [0, 1], SamplingParams(5, greedy=True), eos_id=-1, pad_id=0)
    moe_replay.take(model)
    moe_replay.replay(model, torch.tensor([[[[0, 1]]]]))  # 1 token: no rollout forward has that size
    tok1, _ = eng.generate(ids, mask, [0, 1], SamplingParams(5, greedy=True), eos_id=-1, pad_id=0)
    assert torch.equal(tok0, tok1)
    moe_replay.replay(model, None)
    ids3, mask3 = _prompts([3, 4, 2, 6, 5])
    tok3, _ = eng.generate(ids3, mask3, list(range(5)), SamplingParams(7, greedy=True), eos_id=-1, pad_id=0)
    rec = moe_replay.take(model)
    assert rec.completion.shape[:2] == tok3.shape and (rec.completion[:, :-1] >= 0).all()
    assert (rec.completion[:, -1] == -1).all()


def test_record_replace_rows():
    a = moe_replay.RoutingRecord(torch.randint(0, 8, (3, 2, 1, 2)), torch.randint(0, 8, (3, 4, 1, 2)))
    b = moe_replay.RoutingRecord(torch.randint(0, 8, (1, 3, 1, 2)), torch.randint(0, 8, (1, 2, 1, 2)))
    c = a.replace_rows(b, torch.tensor([1]))
    assert c.prompt.shape == (3, 3, 1, 2) and c.completion.shape == (3, 4, 1, 2)
    assert torch.equal(c.prompt[1], b.prompt[0]) and torch.equal(c.prompt[0, 1:], a.prompt[0])
    assert (c.prompt[0, 0] == -1).all() and (c.completion[1, 2:] == -1).all()
    assert torch.equal(c.completion[2], a.completion[2]) and torch.equal(c.completion[1, :2], b.completion[0])


def test_bad_ids_name_the_argument():
    model = _tiny()
    model.train()
    x = torch.randint(0, 64, (2, 5))
    good = _random_ids(2, 5)
    bad = {
        "float": good.float(),
        "ndim": good[0, 0],
        "layers": good[:, :, :1],
        "top_k": good[..., :3],
        "range_hi": good.masked_fill(torch.rand(good.shape) < 0.1, E),
        "range_lo": good.masked_fill(torch.rand(good.shape) < 0.1, -2),
        "partial": torch.cat([good[..., :1].clamp(max=-1), good[..., 1:]], -1),
        "duplicate": torch.cat([good[..., :1], good[..., :1], good[..., 2:]], -1),
        "device": good.to("meta"),
    }
    bad["range_hi"][0, 0, 0, 0] = E
    bad["range_lo"][0, 0, 0, 0] = -2
    for ids in bad.values():
        with pytest.raises(ValueError, match="ids"):
            moe_replay.replay(model, ids)
    moe_replay.replay(model, good[:, :4])  # 8 tokens armed; the forward routes 10
    with pytest.raises(ValueError, match="ids: the armed replay covers 8 tokens"):
        model(x)
    moe_replay.replay(model, None)
    model(x)
    with pytest.raises(ConfigError, match="moe_router_replay"):
        moe_replay.enable(_model("tiny-qwen2"))
    with pytest.raises(ConfigError, match="moe_router_replay"):
        moe_replay.replay(torch.nn.Linear(2, 2), good)
    with pytest.raises(RuntimeError, match="moe_router_replay"):
        moe_replay.take(_tiny())
    gen = _model("tiny-deepseek-v3")
    moe_replay.enable(gen)
    ids, mask = _prompts([3, 2])
    with pytest.raises(ValueError, match="moe_router_replay needs rollout_engine=r1train"):
        generate(gen, ids, mask, [0, 1], SamplingParams(3), eos_id=-1, pad_id=0, engine="transformers")


# ---- the trainer's wiring (moe_router_replay=true)
TRAIN = ["model_name_or_path=tiny-deepseek-v3", "model_num_layers=2", "moe_bias_update_rate=0", "num_iterations=2",
         "max_steps=2", "moe_router_replay=true", "patch_model=false"]


PACKED = ["padding_free=true", "max_prompt_length=18", "max_tokens_per_batch=40"]


@pytest.mark.parametrize("extra", [[], PACKED], ids=["padded", "packed"])
def test_trainer_replays_the_rollout_routing(tmp_path, monkeypatch, extra):
    """With learning_rate 0 the training forwards route exactly as the rollout did: agreement 1.0 on every step,
    padded and packed (the packs index the record through their flat token positions). With the record's
    experts shifted (e -> e+1 mod E) the same run's losses change and the agreement falls: the replayed ids
    are the ones the training forward uses."""
    import train_helpers as H

    runs = {}
    for shift in (0, 1):
        t = H.grpo_trainer(tmp_path / str(shift), *TRAIN, "learning_rate=0", *extra, reward_funcs=[H.digit_share])
        if shift:
            take, n_exp = t.replay.take, t.model.config.n_routed_experts

            def shifted(take=take, n_exp=n_exp):
                rec = take()
                move = lambda x: torch.where(x >= 0, (x + 1) % n_exp, x)  # noqa: E731
                return moe_replay.RoutingRecord(move(rec.prompt), move(rec.completion))
            monkeypatch.setattr(t.replay, "take", shifted)
        runs[shift] = t.train()
    assert all(h["moe/routing_agreement"] == 1.0 for h in runs[0]), [h["moe/routing_agreement"] for h in runs[0]]
    assert all(h["moe/routing_agreement"] < 0.9 for h in runs[1])
    assert all(a["loss"] != b["loss"] for a, b in zip(runs[0], runs[1]))


def test_trainer_replay_config_errors(tmp_path):
    import train_helpers as H

    with pytest.raises(ConfigError, match="moe_router_replay"):
        H.grpo_trainer(tmp_path / "a", *TRAIN, "rollout_engine=transformers")
    with pytest.raises(ConfigError, match="moe_router_replay"):
        H.grpo_trainer(tmp_path / "b", "moe_router_replay=true")  # tiny-qwen2: no MoE layers


# ---- audit additions
def test_record_is_a_copy_of_the_engine_buffer():
    """The record taken after a rollout is the rollout's own: a later rollout of the same engine (dynamic
    sampling's next round, an evaluation) does not change it. With one MoE layer and one row the permuted
    buffer slice is already contiguous (.contiguous() was the engine's buffer itself), so the next rollout's
    fill and decode writes overwrote the taken record."""
    torch.manual_seed(3)
    model = _model("tiny-deepseek-v3")
    moe_replay.enable(model)
    assert len(moe_replay.moe_routers(model)) == 1
    eng = Engine(model, backend="torch")
    ids, mask = _prompts([3])
    eng.generate(ids, mask, [0], SamplingParams(5, greedy=True), eos_id=-1, pad_id=0)
    rec = moe_replay.take(model)
    prompt, completion = rec.prompt.clone(), rec.completion.clone()
    assert (completion[:, :-1] >= 0).all()
    ids2, mask2 = _prompts([4])
    eng.generate(ids2, mask2, [1], SamplingParams(5, greedy=True), eos_id=-1, pad_id=0)
    assert torch.equal(rec.prompt, prompt) and torch.equal(rec.completion, completion)
    assert rec.completion.data_ptr() != eng.routes.data_ptr()


def test_trainer_replay_rank_without_rows_and_evaluation(tmp_path):
    """A rank with no groups to redraw in a dynamic-sampling round samples zero rows and records nothing: its
    rollout has no routing (take() raised "no recorded rollout"). evaluate()'s rollouts leave no record behind
    (it stayed on the device, untaken, until the next training rollout)."""
    import train_helpers as H

    t = H.grpo_trainer(tmp_path, *TRAIN, reward_funcs=[H.digit_share])
    ro = t._rollout(0, [], [])[0]
    assert ro.routing is None and ro.completion_ids_BT.shape[0] == 0
    t.evaluate(t.eval_rows[:2])
    assert t.replay.record is None
    ro = t._rollout(0, t.train_rows[:1], [0])[0]  # a real rollout still records, and it is taken
    assert ro.routing is not None and t.replay.record is None


def test_replay_checks_ids_against_the_full_expert_count_under_zero3():
    """Under ZeRO-3 the router weight is partitioned (shape (0,), the full one in ds_shape): the expert count is
    the full shape's, so valid ids are accepted (E was 0 and every id was "out of range")."""
    model = _tiny()
    model.train()
    for r in moe_replay.moe_routers(model):  # as deepspeed.zero.Init leaves a partitioned parameter
        r.weight.ds_shape = r.weight.shape
        r.weight.data = torch.empty(0)
    ids = _random_ids(2, 5, unrecorded=0.2)
    with moe_replay.replay(model, ids) as st:
        assert st.shape == (M, K, E) and st.dtype == torch.int16
    bad = ids.clone()
    bad[torch.randint(0, 2, ()), torch.randint(0, 5, ()), torch.randint(0, M, ())] = torch.arange(E - K + 1, E + 1)
    with pytest.raises(ValueError, match=rf"ids: expert ids must be in \[0, {E}\)"):
        moe_replay.replay(model, bad)


def test_disable_stops_recording_and_drops_the_record():
    """disable(model) undoes enable(model): the rollout records nothing, the hooks are off the routers, the record
    and the engine's routes buffer are gone; a second call and a model never enabled are no-ops."""
    from r1train.generation.engine import _ENGINES

    model = _model("tiny-deepseek-v3")
    st = moe_replay.enable(model)
    routers, handles = list(st.routers), list(st._handles)
    ids, mask = _prompts([3, 2])
    generate(model, ids, mask, [0, 1], SamplingParams(4), eos_id=-1, pad_id=0)
    assert st.record is not None and _ENGINES[model].routes is not None
    moe_replay.disable(model)
    assert moe_replay.recorder(model) is None and model not in moe_replay._STATES and st.record is None
    assert all(h.id not in r._forward_hooks for r, h in zip(routers, handles))
    assert _ENGINES[model].routes is None
    generate(model, ids, mask, [2, 3], SamplingParams(4), eos_id=-1, pad_id=0)
    assert model not in moe_replay._STATES and _ENGINES[model].routes is None
    moe_replay.disable(model)
    moe_replay.disable(_model("tiny-qwen2"))


def test_finished_replay_trainer_leaves_the_model_not_recording(tmp_path):
    """After a replay trainer finishes, the model it hands on (pipeline) records no later rollout (rejection
    sampling, a next stage with moe_router_replay=false) and keeps no record; a GRPOTrainer with
    moe_router_replay=false turns off a replay it finds on its model."""
    import train_helpers as H

    from r1train.config import load_config
    from r1train.generation.engine import _ENGINES
    from r1train.grpo import GRPOTrainer
    from r1train.loading import load_datasets
    from r1train.rollout import sample

    t = H.grpo_trainer(tmp_path / "a", *TRAIN, "max_steps=1", reward_funcs=[H.digit_share])
    t.train()
    model = t.model
    assert moe_replay.recorder(model) is not None
    t.finish(save=False)
    assert moe_replay.recorder(model) is None and model not in moe_replay._STATES and t.replay is None
    B = 6
    ids = torch.randint(3, 20, (B, int(torch.randint(4, 9, ())))).long()
    sample(model, ids, torch.ones_like(ids), max_new_tokens=6, eos_id=-1, pad_id=0, seeds_B=list(range(B)))
    assert model not in moe_replay._STATES and _ENGINES[model].routes is None
    moe_replay.enable(model)  # on when the next trainer starts
    cfg = load_config(overrides=H.FAST + TRAIN + [f"output_dir={tmp_path / 'b'}", "moe_router_replay=false"])
    train, ev = load_datasets(cfg)
    t2 = GRPOTrainer(cfg, model, t.tok, train, ev, reward_funcs=[H.digit_share])
    assert t2.replay is None and moe_replay.recorder(t2.model) is None and model not in moe_replay._STATES
