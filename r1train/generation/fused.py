"""Fused kernels in the model's own decode forward, while the engine runs: each Hugging Face RMSNorm ->
rk.rms_norm (one kernel instead of six), each SiLU-gated MLP -> rk.silu_mul between its projections (one
instead of two) and, where gate_proj's and up_proj's weights lie back to back in memory (DeepSpeed ZeRO 1/2),
one GEMM over both; the rotary embedding of Llama-family attention -> rk.apply_rotary (one launch for q
and k instead of about ten); the q/k/v projections of each attention -> one GEMM over the three weights
(a view where they lie back to back, else a concatenated buffer the engine keeps, refreshed from the
parameters on every entry); and in each Llama-family decoder layer the two residual adds -> the beta = 1
input of o_proj's and down_proj's GEMMs (torch.addmm; two kernels fewer). In the decode step (one token per
row, up to 64 rows, each from its DECODE_LINEAR_MIN_ROWS) q/k/v (+ bias), o_proj (+ the residual) and gate/up
(+ SiLU) run as rk.decode_linear where its kernel takes them (a Hopper GPU; DECODE_LINEAR); prefill and
everything else keeps the cuBLAS forms above. Instance attributes shadow the class methods for the duration and
are removed after, so training forwards run the unpatched code."""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

import r1kernels as rk
from r1kernels._backend import kernel as _kernel
from r1kernels.patch.layers import FUSED_MODEL_TYPES, fused_rotary, is_rms_norm, is_silu_mlp
from r1kernels.reference.decode_linear import stacked

# the projections the decode step runs through rk.decode_linear's few-row kernel. H200, Qwen2.5-1.5B shapes
# at 64 rows, each against the engine's cuBLAS form (results/decode_gemm_few_rows_h200_2026-12-05_3d03630.json):
# q/k/v 5.2 vs 6.0 us, o_proj 4.9 vs 5.4, gate/up + SiLU 17.7 vs 20.8; down_proj lost (13.4 vs 12.7) and is not
# here. The fixed rollout with these three: 1.042 s vs 1.087 s (results/rollout_h200_2026-12-05_3267bdf.json). At
# 7B's shapes the kernel's eligibility (one wave of programs) leaves every projection on cuBLAS, measured faster there.
# Also accepted, measured slower: "down_proj" (H100, cd8bc50: the fixed rollout +4.3%). The RMSNorms folded into the
# q/k/v and gate/up kernels were measured slower too (H100 +2.5%, H200 +5.0%) and removed
# (benchmarks/NOTES-decode-linear.md).
DECODE_LINEAR = ("qkv", "o_proj", "gate_up")
# Decode steps of fewer rows than a projection's minimum keep its cuBLAS form. H100, 1.5B shapes, 28-call graphs,
# the kernel's x tile at decode_linear.block_m(rows) vs the engine's cuBLAS form, us at 2 / 8 / 16 / 32 / 64 rows
# (bench_decode_linear_variants --rows-sweep, results/decode_linear_rows_h100_2026-12-07_32948a3.json):
# q/k/v 5.98 / 5.92 / 6.00 / 5.64 / 5.25 vs 6.05 / 6.00 / 5.99 / 6.10 / 6.22 (even below 17 rows);
# o_proj 5.79 / 5.71 / 5.80 / 5.85 / 4.81 vs 5.27 / 5.27 / 5.27 / 5.32 / 5.37 (the kernel wins at 64 only);
# gate/up + SiLU 21.54 / 21.77 / 21.99 / 22.75 / 22.87 vs 22.73 / 23.08 / 23.42 / 24.31 / 25.27 (at every count).
# down_proj's entry applies where DECODE_LINEAR names it (not by default): from 33 rows, as down_proj -> norm ->
# q/k/v chains measured (bench_decode_linear_variants --norm-chain, H100, 6e5a3e0): down through the kernel 22.33 us
# a layer vs cuBLAS's 23.13 at 64 rows, 25.63 vs 22.93 at 32, 25.63 vs 22.51 at 8.
DECODE_LINEAR_MIN_ROWS = {"qkv": 17, "o_proj": 33, "gate_up": 1, "down_proj": 33}


