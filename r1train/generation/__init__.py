"""The generation engine used by every sampling path (GRPO rollouts, evaluation, rejection sampling,
`r1train sample`, distillation): `generate(model, prompts, seeds, params)`.

engine="r1train" (default): r1train.generation.engine (static KV cache, CUDA-graph decode, rk.sample_tokens,
rk.decode_attention). engine="transformers": the model's own `generate` (any model, slower).
Under ZeRO-3 pass the DeepSpeed engine as `ds_engine`: the parameters are gathered once per call (the
per-layer gather hooks lifted for its duration) and released after.
"""
from __future__ import annotations

import contextlib

import torch

from ..moe_replay import recorder
from .engine import Engine, SamplingParams, buckets, check_arguments, checked_logprobs, engine_for, eos_tuple, release
from .hf import hf_generate

ENGINES = ("r1train", "transformers")

__all__ = ["generate", "SamplingParams", "Engine", "engine_for", "eos_tuple", "release", "buckets", "ENGINES",
           "gathered_for_generation"]


def _offload(ds_engine):
    opt = ds_engine.optimizer
    return getattr(opt, "parameter_offload", opt)


def _zero3(ds_engine) -> bool:
    return ds_engine is not None and getattr(ds_engine, "zero_optimization_stage", lambda: 0)() == 3


@contextlib.contextmanager
def gathered_for_generation(ds_engine):
    """ZeRO-3: full parameters for the duration (one all-gather), without the per-module fetch/release
    hooks that would otherwise gather every layer at every decode step. A no-op below ZeRO-3."""
    if not _zero3(ds_engine):
        yield
        return
    import deepspeed

    off = _offload(ds_engine)
    with deepspeed.zero.GatheredParameters(list(ds_engine.module.parameters())):
        for h in list(off.forward_hooks) + list(off.backward_hooks):
            h.remove()
        off.forward_hooks, off.backward_hooks = [], []
        try:
            yield
        finally:
            for p in ds_engine.module.parameters():
                getattr(p, "ds_active_sub_modules", set()).clear()
            off._register_deepspeed_module(off.module)


def generate(model, prompt_ids_BP, prompt_mask_BP, seeds_B, params: SamplingParams, *, eos_id, pad_id: int,
             engine: str = "r1train", ds_engine=None, backend: str = "auto", cuda_graphs: bool = True,
             check_finite: bool = True):
    """Sample one completion per row of the left-padded prompts -> (tokens [B, T'], fp32 log-probs
    [B, T'] of each token under the distribution it was drawn from). eos_id: a token id or a sequence of
    them (a row ends at any; rollout.eos_ids gives TRL's set). check_finite: NaN logits (a row's log-probs NaN)
    are a ValueError naming the rows (checked_logprobs; one host read); False leaves them to the caller (GRPO's
    divergence check: the step's loss turns non-finite on every rank)."""
    out = _generate(model, prompt_ids_BP, prompt_mask_BP, seeds_B, params, eos_id=eos_id, pad_id=pad_id,
                    engine=engine, ds_engine=ds_engine, backend=backend, cuda_graphs=cuda_graphs)
    return (out[0], checked_logprobs(out[1])) if check_finite else out


def _generate(model, prompt_ids_BP, prompt_mask_BP, seeds_B, params, *, eos_id, pad_id, engine, ds_engine, backend,
              cuda_graphs):
    if engine not in ENGINES:
        raise ValueError(f"rollout_engine must be one of {ENGINES}, got {engine!r}")
    # shapes, dtypes, the model's device, one seed a row, pad_id
    check_arguments(prompt_ids_BP, prompt_mask_BP, seeds_B, pad_id, model=model)
    eos_tuple(eos_id)  # a clear error before any work (each engine checks the prompt rows)
    with gathered_for_generation(ds_engine):  # entered even with no rows: under ZeRO-3 it is a collective
        if prompt_ids_BP.shape[0] == 0:  # a rank with nothing to sample this round (dynamic sampling)
            dev = prompt_ids_BP.device
            return torch.zeros(0, 0, dtype=torch.long, device=dev), torch.zeros(0, 0, device=dev)
        if engine == "transformers":
            if recorder(model) is not None:
                raise ValueError("moe_router_replay needs rollout_engine=r1train: the transformers fallback does "
                                 "not record the routing")
            return hf_generate(model, prompt_ids_BP, prompt_mask_BP, seeds_B, params, eos_id=eos_id,
                               pad_id=pad_id, backend=backend)
        eng = engine_for(model, backend=backend, cuda_graphs=cuda_graphs and torch.cuda.is_available())
        try:
            return eng.generate(prompt_ids_BP, prompt_mask_BP, seeds_B, params, eos_id=eos_id, pad_id=pad_id)
        finally:
            if _zero3(ds_engine):  # no full copy of partitioned weights kept between rollouts
                eng.drop_weight_copies()
