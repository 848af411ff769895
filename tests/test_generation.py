"""The generation engine (r1train.generation) against independent computations: greedy completions vs a
token-by-token full forward with no cache, sampled log-probs vs the training forward, batch invariance,
compaction, the transformers fallback, bad arguments."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from r1train.generation import Engine, SamplingParams, buckets, generate
from r1train.generation.hf import hf_generate
from r1train.tasks.models import tiny_config

V = 61
MODELS = ("tiny-qwen2", "tiny-llama", "tiny-deepseek-v3")


def _model(name, layers=2, hidden=64, heads=4, sharp=True):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(name, V, hidden_size=hidden, num_layers=layers, num_heads=heads, max_position=256)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # sharp: logits spread enough that greedy runs are not near-ties
        model.get_output_embeddings().weight.mul_(20.0 if sharp else 2.0)
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias") and getattr(m, "weight", None) is not None:
                m.weight.normal_(0.0, m.weight.shape[1] ** -0.5)
    return model


def _prompts(lens, P=None, lo=3):
    P = P or max(lens)
    ids = torch.zeros(len(lens), P, dtype=torch.long)
    mask = torch.zeros(len(lens), P, dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, P - n:] = torch.randint(lo, V, (n,))
        mask[b, P - n:] = 1
    return ids, mask


@torch.no_grad()
def _greedy_no_cache(model, prompt, T, eos):
    seq, out = list(prompt), []
    dev = next(model.parameters()).device
    for _ in range(T):
        nxt = int(model(input_ids=torch.tensor([seq], device=dev)).logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos:
            break
    return out


@pytest.mark.parametrize("name", MODELS + ("tiny-deepseek-v3-patched", "tiny-qwen2-patched", "tiny-llama-patched"))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_equals_full_forward(name, backend):
    """Patched: rk.patch(model)'s MoE routing and experts run inside the engine's decode step; the fused layer
    classes of Qwen2 / Llama (shadowed by the engine's own decode-step patches) in prefill and decode. The engine
    runs them on their default backend (on CPU the Triton interpreter), the uncached references (~80 forwards)
    on the torch ops (the interpreter there took ~90% of the test's time)."""
    if backend == "triton" and name not in ("tiny-qwen2", "tiny-llama"):
        pytest.skip("interpreter: q/k/v with and without bias are enough for the kernels (torch covers every "
                    "model)")
    import r1kernels as rk

    torch.manual_seed(0 if name == "tiny-qwen2" or name == "tiny-llama" else 1)
    model = _model(name.removesuffix("-patched"))
    patched = name.endswith("-patched")
    if patched:
        rk.patch(model, backend="torch")  # the references: the patched classes over the torch ops
    lens, T = [7, 2, 5, 1, 6], 10
    ids, mask = _prompts(lens)
    rep = [0, 1, 2, 3, 4, 2, 0, 2]  # repeated prompts: one prefill row each, copied (distinct_rows)
    ids, mask, lens = ids[rep], mask[rep], [lens[i] for i in rep]
    # eos: a token the greedy run of row 0 reaches at its 4th step, so some rows stop early
    ref0 = _greedy_no_cache(model, ids[0, mask[0].bool()].tolist(), T, eos=-1)
    eos = ref0[3]
    if patched:
        rk.patch(model)  # the engine's run: the patched ops' default backend
    eng = Engine(model, backend=backend, check_every=2)  # frequent checks: compaction runs
    tok, logp = eng.generate(ids, mask, list(range(len(lens))), SamplingParams(T, greedy=True), eos_id=eos,
                             pad_id=0)
    if patched:
        rk.patch(model, backend="torch")
    for b in range(len(lens)):
        ref = _greedy_no_cache(model, ids[b, mask[b].bool()].tolist(), T, eos)
        assert tok[b, :len(ref)].tolist() == ref, f"row {b}"
        assert (tok[b, len(ref):] == 0).all()
        assert (logp[b, len(ref):] == 0).all()
    assert tok.shape[1] <= T


def _greedy_follows_updates(model, lens, T, updated, check):
    """Two greedy rollouts of one engine, an in-place update of updated(layer)'s tensors between them (what ZeRO
    0-2's optimizer does): each equals the full forward; check(eng) runs after each rollout."""
    ids, mask = _prompts(lens)
    eng = Engine(model, backend="triton")
    for it in range(2):
        tok, _ = eng.generate(ids, mask, list(range(len(lens))), SamplingParams(T, greedy=True), eos_id=-1,
                              pad_id=0)
        check(eng)
        for b in range(len(lens)):
            assert tok[b].tolist() == _greedy_no_cache(model, ids[b, mask[b].bool()].tolist(), T, -1), (it, b)
        with torch.no_grad():
            for layer in model.model.layers:
                for p in updated(layer):
                    p.add_(torch.randn_like(p))


def _qkv_buffers(eng) -> int:
    """The engine's concatenated q/k/v buffers (one per attention module that needs a copy)."""
    return len(eng._fused_buffers.get("qkv", {}))


def test_fused_qkv_follows_in_place_updates():
    """The engine's concatenated q/k/v buffer is refreshed on every rollout: after an in-place update of the
    projections greedy decoding still equals the full forward, and the training forward runs the unpatched
    projections again."""
    torch.manual_seed(0)
    model = _model("tiny-qwen2")

    def check(eng):
        assert _qkv_buffers(eng) == len(model.model.layers)  # the fused path ran
    _greedy_follows_updates(model, [4, 6], 6, lambda layer: (layer.self_attn.k_proj.weight,
                                                              layer.self_attn.v_proj.bias), check)
    layer = model.model.layers[0]
    for m in (layer, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert "forward" not in vars(m), m


def test_fused_qkv_keeps_no_layer_tensors_after_the_layer():
    """k_proj / v_proj take q's slices of the fused q/k/v output and drop them: after a layer's forward (prefill
    and decode) none of its projections still references its input or the q/k/v output."""
    torch.manual_seed(0)
    model = _model("tiny-qwen2", layers=3)
    seen = []

    def after_layer(layer, *_):
        attn = layer.self_attn
        if "forward" in vars(attn.q_proj):  # the engine's fused path is on
            seen.append((attn.k_proj._r1k_out, attn.v_proj._r1k_out))

    hooks = [layer.register_forward_hook(after_layer) for layer in model.model.layers]
    ids, mask = _prompts([5, 3])
    Engine(model, backend="triton").generate(ids, mask, [0, 1], SamplingParams(4, greedy=True), eos_id=-1, pad_id=0)
    for h in hooks:
        h.remove()
    assert len(seen) >= 3 * 4  # every layer: prefill + decode steps
    assert all(kv == ((None, None), (None, None)) for kv in seen)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_flat_parameters_fuse_gate_up_and_follow_updates(name, monkeypatch):
    """Parameters back to back in one buffer (DeepSpeed ZeRO 1/2's layout): gate_proj and up_proj run as one
    GEMM over a view of their weights (and Llama's bias-free q/k/v too, with no buffer); greedy decoding equals
    the full forward before and after an in-place update of those weights, and the patch is gone after."""
    from benchmarks.bench_rollout import flatten_parameters
    from r1train.generation import fused

    torch.manual_seed(0)
    model = flatten_parameters(_model(name))
    calls = []
    orig = fused._mlp_gate_up
    monkeypatch.setattr(fused, "_mlp_gate_up", lambda self, x: calls.append(1) or orig(self, x))
    T = 6

    def check(eng):
        assert len(calls) >= T * len(model.model.layers)  # prefill + decode steps, every layer fused
        assert _qkv_buffers(eng) == (0 if name == "tiny-llama" else len(model.model.layers))
        calls.clear()
    _greedy_follows_updates(model, [4, 6, 3], T, lambda layer: (layer.mlp.up_proj.weight,
                                                                 layer.self_attn.v_proj.weight), check)
    for m in model.modules():
        assert "_r1k_gu" not in vars(m) and "forward" not in vars(m), m



@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_rotary_fused_while_the_engine_runs_only(name, monkeypatch):
    """The engine's fused decode ops (Triton backend: the interpreter on CPU) apply the rotary embedding with
    rk.apply_rotary in every layer of the prefill and inside rk.decode_attention (cos/sin passed, no rotary
    kernel) in every layer of every decode step; the same model's forward outside the engine runs HF's
    rotary code again. (Greedy equality with the uncached forward: test_greedy_equals_full_forward.)"""
    import r1kernels as rk

    torch.manual_seed(0)
    model = _model(name)
    calls, attn = [], []
    orig, orig_attn = rk.apply_rotary, rk.decode_attention
    monkeypatch.setattr(rk, "apply_rotary", lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    checked = []
    monkeypatch.setattr(rk, "decode_attention", lambda *a, **kw: attn.append(kw.get("cos") is not None)
                        or checked.append(kw.get("check_lens", True)) or orig_attn(*a, **kw))
    ids, mask = _prompts([4, 6])
    T = 5
    generate(model, ids, mask, [0, 1], SamplingParams(T, greedy=True), eos_id=-1, pad_id=0, backend="triton")
    n = len(model.model.layers)
    assert len(calls) == n  # the prefill
    assert len(attn) >= (T - 1) * n and all(attn)
    assert not any(checked)  # the engine counts lens itself: no data check in every layer of every step
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls == []


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-deepseek-v3"])
def test_sampled_logprobs_equal_training_forward(name):
    model = _model(name, sharp=False)
    ids, mask = _prompts([5, 3, 8, 4])
    T, temp = 9, 0.7
    tok, logp = generate(model, ids, mask, [11, 12, 13, 14], SamplingParams(T, temperature=temp), eos_id=-1,
                         pad_id=0, backend="torch")
    full_ids = torch.cat([ids, tok], 1)
    full_mask = torch.cat([mask, torch.ones_like(tok)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits
    ref = torch.log_softmax(logits[:, ids.shape[1] - 1:-1].double() / temp, -1)
    ref = ref.gather(-1, tok[..., None]).squeeze(-1)
    assert_close(logp, ref, torch.float32, name="rollout log-probs")


def test_batch_invariance_and_seeds():
    """A row's completion depends only on (model, prompt, seed): alone, in another batch, at another index,
    with other padding."""
    model = _model("tiny-qwen2", sharp=False)
    ids, mask = _prompts([6, 2, 4, 5])
    T = 8
    sp = SamplingParams(T, temperature=1.0, top_p=0.9)
    tok, logp = generate(model, ids, mask, [5, 6, 7, 8], sp, eos_id=-1, pad_id=0, backend="torch")
    n = int(mask[2].sum())
    alone, alone_lp = generate(model, ids[2:3, -n:], mask[2:3, -n:], [7], sp, eos_id=-1, pad_id=0,
                               backend="torch")
    assert torch.equal(alone[0], tok[2])
    other_ids, other_mask = _prompts([9, 3])
    big_ids = torch.cat([other_ids[:1], torch.cat([torch.zeros(1, 9 - n, dtype=torch.long), ids[2:3, -n:]], 1)])
    big_mask = torch.cat([other_mask[:1], torch.cat([torch.zeros(1, 9 - n, dtype=torch.long),
                                                     mask[2:3, -n:]], 1)])
    big, _ = generate(model, big_ids, big_mask, [99, 7], sp, eos_id=-1, pad_id=0, backend="torch")
    assert torch.equal(big[1], tok[2])
    assert_close(alone_lp[0], logp[2].double(), torch.float32, name="log-probs across batches")
    other, _ = generate(model, ids, mask, [5, 6, 70, 8], sp, eos_id=-1, pad_id=0, backend="torch")
    assert not torch.equal(other[2], tok[2]) and torch.equal(other[0], tok[0])
    # repeats of a prompt (one prefill row, copied to each): each row as in a batch of distinct prompts
    rep, rep_lp = generate(model, ids[[2, 0, 2, 2]], mask[[2, 0, 2, 2]], [7, 5, 70, 6], sp, eos_id=-1, pad_id=0,
                           backend="torch")
    six, _ = generate(model, ids[2:3], mask[2:3], [6], sp, eos_id=-1, pad_id=0, backend="torch")
    for got, want in ((rep[0], tok[2]), (rep[1], tok[0]), (rep[2], other[2]), (rep[3], six[0])):
        assert torch.equal(got, want)
    assert_close(rep_lp[0], logp[2].double(), torch.float32, name="log-probs of a repeated prompt")


def test_engine_reuses_buffers_and_compacts():
    model = _model("tiny-llama")
    eng = Engine(model, backend="torch", check_every=1)
    ids, mask = _prompts([3, 4, 5, 6, 7])
    sp = SamplingParams(6, greedy=True)
    a, _ = eng.generate(ids, mask, list(range(5)), sp, eos_id=-1, pad_id=0)
    cache = eng.cache
    b, _ = eng.generate(ids[:3], mask[:3], list(range(3)), sp, eos_id=-1, pad_id=0)
    assert eng.cache is cache and torch.equal(a[:3], b)
    assert buckets(5) == [5, 4, 2, 1] and buckets(1) == [1] and buckets(64)[:2] == [64, 32]


def _shipped_generation_config(model):
    """Processors a checkpoint's generation_config.json can switch on (Qwen2.5-Instruct ships repetition_penalty
    1.05, top_k 20, top_p 0.8, temperature 0.7): the fallback must apply none of them."""
    gc = model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.top_k, gc.top_p, gc.temperature = 1.3, 2, 3, 0.5, 0.4
    gc.bad_words_ids, gc.suppress_tokens, gc.begin_suppress_tokens = [[V - 2]], [V - 3], [V - 4]
    gc.sequence_bias, gc.min_new_tokens = {(V - 5,): 5.0}, 3
    return model


@torch.no_grad()
def _training_logprobs(model, ids, mask, tok, sp, eos):
    """Each row alone through a full forward: log p of its completion tokens under log_softmax(logits /
    temperature) restricted to the kept set (r1kernels.reference.sampling.kept_mask); 0 after the row's eos."""
    from r1kernels.reference.sampling import kept_mask

    out = torch.zeros(tok.shape, dtype=torch.float64)
    for b in range(tok.shape[0]):
        prompt, comp = ids[b, mask[b].bool()].tolist(), tok[b].tolist()
        n = comp.index(eos) + 1 if eos in comp else len(comp)
        logits = model(input_ids=torch.tensor([prompt + comp[:n]])).logits[0, len(prompt) - 1:-1]
        z = logits.double() / sp.temperature
        keep = kept_mask(z, sp.top_k, sp.top_p, sp.min_p)
        assert keep.gather(-1, tok[b, :n, None]).all(), f"row {b}: a token outside the kept set"
        zk = z.masked_fill(~keep, float("-inf"))
        out[b, :n] = zk.gather(-1, tok[b, :n, None]).squeeze(-1) - torch.logsumexp(zk, -1)
    return out


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.3, top_k=5, top_p=0.9),
                                dict(min_p=0.05), dict(greedy=True, temperature=0.7),
                                dict(greedy=True, temperature=1.5, top_k=4)])
def test_transformers_fallback_logprobs_match_training_forward(kw):
    """The fallback samples from, and returns the log-probs of, log_softmax(logits / temperature) over the kept
    set (as the engine does), whatever the model's generation_config sets (it applied repetition_penalty,
    no_repeat_ngram_size, bad words, its own top_k, ... and returned the processed scores, or for greedy the raw
    logits without the temperature)."""
    torch.manual_seed(0)
    model = _shipped_generation_config(_model("tiny-qwen2", sharp=False))
    ids, mask = _prompts([5, 2, 7, 3])
    sp = SamplingParams(9, **kw)
    tok, lp = generate(model, ids, mask, [1, 2, 3, 4], sp, eos_id=V - 1, pad_id=0, engine="transformers")
    assert lp.dtype == torch.float32 and tok.shape == lp.shape
    ref = _training_logprobs(model, ids, mask, tok, sp, eos=V - 1)
    assert_close(lp, ref, torch.float32, name="fallback log-probs")
    after = (tok == V - 1).long().cumsum(1) - (tok == V - 1).long() > 0
    assert (tok[after] == 0).all() and (lp[after] == 0).all()


@torch.no_grad()
def test_transformers_fallback_samples_the_kept_distribution():
    """Many rows of one prompt, one token each: the fallback's tokens follow softmax(logits / temperature) over
    the kept set, with the model's generation_config banning the likeliest token and biasing another (it used to
    apply both)."""
    from r1kernels.reference.sampling import kept_mask

    model = _model("tiny-qwen2", sharp=False)
    ids, mask = _prompts([5])
    sp = SamplingParams(1, temperature=1.3, top_k=5, top_p=0.9)
    z = model(input_ids=ids).logits[0, -1].double() / sp.temperature
    p = torch.softmax(z.masked_fill(~kept_mask(z[None], sp.top_k, sp.top_p)[0], float("-inf")), -1)
    top2 = p.topk(2).indices.tolist()
    assert p[top2[1]] > 0.05
    model.generation_config.bad_words_ids, model.generation_config.sequence_bias = [[top2[0]]], {(top2[1],): 3.0}
    n = 4000
    tok, lp = generate(model, ids.expand(n, -1), mask.expand(n, -1), list(range(n)), sp, eos_id=-1, pad_id=0,
                       engine="transformers")
    freq = torch.bincount(tok[:, 0], minlength=V).double() / n
    assert 0.5 * (freq - p).abs().sum() < 0.05, "total variation distance to the kept distribution"
    assert torch.allclose(lp[:, 0].double(), p[tok[:, 0]].log(), atol=1e-5)


def test_transformers_fallback_greedy_matches_engine():
    """Greedy tokens and log-probs equal the engine's, with a generation_config whose repetition penalty and
    no-repeat n-grams would change the argmax (the sharp model repeats tokens) and a temperature != 1."""
    model = _shipped_generation_config(_model("tiny-qwen2"))
    ids, mask = _prompts([4, 6, 2])
    sp = SamplingParams(7, greedy=True, temperature=0.7)
    ref0 = _greedy_no_cache(model, ids[0, mask[0].bool()].tolist(), 7, eos=-1)
    eos = ref0[2]
    ours, ours_lp = generate(model, ids, mask, [1, 2, 3], sp, eos_id=eos, pad_id=0, backend="torch")
    theirs, lp = generate(model, ids, mask, [1, 2, 3], sp, eos_id=eos, pad_id=0, engine="transformers")
    end = ref0.index(eos) + 1  # row 0 stops there
    assert theirs[0, :end].tolist() == ref0[:end] and (theirs[0, end:] == 0).all()
    n = theirs.shape[1]
    assert torch.equal(theirs, ours[:, :n]) and (ours[:, n:] == 0).all()
    assert_close(lp, ours_lp[:, :n].double(), torch.float32, name="greedy log-probs vs the engine")


@pytest.mark.parametrize("lens", [[3, 5], [2, 7, 4, 1]])
def test_transformers_fallback_leaves_the_global_generator_alone(lens):
    """The fallback draws from the global generator seeded by the rows' seeds, then restores the caller's
    state of it (it was left reseeded: the trainer's later draws followed from the rollout's seeds); the
    completions stay a function of (prompts, seeds), whatever the global state was before."""
    model = _model("tiny-qwen2", layers=1, sharp=False)
    ids, mask = _prompts(lens)
    seeds, sp = list(range(7, 7 + len(lens))), SamplingParams(5, top_k=20)
    outs = []
    for before in (torch.randint(0, 2**31, ()).item(), None):
        if before is not None:
            torch.manual_seed(before)
        state = torch.random.get_rng_state()
        outs.append(generate(model, ids, mask, seeds, sp, eos_id=-1, pad_id=0, engine="transformers"))
        assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
def test_stops_at_any_eos_id(engine):
    """eos_id as a sequence (TRL stops at any of the model's eos ids): each row stops at the first of any of them
    (then pad_id, log-prob 0), where the run with no eos had the same tokens; an int is the sequence of one.
    rollout.sample's completion mask and truncation flag see every eos id."""
    from r1train.rollout import sample

    model = _model("tiny-qwen2", sharp=False)
    ids, mask = _prompts([4, 6, 2, 5])
    sp, seeds = SamplingParams(8), [1, 2, 3, 4]
    kw = dict(pad_id=0, engine=engine, backend="torch")
    full, full_lp = generate(model, ids, mask, seeds, sp, eos_id=-1, **kw)
    eos = [int(full[0, 2]), int(full[1, 3])]
    tok, lp = generate(model, ids, mask, seeds, sp, eos_id=eos, **kw)
    for b in range(4):
        row = full[b].tolist()
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        assert tok[b, :end].tolist() == row[:end] and (tok[b, end:] == 0).all(), f"row {b}"
        assert torch.allclose(lp[b, :end], full_lp[b, :end], atol=1e-6) and (lp[b, end:] == 0).all(), f"row {b}"
    assert tok.shape[1] <= full.shape[1] and (tok[:2, 4:] == 0).all()  # rows 0 and 1 stopped
    one, _ = generate(model, ids, mask, seeds, sp, eos_id=(eos[1],), **kw)
    two, _ = generate(model, ids, mask, seeds, sp, eos_id=eos[1], **kw)
    assert torch.equal(one, two)
    ro = sample(model, ids, mask, max_new_tokens=8, eos_id=eos, seeds_B=seeds, **kw)
    for b in range(4):
        row = full[b].tolist()
        end = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        assert ro.completion_mask_BT[b].sum() == (end or ro.completion_ids_BT.shape[1]), f"row {b}"
        assert bool(ro.truncated_B[b]) == (end is None), f"row {b}"
    for bad in ([], [1.5], True, None):
        with pytest.raises(ValueError, match="eos_id"):
            generate(model, ids, mask, seeds, sp, eos_id=bad, **kw)


def test_eos_ids_are_trls():
    """rollout.eos_ids: the tokenizer's eos, then every eos id of the model's generation_config (TRL 1.16)."""
    from types import SimpleNamespace

    from r1train.rollout import eos_ids

    model = _model("tiny-qwen2", layers=1)
    tok = SimpleNamespace(eos_token_id=7)
    for gen, want in ((None, [7]), (7, [7]), (9, [7, 9]), ([9, 7, 11], [9, 7, 11]), ([9, 11], [7, 9, 11])):
        model.generation_config.eos_token_id = gen
        assert eos_ids(model, tok) == want, gen


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
@pytest.mark.parametrize("lens,row", [([3, 0, 2], 1), ([0, 0], 0)])
def test_empty_prompt(engine, lens, row):
    """A row with no prompt tokens, or a batch of P=0 columns: a ValueError naming prompt_mask_BP and the row (was
    an IndexError / a RuntimeError, or a completion of junk)."""
    model = _model("tiny-qwen2", layers=1)
    ids, mask = _prompts(lens)  # [0, 0]: P = 0 columns
    assert ids.shape[1] == max(lens)
    seeds, sp = list(range(len(lens))), SamplingParams(3)
    with pytest.raises(ValueError, match=rf"prompt_mask_BP: row {row} has no prompt tokens"):
        generate(model, ids, mask, seeds, sp, eos_id=1, pad_id=0, engine=engine)
    if engine == "transformers":
        with pytest.raises(ValueError, match=rf"prompt_mask_BP: row {row} has no prompt tokens"):
            hf_generate(model, ids, mask, seeds, sp, eos_id=1, pad_id=0)


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
def test_right_padded_prompt_is_an_error(engine):
    """A row whose mask has a 0 after a 1 (right padding, a hole): a ValueError naming the row (was accepted:
    the completion continued after the padding)."""
    model = _model("tiny-qwen2", layers=1)
    ids, mask = _prompts([3, 2, 4])
    mask[1] = mask[1].flip(0)  # row 1 right-padded
    with pytest.raises(ValueError, match=r"prompt_mask_BP: row 1 is not left-padded"):
        generate(model, ids, mask, [0, 1, 2], SamplingParams(3), eos_id=1, pad_id=0, engine=engine)
    ids, mask = _prompts([3, 2, 4])
    V = model.get_input_embeddings().num_embeddings
    ids[2, -1] = V  # a token the embedding does not have (an IndexError, a device assert on CUDA)
    ids[0, 0] = V  # in row 0's padding: not read, not an error
    with pytest.raises(ValueError, match=rf"prompt_ids_BP: row 2 holds a token id outside the model's embedding "
                                         rf"\[0, {V}\)"):
        generate(model, ids, mask, [0, 1, 2], SamplingParams(3), eos_id=1, pad_id=0, engine=engine)


@pytest.mark.parametrize("kw,name", [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                     (dict(top_k=-1), "top_k"), (dict(temperature=0.0), "temperature"),
                                     (dict(min_p=1.5), "min_p"), (dict(max_new_tokens=0), "max_new_tokens"),
                                     (dict(temperature=1e-40), "temperature")])
def test_bad_sampling_arguments(kw, name):
    args = dict(max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        SamplingParams(**args)


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
def test_no_rows(engine):
    """A rank with nothing to sample (a dynamic-sampling round) gets empty tensors from either engine, and
    rollout.sample an empty rollout."""
    from r1train.rollout import sample

    model = _model("tiny-qwen2")
    ids = torch.zeros(0, 5, dtype=torch.long)
    tok, logp = generate(model, ids, ids, [], SamplingParams(4), eos_id=1, pad_id=0, engine=engine)
    assert tok.shape == (0, 0) and logp.shape == (0, 0)
    ro = sample(model, ids, ids, max_new_tokens=4, eos_id=1, pad_id=0, seeds_B=[], engine=engine)
    assert ro.completion_ids_BT.shape[0] == 0 and ro.truncated_B.shape == (0,)


def test_bad_engine_arguments():
    model = _model("tiny-qwen2", layers=1)
    ids, mask = _prompts([2, 3])
    with pytest.raises(ValueError, match="rollout_engine"):
        generate(model, ids, mask, [1, 2], SamplingParams(2), eos_id=1, pad_id=0, engine="vllm")
    with pytest.raises(ValueError, match="seeds_B"):
        generate(model, ids, mask, [1], SamplingParams(2), eos_id=1, pad_id=0)


def test_sliding_window_past_the_prompt_and_completion_is_an_error():
    """Qwen2 with use_sliding_window (layers past max_window_layers attend within the window): a rollout whose
    prompt + max_new_tokens pass the window is a ValueError naming it and rollout_engine (the engine attends to
    every position); within the window the engine runs and its greedy tokens equal the full forward's."""
    from transformers import AutoModelForCausalLM

    P, T = 5, 6
    for w, ok in ((P + T - 2, False), (P + T - 1, True)):  # P + T - 1 positions attended (the last token not fed)
        cfg = tiny_config("tiny-qwen2", V, hidden_size=64, num_layers=2, num_heads=4, max_position=256)
        cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, w, 1
        cfg.layer_types = ["full_attention", "sliding_attention"]
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        ids, mask = _prompts([P, P - 2])
        if not ok:
            with pytest.raises(ValueError, match=f"{w}-token sliding window.*rollout_engine=transformers"):
                generate(model, ids, mask, [1, 2], SamplingParams(T, greedy=True), eos_id=V + 5, pad_id=0)
            continue
        tok, _ = generate(model, ids, mask, [1, 2], SamplingParams(T, greedy=True), eos_id=V + 5, pad_id=0)
        assert tok[0].tolist() == _greedy_no_cache(model, ids[0].tolist(), T, None)


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
@pytest.mark.parametrize("rope_type,refused", [("dynamic", True), ("longrope", True), ("linear", False),
                                               (None, False)])
def test_batch_dependent_rope_past_its_length_is_an_error(engine, rope_type, refused):
    """Dynamic / longrope scaling rescales the rotary frequencies by the longest row of each forward once it passes
    original_max_position_embeddings (a row's completion would depend on its batch): a rollout reaching past it
    is a ValueError naming rope_scaling on both engines; within it, and for linear scaling, greedy tokens equal
    the full forward's."""
    from transformers import AutoModelForCausalLM

    P, T, n = 5, 6, 8
    for ok_len in (False, True):
        cfg = tiny_config("tiny-llama", V, hidden_size=64, num_layers=2, num_heads=4, max_position=n)
        if rope_type is not None:
            rp = dict(rope_type=rope_type, factor=4.0, rope_theta=10000.0)
            if rope_type == "longrope":
                rp.update(original_max_position_embeddings=n, short_factor=[1.0] * 8, long_factor=[2.0] * 8)
            cfg.rope_parameters = rp
        cfg.max_position_embeddings = P + T - 1 if ok_len else n
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        ids, mask = _prompts([P, P - 2])
        T_run = T if not ok_len or rope_type != "longrope" else n - P + 1
        sp = SamplingParams(T_run, greedy=True)
        if refused and not ok_len:
            with pytest.raises(ValueError, match="rope_scaling rope_type.*original_max_position_embeddings"):
                generate(model, ids, mask, [1, 2], sp, eos_id=V + 5, pad_id=0, engine=engine)
            continue
        tok, _ = generate(model, ids, mask, [1, 2], sp, eos_id=V + 5, pad_id=0, engine=engine)
        assert tok[0].tolist() == _greedy_no_cache(model, ids[0].tolist(), T_run, None)


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
def test_generate_restores_each_modules_mode(engine):
    """A policy in training mode with one submodule the caller put in eval mode: generate runs in eval mode and
    gives each module its own flag back (model.train(flag) set one flag on every submodule)."""
    model = _model("tiny-qwen2").train()
    model.model.layers[0].eval()
    before = {name: m.training for name, m in model.named_modules()}
    ids, mask = _prompts([4, 3])
    generate(model, ids, mask, [1, 2], SamplingParams(3, greedy=True), eos_id=V + 5, pad_id=0, engine=engine)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert not model.model.layers[0].training and model.training


_BAD_ARGS = [
    (dict(pad_id=None), "pad_id"), (dict(pad_id=-1), "pad_id"), (dict(pad_id=V), "pad_id"),
    (dict(pad_id=0.5), "pad_id"), (dict(pad_id=True), "pad_id"), (dict(mask=lambda m: m[:, 1:]), "prompt_mask_BP"),
    (dict(mask=lambda m: m[:1]), "prompt_mask_BP"), (dict(ids=lambda i: i.float()), "prompt_ids_BP"),
    (dict(ids=lambda i: i[0], mask=lambda m: m[0]), "prompt_ids_BP"), (dict(seeds=[2**64, 1, 2]), "seeds_B"),
    (dict(seeds=[1.5, 2.0, 3.0]), "seeds_B"), (dict(seeds=[1, 2]), "seeds_B"), (dict(seeds=None), "seeds_B"),
]


@pytest.mark.parametrize("engine", ["r1train", "transformers", "Engine"])
@pytest.mark.parametrize("kw,name", _BAD_ARGS, ids=lambda x: x if isinstance(x, str) else ",".join(x))
def test_bad_generate_arguments_name_the_argument(engine, kw, name):
    """Each malformed argument is a ValueError naming it, before any work, through generate() with either engine
    and Engine.generate: a pad_id of None / < 0 / >= vocab was a TypeError or an IndexError in the decode step (a
    device-side assert on a GPU: finished rows feed pad_id to the model), a float seed was truncated, a mask of
    another shape or float ids a RuntimeError."""
    model = _model("tiny-qwen2", layers=1)
    ids, mask = _prompts([2, 4, 3])
    args = dict(ids=ids, mask=mask, seeds=[1, 2, 3], pad_id=0)
    args.update({k: v(args[k]) if callable(v) else v for k, v in kw.items()})
    sp = SamplingParams(3)
    with pytest.raises(ValueError, match=name):
        if engine == "Engine":
            Engine(model, backend="torch", cuda_graphs=False).generate(args["ids"], args["mask"], args["seeds"], sp,
                                                                       eos_id=1, pad_id=args["pad_id"])
        else:
            generate(model, args["ids"], args["mask"], args["seeds"], sp, eos_id=1, pad_id=args["pad_id"],
                     engine=engine, backend="torch")
    if engine == "r1train":  # the tensor seeds and numpy ids callers pass are fine
        import numpy as np

        tok, _ = generate(model, ids, mask, torch.tensor([1, 2, 3]), sp, eos_id=1, pad_id=np.int64(V - 1),
                          backend="torch")
        assert torch.equal(tok, generate(model, ids, mask, [1, 2, 3], sp, eos_id=1, pad_id=V - 1,
                                         backend="torch")[0])


@pytest.mark.parametrize("engine", ["r1train", "transformers", "Engine"])
@pytest.mark.parametrize("where", ["ids", "mask", "both", "model"])
def test_prompts_on_another_device_name_the_argument(engine, where):
    """Prompts on a device other than the model's are a ValueError naming the argument and both devices, before
    any work, through generate() with either engine and Engine.generate (it was a RuntimeError from inside the
    embedding or an index op, or 'Cannot copy out of meta tensor'). 'meta' stands in for the other device on a
    CPU-only machine: as prompts, or as the model's device (its parameters moved there)."""
    import re

    model = _model("tiny-qwen2", layers=1)
    B = int(torch.randint(1, 5, ()))
    ids, mask = _prompts(torch.randint(1, 6, (B,)).tolist())
    seeds, sp = torch.randint(0, 2**31, (B,)).tolist(), SamplingParams(3)
    args = dict(ids=ids.to("meta") if where in ("ids", "both") else ids,
                mask=mask.to("meta") if where in ("mask", "both") else mask)
    if where == "model":
        model = model.to("meta")
    name = "prompt_mask_BP" if where == "mask" else "prompt_ids_BP"
    other, model_dev = ("cpu", "meta") if where == "model" else ("meta", "cpu")

    def run(ids_BP, mask_BP):
        if engine == "Engine":
            return Engine(model, backend="torch", cuda_graphs=False).generate(ids_BP, mask_BP, seeds, sp, eos_id=1,
                                                                              pad_id=0)
        return generate(model, ids_BP, mask_BP, seeds, sp, eos_id=1, pad_id=0, engine=engine, backend="torch")

    with pytest.raises(ValueError, match=re.escape(f"{name} is on {other} but the model is on {model_dev}")):
        run(args["ids"], args["mask"])
    if where != "model":  # the same prompts on the model's device run
        tok, logp = run(ids, mask)
        assert tok.shape[0] == B and 1 <= tok.shape[1] <= 3 and logp.shape == tok.shape
        assert ((tok >= 0) & (tok < V)).all()


@pytest.mark.parametrize("check_every", [0, -3, 2.0, True])
def test_bad_check_every(check_every):
    """check_every 0 was a ZeroDivisionError in the decode loop, < 0 silently never compacted."""
    model = _model("tiny-qwen2", layers=1)
    with pytest.raises(ValueError, match="check_every"):
        Engine(model, backend="torch", check_every=check_every)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_gpu_cuda_graph_greedy_equals_full_forward(name):
    """On CUDA: the captured decode step (Triton sampling + decode attention) against a no-cache forward
    of the same fp32 model; compaction runs (check_every=2), the second call replays the graphs.
    transformers' stock DeepseekV3 experts (grouped_mm) copy to the host, so that model's decode step runs
    eagerly (measured on the H200 with transformers 5.17); its tokens must still match."""
    torch.manual_seed(0)
    model = _model(name).cuda()
    lens, T = [7, 2, 5, 1, 6, 3], 12
    ids, mask = _prompts(lens)
    eos = _greedy_no_cache(model, ids[0, mask[0].bool()].tolist(), T, eos=-1)[3]
    eng = Engine(model, backend="auto", cuda_graphs=True, check_every=2)
    for _ in range(2):
        tok, _ = eng.generate(ids.cuda(), mask.cuda(), list(range(len(lens))), SamplingParams(T, greedy=True),
                              eos_id=eos, pad_id=0)
        for b in range(len(lens)):
            ref = _greedy_no_cache(model, ids[b, mask[b].bool()].tolist(), T, eos)
            assert tok[b, :len(ref)].tolist() == ref, f"row {b}"
    if name != "tiny-deepseek-v3":
        assert eng.cuda_graphs and eng.stats["captures"] >= 1


@pytest.mark.gpu
def test_gpu_stock_deepseek_v3_bf16_decode_step_is_captured():
    """transformers' stock DeepseekV3 experts in bf16 (the dtype a rollout runs): the decode step is captured and
    replayed, and its tokens equal the same engine's eager decode steps. (The fp32 model above copies to the host
    inside torch's grouped_mm and decodes eagerly.)"""
    torch.manual_seed(0)
    model = _model("tiny-deepseek-v3").to(device="cuda", dtype=torch.bfloat16)
    ids, mask = _prompts([7, 2, 5, 1, 6, 3])
    sp, seeds = SamplingParams(10, top_k=20), list(range(6))
    graph = Engine(model, backend="auto", cuda_graphs=True, check_every=2)
    tok, logp = graph.generate(ids.cuda(), mask.cuda(), seeds, sp, eos_id=-1, pad_id=0)
    assert graph.cuda_graphs and graph.stats["captures"] >= 1 and not graph.stats.get("capture_failures")
    tok_eager, logp_eager = Engine(model, backend="auto", cuda_graphs=False, check_every=2).generate(
        ids.cuda(), mask.cuda(), seeds, sp, eos_id=-1, pad_id=0)
    assert torch.equal(tok, tok_eager) and torch.equal(logp, logp_eager)


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
@pytest.mark.parametrize("fill", [V, -1])
def test_padding_ids_outside_the_vocabulary_are_not_read(engine, fill):
    """check_prompt_rows checks only the ids under the mask (a padding column is not read); any id in a padding
    column (-1, V: a caller's own pad value) gives the completions of pad_id there, through either engine and
    called directly (Engine.generate, hf_generate; it was an IndexError from the embedding of the prefill /
    transformers' forward)."""
    model = _model("tiny-qwen2", layers=1, sharp=False)
    ids, mask = _prompts([5, 2, 3])
    sp, seeds = SamplingParams(4, top_k=20), [1, 2, 3]
    want = generate(model, ids, mask, seeds, sp, eos_id=-1, pad_id=0, engine=engine, backend="torch")
    odd = ids.masked_fill(mask == 0, fill)
    got = generate(model, odd, mask, seeds, sp, eos_id=-1, pad_id=0, engine=engine, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(odd[mask == 0], torch.full_like(odd[mask == 0], fill))  # the caller's tensor is untouched
    direct = hf_generate(model, odd, mask, seeds, sp, eos_id=-1, pad_id=0) if engine == "transformers" else \
        Engine(model, backend="torch", cuda_graphs=False).generate(odd, mask, seeds, sp, eos_id=-1, pad_id=0)
    assert torch.equal(direct[0], want[0]) and torch.equal(direct[1], want[1])


def test_transformers_fallback_completion_depends_on_row_only():
    """rollout_engine=transformers keeps the contract of rollout.py: a row's completion depends only on (model,
    prompt, seed), alone or at another index of another batch with other padding (1- and N-process runs sample
    the same), and is the engine's (the same counter-based draw at each generation position). Its noise came
    from one generator seeded by the whole batch's seeds."""
    model = _model("tiny-qwen2", sharp=False)
    ids, mask = _prompts([6, 2, 4, 5])
    sp = SamplingParams(8, temperature=1.1, top_p=0.95)
    kw = dict(eos_id=-1, pad_id=0, engine="transformers")
    tok, lp = generate(model, ids, mask, [5, 6, 7, 8], sp, **kw)
    n = int(mask[2].sum())
    alone, alone_lp = generate(model, ids[2:3, -n:], mask[2:3, -n:], [7], sp, **kw)
    assert torch.equal(alone[0], tok[2])
    assert_close(alone_lp[0], lp[2].double(), torch.float32, name="log-probs alone")
    swapped, _ = generate(model, ids[[3, 2]], mask[[3, 2]], [8, 7], sp, **kw)
    assert torch.equal(swapped[0], tok[3]) and torch.equal(swapped[1], tok[2])
    ours, ours_lp = generate(model, ids, mask, [5, 6, 7, 8], sp, eos_id=-1, pad_id=0, backend="torch")
    assert torch.equal(ours, tok)
    assert_close(lp, ours_lp.double(), torch.float32, name="fallback vs engine log-probs")


class _CharTok:
    """A stand-in tokenizer: one id per character, pad 0, eos 1."""
    pad_token_id, eos_token_id, chat_template = 0, 1, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + ord(c) % (V - 3) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("kw,name", [(dict(num_samples=0), "num_samples"), (dict(num_samples=-2), "num_samples"),
                                     (dict(num_samples=2.0), "num_samples"), (dict(num_samples=True), "num_samples"),
                                     (dict(batch_size=0), "batch_size"), (dict(batch_size=-1), "batch_size")])
def test_sample_rows_bad_counts_name_the_argument(kw, name):
    """num_samples < 1 (the completions per prompt) and batch_size < 1: a ValueError naming it (num_samples 0 or
    batch_size < 0 yielded nothing, silently; num_samples < 0 was a RuntimeError from repeat_interleave, 2.0 a
    TypeError, batch_size 0 range()'s 'arg 3 must not be zero')."""
    from types import SimpleNamespace

    from r1train.rollout import sample_rows

    model = _model("tiny-qwen2", layers=1)
    cfg = SimpleNamespace(max_prompt_length=16, max_completion_length=3, temperature=1.0, top_p=1.0, top_k=0,
                          min_p=0.0, rollout_engine="r1train", kernel_backend="torch", chat_template_kwargs=None)
    rows = [{"prompt": "ab"}, {"prompt": "cde"}]
    args = dict(num_samples=2, batch_size=1)
    out = list(sample_rows(model, _CharTok(), rows, cfg=cfg, **args))
    assert [len(o[3]) for o in out] == [2, 2]
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        list(sample_rows(model, _CharTok(), rows, cfg=cfg, **args))


def test_engine_does_not_keep_its_model_alive():
    """The engine cache is keyed by model (weakly) and its engine referred to the model strongly, so no model that
    ever sampled was freed (its weights, KV cache and graphs' pool kept for the process's life: a distill teacher
    after `del teacher`). Now the model and its engine go once the caller drops the model."""
    import gc
    import weakref

    from r1train.generation import engine as ge

    model = _model("tiny-qwen2")
    ids, mask = _prompts([3, 5])
    generate(model, ids, mask, [1, 2], SamplingParams(3, greedy=True), eos_id=-1, pad_id=0, backend="torch")
    ref_m, ref_e = weakref.ref(model), weakref.ref(ge._ENGINES[model])
    del model
    gc.collect()
    assert ref_m() is None and ref_e() is None


@pytest.mark.parametrize("engine", ["r1train", "transformers"])
def test_nan_logits_are_an_error_naming_the_rows(engine):
    """A row whose logits are NaN (a NaN embedding row in its prompt) sampled token 0 with NaN log-probs at every
    position, silently (the log-probs then reach the importance weights). Now a ValueError names the rows."""
    model = _model("tiny-qwen2")
    bad = int(torch.randint(10, V, ()))
    with torch.no_grad():  # the input row only (tied, the head's row would make every row's logits NaN)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.model.embed_tokens.weight[bad] = float("nan")
    ids, mask = _prompts([4, 3, 5])
    ids[ids == bad] = 5  # the NaN row's only: in row 1
    ids[1, -1] = bad
    with pytest.raises(ValueError, match=r"logits hold NaN for rows \[1\] \(1 of 3\)"):
        generate(model, ids, mask, [1, 2, 3], SamplingParams(4), eos_id=-1, pad_id=0, engine=engine, backend="torch")
    _, logp = generate(model, ids, mask, [1, 2, 3], SamplingParams(4), eos_id=-1, pad_id=0, engine=engine,
                       backend="torch", check_finite=False)  # the caller's own check (GRPO's divergence check)
    assert logp[1].isnan().all() and torch.isfinite(logp[[0, 2]]).all()
    ids[1, -1] = 5
    tok, logp = generate(model, ids, mask, [1, 2, 3], SamplingParams(4), eos_id=-1, pad_id=0, engine=engine,
                         backend="torch")
    assert torch.isfinite(logp).all()


def test_inference_mode_call_then_a_normal_one():
    """A rollout under torch.inference_mode allocated the kept buffers as inference tensors; the next rollout
    outside it failed updating them in place. Now the buffers are allocated anew, and both rollouts equal a fresh
    engine's."""
    torch.manual_seed(0)
    model = _model("tiny-llama")
    ids, mask = _prompts([4, 6, 3])
    sp = SamplingParams(5)
    eng = Engine(model, backend="torch")
    with torch.inference_mode():
        a = eng.generate(ids, mask, [7, 8, 9], sp, eos_id=-1, pad_id=0)
    with torch.no_grad():
        b = eng.generate(ids, mask, [7, 8, 9], sp, eos_id=-1, pad_id=0)
        want = Engine(model, backend="torch").generate(ids, mask, [7, 8, 9], sp, eos_id=-1, pad_id=0)
    for got in (a, b):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cache_follows_the_models_dtype():
    """After the model is cast to another dtype the kept KV cache stayed in the old one (keys / values rounded to
    bf16 under an fp32 model: log-probs off a fresh engine's). Now a new dtype allocates a new cache."""
    torch.manual_seed(0)
    model = _model("tiny-qwen2").to(torch.bfloat16)
    ids, mask = _prompts([5, 3])
    sp = SamplingParams(4)
    eng = Engine(model, backend="torch")
    with torch.no_grad():
        eng.generate(ids, mask, [1, 2], sp, eos_id=-1, pad_id=0)
        model.float()
        got = eng.generate(ids, mask, [1, 2], sp, eos_id=-1, pad_id=0)
        want = Engine(model, backend="torch").generate(ids, mask, [1, 2], sp, eos_id=-1, pad_id=0)
    assert eng.cache.k[0].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_zero3_rollout_keeps_no_weight_copies(monkeypatch):
    """Under ZeRO-3 the engine kept its concatenated q/k/v weights (Qwen2's biased projections do not lie back to
    back) between rollouts: a full copy of partitioned parameters on every rank. Now a ZeRO-3 rollout drops them
    after it (the next one's gathered parameters are new storage: its graphs are captured anew anyway), and the
    next rollout is the same."""
    import contextlib

    import r1train.generation as gen
    from r1train.generation import engine as ge

    monkeypatch.setattr(gen, "_zero3", lambda ds: ds is not None)
    monkeypatch.setattr(gen, "gathered_for_generation", lambda ds: contextlib.nullcontext())
    torch.manual_seed(0)
    model = _model("tiny-qwen2")
    ids, mask = _prompts([4, 5])
    sp = SamplingParams(4, greedy=True)
    a = generate(model, ids, mask, [1, 2], sp, eos_id=-1, pad_id=0, backend="triton")
    eng = ge._ENGINES[model]
    assert _qkv_buffers(eng) == len(model.model.layers)  # below ZeRO-3: kept for the next rollout
    b = generate(model, ids, mask, [1, 2], sp, eos_id=-1, pad_id=0, backend="triton", ds_engine=object())
    assert _qkv_buffers(eng) == 0 and torch.equal(a[0], b[0])