def _decode_kernel(name, backend, x, x2, w, **kw) -> bool:
    """Projection `name` is in DECODE_LINEAR, x [B, T, H] is one token per row (the decode step: T == 1; prefill
    keeps the cuBLAS forms), B >= DECODE_LINEAR_MIN_ROWS[name], and rk.decode_linear's kernel takes x2 = x as
    [B, H] (few rows on a Hopper GPU)."""
    return (name in DECODE_LINEAR and x.dim() == 3 and x.shape[1] == 1 and x2.shape[0] >= DECODE_LINEAR_MIN_ROWS[name]
            and _kernel("decode_linear", backend, x2.device, x2, w, **kw) is not None)


def _norm(self, x):
    return rk.rms_norm(x, self.weight, self.variance_epsilon, backend=self._r1k_backend)


def _mlp(self, x):
    return self.down_proj(rk.silu_mul(self.gate_proj(x), self.up_proj(x), backend=self._r1k_backend))


def _mlp_gate_up(self, x):
    """gate_proj and up_proj plain bias-free Linears. Decode rows: rk.decode_linear's kernel, SiLU in its
    epilogue. Else one GEMM over their weights as one [2I, H] view where they lie back to back (_r1k_gu:
    _stacked_weight; silu_mul reads the two halves of its output in place), or the two GEMMs (_mlp)."""
    n, gu = self.gate_proj.out_features, self._r1k_gu
    x2 = x.reshape(-1, x.shape[-1])
    wg, wu = (gu[:n], gu[n:]) if gu is not None else (self.gate_proj.weight.detach(), self.up_proj.weight.detach())
    if _decode_kernel("gate_up", self._r1k_backend, x, x2, wg, up_weight=wu):
        h = rk.decode_linear(x2, wg, up_weight=wu, backend=self._r1k_backend)
        return self.down_proj(h.view(*x.shape[:-1], n))
    if gu is None:
        return _mlp(self, x)
    out = F.linear(x, gu)
    return self.down_proj(rk.silu_mul(out[..., :n], out[..., n:], backend=self._r1k_backend))


def _stacked_weight(lins):
    """The weights of `lins` (no biases) as one [sum of out_features, in_features] view, when they lie back to
    back in one storage, as DeepSpeed ZeRO 1/2 lays out the parameters it flattens (model order: gate_proj then
    up_proj, q_proj then k_proj then v_proj; r1kernels.reference.decode_linear.stacked); None otherwise. A view
    costs no memory and follows the optimizer's in-place updates, so nothing is refreshed and captured graphs
    stay valid."""
    if any(lin.bias is not None for lin in lins):
        return None
    return stacked([lin.weight.detach() for lin in lins])


