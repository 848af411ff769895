"""Fused lm_head log-probs for Hugging Face causal LMs: after `patch_lm_head(model)`,
`model(input_ids, attention_mask=..., labels=labels, fused_lm_head=True)` returns per-token log-probs (and
entropy) of the next-token labels through `r1kernels.linear_token_logprobs`, never holding the
[B, L, V] logits. Without `fused_lm_head` the forward is the original one (generation is unchanged).

The keyword contract is TRL's `add_fused_lm_head` (trl 1.16): labels are shifted inside (position t scores
labels[:, t + 1]) unless `shift_labels` is given; -100 labels are skipped and read 0; `loss` is the mean
negative log-likelihood over the scored tokens (or their sum / num_items_in_batch). The output carries the fields of
TRL's FusedCausalLMOutput: besides log_probs / entropy / label_mask, the no-gradient per-token fields EXTRA_OUTPUTS
(log_sum_sq_probs, mean_logits, is_top1), each computed only where it is asked for (patch_lm_head's extra_outputs)
and None otherwise, as TRL's are. TRL 1.16's trainers read them from a fused call: SFTTrainer is_top1 (its
mean_token_accuracy), DPOTrainer mean_logits and is_top1 (and log_sum_sq_probs with use_weighting), KTOTrainer
mean_logits; GRPOTrainer and RLOOTrainer read log_probs and entropy only.

A trainer built before the patch has put TRL's own fused forward on the model (add_fused_lm_head(model,
temperature, cast_lm_head_to_fp32, outputs)); patch_lm_head goes over it and takes over the options that trainer
gave it -- its temperature, its fp32 head, entropy where its outputs name it, the EXTRA_OUTPUTS they name -- before
the options of the patch_lm_head call itself. So SFT, DPO, KTO, GRPO and RLOO trainers run unchanged on a model
patched before or after they are built (before: TRL's forward goes over ours and answers the fused calls itself).

`fused_lm_head=fn` (a callable) returns fn(hidden [B, n, H], weight [V, H], bias | None) computed inside
the forward, where hidden[:, t] scores input_ids[:, L - n + t] and n = logits_to_keep (default L - 1):
the fused GRPO loss runs there, so DDP and ZeRO-3 see one ordinary forward. Both fused paths run the head
with autocast off, on inputs cast to the autocast dtype when autocast is on (what F.linear would use).

Soft-capped models (SOFTCAP_CLASSES: Gemma 2, 3, 3n and 4 text, VaultGemma, NanoChat, Beam, RecurrentGemma; the
Gemma 4 and PaliGemma multimodal wrappers): their forward's logits are c * tanh(z / c) of z = lm_head(hidden), c =
config.final_logit_softcapping when it is set (RecurrentGemma: logits_soft_cap; a wrapper: its text config's). The
fused paths read c at each call, as that forward does, and score the capped logits (before the temperature):
fused_lm_head=True passes softcap=c to r1kernels.linear_token_logprobs, and a callable is called fn(hidden, weight,
bias, softcap=c) -- the keyword of r1kernels.linear_token_logprobs / linear_grpo_loss -- only when c is set (an
uncapped model calls fn(hidden, weight, bias) as before; on a capped model, a callable that does not declare a
softcap parameter -- **kwargs alone could drop it -- is a ValueError naming fused_lm_head). Models whose forward
scales their logits (Cohere's logit_scale, ...) stay refused: the fused paths take no logit scale.

Multimodal wrappers (MULTIMODAL_CLASSES: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Llava, Mistral 3, Gemma 3, Gemma 4, PaliGemma
<Type>ForConditionalGeneration): their forward runs self.model -- the vision tower, the image features merged into the
input embeddings, the language model -- and scores its last_hidden_state with lm_head, as a causal LM does; the fused
paths run that self.model on the same inputs (pixel_values, image_grid_thw, token_type_ids, mm_token_type_ids, ...
pass through), so the hidden states are the forward's. What each applies to z = lm_head(hidden) is its own forward's
rule (_LOGIT_RULES under its model_type, the keys read from config.get_text_config()), not its language model's:
Gemma 4 and PaliGemma soft-cap at the text config's final_logit_softcapping; Gemma 3's wrapper does not (its text
config's final_logit_softcapping is read by Gemma3ForCausalLM only), nor does Llava whatever its language model.
"""
from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass

