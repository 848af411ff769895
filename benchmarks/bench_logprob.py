"""K1 token log-probs: N=8192, V=151936 bf16 (DESIGN.md section 6). Providers: torch reference,
torch.compile(reference), triton, Liger's fused_selective_log_softmax (forward) and cross-entropy
(forward+backward: it writes the gradient during its forward) when installed.
Bytes floor: forward reads the logits once; forward+backward reads twice and writes the gradient once.
Also linear_token_logprobs from hidden states (N=8192, H=3584; floor: its GEMMs), whose Triton rows carry
the chunk plan (chunks, rows, budget) of its memory budget, and its soft-capped form (softcap=30, Gemma 2's)
beside the same op uncapped, the model's own logits path (the [N, V] logits capped by torch, then
token_logprobs) and Liger's fused linear cross-entropy with softcap (reduction sum: the same gradients)."""
from __future__ import annotations

import torch

import r1kernels as rk
from r1kernels.reference import token_logprobs as ref_logprobs

from .bench_grpo import chunk_info
from .harness import Case, Rotating


def _liger():
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        from liger_kernel.transformers.functional import liger_cross_entropy
        return fused_selective_log_softmax, liger_cross_entropy
    except Exception:  # not installed, or incompatible with this torch/triton
        return None, None


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        N, V = 64, 1000
    else:
        N, V = (1024, 32000) if quick else (8192, 151936)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = f"N={N} V={V} {str(dtype).split('.')[-1]}"
    logit_bytes = N * V * torch.tensor([], dtype=dtype).element_size()

    def make():
        return (torch.randn(N, V, device=device) * 2).to(dtype), torch.randint(0, V, (N,), device=device)

    inputs = Rotating(make, n=3 if device == "cuda" else 1)
    backends = ["torch"] + (["triton"] if "triton" in rk._backend.available("token_logprobs", device) else [])
    compiled = torch.compile(ref_logprobs) if device == "cuda" else None

    def fwd(fn, entropy=False):
        def run():
            x, y = inputs.next()
            with torch.no_grad():
                return fn(x, y, entropy)
        return run

    def fwd_bwd(fn):
        def run():
            x, y = inputs.next()
            x = x.detach().requires_grad_()
            lp = fn(x, y, False)
            return torch.autograd.grad(lp, x, torch.ones_like(lp))
        return run

    def public(b):
        return lambda x, y, e: rk.token_logprobs(x, y, return_entropy=e, backend=b)

    selective, liger_ce = _liger()
    p_fwd = {b: fwd(public(b)) for b in backends}
    p_ent = {b: fwd(public(b), True) for b in backends}
    p_fb = {b: fwd_bwd(public(b)) for b in backends}
    if "triton" in backends:
        from r1kernels.ops.logprob import token_logprobs_triton
        p_fwd["triton (op, no API checks)"] = fwd(lambda x, y, e: token_logprobs_triton(x, y, 1.0, e))
        p_fb["triton (op, no API checks)"] = fwd_bwd(lambda x, y, e: token_logprobs_triton(x, y, 1.0, e))
    peers = ()
    if compiled is not None:
        p_fwd["torch.compile"] = fwd(lambda x, y, e: compiled(x, y, 1.0, e))
        p_ent["torch.compile"] = fwd(lambda x, y, e: compiled(x, y, 1.0, e), True)
        p_fb["torch.compile"] = fwd_bwd(lambda x, y, e: compiled(x, y, 1.0, e))
        peers = ("torch.compile",)
    if selective is not None and device == "cuda":
        p_fwd["liger selective_log_softmax"] = fwd(lambda x, y, e: selective(x[None], y[None], 1.0))
        peers += ("liger selective_log_softmax",)

        def liger_fb():
            x, y = inputs.next()
            x = x.detach().requires_grad_()
            loss = liger_ce(x, y, reduction="sum")
            return torch.autograd.grad(loss, x)
        p_fb["liger cross_entropy"] = liger_fb
        peers += ("liger cross_entropy",)
    return _linear_cases(device, quick) + [
        Case("token_logprobs fwd", shape, p_fwd, bytes=logit_bytes, peers=peers),
        Case("token_logprobs+entropy fwd", shape, p_ent, bytes=logit_bytes, peers=peers),
        Case("token_logprobs fwd+bwd", shape, p_fb, bytes=3 * logit_bytes, peers=peers),
    ]


def _liger_flce():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return liger_fused_linear_cross_entropy
    except ImportError:
        return None


