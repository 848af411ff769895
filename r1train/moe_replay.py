"""MoE router replay (R3, as slime / verl / prime-rl call it) for DeepseekV3 policies: the rollout records
the experts each token was routed to, and the training forward replays that selection, so the policy
gradient is taken through the experts the samples came from.

Recording (the generation engine, r1train/generation/engine.py): from `enable(model)` until `disable(model)`,
every engine rollout of `model` writes each MoE layer's top-k expert ids into int16 buffers (int32 above 32767
experts): the prompt tokens at prefill, [B, P, M, K], and in the decode step one token per row into a
preallocated [M, rows, T, K] buffer at (row, position) with tensor indices (no host sync: the step stays
CUDA-graph capturable). A token's ids are those the router chose when the token was the forward's INPUT,
which is where the training forward routes it too. Entries of -1 mean "not recorded, route normally":
prompt pads, the eos token and everything after it, and a row's last token (the rollout never feeds it to
the model). None of these reaches the loss (pads are masked out of attention; the attention is causal, so
a row's last real token influences no scored position), so every routing decision that does is replayed.
Prompt tokens are recorded and replayed too: their keys and values, which every completion token attends
to, depend on their routing. `take(model)` returns the last rollout's RoutingRecord (prompt and
completion parts, so a trainer can re-pad them like the rollout's prompt/completion tensors).

Replay (the training forward): `replay(model, ids)` arms every MoE router with ids [..., M, K] (leading
dims flatten to the forward's N tokens in order, e.g. [B, L, M, K] aligned with input_ids). In training
forwards (module.training and grad enabled -- the rule rk.patch's routers count tokens by; generation and
no-grad log-prob passes route normally) each router's output is replaced: the top-k SELECTION becomes the
recorded ids, the WEIGHTS are recomputed from the current router logits at those ids exactly as the model
normalizes its own: w = sigmoid(logits) gathered at the ids, / (sum w + 1e-20) when norm_topk_prob, times
routed_scaling_factor. Gradients reach the gate weight through the gathered scores (the gate still learns);
tokens with -1 keep the router's own selection and weights. The ids stay armed until the next replay() call
or the end of its `with` block, so activation checkpointing's recompute inside backward replays the same
ids. Reentrant checkpointing (use_reentrant=True) runs the layer's forward without grad: that forward is
replayed too (found by its torch.utils.checkpoint frame), else it would route by the router's own choice and
its recompute by the recorded ids (different logits and gradients, silently). The router itself still runs
(its forward hook replaces its output), so rk.patch's load counter (auxiliary-loss-free balancing) keeps
counting the router's own choice, which is what its bias steers.

Agreement: each replayed training forward (not a checkpointing recompute) adds, on the device, how many
recorded (token, layer, k) entries the router's recomputed top-k contains (a set comparison: ids are
compared regardless of their order within the k) and how many entries were recorded; `agreement(model)`
returns {"moe/routing_agreement": matched / recorded} as an fp32 device scalar and resets the counts, so
the trainer reads it with its step's other metrics in one host sync.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from r1kernels.patch.deepseek_v3 import full_shape, in_reentrant_checkpoint

ROUTER_CLASSES = ("DeepseekV3TopkRouter", "R1KRouter")
KEY = "moe_router_replay"


def moe_routers(model) -> list:
    """The model's MoE routers in layer order (transformers' DeepseekV3 router or rk.patch's)."""
    return [m for m in model.modules() if type(m).__name__ in ROUTER_CLASSES]


