"""K5-K7 DeepSeek-V3 MoE routing (DESIGN.md section 6). K5 gate from fp32 logits, T in {4096, 16384, 65536},
E=256, top-8, 8 groups keep 4 (fwd, fwd+bwd), and the full router with the [T,7168]x[7168,256] GEMM
(transformers' fp32 router vs r1kernels fp32 / bf16 GEMM). K6 permute + unpermute, T=16384 x 8, H=7168 bf16.
K7 a V3-dimension MoE layer (H=7168, I=2048, E=256, top-8, one shared expert) fwd+bwd: transformers
(grouped_mm experts) vs patched vs Liger's fused MoE experts (when installed, with our router), vs its grouped
GEMMs + shared expert alone. Providers: torch reference, torch.compile(reference), triton, cuda, transformers.
Bytes floors: gate fwd reads the logits once (+ the [T, K] outputs); fwd+bwd also writes the [T, E] grad.
permute+unpermute: hidden read once, T*K rows written, read back, [T, H] written."""
from __future__ import annotations

import copy

import torch

import r1kernels as rk
from r1kernels.reference import moe as ref

from .harness import Case, Rotating, Skip

E, K, G, KG = 256, 8, 8, 4
_STATE: dict = {}


def _fresh(**kw):
    """Drop the previous case's tensors before allocating this one's."""
    _STATE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _STATE.update(kw)


def _gate_cases(device, quick):
    Ts = [256] if device == "cpu" else ([4096] if quick else [4096, 16384, 65536])
    backends = [b for b in ("cuda", "triton") if b in rk._backend.available("route", device)]
    compiled = torch.compile(ref.route, dynamic=False) if device == "cuda" else None
    return [c for T in Ts for c in _gate_cases_at(T, device, backends, compiled)]


def _gate_cases_at(T, device, backends, compiled):
    inputs = Rotating(lambda: (torch.randn(T, E, device=device) * 2, torch.randn(E, device=device) * 0.05))

    def fwd(fn):
        def run():
            x, b = inputs.next()
            with torch.no_grad():
                return fn(x, b)
        return run

    def fwd_bwd(fn):
        def run():
            x, b = inputs.next()
            x = x.detach().requires_grad_()
            w, _ = fn(x, b)
            return torch.autograd.grad(w, x, torch.ones_like(w))
        return run

    def public(b):
        return lambda x, bias: rk.moe.route(x, bias, top_k=K, n_group=G, topk_group=KG,
                                            routed_scaling_factor=2.5, backend=b)

    provs = {"torch": public("torch")} | {b: public(b) for b in backends}
    peers = ("torch",)
    if compiled is not None and T == 16384:
        provs["torch.compile"] = lambda x, b: compiled(x, b, K, G, KG, 2.5, True)
        peers = ("torch", "torch.compile")
    shape = f"T={T} E={E} top{K} {G}g keep{KG} fp32"
    io = T * E * 4 + T * K * (4 + 8 + 4)
    p_fwd = {n: fwd(f) for n, f in provs.items()}
    p_fb = {n: fwd_bwd(f) for n, f in provs.items()}
    return [Case("moe gate fwd", shape, p_fwd, bytes=io, peers=peers),
            Case("moe gate fwd+bwd", shape, p_fb, bytes=io + T * E * 4 + T * K * 4, peers=peers)]


