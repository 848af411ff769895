"""An experiment, not used by the engine until it measures faster than cuBLAS (bench_decode_gemm --few-rows;
the two earlier few-row GEMMs, Triton with pointer loads and CUDA mma.sync, lost: benchmarks/NOTES-decode-gemm.md).
Few-row bf16 GEMM for the decode step, out[M, N] = x[M, K] @ W[N, K]^T with M <= 64, loading both operands
with tensor-memory-accelerator descriptors (host-built, so a captured CUDA graph keeps them), pipelined over K,
and one of three epilogues:

  "none"      out = acc (+ bias)
  "residual"  res += acc, in place (o_proj / down_proj adding the layer's residual)
  "silu_gate" out = silu(x @ Wg^T) * (x @ Wu^T): gate and up as two accumulators of one program, so the
              [M, 2I] intermediate is never written
Program p owns weight rows [t * BLOCK_N, (t + 1) * BLOCK_N), t = p // SPLIT_K, and the (p % SPLIT_K)-th
of SPLIT_K equal ranges of K (SPLIT_K > 1: fp32 partials, summed in split order by the tile's last
program, so results do not depend on arrival order); the x tile rows past M are zero-filled by the
descriptor (no bytes read). Accumulation in fp32, one rounding at the store. Optionally an RMSNorm of x in
the prologue (norm_K), which removes the decode layer's two norm kernels."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EPILOGUES = ("none", "residual", "silu_gate")


@triton.jit
def _epilogue(acc, acc2, out_ptr, bias_ptr, rm, rn, M, N, stride_om, EPI: tl.constexpr, HAS_BIAS: tl.constexpr):
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if EPI == 1:
        acc += tl.load(ptrs, mask=msk, other=0.0).to(tl.float32)
    if EPI == 2:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _few_rows_kernel(x_desc, w_desc, w2_desc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, g_ptr, eps, M, N, K, stride_om,
                     EPI: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, DOT_F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid // SPLIT_K
    split = pid % SPLIT_K
    n0 = tile * BLOCK_N
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = split * k_per
    k_hi = tl.minimum(K, k_lo + k_per)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    ssq = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        x = x_desc.load([0, k0])
        if NORM:  # x * g in the operand; the row's sum of squares for the rsqrt applied to the accumulators
            rk = k0 + tl.arange(0, BLOCK_K)
            xf = x.to(tl.float32)
            ssq += tl.sum(xf * xf, 1)
            x = (xf * tl.load(g_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
        w = w_desc.load([n0, k0])
        if DOT_F32:  # the interpreter's bf16 dot is wrong
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w.T, acc)
        if EPI == 2:
            w2 = w2_desc.load([n0, k0])
            if DOT_F32:
                w2 = w2.to(tl.float32)
            acc2 = tl.dot(x, w2.T, acc2)
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    if NORM:
        rstd = tl.rsqrt(ssq / K + eps)[:, None]
        acc *= rstd
        acc2 *= rstd
    if SPLIT_K == 1:
        _epilogue(acc, acc2, out_ptr, bias_ptr, rm, rn, M, N, stride_om, EPI, HAS_BIAS)
    else:
        # fp32 partials in ws [2, SPLIT_K, BLOCK_M, N]; the tile's last program to arrive (a self-resetting
        # counter) sums them in split order, so the result does not depend on the arrival order
        part = rm[:, None] * N + rn[None, :]
        nmask = (rn < N)[None, :]
        tl.store(ws_ptr + split * BLOCK_M * N + part, acc, mask=nmask)
        if EPI == 2:
            tl.store(ws_ptr + (SPLIT_K + split) * BLOCK_M * N + part, acc2, mask=nmask)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for j in range(SPLIT_K):
                acc += tl.load(ws_ptr + j * BLOCK_M * N + part, mask=nmask, other=0.0, cache_modifier=".cg")
                if EPI == 2:
                    acc2 += tl.load(ws_ptr + (SPLIT_K + j) * BLOCK_M * N + part, mask=nmask, other=0.0,
                                    cache_modifier=".cg")
            _epilogue(acc, acc2, out_ptr, bias_ptr, rm, rn, M, N, stride_om, EPI, HAS_BIAS)
            tl.store(cnt_ptr + tile, 0)


_COUNTERS: dict = {}  # device -> int32 zeros, one per tile (each split-K launch leaves them zero)


def _counters(device, n):
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return c


DEFAULT_CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "STAGES": 4, "num_warps": 4, "SPLIT_K": 1}


def few_rows_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, *, bias_N=None, epilogue: str = "none",
                    w2_NK: torch.Tensor | None = None, out_MN: torch.Tensor | None = None, norm_K=None,
                    eps: float = 1e-6, config=None):
    """x_MK [M <= 64, K] contiguous; w_NK (and w2_NK for silu_gate) [N, K] with unit stride along K.
    epilogue "residual": out_MN is the residual, updated in place and returned. norm_K: an RMSNorm's weight
    applied to x first (rms_norm(x) @ W^T: x * norm_K in the operand, rsqrt(mean(x^2) + eps) on the
    accumulator), not with split-K (a split sees part of each row)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if M > 64:
        raise ValueError(f"x_MK: at most 64 rows, got {M}")
    if (epilogue == "silu_gate") != (w2_NK is not None):
        raise ValueError("w2_NK: required by epilogue='silu_gate' and only by it")
    if epilogue == "residual" and (out_MN is None or out_MN.shape != (M, N)):
        raise ValueError(f"out_MN: the residual [{M}, {N}] is required by epilogue='residual'")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if norm_K is not None and (norm_K.shape != (K,) or cfg["SPLIT_K"] != 1):
        raise ValueError(f"norm_K: a [{K}] weight, with SPLIT_K 1 (got {tuple(norm_K.shape)}, SPLIT_K "
                         f"{cfg['SPLIT_K']})")
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if INTERPRET:
        bn, bk = min(bn, 16), min(bk, 32)
    bm = 64 if not INTERPRET else max(16, triton.next_power_of_2(M))
    if out_MN is None:
        out_MN = x_MK.new_empty(M, N)
    x_desc = TensorDescriptor.from_tensor(x_MK, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w_NK, [bn, bk])
    w2_desc = TensorDescriptor.from_tensor(w2_NK, [bn, bk]) if w2_NK is not None else w_desc
    split, tiles = cfg["SPLIT_K"], triton.cdiv(N, bn)
    ws = x_MK.new_empty(2 * split * bm * N, dtype=torch.float32) if split > 1 else out_MN
    cnt = _counters(x_MK.device, tiles) if split > 1 else out_MN
    _few_rows_kernel[(tiles * split,)](
        x_desc, w_desc, w2_desc, out_MN, bias_N if bias_N is not None else out_MN, ws, cnt,
        norm_K if norm_K is not None else out_MN, eps, M, N, K, out_MN.stride(0), EPI=EPILOGUES.index(epilogue),
        HAS_BIAS=bias_N is not None, NORM=norm_K is not None,
        DOT_F32=INTERPRET or x_MK.device.type != "cuda", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"],
        SPLIT_K=split, num_warps=cfg["num_warps"])
    return out_MN


