"""bench_persistent_chain's kernel computes the chain it times: one launch per phase and the persistent launch
(one program under the interpreter, where programs run one after another and a grid barrier over two would
never open) equal the torch chain within the bf16 tolerance and each other bitwise, at several shapes."""
import pytest
import torch

from benchmarks.bench_persistent_chain import chain, chain_reference
from tests.conftest import TOLERANCES

CASES = [  # rows, hidden, layers, BLOCK_N, BLOCK_K
    (5, 32, 3, 32, 16),
    (16, 64, 4, 64, 32),
    (3, 32, 2, 32, 32),
]


@pytest.mark.parametrize("M,N,L,bn,bk", CASES)
def test_chain_launches_and_persistent_equal_torch(M, N, L, bn, bk):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device="cpu").manual_seed(M * 1000 + N)
    ws = (torch.randn(L, N, N, generator=g) / N ** 0.5).to(dev, torch.bfloat16)
    buf0 = torch.randn(2, M, N, generator=g).to(dev, torch.bfloat16)
    bar = torch.zeros(1, dtype=torch.int32, device=dev)
    cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": 2}
    want = chain_reference(buf0.double(), ws.double())
    outs = {}
    for mode in ("launches", "persistent"):
        outs[mode] = buf0.clone()
        chain(outs[mode], ws, bar, cfg, mode)
        err = ((outs[mode].double() - want).norm() / want.norm()).item()
        assert err < TOLERANCES[torch.bfloat16], (mode, err)
    assert torch.equal(outs["launches"], outs["persistent"])
    assert bar.item() == L - 1  # one arrival per dependency (between phases) of the one program
    split = buf0.clone()  # two programs a phase, one launch each: the column split of the GPU runs
    chain(split, ws, bar, {**cfg, "BLOCK_N": bn // 2}, "launches")
    assert ((split.double() - want).norm() / want.norm()).item() < TOLERANCES[torch.bfloat16]