def _router_cases(device, quick):
    if device == "cpu":
        return []
    T, H = (4096, 7168) if quick else (16384, 7168)
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    except ImportError:
        DeepseekV3TopkRouter = None

    def setup():
        _fresh()
        _STATE["inputs"] = Rotating(lambda: torch.randn(T, H, device=device, dtype=torch.bfloat16), n=2)
        _STATE["weight"] = torch.nn.Parameter(torch.randn(E, H, device=device) * H ** -0.5)
        _STATE["bias"] = torch.randn(E, device=device) * 0.05
        if DeepseekV3TopkRouter is not None:
            cfg = DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, n_group=G,
                                   topk_group=KG, routed_scaling_factor=2.5, norm_topk_prob=True)
            hf = DeepseekV3TopkRouter(cfg).to(device)
            with torch.no_grad():
                hf.weight.copy_(_STATE["weight"])
                hf.e_score_correction_bias.copy_(_STATE["bias"])
            _STATE["hf"] = hf

    def r1k(gemm_dtype, backend="auto"):
        def run():
            h = _STATE["inputs"].next().detach().requires_grad_()
            w = _STATE["weight"]
            _, tw, _ = rk.moe.router(h, w, _STATE["bias"], top_k=K, n_group=G, topk_group=KG,
                                     routed_scaling_factor=2.5, gemm_dtype=gemm_dtype, backend=backend)
            return torch.autograd.grad(tw, (h, w), torch.ones_like(tw))
        return run

    def hf():
        if "hf" not in _STATE:
            raise Skip("transformers not installed")
        h = _STATE["inputs"].next().detach().requires_grad_()
        out = _STATE["hf"](h)
        tw = out[1] if isinstance(out, tuple) and len(out) == 3 else None
        if tw is None:
            raise Skip("transformers' router API differs")
        return torch.autograd.grad(tw, (h, _STATE["hf"].weight), torch.ones_like(tw))

    provs = {"transformers (fp32 GEMM)": hf, "r1k fp32 GEMM": r1k(None), "r1k bf16 GEMM": r1k(torch.bfloat16),
             "r1k bf16 GEMM triton gate": r1k(torch.bfloat16, "triton")}
    return [Case("moe router fwd+bwd", f"T={T} H={H} E={E} bf16 hidden", provs, flops=3 * 2 * T * H * E,
                 peers=("transformers (fp32 GEMM)",), setup=setup)]