def _linear_cases(device, quick):
    """linear_token_logprobs forward (no grad: reference / old-policy log-probs) and forward+backward."""
    if device == "cpu":
        N, H, V = 16, 32, 500
    else:
        N, H, V = (1024, 1024, 32000) if quick else (8192, 3584, 151936)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(N, H, device=device, dtype=dtype)
    weight = (torch.randn(V, H, device=device) / H ** 0.5).to(dtype)
    y = torch.randint(0, V, (N,), device=device)
    fwd, fb, info_f, info_fb = {}, {}, {}, {}
    for b in rk._backend.available("linear_token_logprobs", device):
        def run_f(b=b):
            with torch.no_grad():
                return rk.linear_token_logprobs(hidden, weight, y, backend=b)

        def run_fb(b=b):
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            return torch.autograd.grad(rk.linear_token_logprobs(h, w, y, backend=b).sum(), (h, w))
        fwd[b], fb[b] = run_f, run_fb
    if "triton" in fwd:
        from r1kernels.ops.linear_grpo import LOGPROB_CHUNK_BUDGET
        info_f["triton"] = chunk_info(N, H, V, dtype, device, LOGPROB_CHUNK_BUDGET, False)
        info_fb["triton"] = chunk_info(N, H, V, dtype, device, LOGPROB_CHUNK_BUDGET, True)
    shape = f"N={N} H={H} V={V} {str(dtype).split('.')[-1]}"
    return [Case("linear_token_logprobs fwd", shape, fwd, flops=2 * N * H * V, info=info_f),
            Case("linear_token_logprobs fwd+bwd", shape, fb, flops=4 * 2 * N * H * V, info=info_fb),
            _softcap_case(hidden, weight, y, shape)]


def _softcap_case(hidden, weight, y, shape, cap=30.0):
    """forward+backward of the soft-capped log-probs (Gemma 2: cap 30): the fused op with softcap, the same op
    uncapped (the cap's cost), the model's own logits path (loss_impl=logits: [N, V] logits, capped by torch),
    and Liger's fused linear cross-entropy with its softcap."""
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device.type
    provs, peers = {}, []

    def grads(fn):
        def run():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            return torch.autograd.grad(fn(h, w), (h, w))
        return run
    for b in rk._backend.available("linear_token_logprobs", dev):
        provs[b] = grads(lambda h, w, b=b: rk.linear_token_logprobs(h, w, y, softcap=cap, backend=b).sum())
    if "triton" in provs:
        provs["triton, uncapped"] = grads(lambda h, w: rk.linear_token_logprobs(h, w, y, backend="triton").sum())
        peers.append("triton, uncapped")
    provs["logits path"] = grads(lambda h, w: rk.token_logprobs(cap * torch.tanh((h @ w.t()) / cap), y).sum())
    peers.append("logits path")
    flce = _liger_flce()
    if flce is not None and dev == "cuda":
        provs["liger fused_linear_cross_entropy"] = grads(lambda h, w: -flce(h, w, y, reduction="sum", softcap=cap))
        peers.append("liger fused_linear_cross_entropy")
    return Case(f"linear_token_logprobs fwd+bwd softcap={cap:g}", shape, provs, flops=4 * 2 * N * H * V,
                peers=tuple(peers))


def tune(out_json: str | None = None, N: int = 8192, V: int = 151936):
    """Kernel-alone times (CUDA events) of the log-prob forward and backward kernels over launch configs,
    beside torch's copy of the same bytes (the backward's floor structure: one read + one write), and the
    per-kernel device time (torch.profiler) of one public-API fwd+bwd call. Tuning lives here, not in
    the kernels: a config that wins becomes LP_BLOCK / FWD_WARPS / BWD_BLOCK in r1kernels/triton/logprob.py."""
    import json
    import os

    from r1kernels.triton.logprob import logprob_bwd, logprob_fwd

    from .harness import ceilings, profile_us, time_ms
    dev = "cuda"
    x = (torch.randn(N, V, device=dev) * 2).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device=dev)
    g = torch.ones(N, device=dev)
    dx = torch.empty_like(x)
    _, lse, _ = logprob_fwd(x, y, 1.0, False)
    gb = x.numel() * x.element_size() / 1e9
    copy_ms = time_ms(lambda: dx.copy_(x), dev)
    res = {"device_name": torch.cuda.get_device_name(), "commit": os.environ.get("R1K_COMMIT", ""),
           "shape": f"N={N} V={V} bfloat16", "ceilings": ceilings(dev), "GB_per_pass": gb,
           "torch_copy_ms": copy_ms, "fwd": {}, "bwd": {}}
    for block, warps in [(4096, 4), (4096, 8), (8192, 4), (8192, 8), (8192, 16), (16384, 8), (16384, 16),
                         (16384, 32), (32768, 32)]:
        key = f"{block}/{warps}"
        res["fwd"][key] = time_ms(lambda b=block, w=warps: logprob_fwd(x, y, 1.0, False, block=b, warps=w), dev)
        res["bwd"][key] = time_ms(lambda b=block, w=warps: logprob_bwd(x, y, lse, None, g, None, 1.0, out=dx,
                                                                       out_strides=(0, V), block=b, warps=w), dev)
        print(f"{key:>12}: fwd {res['fwd'][key]:.3f} ms  bwd {res['bwd'][key]:.3f} ms  (copy {copy_ms:.3f})")

    def api():
        xr = x.detach().requires_grad_()
        lp = rk.token_logprobs(xr, y)
        torch.autograd.grad(lp, xr, torch.ones_like(lp))
    res["api_fwd_bwd_kernels_us"] = profile_us(api)
    res["api_fwd_bwd_ms"] = time_ms(api, dev)
    print(json.dumps({k: res[k] for k in ("torch_copy_ms", "api_fwd_bwd_ms", "api_fwd_bwd_kernels_us")}, indent=1))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    import sys
    tune(sys.argv[1] if len(sys.argv) > 1 else None)
