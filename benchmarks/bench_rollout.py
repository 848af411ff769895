"""R: rollout of a Qwen2.5-1.5B-shaped model (random init, bf16) -- DESIGN.md section 6.

Workloads: "fixed" 8 prompts x 8 samples, 256 prompt tokens, 512 new tokens each (no eos); "varied" the
same prompts with completion lengths uniform in 32-512 (eos forced at the drawn length by a hook on the
lm_head); "throughput" 512 completions (64 prompts x 8) of 512 tokens.
Providers: the floor (each decode step reads every weight once plus the valid KV cache, at the measured
copy bandwidth), transformers generate with its dynamic cache (what TRL's GRPOTrainer runs without vLLM),
transformers generate with a static cache + torch.compile (--with-compile: about 45 s of compile), and the
r1train engine (first call, which captures the CUDA graphs, reported apart). The parameters lie in one flat
buffer, as DeepSpeed ZeRO 1/2 holds them in training (--separate-params: one allocation each).

    python -m benchmarks.bench_rollout --out DIR [--with-compile] [--only fixed,varied,throughput]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time

import torch

H200_COPY_BW = 4.24e12  # bytes/s, device-to-device copy on one H200 (DESIGN.md section 6): the CPU stand-in


def copy_bandwidth(device) -> float:
    """Bytes/s (read + written) of a 1 GiB device copy, measured in this run (harness.ceilings)."""
    from .harness import ceilings

    return ceilings(device)["copy_GBps"] * 1e9 if device == "cuda" else H200_COPY_BW
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True)


def flatten_parameters(model):
    """Move every parameter into one flat buffer, back to back in model.parameters() order: the layout the
    engine reads during training (DeepSpeed ZeRO 1/2 flattens the bf16 parameters this way), where it fuses
    gate_proj with up_proj into one GEMM over a view (r1train/generation/fused.py)."""
    ps = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in ps])
    off = 0
    for p in ps:
        p.data = flat[off:off + p.numel()].view_as(p)
        off += p.numel()
    return model


def _is_flat(model) -> bool:
    return len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def _model(device, tiny, separate_params=False):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from .train_gpu import QWEN25_15B

    torch.manual_seed(0)
    cfg = Qwen2Config(**(TINY if tiny else QWEN25_15B), pad_token_id=0, eos_token_id=1, bos_token_id=2)
    dtype = torch.float32 if tiny else torch.bfloat16
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    return model if separate_params else flatten_parameters(model)


def _step_bytes(model) -> tuple[int, int]:
    """(bytes of every weight, bytes of keys + values of one cached token over all layers, bf16)."""
    c = model.config
    w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return w_bytes, c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2


def floor_seconds(model, prompt_len: int, lens: list[int]) -> float:
    """Decode-step floor: per step all weights once + the KV cache of the rows still generating."""
    w_bytes, kv_tok = _step_bytes(model)
    kv = sum(prompt_len + t for n in lens for t in range(n)) * kv_tok
    return (max(lens) * w_bytes + kv) / copy_bandwidth(next(model.parameters()).device.type)


def generated_tokens(tok_BT: torch.Tensor, eos: int) -> int:
    """Tokens a rollout drew: each row's through its first eos (all T without one). Counting tokens != pad_id
    missed sampled tokens equal to the pad id."""
    T = tok_BT.shape[1]
    is_eos = tok_BT == eos
    n_B = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, T)
    return int(n_B.sum())


def varied_lengths(rows: int, T: int, seed: int = 0) -> list[int]:
    """The "varied" workload's completion lengths: uniform in max(T // 16, 2)..T (32-512 for T = 512)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(max(T // 16, 2), T + 1, (rows,), generator=g).tolist()