# ---- the engine's decode projections through few_rows_linear (bench_rollout --few-rows): measured in the rollout
# before anything of it moves into r1train

MAX_ROWS = 64


def best_configs(sweep: dict, winners_only: bool = False) -> dict:
    """bench_decode_gemm --few-rows JSON -> {(epilogue, weight rows, K): fastest correct config}; winners_only:
    only the projections where that config beat the engine's cuBLAS form."""
    epi = {"qkv": "none", "o_proj": "residual", "down": "residual", "gate_up": "silu_gate"}
    out = {}
    for row in sweep["results"]:
        timed = [(us, key) for key, us in row["us"].items() if key.startswith("few_rows ") and isinstance(us, float)]
        if timed and winners_only and not min(timed)[0] < row["us"].get("engine (cuBLAS)", float("inf")):
            continue
        if timed:
            cfg = dict(kv.split("=") for kv in min(timed)[1][len("few_rows "):].split(","))
            out[(epi[row["op"]], row["N"], row["K"])] = {k: int(v) for k, v in cfg.items()}
    return out


def _eligible(x2, *ws, listed=True) -> bool:
    return listed and x2.shape[0] <= MAX_ROWS and x2.is_contiguous() and x2.dtype in (torch.bfloat16, torch.float16) \
        and all(w.dtype == x2.dtype and w.stride(-1) == 1 for w in ws)


def _pending_norm(mod):
    """The RMSNorm (weight, eps) the patched layer left on `mod` for its input (then the input is the raw
    residual), cleared; None when the input is already normed."""
    return mod.__dict__.pop("_r1k_norm", None)


def _norm_kwargs(norm) -> dict:
    """few_rows_linear's prologue arguments for a pending norm (weight, eps)."""
    return {} if norm is None else {"norm_K": norm[0], "eps": norm[1]}


