"""The decode step's fusions (r1train.generation.engine.STEP_FUSIONS). "emit" (emit.py): the Triton kernel
(interpreter on CPU) leaves the engine's buffers bit for bit as the torch spec does, and the spec against a
per-row Python loop. "rope_table" (fused._rope_table): the table's rows equal the rotary module's own one-token
outputs bitwise, other calls go to the module. With either, the engine samples the same rollout."""
from __future__ import annotations

import pytest
import torch

from r1train.generation import emit as E
from r1train.generation.engine import _State

pytest.importorskip("triton")


def _state(rows, T, r, seed):
    g = torch.Generator().manual_seed(seed)
    st = _State(rows, T, "cpu")
    st.rid[:] = torch.randperm(rows, generator=g)
    st.pos[:] = torch.randint(0, T - 1, (rows,), generator=g)
    st.lens[:] = torch.randint(0, 100, (rows,), generator=g)
    st.done[:] = torch.rand(rows, generator=g) < 0.3
    st.tok[:] = torch.randint(0, 50, (rows,), generator=g)
    st.out_tok[:] = torch.randint(0, 50, (rows, T), generator=g)
    st.out_logp[:] = torch.randn(rows, T, generator=g)
    tok = torch.randint(0, 8, (r,), generator=g)  # small vocabulary: eos ids are drawn
    logp = -torch.rand(r, generator=g) * 5
    return st, tok, logp


def _buffers(st):
    return [t.clone() for t in (st.tok, st.lens, st.pos, st.rid, st.done, st.out_tok, st.out_logp)]


def _by_hand(st, r, tok, logp, eos, pad_id, advance):
    """The contract row by row in Python."""
    for i in range(r):
        t = pad_id if st.done[i] else int(tok[i])
        st.out_tok[st.rid[i], st.pos[i]] = t
        st.out_logp[st.rid[i], st.pos[i]] = 0.0 if st.done[i] else float(logp[i])
        st.done[i] = bool(st.done[i]) or t in eos
        st.tok[i] = t
        st.pos[i] += 1
        if advance:
            st.lens[i] += 1


@pytest.mark.parametrize("rows,r", [(5, 5), (64, 40), (300, 300)])
@pytest.mark.parametrize("eos", [(3,), (3, 5, 0)])
@pytest.mark.parametrize("advance", [False, True])
def test_emit_kernel_equals_spec(rows, r, eos, advance):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    eos_ids = torch.tensor(eos)
    runs = []
    for fn in (E.emit_torch, E.emit_triton, _by_hand):
        st, tok, logp = _state(rows, 12, r, seed)
        fn(st, r, tok, logp, eos if fn is _by_hand else eos_ids, 7, advance)
        runs.append(_buffers(st))
    for a, b, c in zip(*runs):
        assert torch.equal(a, b) and torch.equal(a, c)
    st, tok, logp = _state(rows, 12, r, seed)  # rows >= r untouched
    before = _buffers(st)
    E.emit_triton(st, r, tok, logp, eos_ids, 7, advance)
    for a, b in zip(before[:5], _buffers(st)[:5]):
        assert torch.equal(a[r:], b[r:])