class ForcedLengths:
    """Forces eos as the len_B[b]-th token of row b (hooks: position ids in, lm_head logits out).
    rows() gives the original row of each batch row (the engine moves rows when it compacts); active()
    (default: always) says whether this lm_head call is a rollout's (a trainer's forwards pass through)."""

    def __init__(self, model, prompt_len, len_B, eos, rows, active=None):
        # the prefill draws token 0 from the distinct prompts' logits, whose rows rows() does not map: it is
        # never forced
        if int(len_B.min()) < 2:
            raise ValueError(f"len_B: completion lengths must be >= 2, got {int(len_B.min())}")
        self.len_B, self.P, self.eos, self.rows, self.active = len_B, prompt_len, eos, rows, active
        self.pos = None
        self.h = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                  model.get_output_embeddings().register_forward_hook(self._post)]

    def _pre(self, mod, args, kwargs):
        self.pos = kwargs.get("position_ids")

    def _post(self, mod, args, out):
        if self.active is not None and not self.active():
            return out
        b = out.shape[0]
        t = self.pos[:, -1:] - (self.P - 1)  # index of the token these logits draw
        stop = t >= (self.len_B[self.rows(b)][:, None] - 1)
        big = torch.where(stop, torch.full_like(out[..., 0], 1e4), torch.full_like(out[..., 0], -1e4))
        return torch.cat([out[..., :self.eos], big[..., None], out[..., self.eos + 1:]], -1)

    def remove(self):
        for h in self.h:
            h.remove()


def _timed(fn, device, reps):
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


# --ab: the engine again with a change, in the same process (rows of one call compare; calls vary by ~3%). A
# variant is one change or several joined by "+", e.g. down+emit. (Programmatic dependent launch, RMSNorms folded
# into the projections and shared-prompt reads were measured slower on H100 and H200 and removed:
# benchmarks/NOTES-decode-linear.md.)
AB = {"cublas": "decode projections on cuBLAS", "down": "down_proj through rk.decode_linear",
      "emit": "the step's bookkeeping after sampling as one kernel (engine.STEP_FUSIONS)",
      "rope_table": "the rotary cos / sin of a step gathered from a table (engine.STEP_FUSIONS)",
      "nofusions": "without the step's small-op fusions (engine.STEP_FUSIONS = (), on by default)",
      "dl_all_rows": "rk.decode_linear at every row count (fused.DECODE_LINEAR_MIN_ROWS all 1)",
      "dl_64": "rk.decode_linear as before 2026-12-07: a 64-row x tile, every projection from 17 rows",
      "gu64": "gate/up + SiLU through rk.decode_linear at BLOCK_N 64, 4 stages (98 KB: two programs an SM)",
      "cublaslt": "torch's GEMMs (down_proj, lm_head) on cuBLASLt (torch.backends.cuda.preferred_blas_library)"}


@contextlib.contextmanager
def ab_variant(v: str):
    from r1kernels.triton import decode_linear as dl
    from r1train.generation import engine as ge
    from r1train.generation import fused as fz

    kept = fz.DECODE_LINEAR, ge.STEP_FUSIONS
    min_rows, configs = fz.DECODE_LINEAR_MIN_ROWS, dl.CONFIGS
    blas = torch.backends.cuda.preferred_blas_library() if torch.cuda.is_available() else None
    try:
        for change in v.split("+"):
            if change not in AB:
                raise ValueError(f"--ab: unknown change {change!r} in {v!r} (each one of {sorted(AB)})")
            if change == "cublas":
                fz.DECODE_LINEAR = ()
            elif change == "down":
                fz.DECODE_LINEAR = (*fz.DECODE_LINEAR, "down_proj")
            elif change in ("emit", "rope_table"):
                ge.STEP_FUSIONS = tuple(dict.fromkeys((*ge.STEP_FUSIONS, change)))
            elif change == "nofusions":
                ge.STEP_FUSIONS = ()
            elif change == "dl_all_rows":
                fz.DECODE_LINEAR_MIN_ROWS = dict.fromkeys(min_rows, 1)
            elif change == "dl_64":
                fz.DECODE_LINEAR_MIN_ROWS = dict.fromkeys(min_rows, 17)
                dl.CONFIGS = {epi: dict(c, BLOCK_M=dl.MAX_ROWS) for epi, c in configs.items()}
            elif change == "gu64":
                dl.CONFIGS = {**configs, "silu_gate": dict(configs["silu_gate"], BLOCK_N=64, STAGES=4)}
            elif change == "cublaslt":
                if blas is None:
                    raise ValueError("--ab cublaslt needs a CUDA device (torch's BLAS backend choice)")
                torch.backends.cuda.preferred_blas_library("cublaslt")
        yield
    finally:
        fz.DECODE_LINEAR, ge.STEP_FUSIONS = kept
        fz.DECODE_LINEAR_MIN_ROWS, dl.CONFIGS = min_rows, configs
        if blas is not None:
            torch.backends.cuda.preferred_blas_library(blas)


