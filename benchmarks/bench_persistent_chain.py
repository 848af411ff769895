"""python -m benchmarks.bench_persistent_chain [--out DIR]: what does a dependency between two decode-step projections
cost as a grid barrier inside one persistent kernel, against the kernel boundary the engine pays today? The premise
of a persistent decode kernel (NOTES-decode-linear.md): every projection of the 1.5B step measures ~3.5 us above
its weight bytes at ~4 TB/s, so the step's ~8 kernels a layer pay ~0.8 ms of its 1.93 ms in fixed costs.

The chain: L = 28 dependent projections shaped like the 1.5B o_proj (64 rows, 1536 x 1536, + residual, 28
distinct weights: 132 MB, past the 50 MB L2). Phase l reads all of buf[l % 2] and adds buf[l % 2] @ W_l^T into
buf[(l + 1) % 2]; program p owns columns [p * BLOCK_N, (p + 1) * BLOCK_N), so phase l + 1 needs every program's
phase l. Variants (the same kernel body and tiles; persistent and prefetching ones bitwise equal to launches):
  launches             one launch per phase: 28 launches replayed in one CUDA graph
  launches+prefetch    the same, each program first issuing L2 prefetches of its tile of the next phase's weight
  persistent           one launch of N / BLOCK_N programs running every phase, a grid barrier between phases
                       (one atomic arrival per program, then a spin on the counter: all programs are resident)
  persistent+prefetch  the same, each program first prefetching its tile of the next phase (prefetch2: the
                       phase after next) into L2
  barrier only         the persistent launch with no projection: 28 barriers (their cost alone)
  ..., one weight      launches / persistent with weights[0] in every phase: in L2 after the first phase (the
                       bound of any prefetch)
  split-K S            timing only: each phase over S K-slices (S x the programs), each program reading its x
                       slice as the sum of the S bf16 partials of the previous phase (the sum a split-K
                       projection leaves to its consumer) and writing its own partial; one launch a phase
  rk.decode_linear     the production kernel (tensor-descriptor loads) in the same chain: the reference point
Floor: the weights' bytes at the measured copy bandwidth. Writes bench_persistent_chain.json."""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from benchmarks.harness import ceilings, environment, graphed, time_ms

LAYERS, ROWS, HIDDEN = 28, 64, 1536
CONFIGS = [{"BLOCK_N": 16, "BLOCK_K": 256, "STAGES": 4}, {"BLOCK_N": 16, "BLOCK_K": 128, "STAGES": 5},
           {"BLOCK_N": 32, "BLOCK_K": 128, "STAGES": 4}]


