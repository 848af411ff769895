"""The optimizer behind the `optim` key (transformers/TRL names).

- `adamw_torch_fused` (default, as transformers' default since torch 2.8) and `adamw_torch`: torch AdamW,
  one fused kernel per step or torch's multi-tensor (foreach) path; the same update within fp32 rounding.
  Under DeepSpeed ZeRO 1/2 the optimizer sees one flat fp32 partition, so foreach runs about ten elementwise
  passes over it (reading and writing 12-16 bytes per parameter each) where fused runs one: about 28 bytes
  per parameter, ~10 ms for 1.5B parameters at the H200's 4.2 TB/s (predicted; not yet measured).
  Under DeepSpeed bf16 the engine keeps fp32 master weights, so the GPU holds 2 (bf16 weights) + 2 (bf16
  grads) + 4 (fp32 master) + 8 (fp32 exp_avg, exp_avg_sq) bytes per trained parameter, plus a transient
  fp32 copy of the gradient partition (4) at the optimizer step.
- `adamw_torch_8bit`: torchao's AdamW8bit (what transformers' `optim="adamw_torch_8bit"` builds): the same
  fp32 master weights, the update computed in fp32, the two moments stored block-wise quantized to 8 bits
  (256 values per fp32 scale): 2.03 bytes of state per parameter instead of 8, so fp32 master + states take
  6.03 bytes instead of 12. Chosen over bf16 weights with stochastic rounding (no fp32 master at all) and
  over CPU master weights (offload_optimizer: slow, and 16 bytes per parameter of host memory); measured in
  tests/test_train_memory_optim.py and the README's memory section.

ZeRO 1/2 hand the optimizer one flat fp32 partition per parameter group, whose length is a multiple of
2 x world size, not of torchao's block size; torchao would then keep that whole tensor's state in fp32.
`AdamW8bit` below quantizes the block-aligned head and keeps only the short tail (< 256 values) in fp32.
"""

from __future__ import annotations

import torch

from .config import ConfigError

OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_torch_8bit")


# transformers' Trainer.get_decay_parameter_names: no weight decay for biases and norm weights (matched on the
# lower-cased name) or parameters of nn.LayerNorm modules
_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def param_groups(cfg, model) -> list:
    """model's trainable parameters for make_optimizer: with weight_decay > 0 transformers' two groups (biases
    and norm weights without decay); one group otherwise (the same update, and the layout of checkpoints)."""
    import re

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not cfg.weight_decay:
        return [p for _, p in named]
    pats = [re.compile(x) for x in _NO_DECAY]
    in_ln = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    skip = [id(p) in in_ln or any(r.search(n.lower()) for r in pats) for n, p in named]
    groups = [{"params": [p for (_, p), s in zip(named, skip) if not s]},
              {"params": [p for (_, p), s in zip(named, skip) if s], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(cfg, params):
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
              weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw_torch_8bit":
        return adamw_8bit_class()(params, **kw)
    return torch.optim.AdamW(params, fused=cfg.optim == "adamw_torch_fused", **kw)


def adamw_8bit_class():
    try:
        from torchao.optim import AdamW8bit as _AdamW8bit
        from torchao.optim.adam import single_param_adam
    except ImportError as e:
        raise ConfigError("optim=adamw_torch_8bit needs torchao (pip install torchao)") from e

    class AdamW8bit(_AdamW8bit):
        """torchao's AdamW8bit; a parameter whose length is not a multiple of the block size gets its
        block-aligned head quantized and its tail (< block_size values) in fp32. The update runs over
        chunks of at most `chunk_elements` values (a multiple of the block size, so the quantization blocks
        and the result are the same as in one call): torchao's compiled update holds two fp32 temporaries
        the size of its input (measured on the CPU: 8 bytes per value; 11.5 GiB for ZeRO-2's one flat
        partition of a 1.5B model), so chunks bound that to 2 x 4 x chunk_elements bytes."""

        chunk_elements = 2 ** 25  # 256 MiB of temporaries

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            fn = torch.compile(single_param_adam, fullgraph=True, dynamic=False)
            chunk = max(self.block_size, self.chunk_elements - self.chunk_elements % self.block_size)
            with torch._dynamo.utils.disable_cache_limit():
                for group in self.param_groups:
                    if not torch.is_tensor(group["lr"]):  # a scheduler that assigned a float
                        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        st = self.state[p]
                        n = p.numel()
                        head = n - n % self.block_size if n >= 4096 else 0
                        if not st:
                            st["step"] = torch.tensor(0.0)
                            flat = p.detach().view(-1)
                            if head:
                                st["exp_avg"] = self._new_buffer(flat[:head], True)
                                st["exp_avg_sq"] = self._new_buffer(flat[:head], False)
                            if head < n:
                                st["exp_avg_tail"] = torch.zeros_like(flat[head:])
                                st["exp_avg_sq_tail"] = torch.zeros_like(flat[head:])
                        st["step"] += 1
                        flat, g = p.detach().view(-1), p.grad.view(-1)
                        args = (st["step"],)
                        rest = (None, group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                                group["eps"], True, self.bf16_stochastic_round and p.dtype is torch.bfloat16)
                        for c0 in range(0, head, chunk):
                            c1 = min(head, c0 + chunk)
                            fn(flat[c0:c1], g[c0:c1], *args, st["exp_avg"][c0:c1], st["exp_avg_sq"][c0:c1], *rest)
                        if head < n:
                            fn(flat[head:], g[head:], *args, st["exp_avg_tail"], st["exp_avg_sq_tail"], *rest)
            return loss

    return AdamW8bit


def state_bytes(optimizer) -> int:
    """Bytes the optimizer's state tensors hold (quantized states counted by their real storage)."""
    n = 0
    for st in optimizer.state.values():
        for k, v in st.items():
            if not torch.is_tensor(v) or k == "step":
                continue
            if hasattr(v, "__tensor_flatten__"):  # a tensor subclass: codes + scales (+ the shared qmap)
                names, _ = v.__tensor_flatten__()
                n += sum(getattr(v, a).numel() * getattr(v, a).element_size() for a in names)
            else:
                n += v.numel() * v.element_size()
    return n