@dataclass
class RoutingRecord:
    """Expert ids of one rollout, -1 where not recorded: prompt [B, P, M, K] (aligned with the left-padded
    prompt_ids) and completion [B, T, M, K] (aligned with completion_ids)."""
    prompt: torch.Tensor
    completion: torch.Tensor

    def joined(self) -> torch.Tensor:
        """[B, P + T, M, K], aligned with the rollout's input_ids (prompt then completion)."""
        return torch.cat([self.prompt, self.completion], 1)

    def replace_rows(self, other: RoutingRecord, rows: torch.Tensor) -> RoutingRecord:
        """This record with rows[i] replaced by other's row i; both re-padded with -1 to the wider prompt
        (on the left) and completion (on the right), as the rollout tensors are."""
        P = max(self.prompt.shape[1], other.prompt.shape[1])
        T = max(self.completion.shape[1], other.completion.shape[1])
        rows = rows.to(self.prompt.device)
        prompt = _pad(self.prompt, P, True).index_copy(0, rows, _pad(other.prompt, P, True))
        completion = _pad(self.completion, T, False).index_copy(0, rows, _pad(other.completion, T, False))
        return RoutingRecord(prompt, completion)


def _pad(x, width, left):
    n = width - x.shape[1]
    if n <= 0:
        return x
    fill = x.new_full((x.shape[0], n, *x.shape[2:]), -1)
    return torch.cat([fill, x] if left else [x, fill], 1)