@triton.jit
def _grid_barrier(bar_ptr, target):
    """Every program of the grid has arrived `target` times in total: the CTA's stores are ordered before its
    release-arrival, the acquire before the CTA's later loads (cooperative groups' grid sync, by atomics)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _prefetch_l2(w_ptr, n0, K, BLOCK_N: tl.constexpr, LINES: tl.constexpr):
    """L2 prefetch of weight rows [n0, n0 + BLOCK_N) of a [., K] weight, LINES 128-byte lines (64 bf16) each
    (lines past K clamp to the last): no registers filled, nothing waited for."""
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.minimum(tl.arange(0, LINES) * 64, K - 1)
    p = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _chain_kernel(buf_ptr, w_ptr, bar_ptr, M, N, L, l0, n_phases, w_phase_stride, PERSISTENT: tl.constexpr,
                  AHEAD: tl.constexpr, LINES: tl.constexpr, WORK: tl.constexpr, DOT_F32: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """buf [2, M, N] bf16 (K == N), w [L, N, N] (w_phase_stride 0: one [N, N] weight for every phase); phases
    l0 .. l0 + n_phases - 1 (module docstring). AHEAD > 0:
    first thing in phase l, this program's weight tile of phase l + AHEAD goes to L2 (LINES lines a row)."""
    P = tl.num_programs(0)
    n0 = tl.program_id(0) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    for i in range(n_phases):
        phase = l0 + i
        if AHEAD > 0:
            if phase + AHEAD < L:
                _prefetch_l2(w_ptr + (phase + AHEAD).to(tl.int64) * w_phase_stride, n0, N, BLOCK_N, LINES)
        if WORK:
            src = buf_ptr + (phase % 2) * M * N
            dst = buf_ptr + ((phase + 1) % 2) * M * N
            w = w_ptr + phase.to(tl.int64) * w_phase_stride
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k0 in tl.range(0, N, BLOCK_K, num_stages=STAGES):  # .cg: other SMs wrote src (not in this L1)
                x = tl.load(src + rm[:, None] * N + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0,
                            cache_modifier=".cg")
                wt = tl.load(w + rn[:, None] * N + (k0 + rk)[None, :], mask=rn[:, None] < N, other=0.0)
                if DOT_F32:  # the interpreter's bf16 dot is wrong
                    x = x.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(x, wt.T, acc)
            ptrs = dst + rm[:, None] * N + rn[None, :]
            acc += tl.load(ptrs, mask=msk, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(ptrs, acc.to(tl.bfloat16), mask=msk)
        if PERSISTENT:
            if i + 1 < n_phases:  # the last phase's stores need no barrier: the launch ends
                _grid_barrier(bar_ptr, (i + 1) * P)


MODES = {  # name -> (persistent, phases prefetched ahead)
    "launches": (False, 0), "launches+prefetch": (False, 1), "persistent": (True, 0),
    "persistent+prefetch": (True, 1), "persistent+prefetch2": (True, 2), "barrier only": (True, 0),
    "launches, one weight": (False, 0), "persistent, one weight": (True, 0)}


def chain(buf, ws, bar, cfg: dict, mode: str):
    """Run the L-phase chain on buf [2, M, N] in place with weights ws [L, N, N]; mode: one of MODES."""
    M, N, L = buf.shape[1], buf.shape[2], ws.shape[0]
    interp = buf.device.type != "cuda"
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    assert N % bn == 0 and N % bk == 0, (N, cfg)
    persistent, ahead = MODES[mode]
    w_stride = 0 if "one weight" in mode else N * N  # one weight: it stays in L2 after the first phase
    kw = dict(AHEAD=0 if interp else ahead, LINES=triton.next_power_of_2(triton.cdiv(N, 64)),
              WORK=mode != "barrier only", DOT_F32=interp, BLOCK_M=max(16, triton.next_power_of_2(M)),
              BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"], num_warps=4)
    grid = (N // bn,)
    if not persistent:
        for layer in range(L):
            _chain_kernel[grid](buf, ws, bar, M, N, L, layer, 1, w_stride, PERSISTENT=False, **kw)
    else:  # the grid must be resident at once: one program per SM at most (the interpreter: one program)
        bar.zero_()
        _chain_kernel[grid](buf, ws, bar, M, N, L, 0, L, w_stride, PERSISTENT=True, **kw)


@triton.jit
def _split_phase_kernel(part_ptr, base_ptr, w_ptr, M, N, phase, S: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """Timing only (its values are not the chain's: the residual comes from a fixed base): one phase split over
    K in S slices, the split sum done by the consumer. Program (j, s) reads its x slice as the sum of the S bf16
    partials the previous phase wrote (part[phase % 2]), multiplies it by its [BLOCK_N, N / S] weight slice and
    writes its partial to part[(phase + 1) % 2][s]; slice 0 adds a bf16 residual tile. The loads and stores a
    split-K projection whose sum is left to its consumer would issue."""
    j = tl.program_id(0)
    sl = tl.program_id(1)
    KS = N // S
    rm = tl.arange(0, BLOCK_M)
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    src = part_ptr + (phase % 2) * S * M * N
    dst = part_ptr + ((phase + 1) % 2) * S * M * N
    w = w_ptr + phase * N * N  # < 2^31 at the benchmark's 28 x 1536^2
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(sl * KS, (sl + 1) * KS, BLOCK_K, num_stages=STAGES):
        x = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for s2 in tl.static_range(S):
            x += tl.load(src + s2 * M * N + rm[:, None] * N + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0,
                         cache_modifier=".cg")
        wt = tl.load(w + rn[:, None] * N + (k0 + rk)[None, :])
        acc = tl.dot(x.to(tl.bfloat16), wt.T, acc)
    msk = (rm[:, None] < M) & (rn[None, :] < N)
    if sl == 0:
        acc += tl.load(base_ptr + rm[:, None] * N + rn[None, :], mask=msk, other=0.0).to(tl.float32)
    tl.store(dst + sl * M * N + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=msk)


def split_chain(part, base, ws, S: int):
    """28 phases of _split_phase_kernel (one launch each). part [2, S, M, N] bf16, base [M, N] bf16. BLOCK_N
    16 S: N / 16 programs (one wave), each 16 x N weight elements as at S = 1; three stages of S x-partial tiles
    (BLOCK_K 256, 128 at S = 4: <= 200 KB of shared memory), so N / BLOCK_K / S steps a program."""
    M, N = base.shape
    bn, bk = 16 * S, 256 if S <= 2 else 128
    assert (N // S) % bk == 0, (N, S)
    for layer in range(ws.shape[0]):
        _split_phase_kernel[(N // bn, S)](part, base, ws, M, N, layer, S=S, BLOCK_M=max(16, triton.next_power_of_2(M)),
                                          BLOCK_N=bn, BLOCK_K=bk, STAGES=3, num_warps=4)


def chain_reference(buf, ws):
    """The chain in torch (fp32 accumulation, one bf16 rounding a phase, as the kernel)."""
    out = buf.clone()
    for layer in range(ws.shape[0]):
        src, dst = out[layer % 2], out[(layer + 1) % 2]
        dst.copy_((dst.float() + src.float() @ ws[layer].float().t()).to(dst.dtype))
    return out


def _production(buf, ws):
    import r1kernels as rk
    for layer in range(ws.shape[0]):
        rk.decode_linear(buf[layer % 2], ws[layer], residual=buf[(layer + 1) % 2])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=ROWS, help="x rows (the activation every program reads)")
    a = p.parse_args(argv)
    if a.device != "cuda" or not torch.cuda.is_available():
        print("bench_persistent_chain: needs a CUDA device")
        return 0
    bw = ceilings("cuda")["copy_GBps"] * 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dev, bf = "cuda", torch.bfloat16
    ws = torch.randn(LAYERS, HIDDEN, HIDDEN, device=dev, dtype=bf) / HIDDEN ** 0.5 / 4
    buf0 = torch.randn(2, a.rows, HIDDEN, device=dev, dtype=bf)
    bar = torch.zeros(1, device=dev, dtype=torch.int32)
    want = chain_reference(buf0, ws)
    floor_us = HIDDEN * HIDDEN * 2 / bw * 1e6
    rows = []
    for cfg in CONFIGS:
        row = {"config": cfg, "programs": HIDDEN // cfg["BLOCK_N"], "us_per_phase": {}, "checks": {}}
        if row["programs"] > sms:
            continue
        outs = {}
        for mode in MODES:
            outs[mode] = buf0.clone()
            chain(outs[mode], ws, bar, cfg, mode)
            timed = buf0.clone()  # each replay starts from buf0 (a 0.4 MB copy, in every variant)
            run = lambda m=mode, b=timed, c=cfg: (b.copy_(buf0), chain(b, ws, bar, c, m))  # noqa: E731
            row["us_per_phase"][mode] = time_ms(graphed(run), dev) * 1e3 / LAYERS
        want1 = chain_reference(buf0, ws[:1].expand_as(ws))
        err = ((outs["launches"].double() - want.double()).norm() / want.double().norm()).item()
        row["checks"] = {"launches_vs_torch_rel_err": err,
                         "persistent_bitwise": torch.equal(outs["persistent"], outs["launches"]),
                         "prefetch_bitwise": all(torch.equal(outs[m], outs["launches"]) for m in MODES
                                                 if "prefetch" in m),
                         "one_weight_vs_torch_rel_err": max(
                             ((outs[m].double() - want1.double()).norm() / want1.double().norm()).item()
                             for m in MODES if "one weight" in m)}
        rows.append(row)
        print(cfg, {k: round(v, 2) for k, v in row["us_per_phase"].items()}, row["checks"], flush=True)
    split_us, scratch = {}, buf0.clone()  # every graph below replays the chain modes' 0.4 MB reset copy too
    for S in (1, 2, 4):  # timing only (split_chain)
        part = torch.zeros(2, S, a.rows, HIDDEN, device=dev, dtype=bf)
        run = lambda S=S, part=part: (scratch.copy_(buf0), split_chain(part, buf0[0], ws, S))  # noqa: E731
        split_us[S] = time_ms(graphed(run), dev) * 1e3 / LAYERS
    print("split-K, sum in the consumer (timing only), us a phase:", split_us, flush=True)
    buf = buf0.clone()
    prod_us = time_ms(graphed(lambda: (buf.copy_(buf0), _production(buf, ws))), dev) * 1e3 / LAYERS
    print(f"floor {floor_us:.2f} us a phase; rk.decode_linear {prod_us:.2f} us", flush=True)
    res = {"benchmark": "persistent_chain", **environment("cuda"), "copy_bandwidth": bw, "layers": LAYERS,
           "rows": a.rows, "hidden": HIDDEN, "floor_us_per_phase": floor_us, "rk.decode_linear_us_per_phase": prod_us,
           "results": rows, "split_k_sum_in_consumer_us_per_phase": split_us}
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"bench_persistent_chain_{a.rows}rows.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