def _ab_name(v: str) -> str:
    return "r1train engine, " + " + ".join(AB[c] for c in v.split("+"))


def run_workload(name, model, device, *, n_prompts, G, P, T, lens, with_compile, reps, skip_peers=False, ab=(),
                 breakdown=False, top_p=1.0, top_k=0):
    """ab: names of AB, each run as its own provider; breakdown: step_breakdown of one more warm rollout; top_p /
    top_k: the truncation every provider samples with (default none, as GRPO's defaults)."""
    from r1train.generation import SamplingParams, engine_for

    B = n_prompts * G
    eos = model.config.eos_token_id if lens is not None else -1
    ids = torch.randint(3, model.config.vocab_size, (n_prompts, P), device=device).repeat_interleave(G, 0)
    mask = torch.ones_like(ids)
    seeds = list(range(B))
    sp = SamplingParams(T, temperature=1.0, top_p=top_p, top_k=top_k)
    eng = engine_for(model)
    eng.reset()  # graphs captured for another workload would replay without this one's hooks
    stats0 = dict(eng.stats)  # the engine's counters run over its life: this workload's are the difference
    len_B = torch.tensor(lens if lens is not None else [T] * B, device=device)
    hook = None
    if lens is not None:
        eng_rows = {"on": False}
        hook = ForcedLengths(model, P, len_B, eos, lambda b: eng.st.rid[:b] if eng_rows["on"]
                             else torch.arange(b, device=device))
    res = {"workload": name, "rows": B, "prompt_tokens": P, "max_new_tokens": T, "top_p": top_p, "top_k": top_k,
           "tokens_generated": int(len_B.sum()), "providers": {}}
    res["floor_s"] = floor_seconds(model, P, len_B.tolist())

    def ours():
        if hook:
            eng_rows["on"] = True
        tok, _ = eng.generate(ids, mask, seeds, sp, eos_id=eos, pad_id=0)
        if hook:
            eng_rows["on"] = False
        return tok

    t0 = time.perf_counter()
    tok = ours()
    first = time.perf_counter() - t0
    got = generated_tokens(tok, eos) if lens is not None else tok.numel()
    runs = _timed(ours, device, reps)
    res["providers"]["r1train engine"] = {"seconds": statistics.median(runs), "runs": runs,
                                         "first_call_s": first, "captures": eng.stats["captures"] - stats0["captures"],
                                         "capture_seconds": eng.stats["capture_seconds"] - stats0["capture_seconds"],
                                         "tokens_generated": got}
    if breakdown:
        res["breakdown"] = step_breakdown(eng, ours, model, P, len_B.tolist(), device)
    for v in ab:  # a variant that fails (say a launch option this Triton lacks) is recorded; the others still run
        try:
            with ab_variant(v):
                eng.reset()  # captured graphs keep the kernels they captured
                tok_ab = ours()
                runs = _timed(ours, device, reps)
            res["providers"][_ab_name(v)] = {"seconds": statistics.median(runs), "runs": runs,
                                             "tokens_equal_engine_run": bool(torch.equal(tok_ab, tok))}
        except Exception as e:  # noqa: BLE001 -- reported in the JSON and on stderr
            print(f"bench_rollout --ab {v}: {type(e).__name__}: {e}", file=sys.stderr)
            res["ab_errors"] = {**res.get("ab_errors", {}), v: f"{type(e).__name__}: {e}"}
        finally:
            eng.reset()

    def hf(**kw):
        def run():
            model.generation_config.eos_token_id = None if lens is None else eos
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=top_k,
                                  top_p=top_p, max_new_tokens=T, pad_token_id=0,
                                  eos_token_id=None if lens is None else eos, **kw)
        return run

    hf_reps = 1 if device == "cuda" else reps
    peers = {} if skip_peers else {"transformers generate (dynamic cache)": hf()}
    if with_compile:
        peers["transformers generate (static cache + torch.compile)"] = hf(cache_implementation="static")
    for pname, fn in peers.items():
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        runs = _timed(fn, device, hf_reps)
        res["providers"][pname] = {"seconds": statistics.median(runs), "runs": runs, "first_call_s": first}
    if hook:
        hook.remove()
    for p in res["providers"].values():
        p["x_floor"] = p["seconds"] / res["floor_s"]
    ours_s = res["providers"]["r1train engine"]["seconds"]
    for p in res["providers"].values():
        p["ours_speedup"] = p["seconds"] / ours_s
    return res