def _qkv_projs(m):
    ps = [getattr(m, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if not all(isinstance(p, torch.nn.Linear) for p in ps):
        return None
    if len({p.bias is None for p in ps}) != 1 or len({(p.weight.dtype, p.weight.device) for p in ps}) != 1:
        return None
    return ps


def _q(self, x):
    """q_proj's forward: one GEMM for q, k and v (decode rows: rk.decode_linear's kernel); k_proj / v_proj
    return their slices for the same x."""
    x2 = x.reshape(-1, x.shape[-1])
    if _decode_kernel("qkv", self._r1k_backend, x, x2, self._r1k_w, bias=self._r1k_b):
        qkv = rk.decode_linear(x2, self._r1k_w, bias=self._r1k_b, backend=self._r1k_backend).view(*x.shape[:-1], -1)
    else:
        qkv = F.linear(x, self._r1k_w, self._r1k_b)
    nq, nk = self.out_features, self._r1k_k.out_features
    self._r1k_k._r1k_out, self._r1k_v._r1k_out = (x, qkv[..., nq:nq + nk]), (x, qkv[..., nq + nk:])
    return qkv[..., :nq]


def _kv(self, x):
    """k_proj / v_proj: q's slice when x is q's input. The reference is dropped here: kept, every layer's
    input and q/k/v output stayed alive after the layer (3.1 GiB for a 64 x 256-token prefill of the 1.5B
    model: the rollout's peak in bench_memory's peak_composition)."""
    src, out = self._r1k_out
    self._r1k_out = (None, None)
    return out if src is x else F.linear(x, self.weight, self.bias)


def _fuse_qkv(m, buffers: dict, backend: str):
    """Patch m's q/k/v projections (see _q): over a view of their weights where they lie back to back
    (_stacked_weight), else over a concatenated weight/bias kept in `buffers` (module id -> (weight, bias)) and
    refreshed here."""
    ps = _qkv_projs(m)
    if ps is None:
        return []
    q, k, v = ps
    w, b = _stacked_weight(ps), None
    if w is not None:
        buffers.pop(id(m), None)
    else:
        w_b = buffers.get(id(m))
        if w_b is None or w_b[0].shape[0] != sum(p.out_features for p in ps):
            w = torch.empty(sum(p.out_features for p in ps), q.in_features, dtype=q.weight.dtype,
                            device=q.weight.device)
            w_b = buffers[id(m)] = (w, None if q.bias is None else w.new_empty(w.shape[0]))
        w, b = w_b
        torch.cat([p.weight.detach() for p in ps], out=w)
        if b is not None:
            torch.cat([p.bias.detach() for p in ps], out=b)
    q.forward, q._r1k_w, q._r1k_b, q._r1k_k, q._r1k_v = types.MethodType(_q, q), w, b, k, v
    q._r1k_backend = backend
    k.forward, v.forward = types.MethodType(_kv, k), types.MethodType(_kv, v)
    k._r1k_out = v._r1k_out = (None, None)
    return [(q, ("forward", "_r1k_w", "_r1k_b", "_r1k_k", "_r1k_v", "_r1k_backend")),
            (k, ("forward", "_r1k_out")), (v, ("forward", "_r1k_out"))]


def _rope_table(m, buffers: dict, length: int, dtype):
    """Patch the rotary-embedding module m (default RoPE: cos / sin depend on the position only) to read one-token
    calls (the decode step) from a [length, 2, D] table of its own outputs for positions 0..length-1, kept in
    `buffers` (module id -> (table,); a stable address for captured graphs) and refreshed here: one gather a step
    instead of its ~8 elementwise kernels. The table is the module's own forward at [length, 1] positions in
    `dtype` (the hidden states'), each entry the same fp32 computation as a one-token call: bitwise the values it
    would return."""
    dev = m.inv_freq.device
    cos, sin = type(m).forward(m, torch.empty(0, dtype=dtype, device=dev),
                               torch.arange(length, device=dev)[:, None])  # [length, 1, D]
    tab = buffers.get(id(m), (None,))[0]
    if tab is None or tab.shape != (length, 2, cos.shape[-1]) or tab.dtype != cos.dtype:
        tab = cos.new_empty(length, 2, cos.shape[-1])
        buffers[id(m)] = (tab,)
    tab[:, 0], tab[:, 1] = cos[:, 0], sin[:, 0]
    m.forward, m._r1k_rope = types.MethodType(_rope_lookup, m), tab
    return [(m, ("forward", "_r1k_rope"))]


def _rope_lookup(self, x, position_ids):
    tab = self._r1k_rope
    if position_ids.dim() != 2 or position_ids.shape[1] != 1 or x.dtype != tab.dtype:
        return type(self).forward(self, x, position_ids)
    cs = tab.index_select(0, position_ids[:, 0])  # [B, 2, D]
    return cs[:, None, 0], cs[:, None, 1]  # [B, 1, D] views


def _res_linear(self, x):
    """o_proj / down_proj: residual += x @ W^T in one GEMM, in place (torch.addmm into a new tensor first
    copies the residual: two copy kernels a layer, measured). The residual is the layer's input or its
    attention output, which nothing reads after its norm has (the engine asks for no hidden states)."""
    res, self._r1k_res = self._r1k_res, None
    x2 = x.reshape(-1, x.shape[-1])
    if not res.is_contiguous():
        return torch.addmm(res.reshape(-1, res.shape[-1]), x2, self.weight.t()).view(res.shape)
    res2, w = res.view(-1, res.shape[-1]), self.weight.detach()
    if _decode_kernel(self._r1k_name, self._r1k_backend, x, x2, w, residual=res2):
        rk.decode_linear(x2, w, residual=res2, backend=self._r1k_backend)
    else:
        res2.addmm_(x2, w.t())
    return res


def _layer(self, hidden_states, *args, **kwargs):
    """A Llama-family decoder layer whose o_proj / down_proj add the residual themselves (_res_linear)."""
    if args:  # a caller that passes more than hidden_states positionally: the model's own forward
        return type(self).forward(self, hidden_states, *args, **kwargs)
    attn, mlp = self.self_attn, self.mlp
    attn.o_proj._r1k_res = hidden_states
    hidden_states = attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)[0]
    mlp.down_proj._r1k_res = hidden_states
    return mlp(self.post_attention_layernorm(hidden_states))


def _residual_layer(m) -> bool:
    lin = torch.nn.Linear
    return (type(m).__name__.endswith("DecoderLayer") and all(hasattr(m, n) for n in (
        "input_layernorm", "post_attention_layernorm", "self_attn", "mlp"))
        and isinstance(getattr(m.self_attn, "o_proj", None), lin) and m.self_attn.o_proj.bias is None
        and isinstance(getattr(m.mlp, "down_proj", None), lin) and m.mlp.down_proj.bias is None)


@contextlib.contextmanager
def fused_decode_ops(model, backend: str = "auto", buffers: dict | None = None, rope_sink=None,
                     rope_table: int | None = None):
    """buffers: the caller's dict for the buffers these ops keep (so CUDA graphs captured inside one entry replay
    with the same addresses in the next): buffers["qkv"] the concatenated q/k/v weights, buffers["rope"] the
    rotary tables, each module id -> tuple of tensors (created here); None skips the q/k/v fusion and the
    tables. rope_sink: the KV cache, whose decode attention applies the rotary embedding (fused_rotary's defer).
    rope_table: a length: one-token rotary embeddings of Llama-family models with default RoPE come from a table
    of that many positions (_rope_table)."""
    patched, fused = [], []
    for m in model.modules():
        name = type(m).__name__
        fn = None
        if is_rms_norm(m):
            fn = _norm
        elif is_silu_mlp(m):
            fn = _mlp
            if all(type(getattr(m, n)) is torch.nn.Linear and getattr(m, n).bias is None
                   for n in ("gate_proj", "up_proj")):
                fn, m._r1k_gu = _mlp_gate_up, _stacked_weight([m.gate_proj, m.up_proj])
                fused.append((m, ("_r1k_gu",)))
        if fn is not None:
            m.forward, m._r1k_backend = types.MethodType(fn, m), backend
            patched.append(m)
        elif buffers is not None and name.endswith("Attention"):
            fused += _fuse_qkv(m, buffers.setdefault("qkv", {}), backend)
    llama_family = getattr(model.config, "model_type", None) in FUSED_MODEL_TYPES
    if llama_family and rope_table and buffers is not None:
        for m in model.modules():
            if type(m).__name__.endswith("RotaryEmbedding") and isinstance(getattr(m, "inv_freq", None), torch.Tensor) \
                    and getattr(m, "rope_type", "default") == "default":
                fused += _rope_table(m, buffers.setdefault("rope", {}), rope_table,
                                     model.get_input_embeddings().weight.dtype)
    if llama_family:
        for m in model.modules():
            if _residual_layer(m):
                m.forward = types.MethodType(_layer, m)
                for lin, name in ((m.self_attn.o_proj, "o_proj"), (m.mlp.down_proj, "down_proj")):
                    lin.forward, lin._r1k_res = types.MethodType(_res_linear, lin), None
                    lin._r1k_backend, lin._r1k_name = backend, name
                    fused.append((lin, ("forward", "_r1k_res", "_r1k_backend", "_r1k_name")))
                fused.append((m, ("forward",)))
    try:
        with fused_rotary(model, backend, defer=rope_sink) if llama_family else contextlib.nullcontext():
            yield
    finally:
        for m in patched:
            del m.forward, m._r1k_backend
        for m, attrs in fused:
            for a in attrs:
                delattr(m, a)