def _permute_cases(device, quick):
    T, H = (64, 256) if device == "cpu" else ((4096, 7168) if quick else (16384, 7168))
    dtype = torch.bfloat16
    backends = [b for b in ("cuda", "triton") if b in rk._backend.available("permute", device)]

    def setup():
        _fresh()
        ids = [ref.route(torch.randn(T, E, device=device), torch.zeros(E, device=device), K, G, KG)[1]
               for _ in range(2)]
        _STATE["inputs"] = Rotating(lambda: (torch.randn(T, H, device=device, dtype=dtype), ids.pop(),
                                             torch.rand(T, K, device=device)), n=2)

    def run_with(backend, bwd=False, checked=True):
        permute, unpermute = (rk.moe.permute, rk.moe.unpermute) if checked else (rk.moe._permute, rk.moe._unpermute)

        def run():
            h, ids, w = _STATE["inputs"].next()
            if bwd:
                h = h.detach().requires_grad_()
                w = w.detach().requires_grad_()
            p, row_map, _ = permute(h, ids, E, backend=backend)
            out = unpermute(p, row_map, w, backend=backend)
            if bwd:
                return torch.autograd.grad(out, (h, w), out)
            return out
        return run

    def hf_like(bwd=False):
        """transformers' grouped_mm_experts_forward index path (sort, gather, weight, inverse, sum)."""
        def run():
            h, ids, w = _STATE["inputs"].next()
            if bwd:
                h = h.detach().requires_grad_()
                w = w.detach().requires_grad_()
            ids_g, perm = torch.sort(ids.reshape(-1))
            x = h[perm // K]
            y = x * w.reshape(-1)[perm].unsqueeze(-1)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            out = y[inv].view(T, K, H).sum(1).to(h.dtype)
            if bwd:
                return torch.autograd.grad(out, (h, w), out)
            return out
        return run

    row = T * H * 2
    fwd_bytes = row + T * K * H * 2 * 2 + row
    bwd_bytes = fwd_bytes + (row + 2 * T * K * H * 2) + (T * K * H * 2 + row)  # unpermute bwd + permute bwd
    shape = f"T={T} K={K} H={H} bf16"
    cases = []
    for bwd in (False, True):
        provs = {"torch": run_with("torch", bwd)} | {b: run_with(b, bwd) for b in backends}
        if "cuda" in backends:  # the patch's path: ids from the router, no id-range check (no device sync)
            provs["cuda (unchecked)"] = run_with("cuda", bwd, checked=False)
        provs["transformers-style"] = hf_like(bwd)
        cases.append(Case("moe permute+unpermute" + (" fwd+bwd" if bwd else " fwd"), shape, provs,
                          bytes=bwd_bytes if bwd else fwd_bytes, peers=("torch", "transformers-style"),
                          setup=setup if not bwd else None))
    return cases


def _layer_cases(device, quick):
    if device == "cpu":
        return []
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    except ImportError:
        return []
    import torch.nn.functional as F
    T, H, I, n_exp = (2048, 7168, 2048, 64) if quick else (4096, 7168, 2048, E)

    def setup():
        _fresh()
        cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=n_exp, num_experts_per_tok=K,
                               n_group=G, topk_group=KG, n_shared_experts=1, routed_scaling_factor=2.5)
        cfg._experts_implementation = "grouped_mm"
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                moe = DeepseekV3MoE(cfg)
        finally:
            torch.set_default_dtype(old)
        with torch.no_grad():
            for p in moe.parameters():
                p.normal_(0, 0.02)
            moe.gate.weight.data = moe.gate.weight.data.float()
            moe.gate.e_score_correction_bias.uniform_(0, 0.01)
        patched = copy.copy(moe)               # shares parameters; own _modules dict
        patched._modules = dict(moe._modules)
        from r1kernels.patch.deepseek_v3 import R1KExperts, R1KRouter
        router = R1KRouter(moe.gate, gemm_dtype=torch.bfloat16)
        patched._modules["gate"] = router
        patched._modules["experts"] = R1KExperts(moe.experts)
        liger = copy.copy(moe)                 # the same router as ours; Liger's fused experts on the same weights
        liger._modules = dict(moe._modules)
        liger._modules["gate"] = router
        liger._modules["experts"] = _LigerExperts(moe.experts)
        _STATE.update(moe=moe, patched=patched, liger=liger,
                      inputs=Rotating(lambda: torch.randn(1, T, H, device=device, dtype=torch.bfloat16), n=2))
        ids = ref.route(torch.randn(T, n_exp, device=device), torch.zeros(n_exp, device=device), K, G, KG)[1]
        counts = torch.bincount(ids.flatten(), minlength=n_exp)
        _STATE["gemm_in"] = (torch.randn(T * K, H, device=device, dtype=torch.bfloat16),
                             counts.cumsum(0).to(torch.int32))

    def step(name):
        def run():
            mod = _STATE[name]
            x = _STATE["inputs"].next().detach().requires_grad_()
            out = mod(x)
            out.backward(out)
            for p in mod.parameters():
                p.grad = None
            return x.grad
        return run

    def gemms_only():
        """The layer's matrix work alone: grouped gate_up + down GEMMs and the shared expert, fwd+bwd."""
        moe = _STATE["moe"]
        x, offs = _STATE["gemm_in"]
        x = x.detach().requires_grad_()
        gm = getattr(F, "grouped_mm", None) or torch._grouped_mm
        gu = gm(x, moe.experts.gate_up_proj.transpose(-2, -1), offs=offs)
        a, b = gu.chunk(2, dim=-1)
        y = gm(F.silu(a) * b, moe.experts.down_proj.transpose(-2, -1), offs=offs)
        h = _STATE["inputs"].next().detach().requires_grad_()
        s = moe.shared_experts(h)
        torch.autograd.backward((y, s), (y, s))
        for p in moe.parameters():
            p.grad = None

    flops = 3 * 2 * (T * K * 3 * H * I + T * 3 * H * I)  # fwd+bwd: routed (top-8) and shared, 3 GEMMs each
    provs = {"transformers grouped_mm": step("moe"), "r1kernels patched": step("patched"),
             "grouped GEMMs + shared only": gemms_only}
    peers = ("transformers grouped_mm",)
    if _LigerExperts.fn is not None:
        provs["Liger fused MoE (our router)"] = _skip_on_error(step("liger"))
        peers += ("Liger fused MoE (our router)",)
    return [Case("moe layer fwd+bwd", f"T={T} H={H} I={I} E={n_exp} top{K} bf16", provs, flops=flops,
                 peers=peers, setup=setup)]


def _skip_on_error(fn):
    """A peer that fails (a version mismatch, say) is a skipped row, not a failed benchmark."""
    def run():
        try:
            return fn()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            raise Skip(f"{type(e).__name__}: {e}"[:300]) from e
    return run