class RouterReplay:
    """Per-model state: the routers' hook, the recording target, the armed replay ids, the agreement counts."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.routers: list = []
        self._handles: list = []
        self.recording = False          # engine rollouts record (enable())
        self._target = None             # set by the engine around its forwards
        self._prompt_MBPK = None
        self.record: RoutingRecord | None = None
        self.ids_NMK = self._valid_NM = None
        self.stats = None               # int64 [2] on the device: matched, recorded entries
        self.sync()

    # ---- routers and their hook
    def sync(self):
        """(Re)attach the hook when the model's routers changed (rk.patch / ExpertLoad swap them)."""
        rs = moe_routers(self._model())
        if len(rs) == len(self.routers) and all(a is b for a, b in zip(rs, self.routers)):
            return
        for h in self._handles:
            h.remove()
        self.routers = rs
        self._handles = [r.register_forward_hook(self._hook_for(j)) for j, r in enumerate(rs)]

    def close(self):
        """Stop recording and replaying: the hooks come off the routers; the record, armed ids and counts go."""
        for h in self._handles:
            h.remove()
        self.routers, self._handles = [], []
        self.recording, self._target, self._prompt_MBPK = False, None, None
        self.record = self.ids_NMK = self._valid_NM = self.stats = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(MoE layers M, top_k K, experts E); E from the router weight's full shape (partitioned under ZeRO-3)."""
        r = self.routers[0]
        return len(self.routers), int(r.top_k), int(full_shape(r.weight)[0])

    @property
    def dtype(self):
        return torch.int16 if self.shape[2] <= torch.iinfo(torch.int16).max else torch.int32

    def _hook_for(self, j):
        def hook(module, args, out):
            if self._target is not None:
                self._record(j, out[2])
                return None
            if self.ids_NMK is not None and module.training and (torch.is_grad_enabled() or
                                                                 in_reentrant_checkpoint()):
                return self._replay(j, module, out)
            return None
        return hook

    # ---- recording (the generation engine)
    def _record(self, j, ids_NK):
        t = self._target
        if t[0] == "prefill":
            mask_BP = t[1]
            B, P = mask_BP.shape
            if self._prompt_MBPK is None:
                self._prompt_MBPK = torch.full((len(self.routers), B, P, ids_NK.shape[1]), -1, dtype=self.dtype,
                                               device=ids_NK.device)
            self._prompt_MBPK[j] = torch.where(mask_BP.bool()[..., None], ids_NK.view(B, P, -1), -1)
        else:  # decode: the input token of row rid sits at completion position pos - 1
            _, buf_MBTK, rid, pos, done = t
            vals = torch.where(done[:, None], -1, ids_NK).to(buf_MBTK.dtype)
            buf_MBTK[j].index_put_((rid, pos - 1), vals)

    @contextlib.contextmanager
    def prefill(self, prompt_mask_BP):
        """Around the engine's prefill forward: records the prompt tokens' ids (pads -1)."""
        self._prompt_MBPK, self._target = None, ("prefill", prompt_mask_BP)
        try:
            yield
        finally:
            self._target = None

    def repeat_prompts(self, rows_B):
        """The prefill ran on distinct prompts: row b's prompt record is prompt row rows_B[b]'s."""
        self._prompt_MBPK = self._prompt_MBPK.index_select(1, rows_B)

    @contextlib.contextmanager
    def decode(self, buf_MBTK, rid_r, pos_r, done_r):
        """Around the decode step's forward (captured in the CUDA graph): row rid_r[i]'s input token ids go
        to buf[:, rid_r[i], pos_r[i] - 1] (-1 for rows already done); static buffers only."""
        self._target = ("decode", buf_MBTK, rid_r, pos_r, done_r)
        try:
            yield
        finally:
            self._target = None

    def finish(self, completion_MBTK):
        """The engine's rollout is done: completion_MBTK = its buffer [M, B, T', K] (copied)."""
        # a copy, never a view of the engine's buffer (.contiguous() returns the view itself when it is already
        # contiguous: one MoE layer with one row, or rows that ran the buffer's full width), which the next
        # rollout (dynamic sampling, evaluation) overwrites
        self.record = RoutingRecord(self._prompt_MBPK.permute(1, 2, 0, 3).contiguous(),
                                    completion_MBTK.permute(1, 2, 0, 3).clone(memory_format=torch.contiguous_format))
        self._prompt_MBPK = None

    def take(self) -> RoutingRecord:
        if self.record is None:
            raise RuntimeError(f"{KEY}: no recorded rollout to take (the r1train generation engine records "
                               "after enable(model); rollout_engine=transformers does not record)")
        rec, self.record = self.record, None
        return rec

    # ---- replay (the training forward)
    def arm(self, ids, *, check: bool = True):
        if ids is None:
            self.ids_NMK = self._valid_NM = None
            return
        self.sync()
        M, K, E = self.shape
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor of expert ids, got "
                             f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.dim() < 3 or ids.shape[-2:] != (M, K):
            raise ValueError(f"ids must have shape [..., {M}, {K}] (tokens, MoE layers, top_k), "
                             f"got {tuple(ids.shape)}")
        dev = self.routers[0].weight.device
        if ids.device != dev:
            raise ValueError(f"ids must be on the model's device {dev}, got {ids.device}")
        ids_NMK = ids.reshape(-1, M, K)
        valid_NM = (ids_NMK >= 0).all(-1)
        if check:  # one host read: range, whole-token -1, distinct ids within a token
            rec = ids_NMK.long()
            bad_range = ((rec < -1) | (rec >= E)).any()
            partial = ((rec < 0).any(-1) & (rec >= 0).any(-1)).any()
            srt = rec.sort(-1).values
            dup = ((srt[..., 1:] == srt[..., :-1]) & valid_NM[..., None]).any()
            flags = torch.stack([bad_range, partial, dup]).tolist()
            if flags[0]:
                raise ValueError(f"ids: expert ids must be in [0, {E}) (or -1: route normally), got values in "
                                 f"[{int(rec.min())}, {int(rec.max())}]")
            if flags[1]:
                raise ValueError("ids: a token's k ids must be all -1 (route normally) or all recorded")
            if flags[2]:
                raise ValueError("ids: a token's k expert ids must be distinct")
        self.ids_NMK, self._valid_NM = ids_NMK, valid_NM

    def _replay(self, j, router, out):
        logits_NE, w_NK, ids_NK = out
        N, K = ids_NK.shape
        if self.ids_NMK.shape[0] != N:
            raise ValueError(f"ids: the armed replay covers {self.ids_NMK.shape[0]} tokens but this training "
                             f"forward routes {N} (arm the ids of each forward: replay(model, ids))")
        rec_NK = self.ids_NMK[:, j].long()
        valid_N1 = self._valid_NM[:, j, None]
        forced_NK = torch.where(valid_N1, rec_NK, ids_NK)
        w = logits_NE.float().sigmoid().gather(1, forced_NK)
        if router.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * router.routed_scaling_factor
        if torch._C._current_graph_task_id() == -1:  # not activation checkpointing's recompute
            with torch.no_grad():
                hit = ((rec_NK[:, :, None] == ids_NK[:, None, :]).any(-1) & valid_N1).sum()
                add = torch.stack([hit, valid_N1.sum() * K])
                self.stats = add if self.stats is None else self.stats + add
        return logits_NE, torch.where(valid_N1, w, w_NK.float()).to(w_NK.dtype), forced_NK

    def agreement(self) -> dict:
        """{"moe/routing_agreement": fp32 device scalar} over the replayed training forwards since the last
        call (NaN if none had a recorded token); {} when nothing was replayed. Resets the counts."""
        if self.stats is None:
            return {}
        s, self.stats = self.stats, None
        frac = torch.where(s[1] > 0, s[0].double() / s[1].clamp(min=1), float("nan")).float()
        return {"moe/routing_agreement": frac}


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _state(model, create: bool = True) -> RouterReplay | None:
    st = _STATES.get(model)
    if st is None and create:
        if not moe_routers(model):
            from .config import ConfigError

            raise ConfigError(f"{KEY}: the model ({type(model).__name__}) has no MoE layers (DeepseekV3 "
                              f"routers) to replay; set {KEY}=false")
        st = _STATES[model] = RouterReplay(model)
    return st


