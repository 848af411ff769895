"""Drop-in for transformers' DeepseekV3 MoE layers: the router (DeepseekV3TopkRouter) becomes the fused
gate (r1kernels.moe.route, optionally a bf16 router GEMM) and the experts (DeepseekV3Experts) become
permute -> grouped GEMM -> unpermute. Parameters, buffers and state_dict keys stay the same objects, so
optimizers, checkpoints and DeepSpeed see no difference.

Auxiliary-loss-free balancing (the one mechanism; r1train's ExpertLoad drives it): each patched router adds
its routed tokens to `router.tokens_per_expert` (int64 [E], on the device, no host sync) in training
forwards only -- module.training and grad enabled, outside backward's recompute -- so generation (eval
mode, no_grad), no-grad log-prob passes and activation-checkpointing recomputes never count. Reentrant
checkpointing (torch's use_reentrant=True, DeepSpeed's, Megatron's) runs a layer's training forward under
no_grad inside its CheckpointFunction.forward: that forward counts as grad-enabled (`in_reentrant_checkpoint`),
so each training forward counts exactly once in either checkpointing mode.
`router.token_mask` ([N] bool, pads False) restricts the count to real tokens of forwards with N tokens (a
mask of another size: a ValueError in the training forward).
`update_router_biases` (once per optimizer step) sums the counts over ranks, moves each
e_score_correction_bias by rk.moe.update_bias, and resets them.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .. import moe as _moe
from ._pickle import reduce_made

ROUTER_CLASSES = ("DeepseekV3TopkRouter",)
EXPERTS_CLASSES = ("DeepseekV3Experts",)

# Reentrant activation checkpointing's autograd Functions, whose forward runs the layer under no_grad: torch's,
# DeepSpeed's and Megatron's (looked up where their modules are loaded; each a class named CheckpointFunction)
_REENTRANT_MODULES = ("torch.utils.checkpoint", "deepspeed.runtime.activation_checkpointing.checkpointing",
                      "megatron.core.tensor_parallel.random")


def _reentrant_forwards() -> set:
    codes = set()
    for name in _REENTRANT_MODULES:
        fwd = getattr(getattr(sys.modules.get(name), "CheckpointFunction", None), "forward", None)
        if fwd is not None:
            codes.add(fwd.__code__)
    return codes


def in_reentrant_checkpoint() -> bool:
    """Inside a reentrant checkpoint's forward (torch's, DeepSpeed's, Megatron's), which runs the layer under no_grad
    (transformers checkpoints only grad-enabled training forwards; the recompute runs in backward, outside it)."""
    codes = _reentrant_forwards()
    f = sys._getframe(1)
    while f is not None:
        if f.f_code in codes:
            return True
        f = f.f_back
    return False


def training_forward(module: nn.Module) -> bool:
    """A forward whose backward trains `module`, seen once: train mode, grad enabled (or reentrant
    checkpointing's no-grad forward), and not activation checkpointing's recompute inside backward (an
    autograd graph task is then running)."""
    return (module.training and (torch.is_grad_enabled() or in_reentrant_checkpoint())
            and torch._C._current_graph_task_id() == -1)


class R1KRouter(nn.Module):
    """DeepSeek-V3 router on the fused gate. Returns what the replaced router returned:
    (router_logits, topk_weights, topk_ids) in transformers >= 5.2."""

    def __init__(self, gate: nn.Module, *, gemm_dtype: torch.dtype | None = None, backend: str = "auto"):
        nn.Module.__init__(self)  # not the replaced router class's __init__ (_router_type: it takes a config)
        _keep_replaced(self, gate)
        self.weight = gate.weight                              # the same Parameter
        self.register_buffer("e_score_correction_bias", gate.e_score_correction_bias)
        self.top_k = gate.top_k
        self.num_experts = full_shape(gate.weight)[0]
        self.n_group = gate.num_group if hasattr(gate, "num_group") else gate.n_group
        self.topk_group = gate.topk_group
        # a bad config (n_group not dividing the experts, topk_group > n_group, ...) names itself at patch time,
        # not at the first forward
        _moe.check_routing_config(self.num_experts, self.top_k, self.n_group, self.topk_group)
        self.routed_scaling_factor = float(gate.routed_scaling_factor)
        self.norm_topk_prob = bool(gate.norm_topk_prob)
        self.gemm_dtype = gemm_dtype        # None: transformers' fp32 GEMM; torch.bfloat16: bf16 x bf16 -> fp32
        self.backend = backend
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.int64,
                                                              device=gate.weight.device), persistent=False)
        self.token_mask: torch.Tensor | None = None  # [N] bool: the tokens to count (None: all)

    def forward(self, hidden_states):
        hidden = hidden_states.reshape(-1, self.weight.shape[1])
        logits, w, ids = _moe.router(hidden, self.weight, self.e_score_correction_bias, top_k=self.top_k,
                                     n_group=self.n_group, topk_group=self.topk_group,
                                     routed_scaling_factor=self.routed_scaling_factor,
                                     norm_topk_prob=self.norm_topk_prob, gemm_dtype=self.gemm_dtype,
                                     backend=self.backend)
        if training_forward(self):  # a checkpointing recompute routes the same tokens again: not counted
            self._count(ids)
        return logits, w, ids

    @torch.no_grad()
    def _count(self, ids_NK):
        """tokens_per_expert += the routed tokens of ids [N, K] (index_add_: no host read, unlike bincount on
        CUDA); a token_mask of N entries leaves its False tokens out, one of another size is a ValueError (it
        was ignored: every token, pads too, counted)."""
        N, K = ids_NK.shape
        m = self.token_mask
        if m is not None and m.numel() != N:
            raise ValueError(f"token_mask has {m.numel()} entries but this training forward routes {N} tokens "
                             "(set it to the forward's [N] mask of real tokens, or None to count every token)")
        if m is not None:
            ones = m.reshape(N, 1).to(device=ids_NK.device, dtype=torch.int64).expand(N, K)
        else:
            ones = ids_NK.new_ones(()).expand(N, K)
        self.tokens_per_expert.index_add_(0, ids_NK.reshape(-1), ones.reshape(-1))

    def extra_repr(self):
        return (f"experts={self.num_experts}, top_k={self.top_k}, n_group={self.n_group}, "
                f"topk_group={self.topk_group}, gemm_dtype={self.gemm_dtype}, backend={self.backend}")


_ROUTER_TYPES: dict = {}


def _router_type(gate_cls: type) -> type:
    """R1KRouter as a subclass of the router class it replaces, so transformers' output recorders
    (output_router_logits=True: OutputRecorder(DeepseekV3TopkRouter, index=0)) still find the router; the
    logits are its output 0, as the replaced one's."""
    t = _ROUTER_TYPES.get(gate_cls)
    if t is None:
        # the same name: code that matches routers by class name (moe_replay) sees an R1KRouter
        t = _ROUTER_TYPES[gate_cls] = type("R1KRouter", (R1KRouter, gate_cls),
                                           {"__module__": __name__, "__reduce_ex__": _reduce_router})
    return t


def _reduce_router(self, protocol):
    """A patched router pickles as the made class of its replaced router's class (patch/_pickle.py)."""
    return reduce_made(self, protocol, _router_type, type(self).__bases__[1])


def _grouped_linear(x, weight_EOI, counts, offs):
    """x [N, I] rows grouped by expert -> [N, O] = x_e @ weight[e].T per expert segment."""
    gm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if (gm is not None and x.is_cuda and x.dtype == torch.bfloat16 and weight_EOI.dtype == torch.bfloat16
            and x.shape[1] % 8 == 0 and weight_EOI.shape[1] % 8 == 0):
        return gm(x, weight_EOI.transpose(-2, -1), offs=offs)
    outs = [seg @ weight_EOI[e].to(x.dtype).t()
            for e, seg in enumerate(torch.split(x, counts.tolist())) if seg.shape[0]]
    return torch.cat(outs) if outs else x.new_empty(0, weight_EOI.shape[1])


class R1KExperts(nn.Module):
    """DeepseekV3Experts as permute -> grouped GEMM (gate_up) -> act * up -> grouped GEMM (down) ->
    unpermute (fp32 weighted combine)."""

    def __init__(self, experts: nn.Module, *, backend: str = "auto"):
        super().__init__()
        _keep_replaced(self, experts)
        self.gate_up_proj = experts.gate_up_proj              # [E, 2I, H], the same Parameters
        self.down_proj = experts.down_proj                    # [E, H, I]
        self.act_fn = experts.act_fn
        self.num_experts = full_shape(experts.gate_up_proj)[0]
        self.backend = backend

    def forward(self, hidden_states, top_k_index, top_k_weights):
        # ids come from the router: the unchecked entry points skip the id-range check and its device sync
        permuted, row_map, counts = _moe._permute(hidden_states, top_k_index, self.num_experts, self.backend)
        offs = counts.cumsum(0).to(torch.int32)
        gate_up = _grouped_linear(permuted, self.gate_up_proj, counts, offs)
        gate, up = gate_up.chunk(2, dim=-1)
        down = _grouped_linear(self.act_fn(gate) * up, self.down_proj, counts, offs)
        return _moe._unpermute(down, row_map, top_k_weights, self.backend)


def full_shape(p: torch.Tensor) -> tuple:
    """A parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it (built under zero.Init, as
    transformers' from_pretrained does with ZeRO-3 on: p.shape is (0,), p.ds_shape the full one)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _check_experts(mod):
    gu, dn = full_shape(mod.gate_up_proj), full_shape(mod.down_proj)
    if len(gu) != 3 or dn != (gu[0], gu[2], gu[1] // 2) or getattr(mod, "is_transposed", False):
        raise ValueError(f"unsupported DeepseekV3Experts layout: gate_up_proj {gu}, down_proj {dn}")


def patch_deepseek_v3(model: nn.Module, *, gemm_dtype: torch.dtype | None = None, backend: str = "auto",
                      experts: bool = True) -> dict[str, nn.Module]:
    """Swap every DeepseekV3 MoE router (and, with experts=True, its experts) of `model` in place;
    returns {qualified name: replaced module}. gemm_dtype=torch.bfloat16 runs the router GEMM in bf16 with
    fp32 accumulation and fp32 logits (default None: transformers' fp32 GEMM).
    Patching a patched model replaces only what is still HF's (the experts of layers patched with
    experts=False) and sets the backend of the patched routers and experts. backend and gemm_dtype: checked here,
    before anything changes (they failed only at the first forward)."""
    from ..moe import check_gemm_dtype

    _check_backend(backend)
    check_gemm_dtype(gemm_dtype)
    replaced: dict[str, nn.Module] = {}
    for name, parent in list(model.named_modules()):
        gate = getattr(parent, "gate", None)
        prefix = f"{name}." if name else ""
        if is_router(gate, patched=True):  # patched before
            gate.backend = backend
            if isinstance(getattr(parent, "experts", None), R1KExperts):
                parent.experts.backend = backend
        elif is_router(gate, patched=False):
            router = _router_type(type(gate))(gate, gemm_dtype=gemm_dtype, backend=backend)
            parent.gate = router
            replaced[prefix + "gate"] = gate
        else:
            continue
        old = getattr(parent, "experts", None)
        if experts and type(old).__name__ in EXPERTS_CLASSES:
            _check_experts(old)
            parent.experts = R1KExperts(old, backend=backend)
            replaced[prefix + "experts"] = old
    return replaced


def _keep_replaced(module: nn.Module, replaced: nn.Module):
    """`module` keeps the transformers module it replaces as a plain attribute, outside the module tree (no
    submodule: state_dict keys and parameters stay those of the patched model), for unpatch_deepseek_v3."""
    object.__setattr__(module, "_r1k_replaced", replaced)


def _restored(module: nn.Module) -> nn.Module:
    """The transformers module `module` replaced, holding `module`'s current parameters and buffers under their
    names (the patched module trained them, and .to() / .float() replaced its buffers): nothing trained is lost."""
    orig = module.__dict__.get("_r1k_replaced")
    if orig is None:
        raise ValueError(f"{type(module).__name__}: no replaced module kept (patched by an older r1kernels); reload "
                         "the model instead of unpatching it")
    for name in orig._parameters.keys() & module._parameters.keys():
        setattr(orig, name, module._parameters[name])
    for name in orig._buffers.keys() & module._buffers.keys():
        orig._buffers[name] = module._buffers[name]
    return orig


def unpatch_deepseek_v3(model: nn.Module) -> dict[str, nn.Module]:
    """Undo patch_deepseek_v3: every patched router and expert block of `model` goes back to the transformers
    module it replaced, with the patched one's parameters and buffers (e_score_correction_bias as balanced);
    returns {qualified name: the patched module taken out}."""
    out: dict[str, nn.Module] = {}
    for name, parent in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        for attr, cls in (("gate", R1KRouter), ("experts", R1KExperts)):
            mod = getattr(parent, attr, None)
            if isinstance(mod, cls):
                setattr(parent, attr, _restored(mod))
                out[prefix + attr] = mod
    return out


MOE_OPS = ("route", "permute", "unpermute")


def _check_backend(backend: str):
    """backend: "auto", "torch", or a backend with a kernel for every MoE op (KERNELS' names; the device is the
    forward's, checked there)."""
    from .. import _backend, _checks

    _checks.choice("backend", backend, _backend.BACKENDS)
    lacking = _backend.lacking(MOE_OPS, backend)
    if lacking:
        raise ValueError(f"backend={backend!r}: r1kernels has no {backend} kernel for {', '.join(lacking)} (the "
                         "MoE layers' ops); use auto, triton, cuda or torch")


def is_router(gate, patched: bool | None = None) -> bool:
    """`gate` (an MoE block's `gate` attribute) is a DeepSeek-V3 router: rk.patch's (patched=True), transformers'
    (False), or either (None). A router that a peft adapter wraps is the wrapper there: not a router."""
    if isinstance(gate, R1KRouter):
        return patched is not False
    return patched is not True and type(gate).__name__ in ROUTER_CLASSES


def moe_routers(model: nn.Module, patched: bool | None = None) -> list[nn.Module]:
    """The routers of `model`'s MoE blocks (is_router of each module's `gate`, counted through the block)."""
    return [g for g in (getattr(m, "gate", None) for m in model.modules()) if is_router(g, patched)]


def routers_to_patch(model: nn.Module) -> list[nn.Module]:
    """The transformers DeepseekV3 routers of `model` that patch_deepseek_v3 would replace."""
    return moe_routers(model, patched=False)


def routers(model: nn.Module) -> list[R1KRouter]:
    """The patched routers of `model` (the ones update_router_biases balances)."""
    return moe_routers(model, patched=True)


@torch.no_grad()
def update_router_biases(model: nn.Module, rate: float = 1e-3, *, all_reduce: bool | None = None
                         ) -> torch.Tensor | None:
    """Auxiliary-loss-free balancing, once per optimizer step: sum the patched routers' tokens_per_expert
    over data-parallel ranks (one all-reduce, when torch.distributed is initialized and all_reduce is not
    False), apply rk.moe.update_bias to each e_score_correction_bias, reset the counts. Returns the counts
    applied, int64 [routers, E] on the device (None: the model has no patched router)."""
    rs = routers(model)
    if not rs:
        return None
    counts_RE = torch.stack([r.tokens_per_expert for r in rs])
    dist = torch.distributed
    if all_reduce is not False and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts_RE)
    for r, c_E in zip(rs, counts_RE):
        _moe.update_bias(r.e_score_correction_bias, c_E, rate=rate)
        r.tokens_per_expert.zero_()
    return counts_RE