@contextlib.contextmanager
def engine_patch(configs: dict | None = None, fuse_norms: bool = False, only_listed: bool = False):
    """While open, r1train.generation.fused (the engine's decode forward) runs q/k/v (+ bias), o_proj / down_proj
    (+ the residual, in place) and gate/up + SiLU through few_rows_linear for <= 64 rows (the decode step);
    prefill and other dtypes keep the engine's cuBLAS form. configs: best_configs(); default DEFAULT_CONFIG;
    only_listed: the projections without a config keep cuBLAS too.
    fuse_norms: each Llama-family layer's two RMSNorms move into the q/k/v and gate/up kernels (norm_K; those
    two then run without split-K). fused_decode_ops binds these functions when it is entered (each
    Engine.generate), so enter this first; and call Engine.reset() after entering and after leaving: captured
    graphs keep the kernels they captured."""
    import r1kernels as rk
    from r1train.generation import fused as F_

    configs = configs or {}

    def cfg(epi, n, k, norm):
        c = configs.get((epi, n, k))
        return {**(c or DEFAULT_CONFIG), "SPLIT_K": 1} if norm is not None else c

    def listed(epi, n, k):
        return not only_listed or (epi, n, k) in configs

    def normed(x, norm):  # the fallback paths: the deferred norm, unfused
        return x if norm is None else rk.rms_norm(x, norm[0], norm[1])

    orig = {n: getattr(F_, n) for n in ("_q", "_mlp", "_mlp_gate_up", "_res_linear", "_layer")}

    def _q(self, x):
        norm = _pending_norm(self)
        x2 = x.reshape(-1, x.shape[-1])
        if not _eligible(x2, self._r1k_w, listed=listed("none", *self._r1k_w.shape)):
            return orig["_q"](self, normed(x, norm))
        w = self._r1k_w
        qkv = few_rows_linear(x2, w, bias_N=self._r1k_b, config=cfg("none", *w.shape, norm),
                              **_norm_kwargs(norm)).view(*x.shape[:-1], -1)
        nq, nk = self.out_features, self._r1k_k.out_features
        self._r1k_k._r1k_out, self._r1k_v._r1k_out = (x, qkv[..., nq:nq + nk]), (x, qkv[..., nq + nk:])
        return qkv[..., :nq]

    def _gated(self, x, wg, wu, name):
        norm = _pending_norm(self)
        x2 = x.reshape(-1, x.shape[-1])
        if not _eligible(x2, wg, wu, listed=listed("silu_gate", 2 * wg.shape[0], wg.shape[1])):
            return orig[name](self, normed(x, norm))
        h = few_rows_linear(x2, wg, w2_NK=wu, epilogue="silu_gate", config=cfg("silu_gate", 2 * wg.shape[0],
                            wg.shape[1], norm), **_norm_kwargs(norm))
        return self.down_proj(h.view(*x.shape[:-1], wg.shape[0]))

    def _mlp(self, x):
        return _gated(self, x, self.gate_proj.weight.detach(), self.up_proj.weight.detach(), "_mlp")

    def _mlp_gate_up(self, x):
        n = self.gate_proj.out_features
        return _gated(self, x, self._r1k_gu[:n], self._r1k_gu[n:], "_mlp_gate_up")

    def _res_linear(self, x):
        res, x2 = self._r1k_res, x.reshape(-1, x.shape[-1])
        w = self.weight.detach()
        if not (_eligible(x2, w, listed=listed("residual", *w.shape)) and res.is_contiguous()):
            return orig["_res_linear"](self, x)
        self._r1k_res = None
        few_rows_linear(x2, w, epilogue="residual", out_MN=res.view(-1, res.shape[-1]),
                        config=cfg("residual", *w.shape, None))
        return res

    def _layer(self, hidden_states, *args, **kwargs):
        """The engine's residual layer (fused._layer) with its norms left to the q/k/v and gate/up kernels."""
        attn, mlp = self.self_attn, self.mlp
        x2 = hidden_states.reshape(-1, hidden_states.shape[-1])
        ours = getattr(getattr(attn, "q_proj", None), "forward", None)
        if args or not (_eligible(x2) and getattr(ours, "__func__", None) is _q
                        and getattr(mlp.forward, "__func__", None) in (_mlp, _mlp_gate_up)):
            return orig["_layer"](self, hidden_states, *args, **kwargs)
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        attn.o_proj._r1k_res = hidden_states
        attn.q_proj._r1k_norm = (ln1.weight.detach(), ln1.variance_epsilon)
        hidden_states = attn(hidden_states=hidden_states, **kwargs)[0]
        mlp.down_proj._r1k_res = hidden_states
        mlp._r1k_norm = (ln2.weight.detach(), ln2.variance_epsilon)
        return mlp(hidden_states)

    new = {"_q": _q, "_mlp": _mlp, "_mlp_gate_up": _mlp_gate_up, "_res_linear": _res_linear}
    if fuse_norms:
        new["_layer"] = _layer
    for n, fn in new.items():
        setattr(F_, n, fn)
    try:
        yield
    finally:
        for n, fn in orig.items():
            setattr(F_, n, fn)
