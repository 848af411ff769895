"""One call of sample_tokens (top-p 0.9 + top-k 50, B=64 V=151936 bf16) at each PASS_SUB value, for ncu:
`ncu -k regex:_pass_kernel --csv --metrics ... python -m benchmarks.ncu_sampling_pass [subs]`; launches
0-15 are the first value's 16 bisection passes (8 top-k, 8 top-p), 16-31 the second's."""
import sys

import torch

from r1kernels.ops.sampling import sample_tokens_triton
from r1kernels.triton import sampling

if __name__ == "__main__":
    subs = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "256,1024").split(",")]
    logits = (torch.randn(64, 151936, device="cuda") * 2).bfloat16()
    seeds = torch.randint(0, 2**62, (64,), device="cuda")
    positions = torch.zeros(64, dtype=torch.long, device="cuda")
    for sub in subs:
        sampling.PASS_SUB = sub
        sample_tokens_triton(logits, seeds, positions, top_p=0.9, top_k=50)
    torch.cuda.synchronize()