class _LigerExperts(torch.nn.Module):
    """Liger-Kernel 0.8.5's LigerFusedMoEFunction (gather + grouped GEMM + SwiGLU, recomputing backward) on
    transformers' expert weights (gate_up_proj [E, 2I, H], down_proj [E, H, I]: Liger's layout)."""
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction as fn
    except ImportError:
        fn = None

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.fn.apply(hidden_states, self.experts.gate_up_proj, self.experts.down_proj,
                             top_k_index.to(torch.int32), top_k_weights)


def cases(device: str, quick: bool) -> list[Case]:
    """All MoE cases; env R1K_BENCH_MOE=gate,router,permute,layer picks a subset."""
    import os
    parts = {"gate": _gate_cases, "router": _router_cases, "permute": _permute_cases, "layer": _layer_cases}
    pick = [p for p in os.environ.get("R1K_BENCH_MOE", "").split(",") if p] or list(parts)
    return [c for p in pick for c in parts[p](device, quick)]


def profile(T: int = 16384, H: int = 7168, out_json: str | None = None, gate_only: bool = False):
    """Per-kernel device time (torch.profiler, no CPU launch overhead), the top host ops (CPU self time) and
    the wall time of 50 back-to-back calls of the gate fwd+bwd at T in {4096, 16384, 65536}, the router fwd+bwd
    (fp32 / bf16 GEMM) and permute+unpermute fwd+bwd."""
    import json
    import os
    import time

    from .harness import profile_us
    dev = "cuda"
    h = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(E, H, device=dev) * H ** -0.5)
    bias = torch.randn(E, device=dev) * 0.05

    def router(gd):
        _, tw, _ = rk.moe.router(h, w, bias, top_k=K, n_group=G, topk_group=KG, gemm_dtype=gd)
        torch.autograd.grad(tw, (h, w), torch.ones_like(tw))

    ids = ref.route(torch.randn(T, E, device=dev), bias, K, G, KG)[1]
    tw = torch.rand(T, K, device=dev, requires_grad=True)

    def perm():
        p, rm, _ = rk.moe.permute(h, ids, E)
        out = rk.moe.unpermute(p, rm, tw)
        torch.autograd.grad(out, (h, tw), out)

    def gate(Tg, backend):
        xs = [torch.randn(Tg, E, device=dev) * 2 for _ in range(4)]
        i = [0]

        def run():
            i[0] = (i[0] + 1) % 4
            x = xs[i[0]].requires_grad_()
            w, _ = rk.moe.route(x, bias, top_k=K, n_group=G, topk_group=KG, backend=backend)
            torch.autograd.grad(w, x, torch.ones_like(w))
        return run

    cases = [(f"gate fwd+bwd T={t} {b}", gate(t, b)) for t in (4096, 16384, 65536) for b in ("cuda", "triton")
             if b in rk._backend.available("route", dev)]
    if not gate_only:
        cases += [("router fp32 GEMM", lambda: router(None)), ("router bf16 GEMM", lambda: router(torch.bfloat16)),
                  ("permute+unpermute fwd+bwd", perm)]
        # permute's bytes (read T*H, write T*K*H) as plain torch streams: the write-heavy floor
        rows, src = (torch.ones(T * K, H, device=dev, dtype=torch.bfloat16) for _ in range(2))
        cases += [("write T*K*H (fill)", lambda: rows.fill_(1.0)),
                  ("copy T*K*H (read + write)", lambda: rows.copy_(src))]
    result = {"device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
              "commit": os.environ.get("R1K_COMMIT", ""), "us_per_iteration": {},
              "host_us_per_iteration": {}, "wall_us_per_iteration": {}}
    for name, fn in cases:
        times = profile_us(fn)
        result["us_per_iteration"][name] = times
        result["host_us_per_iteration"][name] = profile_us(fn, host=True)
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        result["wall_us_per_iteration"][name] = round((time.perf_counter() - t0) / 50 * 1e6, 1)
        print(f"\n== {name}: {sum(times.values()):.1f} us/iteration on the GPU")
        for k, v in list(times.items())[:8]:
            print(f"   {v:9.1f} us  {k}")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    import sys
    profile(out_json=sys.argv[1] if len(sys.argv) > 1 else None, gate_only="gate" in sys.argv[2:])