import torch

# Multimodal wrappers whose forward is logits = lm_head(self.model(**inputs).last_hidden_state), then the rule of
# _LOGIT_RULES under their model_type (transformers 5.x's forwards read; each checked against its own logits, text
# and image inputs, in tests/test_patch_lm_head_multimodal.py). Refused, not listed: Gemma3nForConditionalGeneration
# (its vision tower needs timm, so no test builds one here), the MoE wrappers (Qwen3-VL-MoE's forward adds a router
# aux loss when asked), and every other wrapper, whose forward is unchecked.
MULTIMODAL_PLAIN_CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                            "Qwen3VLForConditionalGeneration", "LlavaForConditionalGeneration",
                            "Mistral3ForConditionalGeneration", "Gemma3ForConditionalGeneration")
MULTIMODAL_SOFTCAP_CLASSES = ("Gemma4ForConditionalGeneration", "PaliGemmaForConditionalGeneration")
MULTIMODAL_CLASSES = MULTIMODAL_PLAIN_CLASSES + MULTIMODAL_SOFTCAP_CLASSES
# Causal LMs (and multimodal wrappers) whose logits are exactly lm_head(last_hidden_state): no soft-capping, no
# logit scale.
LM_HEAD_CLASSES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                   *MULTIMODAL_PLAIN_CLASSES)
# Causal LMs (and multimodal wrappers) whose logits are lm_head(last_hidden_state), soft-capped to c * tanh(z / c)
# where their (text) config sets final_logit_softcapping = c (RecurrentGemma: logits_soft_cap; transformers 5.x's
# forwards; no logit scale): every soft-capped type of _LOGIT_RULES, each checked against its forward's logits in
# tests/test_patch_lm_head.py (wrappers: tests/test_patch_lm_head_multimodal.py).
SOFTCAP_CLASSES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma4ForCausalLM",
                   "VaultGemmaForCausalLM", "NanoChatForCausalLM", "BeamForCausalLM", "RecurrentGemmaForCausalLM",
                   *MULTIMODAL_SOFTCAP_CLASSES)
ALSO_FUSABLE = ("DeepseekV3ForCausalLM",)  # fused by r1kernels.integrations.trl, not by rk.patch
# Config keys some forwards apply to z = lm_head(hidden) (as _LOGIT_RULES says); a model type not in _LOGIT_RULES
# that sets one has logits this module cannot describe.
_CAP_KEYS = ("final_logit_softcapping", "logits_soft_cap")
_SCALE_KEYS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling") + _CAP_KEYS
# model_type -> (scale key, "*" or "/", soft-cap key): the forward's logits are c * tanh(s * z / c) with s = the
# scale key's value ("*") or its inverse ("/") and c the soft-cap key's value (None: s * z), read from
# config.get_text_config() (the config itself for a causal LM), as transformers 5.x's <Type>ForCausalLM.forward (or
# <Type>ForConditionalGeneration.forward, for a multimodal type) applies them. A type listed here applies no other
# _SCALE_KEYS: MPT's config carries logit_scale, which MptForCausalLM.forward never reads; a Gemma 3 wrapper's text
# config carries final_logit_softcapping, which Gemma3ForConditionalGeneration.forward never reads.
_LOGIT_RULES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), ("logit_scale", "*", None)),
    # MiniCPM3 divides the hidden states before its lm_head, which has no bias: the same logits
    **dict.fromkeys(("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa",
                     "minicpm3"), ("logits_scaling", "/", None)),
    "hyperclovax": ("logits_scaling", "*", None),
    "falcon_h1": ("lm_head_multiplier", "*", None),
    **dict.fromkeys(("gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "vaultgemma", "nanochat", "beam"),
                    (None, None, "final_logit_softcapping")),
    "recurrent_gemma": (None, None, "logits_soft_cap"),
    **dict.fromkeys(("qwen2", "qwen3", "llama", "mistral", "deepseek_v3", "mpt"), (None, None, None)),
    # multimodal wrappers (MULTIMODAL_CLASSES): their own forward's rule, whatever their language model's type
    **dict.fromkeys(("gemma4", "paligemma"), (None, None, "final_logit_softcapping")),
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "mistral3", "gemma3"), (None, None, None)),
}


