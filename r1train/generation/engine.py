"""The generation engine: static KV cache, prefill through the model's forward, a decode step replayed as
a CUDA graph per batch-size bucket, sampling with rk.sample_tokens, finished rows compacted away.

Per rollout of B rows (left-padded prompts [B, P], max_new_tokens T):
1. prefill: one forward over the distinct prompts (sdpa, keys/values written into the cache; rows that repeat
   a prompt get copies), first token sampled;
2. decode: the step "forward one token per row -> sample -> write token and log-prob -> advance" reads and
   writes only static buffers, so on CUDA it is captured once per (rows, sampling options) and replayed;
   the host reads back only the number of live rows every `check_every` steps, and then moves live rows
   to the front and continues on the smallest bucket (B, then powers of two) that holds them;
3. a row's token at generation position t depends only on (model, its prompt, its seed, t):
   rk.sample_tokens' counter-based noise, so any batch, rank count or resume draws the same samples. The
   logits it is drawn from are bitwise the same in any batch on the CPU; on a GPU the projections' kernels
   depend on the row count (rk.decode_linear from its row minima, cuBLAS's own choice by shape), so a row's
   bf16 logits can differ in their last bits between batch sizes, which can flip a draw that sits on a
   boundary of the sampling distribution.
MoE router replay (r1train.moe_replay.enable(model)): the prefill records the prompt tokens' expert ids and
the decode step writes each row's into a preallocated [layers, rows, T, k] int16 buffer (tensor indices, no
host read: part of the captured graph); moe_replay.take(model) returns them after the rollout.
Graphs and buffers are kept between rollouts while the parameters keep their storage (ZeRO 0-2: the
optimizer updates them in place); a new parameter storage (ZeRO-3 gathers) re-captures.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
import weakref
from dataclasses import dataclass

import torch

import r1kernels as rk

from .. import moe_replay as _replay
from . import attention as _attn
from . import emit as _emit_ops
from .fused import fused_decode_ops

SUPPORTED = ("qwen2", "qwen3", "llama", "mistral", "deepseek_v3")
FUSED_OPS = ("rms_norm", "apply_rotary", "silu_mul")
# Fusions of the decode step's small torch ops: "emit", the bookkeeping after sampling (write token / log-prob,
# done, next input, pos, lens) as one Triton kernel instead of ten torch kernels (emit.py); "rope_table", the
# rotary embedding's cos / sin of a one-token step gathered from a table of the positions the cache holds
# instead of ~8 elementwise kernels (fused._rope_table). Bitwise the same values and tokens. Measured together
# (H100, cd8bc50, fixed rollout, bench_rollout --ab emit+rope_table beside the engine without them in one
# process): 1.264 -> 1.239 s (-2.0%; predicted -0.035 ms a step, -1.8%). Captured graphs keep what they
# captured (the graph key has this tuple); bench_rollout's ab_variant sets it.
STEP_FUSIONS: tuple = ("emit", "rope_table")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    greedy: bool = False

    def __post_init__(self):
        rk.check_sampling_options(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                  min_p=self.min_p, greedy=self.greedy, max_new_tokens=self.max_new_tokens)

    def kernel_kwargs(self):
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    greedy=self.greedy)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def buckets(rows: int) -> list[int]:
    """Batch sizes the decode step runs at: rows itself, then the powers of two below it."""
    out, b = [rows], 1
    while b < rows:
        out.append(b)
        b *= 2
    return sorted(set(out), reverse=True)


def eos_tuple(eos_id) -> tuple:
    """eos_id: one token id or a sequence of them (TRL stops at any of the model's eos ids) -> a tuple of ints.
    A numpy integer, an integer numpy array or an integer tensor (0-d or 1-d) holds valid ids (tokenizers and
    TRL configs pass them): read as Python ints. Bools, floats, strings: a ValueError naming eos_id."""
    from operator import index  # int, numpy integer, 0-d integer array / tensor -> int; a float: TypeError

    def one(i):
        if isinstance(i, bool) or "bool" in str(getattr(i, "dtype", "")):
            raise TypeError("a bool")
        v = index(i)
        if not -2 ** 63 <= v < 2 ** 63:  # the engine holds the ids in int64
            raise OverflowError(v)
        return v

    try:
        if isinstance(eos_id, (str, bytes)):  # iterable, but not token ids
            raise TypeError("a string")
        scalar = isinstance(eos_id, (numbers.Integral, bool)) or getattr(eos_id, "ndim", None) == 0
        ids = (one(eos_id),) if scalar else tuple(dict.fromkeys(one(i) for i in eos_id))
    except (TypeError, ValueError, OverflowError):
        ids = ()
    if not ids:
        raise ValueError(f"eos_id must be a token id or a non-empty sequence of them, got {eos_id!r}")
    return ids


def check_arguments(prompt_ids_BP, prompt_mask_BP, seeds_B, pad_id, *, model) -> torch.Tensor:
    """A ValueError naming the first malformed argument (before any work; no host read): prompt_ids_BP a 2-D
    integer tensor, prompt_mask_BP a tensor of its shape, both on the model's device (its parameters'; a
    mismatch was a RuntimeError from inside the embedding or an index op), seeds_B one integer seed per row (in
    int64; a float seed was truncated; any device), pad_id an int >= 0 (done rows feed it to the model:
    check_prompt_rows bounds it by the vocabulary). -> the seeds as an int64 tensor (on seeds_B's device; a
    list: on the CPU)."""
    def integer(t):
        return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)

    if not isinstance(prompt_ids_BP, torch.Tensor) or prompt_ids_BP.ndim != 2 or not integer(prompt_ids_BP):
        raise ValueError(f"prompt_ids_BP must be a 2-D integer tensor [B, P] (left-padded prompts), got "
                         f"{getattr(prompt_ids_BP, 'dtype', type(prompt_ids_BP))} of shape "
                         f"{tuple(getattr(prompt_ids_BP, 'shape', ()))}")
    if not isinstance(prompt_mask_BP, torch.Tensor) or prompt_mask_BP.shape != prompt_ids_BP.shape:
        raise ValueError(f"prompt_mask_BP must be a tensor of prompt_ids_BP's shape {tuple(prompt_ids_BP.shape)}, "
                         f"got {tuple(getattr(prompt_mask_BP, 'shape', ()))}")
    dev = next(model.parameters()).device
    for name, t in (("prompt_ids_BP", prompt_ids_BP), ("prompt_mask_BP", prompt_mask_BP)):
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the model is on {dev} (move the prompts to the "
                             "model's device)")
    B = prompt_ids_BP.shape[0]
    try:
        seeds = seeds_B if isinstance(seeds_B, torch.Tensor) else torch.as_tensor(list(seeds_B))
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"seeds_B must be {B} integer seeds in int64's range, got {seeds_B!r} ({e})") from None
    if seeds.numel() == 0:  # [] is a float tensor
        seeds = seeds.long()
    if seeds.shape != (B,) or not integer(seeds):
        raise ValueError(f"seeds_B must be {B} integer seeds (one per prompt row), got {seeds.dtype} of shape "
                         f"{tuple(seeds.shape)}")
    if not isinstance(pad_id, numbers.Integral) or isinstance(pad_id, bool) or pad_id < 0:
        raise ValueError(f"pad_id must be a token id (an int >= 0: finished rows feed it to the model), got "
                         f"{pad_id!r}")
    return seeds.long()


def check_prompt_rows(prompt_mask_BP: torch.Tensor, prompt_ids_BP: torch.Tensor, model, pad_id=None):
    """Every row has a prompt token (a completion needs a prompt to condition on), is left-padded (its tokens
    are its last columns: a right-padded row would continue after its padding) and holds ids the model's
    embedding has: a ValueError naming the first row that does not; so must pad_id, when given. One host read."""
    B, P = prompt_mask_BP.shape
    emb = model.get_input_embeddings()
    V = getattr(emb, "base_layer", emb).num_embeddings  # peft's LoRA embedding wraps the layer
    if pad_id is not None and not 0 <= pad_id < V:
        raise ValueError(f"pad_id {pad_id} is outside the model's embedding [0, {V}) (finished rows feed it to "
                         "the model)")
    m_BP = prompt_mask_BP.bool()
    flags_3B = torch.stack([~m_BP.any(1), (m_BP[:, :-1] & ~m_BP[:, 1:]).any(1),
                            (m_BP & ((prompt_ids_BP < 0) | (prompt_ids_BP >= V))).any(1)])
    empty, gap, bad = (f.nonzero().flatten().tolist() for f in flags_3B.cpu())
    if empty:
        raise ValueError(f"prompt_mask_BP: row {empty[0]} has no prompt tokens ({len(empty)} such row(s) of {B}, "
                         f"P={P} prompt columns); a completion needs a prompt to condition on")
    if gap:
        raise ValueError(f"prompt_mask_BP: row {gap[0]} is not left-padded (a 0 after a 1; {len(gap)} such row(s) "
                         f"of {B}): prompts must end in the last column (tokenizer padding_side='left')")
    if bad:
        raise ValueError(f"prompt_ids_BP: row {bad[0]} holds a token id outside the model's embedding [0, {V}) "
                         f"({len(bad)} such row(s) of {B}); is the tokenizer the model's?")


def distinct_rows(ids_BP: torch.Tensor, mask_BP: torch.Tensor):
    """Distinct left-padded prompts -> (first_U: the first row of each, ascending; rows_B: the index in first_U
    of row b's prompt). Rows are the same prompt when their tokens and padding are. One host read (the count)."""
    B, dev = ids_BP.shape[0], ids_BP.device
    key_BP = torch.where(mask_BP.bool(), ids_BP, -1)
    uniq_UP, sorted_B = torch.unique(key_BP, dim=0, return_inverse=True)  # indices into sorted keys
    first_U = torch.full((uniq_UP.shape[0],), B, dtype=torch.int64, device=dev)
    first_U.scatter_reduce_(0, sorted_B, torch.arange(B, device=dev), "amin")
    first_U, order_U = first_U.sort()
    rank_U = torch.empty_like(order_U)
    rank_U[order_U] = torch.arange(order_U.numel(), device=dev)
    return first_U, rank_U[sorted_B]


class _State:
    """Static decode-state buffers (their addresses are baked into the captured graphs)."""

    def __init__(self, rows: int, new_tokens: int, dev):
        i64 = dict(dtype=torch.int64, device=dev)
        self.tok, self.lens, self.seeds = (torch.zeros(rows, **i64) for _ in range(3))
        self.pos, self.rid = torch.zeros(rows, **i64), torch.zeros(rows, **i64)
        self.done = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.out_tok = torch.zeros(rows, new_tokens, **i64)
        self.out_logp = torch.zeros(rows, new_tokens, dtype=torch.float32, device=dev)

    def small(self):
        """The per-row state compaction moves."""
        return [self.tok, self.lens, self.seeds, self.pos, self.rid, self.done]


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers as transformers applies it (each position sees
    the last `window` cache positions), or None when every layer attends to the whole sequence."""
    w = getattr(config, "sliding_window", None)
    if w is None:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:  # Qwen2 / Qwen3 (use_sliding_window sets some layers' type), Mistral in newer releases
        return w if "sliding_attention" in types else None
    if hasattr(config, "use_sliding_window"):
        return w if config.use_sliding_window else None
    return w  # Mistral: a set sliding_window applies to every layer


def window_passed(config, P: int, T: int) -> str | None:
    """Why the engine cannot run a rollout of P prompt columns and T new tokens on this model (it attends to every
    position): the model's sliding window, which they pass; else None. P + T - 1 positions are attended: the last
    sampled token is not fed."""
    w = sliding_window(config)
    if w is None or P + T - 1 <= w:
        return None
    return f"the model's {w}-token sliding window, which prompt + max_new_tokens - 1 ({P} + {T} - 1) pass"


# transformers' rope types whose frequencies follow the longest position of each forward call once it passes
# original_max_position_embeddings (dynamic_rope_update): a row's logits then depend on the other rows' lengths
BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_rescaled(config, P: int, T: int) -> str | None:
    """Why no engine can run a rollout of P prompt columns and T new tokens on this model with its contract (a
    completion depends only on model, prompt and seed): its rope_scaling rescales the rotary frequencies by the
    longest row of a forward call past the original length, which P + T - 1 positions reach; else None."""
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rp.get("rope_type", rp.get("type")) if isinstance(rp, dict) else None
    if kind not in BATCH_DEPENDENT_ROPE:
        return None
    n = (rp.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
         or config.max_position_embeddings)
    if P + T - 1 <= n:
        return None
    return (f"rope_scaling rope_type={kind!r} rescales the rotary frequencies by the longest row of each forward "
            f"past original_max_position_embeddings ({n}), which prompt + max_new_tokens - 1 ({P} + {T} - 1) "
            "pass: a completion would depend on the other rows of its batch")


def check_rope(config, P: int, T: int):
    """rope_rescaled as a ValueError (both rollout engines: transformers' generate rescales the same way)."""
    why = rope_rescaled(config, P, T)
    if why is not None:
        raise ValueError(f"{why}; keep max_prompt_length + max_completion_length within it")


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() inside, then every module's own training flag back (model.train(flag) would set one flag on
    every submodule: a submodule the caller froze in eval mode came back in training mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


class Engine:
    def __init__(self, model, *, backend: str = "auto", cuda_graphs: bool = True, check_every: int = 8,
                 fused: bool = True):
        mt = getattr(model.config, "model_type", None)
        if mt not in SUPPORTED:
            raise ValueError(f"the generation engine supports {SUPPORTED} models, not {mt!r}; use "
                             "rollout_engine=transformers for this model")
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1 (decode steps between reads of the live-row count), "
                             f"got {check_every!r}")  # 0 was a ZeroDivisionError, < 0 never compacted
        _attn.register()
        self.options = dict(backend=backend, cuda_graphs=cuda_graphs, check_every=check_every, fused=fused)
        self.fused = fused and backend != "torch"  # the fused kernels, where rk runs a kernel for them
        # the model through a weak reference: _ENGINES keys engines by model, and a strong one would keep every
        # model that ever sampled (its weights, this cache, the graphs' pool) alive for the process's life
        self._model = weakref.ref(model)
        self.backend, self.check_every = backend, check_every
        self._dtype = None  # the dtype the cache and buffers were allocated for
        self.cuda_graphs = cuda_graphs
        self.cache = self.st = None
        self.routes = None  # MoE router replay: expert ids [layers, rows, T, k] of the decoded tokens
        self._rec = None    # the model's recorder during a recording rollout
        self.graphs: dict = {}
        self.pool = None
        # the fused decode ops' kept buffers (fused.fused_decode_ops): "qkv": attention module id -> concatenated
        # q/k/v (weight, bias); "rope": rotary module id -> (its cos / sin table,) with STEP_FUSIONS "rope_table"
        self._fused_buffers: dict = {}
        self._eos: dict = {}  # eos tuple -> int64 tensor of its ids (static: the captured steps read it)
        self._sig = None
        self.stats = {"captures": 0, "capture_seconds": 0.0}

    @property
    def model(self):
        m = self._model()
        if m is None:
            raise RuntimeError("the generation engine's model was freed")
        return m

    # ---- buffers and graphs
    def _param_sig(self):
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _ensure(self, B: int, L: int, T: int, dev):
        c = self.cache
        dtype = self.model.get_input_embeddings().weight.dtype
        # kept buffers that cannot serve this call: a model cast to another dtype since (the cache would round its
        # keys / values to the old one), or buffers allocated under torch.inference_mode, which are not updated in
        # place outside it
        stale = c is not None and (dtype != self._dtype or (self.st.out_tok.is_inference()
                                                            and not torch.is_inference_mode_enabled()))
        if c is None or stale or c.rows_max < B or c.length < L or self.st.out_tok.shape[1] < T:
            self.reset()  # free before allocating the larger ones
            self._dtype = dtype
            self.st = _State(B, _round_up(T, 256), dev)
            self.cache = _attn.KVCache(self.model.config.num_hidden_layers, self.st.lens, _round_up(L, 256),
                                       backend=self.backend)
        sig = self._param_sig()
        if sig != self._sig:
            self._drop_graphs()
            self._sig = sig

    def _drop_graphs(self):
        # a memory pool whose graphs are all gone cannot take a new capture (measured on torch 2.11:
        # "use_count > 0" assert in capture_begin): the next capture gets a new pool
        self.graphs.clear()
        self.pool = None

    def reset(self):
        """Drop graphs and buffers (the next rollout allocates and captures anew): call it after adding
        hooks to the model or changing it in ways the parameter storage does not show."""
        self._drop_graphs()
        self.cache = self.st = self.routes = None
        self._fused_buffers.clear()

    def drop_weight_copies(self):
        """Free the concatenated q/k/v weights kept between rollouts (where the three do not lie back to back),
        and the graphs that read them: under ZeRO-3 they are full copies of partitioned parameters, and the
        next rollout's gathered parameters have new storage anyway (its graphs are captured anew)."""
        self._drop_graphs()
        self._fused_buffers.pop("qkv", None)

    def memory_bytes(self) -> int:
        """Device bytes this engine holds between rollouts: KV cache, decode state, q/k/v and rotary buffers (the
        CUDA graphs' private pool is not counted)."""
        ts = [] if self.cache is None else [t for t in self.cache.k + self.cache.v if t is not None]
        ts += [] if self.st is None else [*self.st.small(), self.st.out_tok, self.st.out_logp]
        ts += [t for kept in self._fused_buffers.values() for wb in kept.values() for t in wb if t is not None]
        ts += [] if self.routes is None else [self.routes]
        return sum(t.numel() * t.element_size() for t in ts)

    @contextlib.contextmanager
    def _active(self):
        cfg = self.model.config
        old = cfg._attn_implementation
        dev = next(self.model.parameters()).device
        fuse = (self.fused and (dev.type == "cuda" or self.backend == "triton")
                and all(len(rk._backend.available(op, dev.type)) > 1 for op in FUSED_OPS))
        with eval_mode(self.model):
            cfg._attn_implementation = _attn.ATTN_NAME
            _attn._ACTIVE.append(self.cache)
            try:
                rope = self.cache.length if "rope_table" in STEP_FUSIONS else None
                with fused_decode_ops(self.model, self.backend, self._fused_buffers, rope_sink=self.cache,
                                      rope_table=rope) if fuse else contextlib.nullcontext():
                    yield
            finally:
                _attn._ACTIVE.pop()
                cfg._attn_implementation = old

    def _forward(self, ids_BT, pos_BT):
        return self.model(input_ids=ids_BT, position_ids=pos_BT, use_cache=False, logits_to_keep=1).logits[:, -1]

    def _step(self, r: int, sp: SamplingParams, eos: tuple, pad_id: int):
        st = self.st
        rec = self._rec.decode(self.routes, st.rid[:r], st.pos[:r], st.done[:r]) if self._rec else None
        with rec or contextlib.nullcontext():
            logits = self._forward(st.tok[:r, None], st.lens[:r, None])
        self._emit(r, logits, sp, eos, pad_id, advance_lens=True)

    def _emit(self, r, logits_rV, sp, eos, pad_id, advance_lens=False):
        """Sample row tokens from logits, write token/log-prob at each row's position, advance (emit.py)."""
        st = self.st
        tok, logp = rk.sample_tokens(logits_rV, st.seeds[:r], st.pos[:r], backend=self.backend,
                                     **sp.kernel_kwargs())
        kernel = ("emit" in STEP_FUSIONS and _emit_ops.triton is not None and self.backend != "torch"
                  and (tok.is_cuda or rk._backend.TRITON_INTERPRET))
        emit = _emit_ops.emit_triton if kernel else _emit_ops.emit_torch
        emit(st, r, tok, logp, self._eos[eos], pad_id, advance_lens)

    def _run_step(self, r, sp, eos, pad_id):
        if not (self.cuda_graphs and self.st.tok.is_cuda):
            return self._step(r, sp, eos, pad_id)
        key = (r, tuple(sp.kernel_kwargs().items()), eos, pad_id, self._rec is not None, STEP_FUSIONS)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(r, sp, eos, pad_id)
            if g is None and self.cuda_graphs:  # a lazy initialization may fail only the first capture
                g = self._capture(r, sp, eos, pad_id)
            if g is None:
                self.cuda_graphs = False
                return self._step(r, sp, eos, pad_id)
            self.graphs[key] = g
        g.replay()

    def _capture(self, r, sp, eos, pad_id):
        import time

        t0 = time.perf_counter()
        snap = [t.clone() for t in self.st.small()]
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up: Triton compiles, cuBLAS workspaces
                self._step(r, sp, eos, pad_id)
            torch.cuda.current_stream().wait_stream(s)
            for t, v in zip(self.st.small(), snap):  # the warm-up step must leave no trace
                t.copy_(v)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self._step(r, sp, eos, pad_id)
        except Exception as e:  # a model whose forward syncs with the host cannot be captured
            for t, v in zip(self.st.small(), snap):
                t.copy_(v)
            import traceback

            where = "".join(traceback.format_tb(e.__traceback__)[-4:])
            warnings.warn(f"r1train generation: CUDA-graph capture of the decode step failed "
                          f"({type(e).__name__}: {e}) at:\n{where}")
            self.stats["capture_failures"] = self.stats.get("capture_failures", 0) + 1
            return None
        torch.cuda.synchronize()
        self.stats["captures"] += 1
        self.stats["capture_seconds"] += time.perf_counter() - t0
        return g

    def _compact(self, r: int, target: int):
        """Move live rows to the front; the first `target` rows then hold every live row."""
        st = self.st
        done = st.done[:r]
        order = torch.cat([(~done).nonzero().squeeze(1), done.nonzero().squeeze(1)])[:target]
        for t in st.small():
            t[:target] = t[:r].index_select(0, order)
        self.cache.compact(order)

    # ---- one rollout
    @torch.no_grad()
    def generate(self, prompt_ids_BP, prompt_mask_BP, seeds_B, sp: SamplingParams, *, eos_id, pad_id: int):
        """-> (tokens int64 [B, T'], fp32 log-probs [B, T']) with T' <= max_new_tokens (every row finished
        or T' = max_new_tokens); tokens after a row's eos are pad_id, their log-probs 0."""
        seeds = check_arguments(prompt_ids_BP, prompt_mask_BP, seeds_B, pad_id, model=self.model)
        B, P = prompt_ids_BP.shape
        T, dev = sp.max_new_tokens, prompt_ids_BP.device
        if B == 0:
            return torch.zeros(0, 0, dtype=torch.long, device=dev), torch.zeros(0, 0, device=dev)
        why = window_passed(self.model.config, P, T)
        if why is not None:
            raise ValueError(f"the generation engine attends to every position, not within {why}: use "
                             "rollout_engine=transformers")
        check_rope(self.model.config, P, T)
        check_prompt_rows(prompt_mask_BP, prompt_ids_BP, self.model, pad_id)
        # padding columns are not read (check_prompt_rows checks the masked-in ids only), but the prefill embeds
        # them: a caller's own pad value (-1, an id past the vocabulary) would index outside the embedding
        prompt_ids_BP = prompt_ids_BP.masked_fill(~prompt_mask_BP.bool(), pad_id)
        eos = eos_tuple(eos_id)
        if eos not in self._eos:
            self._eos[eos] = torch.tensor(eos, dtype=torch.int64, device=dev)
        self._ensure(B, P + T, T, dev)
        st, cache = self.st, self.cache
        self._rec = rec = _replay.recorder(self.model)
        if rec is not None:
            rec.sync()
            M, K, _ = rec.shape
            shape = (M, self.cache.rows_max, st.out_tok.shape[1], K)
            if self.routes is None or tuple(self.routes.shape) != shape or self.routes.dtype != rec.dtype:
                self._drop_graphs()  # captured graphs write into the old buffer
                self.routes = torch.empty(shape, dtype=rec.dtype, device=dev)
            self.routes[:, :B].fill_(-1)
        st.seeds[:B] = seeds.to(dev)
        st.rid[:B] = torch.arange(B, device=dev)
        st.pos.zero_()
        st.done.zero_()
        st.out_tok[:B].fill_(pad_id)
        st.out_logp[:B].zero_()
        with self._active():
            # the prefill runs once per distinct prompt (GRPO repeats each num_generations times); the repeats
            # get copies of its keys/values, first-token logits and MoE routing
            first_U, rows_B = distinct_rows(prompt_ids_BP, prompt_mask_BP)
            ids_UP, mask_UP = prompt_ids_BP[first_U], prompt_mask_BP[first_U]
            n_U = cache.set_prefill(mask_UP)
            with rec.prefill(mask_UP) if rec else contextlib.nullcontext():
                logits = self._forward(ids_UP, _attn.position_ids(mask_UP))
            n_B = n_U
            if first_U.numel() < B:
                cache.repeat_prefill(rows_B, P)
                if rec:
                    rec.repeat_prompts(rows_B)
                logits, n_B = logits[rows_B], n_U[rows_B]
            cache.mode = "decode"
            st.lens[:B] = n_B
            self._emit(B, logits, sp, eos, pad_id)
            rows, steps = B, 1
            sizes = buckets(B)
            while steps < T:
                eager = not (self.cuda_graphs and st.tok.is_cuda)
                cache.window = min(P + steps, cache.length) if eager else None  # lens <= P + steps - 1
                self._run_step(rows, sp, eos, pad_id)
                steps += 1
                if steps % self.check_every == 0 and steps < T:
                    live = int((~st.done[:rows]).sum())
                    if live == 0:
                        break
                    target = min(s for s in sizes if s >= live)
                    if target < rows:
                        self._compact(rows, target)
                        rows = target
        cache.window = None
        if rec is not None:
            rec.finish(self.routes[:, :B, :steps])
            self._rec = None
        return st.out_tok[:B, :steps].clone(), st.out_logp[:B, :steps].clone()


def checked_logprobs(logp_BT: torch.Tensor) -> torch.Tensor:
    """logp_BT, or a ValueError naming the rows with a NaN log-prob: NaN logits sample token 0 (argmax and the
    sampler treat NaN as the largest) with a NaN log-prob at every position. One host read a rollout."""
    bad = logp_BT.isnan().any(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"the model's logits hold NaN for rows {rows[:8]}{' ...' if len(rows) > 8 else ''} "
                         f"({len(rows)} of {len(bad)}): nothing can be sampled from them (its weights or the "
                         "prompt's embeddings hold NaN or inf)")
    return logp_BT


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def release(model):
    """Free what the model's engine holds between rollouts (KV cache, buffers, graphs), if it has one."""
    e = _ENGINES.get(model)
    if e is not None:
        e.reset()


def engine_for(model, **kw) -> Engine:
    """The engine of this model (kept between rollouts so graphs and buffers are reused)."""
    e = _ENGINES.get(model)
    if e is None or any(e.options.get(k) != v for k, v in kw.items()):
        e = _ENGINES[model] = Engine(model, **kw)
    return e