def test_emit_strided_samples():
    """tok / logp as strided views (a sampler's outputs may be column views)."""
    st, tok, logp = _state(6, 8, 6, 3)
    tok2, logp2 = torch.stack([tok, tok], 1)[:, 1], torch.stack([logp, logp], 1)[:, 0]
    a = _state(6, 8, 6, 3)[0]
    E.emit_torch(a, 6, tok, logp, torch.tensor([2]), 0, True)
    E.emit_triton(st, 6, tok2, logp2, torch.tensor([2]), 0, True)
    for x, y in zip(_buffers(a), _buffers(st)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_rope_table_equals_the_module(name):
    """fused_decode_ops(rope_table=L): one-token calls read the table (no elementwise kernel: the module's own
    forward is not called) and equal the module's forward bitwise at every position, in fp32 and bf16;
    multi-token calls (prefill) and other dtypes go to the module; after the context the module is unpatched."""
    from test_generation import _model

    from r1train.generation.fused import fused_decode_ops

    for dtype in (torch.float32, torch.bfloat16):
        model = _model(name).to(dtype)
        rot = model.model.rotary_emb
        pos = torch.randint(0, 40, (7, 1))
        want = rot(torch.empty(0, dtype=dtype), pos)
        many = torch.randint(0, 40, (2, 5))
        want_many = rot(torch.empty(0, dtype=dtype), many)
        calls = []
        real = type(rot).forward
        buffers = {}
        with fused_decode_ops(model, "torch", buffers, rope_table=40):
            type(rot).forward = lambda self, *a, _c=calls, _r=real: _c.append(1) or _r(self, *a)
            try:
                got = rot(torch.empty(0, dtype=dtype), pos)
                assert calls == []
                got_many = rot(torch.empty(0, dtype=dtype), many)
                assert calls == [1]
                other = rot(torch.empty(0, dtype=torch.float16), pos)
            finally:
                type(rot).forward = real
        for a, b in zip(got + got_many, want + want_many):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        assert other[0].dtype == torch.float16
        assert "forward" not in vars(rot) and len(buffers["rope"]) == 1


@pytest.mark.parametrize("fusion", ["emit", "rope_table"])
def test_engine_with_step_fusions(fusion, monkeypatch):
    """The engine with the fusion in STEP_FUSIONS (triton backend): the same sampled rollout (tokens, log-probs),
    early eos and compaction included; the fused path runs."""
    from test_generation import _model, _prompts

    from r1train.generation import Engine, SamplingParams
    from r1train.generation import engine as eng_mod
    from r1train.generation import fused as F

    calls = []
    real = E.emit_triton if fusion == "emit" else F._rope_lookup
    monkeypatch.setattr(E if fusion == "emit" else F, real.__name__, lambda *a: calls.append(a[1]) or real(*a))
    torch.manual_seed(4)
    model = _model("tiny-qwen2", sharp=False)
    ids, mask = _prompts([5, 3, 6, 2, 4])
    out = []
    for fusions in ((), (fusion,)):
        monkeypatch.setattr(eng_mod, "STEP_FUSIONS", fusions)
        eng = Engine(model, backend="triton", check_every=1)
        out.append(eng.generate(ids, mask, list(range(5)), SamplingParams(9, temperature=1.0), eos_id=(4, 9),
                                pad_id=0))
    (t0, l0), (t1, l1) = out
    assert len(calls) >= 8  # every decode step (emit: and the prefill's first token)
    assert torch.equal(t0, t1) and torch.equal(l0, l1)
    assert ((t0 == 4) | (t0 == 9)).any(1).sum() >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("fusion", ["emit", "rope_table"])
def test_gpu_step_fusions_in_captured_steps(greedy, fusion, monkeypatch):
    """The captured decode step with the fusion (bf16 tiny Qwen2, 12 rows, compaction every 2 steps, two eos
    ids): tokens and log-probs bitwise the default's, on the first rollout and on replay. rk.decode_linear's
    kernel runs in every bucket (every row minimum set to 1: by default q/k/v below 17 rows and o_proj below 33
    keep cuBLAS)."""
    from test_generation import _model, _prompts

    from r1train.generation import fused as fz
    monkeypatch.setattr(fz, "DECODE_LINEAR_MIN_ROWS", dict.fromkeys(fz.DECODE_LINEAR_MIN_ROWS, 1))

    from r1train.generation import Engine, SamplingParams
    from r1train.generation import engine as eng_mod

    torch.manual_seed(5)
    model = _model("tiny-qwen2", sharp=False).cuda().to(torch.bfloat16)
    ids, mask = _prompts([5, 3, 6, 2, 4, 7, 1, 5, 5, 2, 3, 6])
    ids, mask = ids.cuda(), mask.cuda()
    sp = SamplingParams(24, greedy=greedy)
    out = {}
    for fusions in ((), (fusion,)):
        monkeypatch.setattr(eng_mod, "STEP_FUSIONS", fusions)
        eng = Engine(model, cuda_graphs=True, check_every=2)
        out[fusions] = [eng.generate(ids, mask, list(range(12)), sp, eos_id=(4, 9), pad_id=0) for _ in range(2)]
        assert eng.cuda_graphs and eng.stats["captures"] >= 1
    for (t0, l0), (t1, l1) in zip(out[()], out[(fusion,)]):
        assert torch.equal(t0, t1) and torch.equal(l0, l1)