@dataclass(frozen=True)
class LogitScaling:
    """What a model's forward applies to z = lm_head(hidden): logits = scale * z, soft-capped to
    softcap * tanh(logits / softcap) when softcap is set. keys: the config keys (and values) behind them; with
    known False, keys its model type sets whose use is not known here (nothing is said about its logits)."""
    scale: float = 1.0
    softcap: float | None = None
    keys: tuple = ()
    known: bool = True

    @property
    def head_kwargs(self) -> dict | None:
        """The fused head kernels' keywords that give these logits from z (r1train's rollout.Policy passes them to
        its fns), or None when there are none (unknown rules, s <= 0, a cap c / s outside the kernels' float32 range:
        _checks.softcap_in_range): {} for z; logit_scale=s for s * z (scored at
        temperature T / s); softcap=c / s with a soft-cap c, as c * tanh(s * z / c) = s * (c / s) * tanh(z / (c / s))
        (with s = 1: Gemma 2's c * tanh(z / c))."""
        if not (self.known and 0 < self.scale < math.inf):
            return None
        kw = {} if self.scale == 1.0 else {"logit_scale": self.scale}
        if self.softcap is not None:
            from .._checks import softcap_in_range

            if not softcap_in_range(self.softcap / self.scale):
                return None
            kw["softcap"] = self.softcap / self.scale
        return kw

    @property
    def unfused_reason(self) -> str | None:
        """Why the fused head kernels cannot compute these logits, or None when they can (head_kwargs is not
        None)."""
        if self.head_kwargs is not None:
            return None
        return str(self) if not self.known else f"{self}, which the fused head kernels do not compute"

    def __str__(self):
        keys = ", ".join(f"{k}={v!r}" for k, v in self.keys)
        if not self.known:
            return f"its config sets {keys}, which r1kernels does not know how its forward applies"
        if self.softcap is not None:
            return f"its forward soft-caps its logits ({keys})"
        if self.scale != 1.0:
            return f"its forward multiplies its logits by {self.scale:g} ({keys})"
        return "its logits are its lm_head's output"


# TRL's FusedCausalLMOutput fields beyond log_probs and entropy, all without gradient
EXTRA_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")
# fp32 logits per row chunk of the EXTRA_OUTPUTS pass
_EXTRA_CHUNK_BYTES = 128 * 2**20