def step_breakdown(eng, run, model, P, lens, device) -> dict:
    """Where one warm rollout's wall time goes: a timing mark (a CUDA event, or the host clock on CPU) before and
    after each decode step and each compaction (the engine's own methods wrapped on this instance; no host read
    added inside the loop). Parts: the prefill and first token (start to the first step); the decode steps by
    batch bucket, each beside its floor (every weight once + the keys/values of the rows still generating at that
    step, as floor_seconds); the steps after every row drew its eos (up to check_every - 1); the compactions;
    idle device time between steps (the host's done-checks); the tail (outputs copied); the wall time around it."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def mark():
        if not cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(a, b):
        return a.elapsed_time(b) if cuda else (b - a) * 1e3

    marks = []  # (kind, rows, start, end)
    step, compact = eng._run_step, eng._compact

    def timed_step(r, *a):
        s0 = mark()
        step(r, *a)
        marks.append(("step", r, s0, mark()))

    def timed_compact(r, target):
        s0 = mark()
        compact(r, target)
        marks.append(("compact", r, s0, mark()))

    eng._run_step, eng._compact = timed_step, timed_compact
    try:
        sync()
        t0 = time.perf_counter()
        begin = mark()
        run()
        end = mark()
        sync()
        wall = time.perf_counter() - t0
    finally:
        del eng._run_step, eng._compact  # the class's methods again
    w_bytes, kv_tok = _step_bytes(model)
    bw = copy_bandwidth(device)
    out = {"wall_ms": wall * 1e3, "prefill_and_first_token_ms": ms(begin, marks[0][2]) if marks else ms(begin, end),
           "buckets": {}, "steps_after_done": 0, "steps_after_done_ms": 0.0, "compactions": 0,
           "compaction_ms": 0.0, "idle_between_ms": 0.0,
           "tail_ms": ms(marks[-1][3], end) if marks else 0.0}
    t = 0  # decode step t draws token t (token 0 came from the prefill)
    for i, (kind, r, s0, e0) in enumerate(marks):
        if i:
            out["idle_between_ms"] += ms(marks[i - 1][3], s0)
        if kind == "compact":
            out["compactions"] += 1
            out["compaction_ms"] += ms(s0, e0)
            continue
        t += 1
        live = [n for n in lens if n > t]
        if not live:  # every row has drawn its eos; the engine reads the live count only every check_every steps
            out["steps_after_done"] += 1
            out["steps_after_done_ms"] += ms(s0, e0)
            continue
        b = out["buckets"].setdefault(str(r), {"rows": r, "steps": 0, "ms": 0.0, "floor_ms": 0.0, "live_rows": 0})
        b["steps"] += 1
        b["ms"] += ms(s0, e0)
        b["floor_ms"] += (w_bytes + len(live) * (P + t) * kv_tok) / bw * 1e3
        b["live_rows"] += len(live)
    for b in out["buckets"].values():
        b.update(ms_per_step=b["ms"] / b["steps"], floor_ms_per_step=b["floor_ms"] / b["steps"],
                 x_floor=b["ms"] / b["floor_ms"], live_rows=b["live_rows"] / b["steps"])
    out["steps_ms"] = sum(b["ms"] for b in out["buckets"].values())
    out["steps_floor_ms"] = sum(b["floor_ms"] for b in out["buckets"].values())
    print(f"  breakdown: wall {out['wall_ms']:.1f} ms = prefill {out['prefill_and_first_token_ms']:.1f} + steps "
          f"{out['steps_ms']:.1f} (floor {out['steps_floor_ms']:.1f}) + {out['steps_after_done']} steps after the last "
          f"eos {out['steps_after_done_ms']:.1f} + {out['compactions']} compactions "
          f"{out['compaction_ms']:.1f} + idle {out['idle_between_ms']:.1f} + tail {out['tail_ms']:.1f}")
    for b in out["buckets"].values():
        print(f"    rows {b['rows']:4d}: {b['steps']:4d} steps x {b['ms_per_step']:.3f} ms (floor "
              f"{b['floor_ms_per_step']:.3f}, {b['x_floor']:.2f}x; {b['live_rows']:.1f} live rows)")
    return out


@torch.no_grad()
def profile_step(model, device, rows=64, P=256, T=512, G=8):
    """Per-kernel device time of one eager decode step (the 6th of a rollout with CUDA graphs off), and the
    graphed decode step's time per step: (rollout of T tokens - rollout of 2 tokens) / (T - 2). The rows are
    rows / G prompts x G completions, as in the fixed workload (so the one-time part prefills rows / G prompts:
    until 2026-12-05 every row had its own prompt, 8x the fixed workload's prefill)."""
    from torch.profiler import ProfilerActivity, profile

    from r1train.generation import Engine, SamplingParams

    ids = torch.randint(3, model.config.vocab_size, (rows // G, P), device=device).repeat_interleave(G, 0)
    mask, seeds = torch.ones_like(ids), list(range(rows))
    eng = Engine(model, cuda_graphs=False)
    held, n = {}, [0]
    step = eng._step

    def profiled_step(*a):
        n[0] += 1
        if n[0] != 6:
            return step(*a)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA if device == "cuda" else ProfilerActivity.CPU]) as prof:
            step(*a)
            torch.cuda.synchronize()
        held["prof"] = prof

    eng._step = profiled_step
    eng.generate(ids, mask, seeds, SamplingParams(8), eos_id=-1, pad_id=0)
    evs = list(held["prof"].key_averages())
    res = {"rows": rows, "kernel_ms_total": sum(e.device_time_total for e in evs) / 1e3,
           "kernel_launches": sum(e.count for e in evs),
           "kernels": _device_top(evs, 30)}
    eng = Engine(model)
    t = {}
    for n_new in (2, T):
        run = lambda n=n_new: eng.generate(ids, mask, seeds, SamplingParams(n), eos_id=-1, pad_id=0)  # noqa: E731
        run()
        t[n_new] = statistics.median(_timed(run, device, 3))
    res["graph_step_ms"] = (t[T] - t[2]) / (T - 2) * 1e3
    res["prefill_and_first_step_s"] = t[2]
    res["prefill_profile"] = _profile_prefill(eng, ids, mask, seeds, device)
    res["graph_timeline"] = graph_timeline(model, ids, mask, seeds)
    print(json.dumps({k: v for k, v in res.items() if k not in ("kernels", "prefill_profile", "graph_timeline")}))
    gt = res["graph_timeline"]
    if gt.get("replays"):
        print("graph timeline (median replay): " + json.dumps({k: v for k, v in gt.items() if k not in
                                                              ("replays", "top_gaps", "gap_by_pair")}))
    for k in res["kernels"][:25]:
        print(f"  {k['ms']:8.3f} ms  x{k['count']:4d}  {k['name']}")
    return res


@torch.no_grad()
def graph_timeline(model, ids, mask, seeds, steps=64, replays=5):
    """Where the replayed decode step's time goes between kernels: the step's graph (captured by a rollout of
    `steps` tokens) replayed `replays` times under torch.profiler, each replay's kernels (CUPTI records the graph's
    kernel nodes) reduced by timeline_stats. The replays continue the rollout's rows (the cache holds P + 256)."""
    from torch.profiler import ProfilerActivity, profile

    from r1train.generation import Engine, SamplingParams

    eng = Engine(model)
    eng.generate(ids, mask, seeds, SamplingParams(steps), eos_id=-1, pad_id=0)
    if len(eng.graphs) != 1:
        return {"error": f"expected one captured graph, got {len(eng.graphs)}"}
    g = next(iter(eng.graphs.values()))
    g.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            g.replay()
            torch.cuda.synchronize()  # host gap between replays: timeline_stats splits the trace there
    kern = [(e.name(), e.start_ns() / 1e3, e.end_ns() / 1e3) for e in prof.profiler.kineto_results.events()
            if str(e.device_type()).endswith("CUDA") and e.duration_ns() > 0]
    eng.reset()
    return timeline_stats(kern)


def timeline_stats(kern, split_us=50.0, top=12) -> dict:
    """kern: (name, start_us, end_us) of device kernels. Replays are runs of kernels separated by more than split_us
    of idle device. Per replay: span (first start to last end), busy (union of kernel intervals), gaps (idle time
    between kernels inside the span = span - busy), overlap (sum of kernel durations - busy: kernels running at once,
    as with programmatic dependent launch). The median replay's figures, its largest gaps and the gap time by
    (previous kernel, next kernel) name pair (names cut at 40 characters)."""
    kern = sorted(kern, key=lambda k: k[1])
    runs, cur, end = [], [], None
    for k in kern:
        if cur and k[1] - end > split_us:
            runs.append(cur)
            cur = []
        cur.append(k)
        end = k[2] if len(cur) == 1 else max(end, k[2])
    if cur:
        runs.append(cur)
    stats = []
    for r in runs:
        busy, s0, e0, last = 0.0, r[0][1], r[0][2], r[0][0]  # last: the kernel whose end is e0
        gaps = []
        for k in r[1:]:
            if k[1] > e0:
                busy += e0 - s0
                gaps.append((k[1] - e0, last[:40], k[0][:40]))
                s0, e0, last = k[1], k[2], k[0]
            elif k[2] > e0:
                e0, last = k[2], k[0]
        busy += e0 - s0
        span = max(k[2] for k in r) - r[0][1]
        stats.append({"kernels": len(r), "span_us": span, "busy_us": busy, "gap_us": span - busy,
                      "overlap_us": sum(k[2] - k[1] for k in r) - busy, "gaps": gaps})
    if not stats:
        return {"replays": 0}
    med = sorted(stats, key=lambda s: s["span_us"])[len(stats) // 2]
    pair: dict = {}
    for us, a, b in med["gaps"]:
        n, t = pair.get((a, b), (0, 0.0))
        pair[(a, b)] = (n + 1, t + us)
    out = {k: v for k, v in med.items() if k != "gaps"}
    out.update(replays=len(stats), spans_us=[s["span_us"] for s in stats], gap_count=len(med["gaps"]),
               top_gaps=[{"us": us, "after": a, "before": b} for us, a, b in sorted(med["gaps"], reverse=True)[:top]],
               gap_by_pair=[{"after": a, "before": b, "count": n, "us": t}
                            for (a, b), (n, t) in sorted(pair.items(), key=lambda kv: -kv[1][1])[:top]])
    return out


def _device_top(evs, n: int) -> list[dict]:
    """The n profiler events (key_averages) with the most device time: name, count, ms."""
    return [{"name": e.key[:90], "count": e.count, "ms": e.device_time_total / 1e3}
            for e in sorted(evs, key=lambda e: -e.device_time_total)[:n]]


def _profile_prefill(eng, ids, mask, seeds, device, top=25):
    """Where the rollout's one-time part goes (prefill_and_first_step_s: a warm 2-token rollout of the same rows:
    setup, the prefill of the distinct prompts, the repeats' copies, one decode step, the outputs): host time by
    op (self CPU time) and device time by kernel, from torch.profiler over one such call."""
    from torch.profiler import ProfilerActivity, profile

    from r1train.generation import SamplingParams

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        eng.generate(ids, mask, seeds, SamplingParams(2), eos_id=-1, pad_id=0)
        sync()
    evs = list(prof.key_averages())
    host = sorted(evs, key=lambda e: -e.self_cpu_time_total)[:top]
    out = {"host_ms_self_total": sum(e.self_cpu_time_total for e in evs) / 1e3,
           "device_ms_total": sum(e.self_device_time_total for e in evs) / 1e3,
           "host_top": [{"name": e.key[:90], "count": e.count, "self_ms": e.self_cpu_time_total / 1e3} for e in host],
           "device_top": _device_top(evs, top)}
    print(f"prefill profile: host self {out['host_ms_self_total']:.1f} ms, device {out['device_ms_total']:.1f} ms")
    for e in out["host_top"][:12]:
        print(f"  host {e['self_ms']:8.3f} ms  x{e['count']:5d}  {e['name']}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--with-compile", action="store_true")
    p.add_argument("--only", default="fixed,varied,throughput")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="per-kernel time of one decode step (CUDA): the default engine's and the last --ab variant's; "
                   "and each workload's step_breakdown")
    p.add_argument("--skip-peers", action="store_true", help="the engine only (no transformers generate)")
    p.add_argument("--ab", default="", help="comma list of variants, each a change or changes joined by +: also "
                   "the engine with that change; changes: " + ", ".join(f"{k} = {v}" for k, v in AB.items()))
    p.add_argument("--top-p", type=float, default=1.0, help="sampling truncation of every provider (default none)")
    p.add_argument("--top-k", type=int, default=0, help="sampling truncation of every provider (default none)")
    p.add_argument("--separate-params", action="store_true",
                   help="each parameter in its own allocation (default: one flat buffer, as under ZeRO 1/2)")
    a = p.parse_args(argv)
    variants = [v for v in a.ab.split(",") if v]
    bad = [c for v in variants for c in v.split("+") if c not in AB]
    if bad:
        p.error(f"--ab: unknown change(s) {bad} (each one of {sorted(AB)})")
    tiny = a.device == "cpu"
    model = _model(a.device, tiny, a.separate_params)
    n, G, P, T = (2, 2, 8, 12) if tiny else (8, 8, 256, 512)
    varied = varied_lengths(n * G, T)
    work = {"fixed": dict(n_prompts=n, G=G, P=P, T=T, lens=None),
            "varied": dict(n_prompts=n, G=G, P=P, T=T, lens=varied),
            "throughput": dict(n_prompts=n * 8, G=G, P=P, T=T, lens=None)}
    results = []
    for name in a.only.split(","):
        r = run_workload(name, model, a.device, **work[name], with_compile=a.with_compile and name == "fixed",
                         reps=a.reps, skip_peers=a.skip_peers,
                         ab=variants, breakdown=a.profile, top_p=a.top_p, top_k=a.top_k)
        if name == "throughput":
            r["tokens_per_second"] = r["tokens_generated"] / r["providers"]["r1train engine"]["seconds"]
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "providers"}))
        for pname, pr in r["providers"].items():
            print(f"  {pname:55s} {pr['seconds']:8.3f} s  x floor {pr['x_floor']:6.2f}  "
                  f"(ours {pr['ours_speedup']:.2f}x faster)")
        e = r["providers"]["r1train engine"]
        print(f"  engine: first call {e['first_call_s']:.2f} s, {e['captures']} graph captures in "
              f"{e['capture_seconds']:.2f} s, {e['tokens_generated']} tokens")
        if a.out:  # written after each workload: a later failure keeps the earlier numbers
            _write(a.out, model, results, a.device)
        if a.profile and a.device == "cuda" and name == "fixed":
            r["profile"] = profile_step(model, a.device)
            if variants and variants[-1] not in r.get("ab_errors", {}):  # the last variant's step too
                with ab_variant(variants[-1]):
                    r["profile_ab"] = {"variant": variants[-1], **profile_step(model, a.device)}
            if a.out:
                _write(a.out, model, results, a.device)
    return results


def _write(out_dir, model, results, device):
    import transformers

    from .train_gpu import _commit

    doc = {"benchmark": "rollout", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": _commit(), "torch": torch.__version__, "transformers": transformers.__version__,
           "copy_bandwidth": copy_bandwidth(device), "params": sum(p.numel() for p in model.parameters()),
           "parameter_layout": "flat (as DeepSpeed ZeRO 1/2)" if _is_flat(model) else "separate",
           "results": results}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_rollout.json"), "w") as fh:
        json.dump(doc, fh, indent=1)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