def enable(model) -> RouterReplay:
    """Router replay for `model`: the generation engine records every rollout's routing from now on.
    Raises ConfigError naming moe_router_replay when the model has no MoE layers. Call it after the routers
    are in place (rk.patch / ExpertLoad); replay() re-attaches to swapped routers anyway."""
    st = _state(model)
    st.sync()
    st.recording = True
    return st


def disable(model):
    """Undo enable(model) and any replay(): its rollouts record nothing from now on, the hooks come off its
    routers, and the last record, the armed ids and the agreement counts are dropped, with the buffers its
    generation engine kept for a recording rollout (the engine's next rollout allocates anew). A model with no
    router replay is left as it is (so a second call does nothing)."""
    st = _STATES.pop(model, None)
    if st is None:
        return
    recorded = st.recording
    st.close()
    if recorded:  # the engine's [M, rows, T, K] routes buffer and the graphs that write it
        from .generation.engine import release

        release(model)


def recorder(model) -> RouterReplay | None:
    """The engine's question: does this model's rollout record routing? (the state, or None)."""
    st = _STATES.get(model)
    return st if st is not None and st.recording else None


def take(model) -> RoutingRecord:
    """The last recorded rollout's RoutingRecord (once: taking it clears it)."""
    st = _STATES.get(model)
    if st is None:
        raise RuntimeError(f"{KEY}: router replay is not enabled for this model (enable(model))")
    return st.take()


class _Armed:
    def __init__(self, st):
        self.st = st

    def __enter__(self):
        return self.st

    def __exit__(self, *exc):
        self.st.arm(None)
        return False


def replay(model, ids, *, check: bool = True) -> _Armed:
    """Arm the model's MoE routers with ids [..., M, K] (int; -1 = route that token normally) for its training
    forwards, until the next replay() call (ids=None disarms) -- or, used as `with replay(model, ids):`, until
    the block ends (put backward inside it under activation checkpointing). check=True validates the values
    (one host read: ids in [-1, E), a token all -1 or k distinct ids); the engine's records are valid by
    construction (check=False skips the read). Bad ids raise ValueError naming `ids`."""
    st = _state(model, create=ids is not None)
    if st is None:  # disarming a model that was never armed
        return contextlib.nullcontext()
    st.arm(ids, check=check)
    return _Armed(st)


def agreement(model) -> dict:
    """{"moe/routing_agreement": fp32 device scalar} since the last call ({} when nothing was replayed)."""
    st = _STATES.get(model)
    return {} if st is None else st.agreement()