@dataclass
class FusedLMHeadOutput:
    """What a patched model returns with fused_lm_head=True: TRL's FusedCausalLMOutput fields. Per-token fields
    are [B, L - 1] (or the shape of shift_labels), in the log-probs' dtype (fp32; fp64 for an fp64 model), 0 (is_top1:
    False) where the label is -100. Of x = the scored logits (soft-capped where the model caps them) / temperature:
    log_sum_sq_probs = log sum_v softmax(x)_v^2, mean_logits = mean_v x_v, is_top1 = (label == argmax_v x_v, the
    first maximum, as torch.argmax), bool; each is None unless asked for (EXTRA_OUTPUTS)."""
    loss: torch.Tensor
    log_probs: torch.Tensor
    entropy: torch.Tensor | None
    label_mask: torch.Tensor
    aux_loss: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def logit_scaling(model) -> LogitScaling:
    """What `model`'s forward applies to its lm_head's output: the rule of its config's model_type (_LOGIT_RULES; a
    multimodal wrapper's own type), its keys' values read from config.get_text_config()."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    rule = _LOGIT_RULES.get(getattr(model.config, "model_type", None))
    names = _SCALE_KEYS if rule is None else [k for k in (rule[0], rule[2]) if k]
    # the keys that change the logits: a soft-cap of any value, a scale other than 1
    keys = tuple((k, v) for k in names if (v := getattr(cfg, k, None)) is not None and (k in _CAP_KEYS or v != 1))
    if rule is None:
        return LogitScaling(keys=keys, known=not keys)
    scale_key, op, cap_key = rule
    s, c = dict(keys).get(scale_key), dict(keys).get(cap_key)
    scale = 1.0 if s is None else float(s) if op == "*" else 1.0 / float(s) if s else math.inf
    return LogitScaling(scale=scale, softcap=None if c is None else float(c), keys=keys)


def unsupported_reason(model) -> str | None:
    """Why `model` cannot take the fused lm_head path, or None when it can."""
    name = type(model).__name__
    fusable = LM_HEAD_CLASSES + SOFTCAP_CLASSES + ALSO_FUSABLE
    if name not in fusable:
        return f"{name} is not one of {', '.join(fusable)}"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its lm_head is a {type(head).__name__}, not a torch.nn.Linear (e.g. a PEFT adapter on lm_head)"
    reason = _softcap_or_reason(model)[1]
    if reason is not None:
        return reason
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "output_router_logits", False):
        return "its config sets output_router_logits (a router aux loss in the forward)"
    return None


def _softcap_or_reason(model) -> tuple[float | None, str | None]:
    """(c, None) where `model`'s logits are c * tanh(z / c) of z = lm_head(hidden) (c None: z itself), the fused
    paths' log_softmax(logits / T) with softcap=c; else (None, why they cannot give its logits): a scale (s * z,
    head_kwargs' logit_scale, which the fused_lm_head contract does not carry), a cap outside the kernels' range, or
    a logit rule not known here."""
    scaling = logit_scaling(model)
    kw = scaling.head_kwargs
    if kw is None:
        return None, scaling.unfused_reason
    if "logit_scale" in kw:
        return None, f"{scaling}; the fused lm_head path takes no logit scale"
    return kw.get("softcap"), None


def _softcap(model) -> float | None:
    """The softcap the fused paths score `model`'s logits with, read from its config at each call as its forward
    reads final_logit_softcapping (None: uncapped)."""
    softcap, reason = _softcap_or_reason(model)
    if reason is not None:  # the config changed after patch_lm_head accepted it
        raise ValueError(f"model: no fused lm_head path for this model: {reason}")
    return softcap


def _takes_softcap(fn) -> bool:
    """Whether the callable fn declares a parameter softcap that can be passed by keyword (True where its signature
    cannot be read: the call decides). A **kwargs catch-all does not count: it can drop the cap, and fn would
    score the uncapped logits without an error."""
    if isinstance(fn, torch.nn.Module):  # Module.__call__ reads (*args, **kwargs): its forward's signature counts
        fn = getattr(fn, "_orig_mod", fn).forward  # torch.compile's OptimizedModule wraps the module
    try:
        p = inspect.signature(fn).parameters.get("softcap")
    except (TypeError, ValueError):
        return True
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _as_keywords(forward, args, kwargs) -> tuple[tuple, dict]:
    """The call's positional args as keywords, named by the patched `forward`'s signature: the fused paths pop labels
    & co. by name and call the base model, whose parameters come in another order (Qwen2VLForConditionalGeneration's
    6th is labels, Qwen2VLModel's use_cache). Unchanged when `forward` takes *args. Too many positional args, or one
    also passed by keyword: a TypeError, as the forward would raise."""
    if not args:
        return args, kwargs
    sig = inspect.signature(forward)
    if any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
        return args, kwargs
    # args alone: binding kwargs too would reject the fused path's own keywords (temperature, shift_labels, ...)
    # on a forward without **kwargs
    named = sig.bind_partial(*args).arguments
    twice = sorted(named.keys() & kwargs.keys())
    if twice:
        raise TypeError(f"forward() got multiple values for argument(s) {', '.join(twice)}")
    return (), {**named, **kwargs}


def _check_labels(kwargs, labels, shift_labels):
    """labels / shift_labels [B, T] as the input's tokens (input_ids, else inputs_embeds [B, T, H]): a ValueError
    naming them before the backbone runs (a mismatch failed in the boolean indexing of the head's rows)."""
    ref = kwargs.get("input_ids")
    ref = kwargs.get("inputs_embeds") if ref is None else ref
    if ref is None:
        return
    from .. import _checks

    for name, lab in (("labels", labels), ("shift_labels", shift_labels)):
        if lab is not None:
            _checks.shape(name, lab, tuple(ref.shape[:2]), " (the input's [batch, tokens])")


def _head_params(self, hidden, fp32):
    """hidden, weight, bias as the head GEMM reads them: fp32 with fp32_lm_head, else in the autocast dtype
    when autocast is on (what F.linear would run in), else in hidden's dtype."""
    head = self.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as a DTensor
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    hidden = hidden.to(weight.device)
    dev = hidden.device.type
    dtype = (torch.float32 if fp32 else torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
             else hidden.dtype)
    bias = bias.to(dtype) if bias is not None else None
    return hidden.to(dtype), weight.to(dtype), bias


def _extra_outputs(hidden, weight, bias, labels, temperature, softcap, names, dtype) -> dict:
    """{name: [N] tensor} for the EXTRA_OUTPUTS in `names` (FusedLMHeadOutput's definitions) of rows hidden [N, H]
    with labels [N], from their logits z = hidden @ weight.T + bias in the head's dtype, then in `dtype`: x =
    softcap * tanh(z / softcap) (z where softcap is None), divided by temperature. No gradient; one more head GEMM,
    in row chunks of at most _EXTRA_CHUNK_BYTES of fp32 logits."""
    rows = max(1, _EXTRA_CHUNK_BYTES // (4 * max(weight.shape[0], 1)))
    parts = {name: [] for name in names}
    with torch.no_grad():
        for start in range(0, max(hidden.shape[0], 1), rows):
            x = torch.nn.functional.linear(hidden[start:start + rows], weight, bias).to(dtype)
            if softcap is not None:
                x = x.div_(softcap).tanh_().mul_(softcap)
            x = x.div_(temperature)
            if "mean_logits" in parts:
                parts["mean_logits"].append(x.mean(-1))
            if "is_top1" in parts:
                parts["is_top1"].append(x.argmax(-1) == labels[start:start + rows])
            if "log_sum_sq_probs" in parts:
                parts["log_sum_sq_probs"].append(torch.logsumexp(2 * x, -1) - 2 * torch.logsumexp(x, -1))
    return {name: torch.cat(p) for name, p in parts.items()}


def _fused_logprobs(self, hidden, labels, num_items_in_batch, temperature, return_entropy, fp32, backend, softcap,
                    extra_outputs=()):
    """FusedLMHeadOutput of labels [B, n] (-100: not scored) from hidden [B, n, H]; softcap: _softcap(self);
    extra_outputs: the EXTRA_OUTPUTS to compute."""
    from .. import linear_token_logprobs

    hidden, weight, bias = _head_params(self, hidden, fp32)
    labels = labels.to(hidden.device)
    mask = labels != -100
    # only the scored rows go through the head; masked_scatter keeps an all-masked batch differentiable
    with torch.autocast(hidden.device.type, enabled=False):
        h, y = hidden[mask], labels[mask]
        out = linear_token_logprobs(h, weight, y, bias=bias, temperature=temperature,
                                    return_entropy=return_entropy, softcap=softcap, backend=backend)
        logp, ent = out if return_entropy else (out, None)
        extra = _extra_outputs(h, weight, bias, y, temperature, softcap, extra_outputs, logp.dtype)

    def per_token(v):  # the scored rows' values at their positions, 0 (False) elsewhere, in v's dtype: the op's
        return v.new_zeros(mask.shape).masked_scatter(mask, v)  # fp32 for 16-bit heads, fp64 for an fp64 model

    logp = per_token(logp)
    ent = per_token(ent) if ent is not None else None
    extra = {k: per_token(v) for k, v in extra.items()}
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedLMHeadOutput(loss=-logp.sum() / denom, log_probs=logp, entropy=ent, label_mask=mask, **extra)


def _trl_head_options(forward) -> dict:
    """The options TRL's add_fused_lm_head gave `forward` when it is that function's fused forward (a bound
    _fused_forward of trl.trainer.utils, whose closure holds them), as patch_lm_head's state keys: temperature,
    fp32 (cast_lm_head_to_fp32), return_entropy ("entropy" in its outputs), extra_outputs (the EXTRA_OUTPUTS its
    outputs name; all of them where its closure holds no outputs). {} for any other forward."""
    fn = getattr(forward, "__func__", forward)
    code = getattr(fn, "__code__", None)
    module = getattr(fn, "__globals__", {}).get("__name__", "")
    if code is None or code.co_name != "_fused_forward" or not str(module).startswith("trl."):
        return {}
    cells = {}
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            cells[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    outputs = cells.get("outputs")
    if isinstance(outputs, (tuple, list, set, frozenset)):
        opts = dict(return_entropy="entropy" in outputs,
                    extra_outputs=tuple(n for n in EXTRA_OUTPUTS if n in outputs))
    else:  # every field one of its trainers may read
        opts = dict(return_entropy=True, extra_outputs=EXTRA_OUTPUTS)
    temperature = cells.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        opts["temperature"] = float(temperature)
    if isinstance(cells.get("cast_lm_head_to_fp32"), bool):
        opts["fp32"] = cells["cast_lm_head_to_fp32"]
    return opts


def head_backend(backend: str) -> str:
    """The fused lm_head's backend for a caller's op backend (rk.patch, use_r1kernels): its op,
    linear_token_logprobs, has Triton kernels and the reference only, so "cuda" (kernels other ops have) means
    "auto"; any other name is patch_lm_head's to check."""
    return "auto" if backend == "cuda" else backend


_DEFAULTS = dict(temperature=1.0, return_entropy=True, fp32=False, backend="auto", extra_outputs=())


def patch_lm_head(model, *, temperature: float | None = None, return_entropy: bool | None = None,
                  fp32_lm_head: bool | None = None, backend: str | None = None,
                  extra_outputs: tuple[str, ...] | None = None) -> dict:
    """Give `model` the fused_lm_head forward (module docstring); returns {"forward": the replaced forward}.
    temperature (1.0) / return_entropy (True) are the defaults of each fused call (a call may pass its own);
    fp32_lm_head (False) runs the head on fp32 hidden states and weight (TRL's cast_lm_head_to_fp32); backend
    ("auto"); extra_outputs (()): the EXTRA_OUTPUTS each fused call computes (one more head GEMM without gradient
    where any is named). Patching a patched model sets the options it is given and keeps the others; where something
    wrapped the fused forward since (TRL's trainers put their own fused-head forward over it), the fused forward goes
    over that again (calls without fused_lm_head still reach it), with the options TRL gave that forward
    (_trl_head_options) under the ones this call names."""
    from .. import _backend, _checks

    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"model: no fused lm_head path for this model: {reason}")
    if temperature is not None:
        _checks.temperature(temperature)
    for name, flag in (("return_entropy", return_entropy), ("fp32_lm_head", fp32_lm_head)):
        if flag is not None and not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    if backend is not None:
        _checks.choice("backend", backend, ("auto", "triton", "cuda", "torch"))
        if _backend.lacking(["linear_token_logprobs"], backend):  # every fused call would fail
            raise ValueError(f"backend={backend!r}: linear_token_logprobs (the fused lm_head's op) has no {backend} "
                             "kernel; use auto, triton or torch (rk.patch and use_r1kernels read 'cuda' as 'auto' "
                             "for it)")
    if extra_outputs is not None:
        if not (isinstance(extra_outputs, (tuple, list, set, frozenset))
                and all(isinstance(n, str) and n in EXTRA_OUTPUTS for n in extra_outputs)):
            raise ValueError(f"extra_outputs must be a tuple of names among {EXTRA_OUTPUTS}, got {extra_outputs!r}")
        extra_outputs = tuple(n for n in EXTRA_OUTPUTS if n in extra_outputs)
    given = dict(temperature=None if temperature is None else float(temperature), return_entropy=return_entropy,
                 fp32=fp32_lm_head, backend=backend, extra_outputs=extra_outputs)
    given = {k: v for k, v in given.items() if v is not None}
    state = getattr(model, "_r1k_lm_head", None)
    if state is None:
        state = model._r1k_lm_head = dict(_DEFAULTS, **_trl_head_options(model.forward),
                                          forward=_ForwardWithFusedHead(model, model.forward))
        model.forward = state["forward"]
    elif model.__dict__.get("forward") is not state["forward"]:
        state.update(_trl_head_options(model.forward))
        state["forward"] = _ForwardWithFusedHead(model, model.forward)
        model.forward = state["forward"]
    state.update(given)
    return {"forward": state["forward"].original_forward()}


def unpatch_lm_head(model) -> dict:
    """Undo patch_lm_head: model.forward is the one it replaced; returns {"forward": the fused_lm_head forward taken
    out} ({} for a model without it). A forward set over it since is a ValueError (unpatching would drop it)."""
    state = getattr(model, "_r1k_lm_head", None)
    if state is None:
        return {}
    fused = state["forward"]
    if model.__dict__.get("forward") is not fused:
        raise ValueError(f"model ({type(model).__name__}): its forward was replaced after patch_lm_head; unpatching "
                         "would drop that forward")
    if fused.original is None:  # the class's own forward
        del model.forward
    else:
        model.forward = fused.original
    del model._r1k_lm_head
    return {"forward": fused}


class _ForwardWithFusedHead:
    """model.forward after patch_lm_head: an object of a module-level class, not a method bound to the model,
    so that torch.save(model) reloads it patched and copy.deepcopy(model) (a reference copy) gets one that runs
    the copy (pickle and deepcopy keep the one model object; a bound method would reload as the class's
    unpatched forward, which ignores fused_lm_head). The defaults are read from the model at each call. Its
    signature is the replaced forward's: generate() reads its kwargs and logits_to_keep support from it."""

    def __init__(self, model, original):
        self.model = model
        # None: the class's own forward, bound at each call (nothing of it to pickle)
        self.original = None if getattr(original, "__func__", None) is type(model).forward else original

    def original_forward(self):
        return self.original if self.original is not None else types.MethodType(type(self.model).forward,
                                                                                 self.model)

    @property
    def __signature__(self):
        return inspect.signature(self.original_forward())

    def __call__(self, *args, fused_lm_head=False, **kwargs):
        model = self.model
        if fused_lm_head is False or fused_lm_head is None:  # reads no state: a forward wrapped over since may
            return self.original_forward()(*args, **kwargs)  # outlive unpatch_lm_head
        state = model._r1k_lm_head
        if fused_lm_head is not True and not callable(fused_lm_head):
            raise ValueError(f"fused_lm_head must be True, False or a callable, got {fused_lm_head!r}")
        args, kwargs = _as_keywords(self.original_forward(), args, kwargs)
        temperature = kwargs.pop("temperature", None)
        temperature = state["temperature"] if temperature is None else temperature
        return_entropy = kwargs.pop("return_entropy", None)
        return_entropy = state["return_entropy"] if return_entropy is None else return_entropy
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        _check_labels(kwargs, labels, shift_labels)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        keep = kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False
        softcap = _softcap(model)  # before the backbone runs: a config refused now costs no forward
        # a capped model's callable gets softcap=c (module docstring); one that cannot take it would score z
        if callable(fused_lm_head) and softcap is not None and not _takes_softcap(fused_lm_head):
            raise ValueError(f"fused_lm_head: {type(model).__name__} soft-caps its logits at {softcap:g}: the "
                             f"callable is called fn(hidden, weight, bias, softcap={softcap:g}) and must declare a "
                             "softcap parameter (a **kwargs catch-all is not enough: it can drop the cap silently)")
        # a multimodal wrapper's base model takes its image inputs (pixel_values, ...) as its forward passes them
        hidden = getattr(model, model.base_model_prefix)(*args, **kwargs).last_hidden_state
        if callable(fused_lm_head):
            n = hidden.shape[1] - 1 if not keep else int(keep)
            if not 1 <= n < hidden.shape[1]:  # a wider slice would wrap around to the sequence's end (silently)
                raise ValueError(f"logits_to_keep must be in [1, {hidden.shape[1] - 1}] (the sequence has "
                                 f"{hidden.shape[1]} tokens; position t scores token t + 1), got {keep!r}")
            h, weight, bias = _head_params(model, hidden[:, hidden.shape[1] - n - 1:-1], state["fp32"])
            cap = {} if softcap is None else {"softcap": softcap}  # uncapped: the 3-argument call, as before
            with torch.autocast(h.device.type, enabled=False):
                return fused_lm_head(h, weight, bias, **cap)
        if shift_labels is None:
            if labels is None:
                raise ValueError("labels (or shift_labels) is required with fused_lm_head=True")
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        return _fused_logprobs(model, hidden, labels, num_items_in_batch, temperature, return_entropy,
                               state["fp32"], state["backend"], softcap, state.get("extra_outputs", ()))

