"""K2 GRPO loss from logits: B=8, T=1024, V=151936 bf16, forward+backward (DESIGN.md section 6). Providers: torch
reference, torch.compile(reference), triton (gradient buffer), triton in place (gradient written into the
logits), the CUDA cluster kernel (sm_90+: each row on chip; 2, 4, 8 CTAs per row), Liger's triton_grpo_loss when
installed (its logits carry one extra position, [B, T+1, V], as its API wants). Bytes floor: one read + one
write of the logits. Config: dapo, token level (and sequence level), old + ref log-probs, beta=0.04, temperature
1, all-ones mask (a padded mask would let our kernel skip rows, which the floor does not count)."""
from __future__ import annotations

import functools

import torch

import r1kernels as rk
from r1kernels.reference import grpo as R

from .harness import Case, Rotating


def _liger():
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
        return triton_grpo_loss
    except Exception:
        return None


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        B, T, V = 2, 16, 1000
    else:
        B, T, V = (2, 512, 32000) if quick else (8, 1024, 151936)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = f"B={B} T={T} V={V} {str(dtype).split('.')[-1]}"
    logit_bytes = B * T * V * torch.tensor([], dtype=dtype).element_size()
    liger = _liger() if device == "cuda" else None

    def make():
        x = (torch.randn(B, T + (1 if liger else 0), V, device=device) * 2).to(dtype)
        ids = torch.randint(0, V, (B, T), device=device)
        base = R.token_logprobs(x[:, :T], ids)
        old = base + 0.1 * torch.randn(B, T, device=device)
        ref = base + 0.1 * torch.randn(B, T, device=device)
        return x, ids, torch.randn(B, device=device), torch.ones(B, T, device=device), old, ref

    inputs = Rotating(make, n=2 if device == "cuda" else 1)
    backends = ["torch"] + (["triton"] if "triton" in rk._backend.available("grpo_loss", device) else [])
    kw = dict(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")

    def ours(backend, inplace=False, level="token"):
        def run():
            x, ids, adv, mask, old, ref = inputs.next()
            x = x[:, :T].detach().requires_grad_()
            out = rk.grpo_loss(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, backend=backend,
                               inplace_backward=inplace, importance_sampling_level=level, **kw)
            return torch.autograd.grad(out.loss, x)
        return run

    def op_run():
        from r1kernels.ops.grpo import grpo_loss_triton
        x, ids, adv, mask, old, ref = inputs.next()
        x = x[:, :T].detach().requires_grad_()
        loss, _, _ = grpo_loss_triton(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, inplace_backward=True,
                                      delta=None, kl_estimator="k3", max_completion_length=None,
                                      num_items_in_batch=None, **kw)
        return torch.autograd.grad(loss, x)

    def ref_fn(x, ids, adv, mask, old, ref):
        return R.grpo_loss(x, ids, adv, mask, old_logprobs=old, ref_logprobs=ref, **kw)[0]

    compiled = torch.compile(ref_fn) if device == "cuda" else None

    def compiled_run():
        x, ids, adv, mask, old, ref = inputs.next()
        x = x[:, :T].detach().requires_grad_()
        return torch.autograd.grad(compiled(x, ids, adv, mask, old, ref), x)

    def liger_run():
        x, ids, adv, mask, old, ref = inputs.next()
        x = x.detach().requires_grad_()
        loss, _ = liger(x, old, ref, ids, adv, mask, temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.28,
                        inplace=True, loss_type="dapo", reduce=True)
        return torch.autograd.grad(loss, x)

    tok = {b: ours(b) for b in backends}
    seq = {b: ours(b, level="sequence") for b in backends}
    peers = ()
    if "triton" in backends:
        tok["triton inplace"] = ours("triton", inplace=True)
        tok["triton inplace (op, no API checks)"] = op_run
        seq["triton inplace"] = ours("triton", inplace=True, level="sequence")
    if "cuda" in rk._backend.available("grpo_loss", device):  # the cluster kernel; CTAs per row swept
        from r1kernels.ops import grpo as G

        def with_cluster(cl, fn):
            def run():
                keep = G.CUDA_CONFIG["cluster"]
                G.CUDA_CONFIG["cluster"] = cl
                try:
                    return fn()
                finally:
                    G.CUDA_CONFIG["cluster"] = keep
            return run
        tok["cuda"] = ours("cuda")
        tok["cuda inplace"] = ours("cuda", inplace=True)
        for cl in (2, 4, 8):
            if cl != G.CUDA_CONFIG["cluster"]:
                tok[f"cuda inplace, {cl} CTAs per row"] = with_cluster(cl, ours("cuda", inplace=True))
    if compiled is not None:
        tok["torch.compile"] = compiled_run
        peers += ("torch.compile",)
    if liger is not None:
        tok["liger triton_grpo_loss"] = liger_run
        peers += ("liger triton_grpo_loss",)
    return [Case("grpo_loss fwd+bwd token", shape, tok, bytes=2 * logit_bytes, peers=peers),
            Case("grpo_loss fwd+bwd sequence", shape, seq, bytes=2 * logit_bytes)] + _linear_cases(device, quick)


def chunk_info(N, H, V, dtype, device, budget, grad_weight, grad_hidden=None):
    """The Triton provider's chunk plan (rows, count, budget, dweight accumulator) and the bytes of the
    gradients it returns (peak_extra_MB minus outputs_MB = the temporaries); grad_hidden defaults to
    grad_weight (a forward alone returns neither)."""
    from r1kernels.ops.linear_grpo import chunk_plan
    p = chunk_plan(N, V, dtype, budget, weight_numel=V * H if grad_weight else 0, weight_dtype=dtype, device=device)
    elt = torch.empty((), dtype=dtype).element_size()
    grad_hidden = grad_weight if grad_hidden is None else grad_hidden
    return {"chunk_budget_bytes": p.budget_bytes, "chunks": p.chunks, "chunk_rows": p.rows,
            "fp32_dweight": p.fp32_dweight, "planned_temp_MB": p.temp_bytes / 2**20,
            "outputs_MB": (N * H * grad_hidden + V * H * grad_weight) * elt / 2**20}


def _linear_cases(device, quick):
    """K3 fused hidden -> loss: N=8192, H=3584, V=151936 (floor: 3 GEMMs of 2*N*H*V FLOPs)."""
    if device == "cpu":
        B, T, H, V = 2, 8, 32, 500
    else:
        B, T, H, V = (2, 512, 1024, 32000) if quick else (8, 1024, 3584, 151936)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hidden = torch.randn(B, T, H, device=device, dtype=dtype)
    weight = (torch.randn(V, H, device=device) / H ** 0.5).to(dtype)
    ids = torch.randint(0, V, (B, T), device=device)
    adv = torch.randn(B, device=device)
    old = torch.randn(B, T, device=device) - 12.0
    provs, info = {}, {}

    def run(b, frozen=False):  # frozen: lm_head without grad (LoRA): no weight gradient, no weight-gradient GEMM
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_(not frozen)
        out = rk.linear_grpo_loss(h, w, ids, adv, old_logprobs=old, ref_logprobs=old, beta=0.04, backend=b)
        return torch.autograd.grad(out.loss, (h,) if frozen else (h, w))
    for b in rk._backend.available("linear_grpo_loss", device):
        provs[b] = functools.partial(run, b)
    if "triton" in provs:
        from r1kernels.ops.linear_grpo import GRPO_CHUNK_BUDGET
        provs["triton, lm_head frozen"] = functools.partial(run, "triton", frozen=True)
        info["triton"] = chunk_info(B * T, H, V, dtype, device, GRPO_CHUNK_BUDGET, True)
        info["triton, lm_head frozen"] = chunk_info(B * T, H, V, dtype, device, GRPO_CHUNK_BUDGET, False, True)
    return [Case("linear_grpo_loss fwd+bwd token", f"N={B * T} H={H} V={V} {str(dtype).split('.')[-1]}", provs,
                 flops=3 * 2 * B * T * H * V, info=info)]


def tune(B=8, T=1024, V=151936, out=None):
    """GPU sweep of the GRPO kernel's launch configs (block, warps, pass-2 order, store hint),
    passed to the launchers explicitly (the kernels read no environment). Prints median ms per config and
    writes the best as constants to `out`. `python -m benchmarks.bench_grpo --tune [best.txt]`."""
    from triton.testing import do_bench

    from r1kernels.ops import grpo as G
    from r1kernels.triton import grpo as K
    x = (torch.randn(B, T, V, device="cuda") * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), device="cuda")
    adv, old = torch.randn(B, device="cuda"), torch.randn(B, T, device="cuda") - 12.0
    s_B = G.row_scale(None, B, T, "dapo", None, None, None, "cuda")
    opts = dict(temperature=1.0, eps_low=0.2, eps_high=0.28, delta=None, beta=0.04, loss_type="dapo",
                kl_estimator="k3")
    logp = torch.empty(B, T, device="cuda")
    stats = torch.empty(6, B * T, device="cuda")

    def run(xi, dx, cfg):
        K.grpo_token(xi, ids, adv, None, old, old, s_B, logp, stats, dx, (dx.stride(0), dx.stride(1)), config=cfg,
                     **opts)

    floor = 2 * x.numel() * 2 / 3.0e12 * 1e3
    print(f"grpo fwd (writes the gradient) B={B} T={T} V={V}; 1 read + 1 write at 3.0 TB/s = {floor:.3f} ms")
    configs = [dict(K.CONFIG), dict(K.CONFIG, REVERSE=False), dict(K.CONFIG, STORE_CM=""),
               dict(K.CONFIG, BLOCK=8192), dict(K.CONFIG, BLOCK=8192, num_warps=8), dict(K.CONFIG, BLOCK=32768)]
    dx = torch.empty_like(x)
    run(x, dx, K.CONFIG)
    ref_logp = logp.clone()
    best = (1e9, None)
    for cfg in configs:
        try:
            run(x, dx, cfg)
            err = (logp - ref_logp).abs().max().item()
            ms = do_bench(lambda cfg=cfg: run(x, dx, cfg), warmup=50, rep=200, return_mode="median")
            xi = x.clone()
            ms_ip = do_bench(lambda cfg=cfg, xi=xi: run(xi, xi, cfg), warmup=50, rep=200, return_mode="median")
            print(f"  {cfg}: {ms:.3f} ms ({ms / floor:.2f}x)  inplace {ms_ip:.3f} ms ({ms_ip / floor:.2f}x)  "
                  f"max|dlogp| {err:.1e}", flush=True)
            if err < 1e-3 and ms_ip < best[0]:
                best = (ms_ip, cfg)
        except Exception as e:
            print(f"  {cfg}: failed {type(e).__name__}: {str(e)[:300]}", flush=True)
    lines = [f"r1kernels/triton/grpo.py CONFIG = {best[1]} (log-prob kernels: benchmarks.bench_logprob.tune)"]
    print("BEST:", "; ".join(lines))
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    import sys
    if "--tune" in sys.argv:
        tune(out=sys.argv[sys.argv.index("--tune") + 1] if len(sys.argv) > sys.argv.index("--tune") + 1 else None)
