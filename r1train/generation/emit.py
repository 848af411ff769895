"""The decode step's bookkeeping after sampling, on the engine's static buffers: each row's token (pad_id for
rows already done) and log-prob (0 there) written at (rid, pos) of the outputs, done |= token is an eos id,
the token becomes the next input, pos += 1 and, in a decode step, lens += 1.

emit_torch is the spec (ten small torch kernels a step on a GPU: fill, where, masked_fill, two index_put, eq,
or, copy and two adds); emit_triton does the same in one launch over the rows (the engine's step with "emit"
in engine.STEP_FUSIONS). Integer and copy work only: the two give equal buffers bit for bit.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: emit_torch only
    triton = None


def emit_torch(st, r: int, tok_r, logp_r, eos_ids, pad_id: int, advance_lens: bool):
    """st: the engine's _State; eos_ids: int64 tensor of the eos ids; tok_r / logp_r: the sampled rows."""
    done = st.done[:r]
    tok = torch.where(done, torch.full_like(tok_r, pad_id), tok_r)
    st.out_tok.index_put_((st.rid[:r], st.pos[:r]), tok)
    st.out_logp.index_put_((st.rid[:r], st.pos[:r]), logp_r.masked_fill(done, 0.0))
    done |= (tok == eos_ids[0]) if eos_ids.numel() == 1 else (tok[:, None] == eos_ids).any(1)
    st.tok[:r] = tok
    st.pos[:r] += 1
    if advance_lens:
        st.lens[:r] += 1


if triton is not None:
    @triton.jit
    def _emit_kernel(tok_ptr, logp_ptr, done_ptr, rid_ptr, pos_ptr, lens_ptr, in_tok_ptr, out_tok_ptr,
                     out_logp_ptr, eos_ptr, n_eos, pad_id, r, s_tok, s_logp, so_tok, so_logp,
                     ADVANCE_LENS: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < r
        done = tl.load(done_ptr + i, mask=m, other=0) != 0
        tok = tl.where(done, pad_id, tl.load(tok_ptr + i * s_tok, mask=m, other=0))
        logp = tl.where(done, 0.0, tl.load(logp_ptr + i * s_logp, mask=m, other=0.0))
        rid = tl.load(rid_ptr + i, mask=m, other=0)
        pos = tl.load(pos_ptr + i, mask=m, other=0)
        tl.store(out_tok_ptr + rid * so_tok + pos, tok, mask=m)
        tl.store(out_logp_ptr + rid * so_logp + pos, logp, mask=m)
        for e in range(n_eos):
            done = done | (tok == tl.load(eos_ptr + e))
        tl.store(done_ptr + i, done, mask=m)
        tl.store(in_tok_ptr + i, tok, mask=m)
        tl.store(pos_ptr + i, pos + 1, mask=m)
        if ADVANCE_LENS:
            tl.store(lens_ptr + i, tl.load(lens_ptr + i, mask=m, other=0) + 1, mask=m)


def emit_triton(st, r: int, tok_r, logp_r, eos_ids, pad_id: int, advance_lens: bool):
    """emit_torch in one kernel (CUDA, or CPU under TRITON_INTERPRET=1). The state buffers are contiguous
    1-D (rows) and [rows, T] tensors (_State allocates them so)."""
    if r == 0:
        return
    block = min(max(triton.next_power_of_2(r), 16), 1024)
    _emit_kernel[(triton.cdiv(r, block),)](
        tok_r, logp_r, st.done, st.rid, st.pos, st.lens, st.tok, st.out_tok, st.out_logp, eos_ids,
        eos_ids.numel(), int(pad_id), r, tok_r.stride(0), logp_r.stride(0), st.out_tok.stride(0),
        st.out_logp.stride(0), ADVANCE_LENS=advance_lens, BLOCK=block, num_warps=1 if block <= 64 else 4)
