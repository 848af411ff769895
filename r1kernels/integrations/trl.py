"""r1kernels inside TRL's GRPOTrainer (trl >= 1.16). One line after building the trainer:

    trainer = use_r1kernels(GRPOTrainer(model=..., args=GRPOConfig(...), ...))

A function rather than a GRPOTrainer subclass, so that it composes with any trainer class a user already
has (their own GRPOTrainer subclasses included) and leaves TRL's constructor and names untouched.

What it switches:
- log-probs and entropy (policy, old policy, reference): the models' fused lm_head becomes
  r1kernels.linear_token_logprobs (patch/lm_head.py) for Qwen2, Qwen3, Llama, Mistral, DeepseekV3 and the
  soft-capped Gemma-family models (lm_head.SOFTCAP_CLASSES); DeepseekV3 MoE layers also route through
  r1kernels.moe (patch/deepseek_v3.py); a soft-capped model's cap goes to the kernels' softcap (the loss's too),
  as TRL's own fused head applies it;
- every forward and backward of Qwen2, Qwen3, Llama and Mistral models (HF generate's small decode steps
  aside: patch/layers.HOST_BOUND_ROWS): RMSNorm, the SiLU MLP's activation and the rotary embedding run as one
  fused kernel each (patch/layers.py);
- the loss: r1kernels.linear_grpo_loss from the last hidden states, with TRL's GRPOConfig names
  (loss_type grpo/bnpo/dr_grpo/dapo/cispo/sapo/luspo, epsilon, epsilon_high, delta, beta with TRL's k3
  KL and use_bias_correction_kl, sapo_temperature_pos/neg, importance_sampling_level, temperature,
  max_completion_length) and TRL's normalizers and metrics (kl, entropy, clip_ratio/*, cispo_clip_ratio).
Everything else (vespo, off_policy_mask_threshold, top_entropy_quantile, entropy bonus, vLLM
importance-sampling correction, router aux loss, multimodal inputs, models without a fused head,
DeepSpeed ZeRO-3) runs TRL's own code, announced by one warning.

rollout_engine="r1train" (the default; "transformers" keeps TRL's) also replaces the policy's `generate`, which
TRL calls for its rollout without vLLM, by r1train's generation engine (static KV cache, CUDA-graph decode
steps, rk.sample_tokens, rk.decode_attention): the same distribution (temperature, top_k, top_p, min_p; greedy
without do_sample), drawn with counter-based noise from one seed per row taken from torch's RNG (so TRL's seed
fixes the samples). It returns HF's layout: the prompt ids then the completion, pad_token_id after a row's eos.
A generate call with anything else (beams, a repetition penalty, suppressed tokens, logits processors, also
from the model's own generation_config; multimodal inputs; prompt + max_new_tokens past a sliding window) and a
trainer the engine cannot serve (FSDP, quantized weights, a model type it does not support) run transformers'
generate after one warning; so does a call on a policy in training mode whose forward applies dropout (a LoRA
lora_dropout, an attention_dropout: TRL's rollout samples through it, the engine runs in eval mode).
With vLLM or TRL's continuous batching the policy's generate is never called and stays as it is.
"""
from __future__ import annotations

import functools
import inspect
import types
import warnings

import torch

from .. import _checks, linear_grpo_loss
from ..reference.grpo import LOSS_REDUCTION, LOSS_TYPES, SAPO_TAU_NEG, SAPO_TAU_POS

__all__ = ["use_r1kernels", "unsupported_options", "ROLLOUT_ENGINES"]

ROLLOUT_ENGINES = ("transformers", "r1train")

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
               "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def unsupported_options(trainer) -> list[str]:
    """The trainer's settings that r1kernels' loss does not implement (TRL's loss code runs for them)."""
    out = []
    if trainer.loss_type not in LOSS_TYPES or trainer.loss_type == "vespo":
        out.append(f"loss_type={trainer.loss_type!r}")
    if trainer.loss_type == "luspo" and trainer.importance_sampling_level != "sequence":
        out.append("loss_type='luspo' with importance_sampling_level='token'")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        out.append(f"off_policy_mask_threshold={trainer.off_policy_mask_threshold}")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        out.append(f"top_entropy_quantile={trainer.top_entropy_quantile}")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        out.append("an entropy bonus (entropy_coef / use_adaptive_entropy)")
    if getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False):
        out.append("vllm_importance_sampling_correction=True")
    if getattr(trainer, "aux_loss_enabled", False):
        out.append("a router aux loss (router_aux_loss_coef)")
    return out


def _unwrap(model):
    model = getattr(model, "module", model)  # DeepSpeed engine / DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT


def _patch_models(trainer, backend):
    """_patch_model on the policy, then the reference model; the policy's reason. The models first: a patch that
    raises leaves the trainer as it was (no engine bound, TRL's loss) and each model as it was before this call
    (one this call began to patch is unpatched, one patched before is left to its caller)."""
    from ..patch import is_patched, unpatch

    models = [(trainer.model, True)]
    if getattr(trainer, "ref_model", None) is not None:
        models.append((trainer.ref_model, False))
    started = []
    reason = None
    try:
        for model, policy in models:
            if not is_patched(_unwrap(model)):
                started.append(model)
            r = _patch_model(model, trainer, policy, backend)
            reason = r if policy else reason
    except BaseException:
        for model in started:
            unpatch(_unwrap(model))
        raise
    return reason


def _patch_model(model, trainer, return_entropy, backend):
    """DeepseekV3 routing, the fused layer ops and the fused lm_head on one model; the reason when the head
    stays TRL's."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from ..patch.deepseek_v3 import patch_deepseek_v3, routers_to_patch
    from ..patch.layers import FUSED_MODEL_TYPES, layers_backend, patch_layers
    from ..patch.lm_head import head_backend, patch_lm_head, unsupported_reason

    zero3_wrapped = is_deepspeed_zero3_enabled() and hasattr(model, "module")  # a DeepSpeed engine
    model = _unwrap(model)
    if zero3_wrapped and routers_to_patch(model):
        # TRL's ZeRO-3 reference model is a DeepSpeed engine already: its parameter-gathering hooks sit on the
        # modules it has, so a router or experts module put in now would run with its parameters partitioned
        warnings.warn("r1kernels: DeepSpeed ZeRO-3 already wraps this model (TRL's reference model): its MoE "
                      "layers keep transformers' code", stacklevel=3)
    else:
        patch_deepseek_v3(model, backend=backend)
    if getattr(model.config, "model_type", None) in FUSED_MODEL_TYPES:
        patch_layers(model, backend=layers_backend(backend))
    # ZeRO-3 materializes lm_head.weight only inside lm_head's own forward, which the fused path never calls
    reason = "DeepSpeed ZeRO-3 shards lm_head.weight" if is_deepspeed_zero3_enabled() else unsupported_reason(model)
    if reason is None:
        patch_lm_head(model, temperature=trainer.temperature, return_entropy=return_entropy,
                      fp32_lm_head=bool(getattr(trainer.args, "cast_lm_head_to_fp32", False)),
                      backend=head_backend(backend))
    return reason


def use_r1kernels(trainer, *, backend: str = "auto", rollout_engine: str = "r1train",
                  rollout_release_memory: bool = False):
    """Make a trl.GRPOTrainer compute log-probs, entropy and the loss with r1kernels (module docstring);
    returns the trainer. Call it after constructing the trainer and before train(); calling it twice is a
    no-op (a warning when the second call's options differ: remove_r1kernels first). backend: as every r1kernels
    op ("auto" | "triton" | "cuda" | "torch"). rollout_engine:
    "r1train" (default: r1train's generation engine for TRL's rollout without vLLM) or "transformers"
    (TRL's own generate, its random stream included). rollout_release_memory: free the engine's KV cache, decode
    buffers and CUDA graphs after each rollout (r1train's key of that name: less memory in the training phase,
    the next rollout allocates and captures again)."""
    try:
        from trl import GRPOTrainer
    except ImportError as e:  # pragma: no cover - the integration is for TRL users
        raise ImportError("r1kernels.integrations.trl needs trl (pip install 'trl>=1.16')") from e
    if not isinstance(trainer, GRPOTrainer):
        raise ValueError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    _checks.choice("backend", backend, ("auto", "triton", "cuda", "torch"))
    _checks.choice("rollout_engine", rollout_engine, ROLLOUT_ENGINES)
    if not isinstance(rollout_release_memory, bool):
        raise ValueError(f"rollout_release_memory must be a bool, got {rollout_release_memory!r}")
    options = (backend, rollout_engine, rollout_release_memory)
    if getattr(trainer, "_r1k_options", None) is not None:
        if trainer._r1k_options != options:
            warnings.warn(f"r1kernels: use_r1kernels was called on this trainer before with backend, "
                          f"rollout_engine, rollout_release_memory = {trainer._r1k_options}; this call's "
                          f"{options} changes nothing (call remove_r1kernels(trainer) first)", stacklevel=2)
        return trainer
    reason = _patch_models(trainer, backend)
    trainer._r1k_options, trainer._r1k_backend = options, backend
    if rollout_engine == "r1train":
        _use_engine(trainer, backend, rollout_release_memory)
    todo = unsupported_options(trainer)
    own = type(trainer)._compute_loss is not GRPOTrainer._compute_loss
    if reason is not None:
        warnings.warn(f"r1kernels: the model keeps TRL's lm_head and loss ({reason})", stacklevel=2)
    elif own:  # the subclass's loss runs as written: replacing it would drop the user's code without a word
        warnings.warn(f"r1kernels: {type(trainer).__name__}._compute_loss overrides TRL's and runs as written "
                      "(log-probs and entropy still use r1kernels' fused lm_head)", stacklevel=2)
    elif todo:
        warnings.warn(f"r1kernels: TRL's loss code runs for {', '.join(todo)} (log-probs and entropy still use "
                      "r1kernels' fused lm_head)", stacklevel=2)
    else:
        trainer._r1k_trl_compute_loss = trainer._compute_loss
        trainer._compute_loss = types.MethodType(_compute_loss, trainer)
    return trainer


def remove_r1kernels(trainer):
    """Undo use_r1kernels' trainer-level switches: TRL's own loss and the policy's own generate again (a later
    trainer on the same model object would otherwise roll out through r1train's engine). The models keep their
    fused layer ops (the same values within the tolerance table) and their fused lm_head path, which runs only
    when a call asks for it (fused_lm_head=...). Returns the trainer; a trainer use_r1kernels never saw is
    returned as it is."""
    if getattr(trainer, "_r1k_options", None) is None:
        return trainer
    if "_compute_loss" in vars(trainer):
        del trainer._compute_loss
    model = _unwrap(trainer.model)
    if isinstance(vars(model).get("generate"), _EngineGenerate):
        del model.generate
    trainer._r1k_options = trainer._r1k_backend = None
    return trainer


def _items_normalizer(trainer, inputs, mode):
    """TRL's dapo/cispo denominator for this micro-batch: the generation batch's completion tokens per
    process, rescaled to one gradient-accumulation window."""
    n = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if mode == "train":
        n = n * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return n


def _compute_loss(self, model, inputs):
    """GRPOTrainer._compute_loss on r1kernels.linear_grpo_loss (bound to the trainer by use_r1kernels)."""
    if any(inputs.get(k) is not None for k in _MULTIMODAL):
        if not getattr(self, "_r1k_warned_multimodal", False):
            self._r1k_warned_multimodal = True
            warnings.warn("r1kernels: multimodal inputs run TRL's loss code", stacklevel=2)
        return self._r1k_trl_compute_loss(model, inputs)
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mode = "train" if self.model.training else "eval"
    items = LOSS_REDUCTION[self.loss_type] == "items"
    old = inputs.get("old_per_token_logps")
    kw = dict(old_logprobs=old, ref_logprobs=inputs["ref_per_token_logps"] if self.beta != 0.0 else None,
              beta=self.beta, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
              loss_type=self.loss_type, importance_sampling_level=self.importance_sampling_level,
              kl_estimator="k3", temperature=self.temperature, max_completion_length=self.max_completion_length,
              num_items_in_batch=_items_normalizer(self, inputs, mode) if items else None, backend=self._r1k_backend,
              use_bias_correction_kl=bool(getattr(self.args, "use_bias_correction_kl", False)),
              sapo_temperature_pos=getattr(self.args, "sapo_temperature_pos", SAPO_TAU_POS),
              sapo_temperature_neg=getattr(self.args, "sapo_temperature_neg", SAPO_TAU_NEG),
              compute_entropy=True)  # the entropy metric from the loss kernel's own pass

    def head(hidden, weight, bias, softcap=None):  # softcap: a soft-capped model's cap (patch/lm_head.py)
        return linear_grpo_loss(hidden, weight, completion_ids, inputs["advantages"], mask, bias=bias,
                                softcap=softcap, **kw)

    with self.accelerator.autocast():
        out = model(input_ids=input_ids, attention_mask=attention_mask, fused_lm_head=head,
                    logits_to_keep=completion_ids.size(1))
    _log_metrics(self, mode, out.per_token_logprobs, old, inputs, mask, out.metrics["entropy"])
    if items or mode != "train":
        return out.loss
    return out.loss / self.current_gradient_accumulation_steps


def _entropy_mean(self, entropy, mask):
    """TRL's entropy metric from the kernel's masked mean `entropy` over this micro-batch: the masked sum
    over all processes / their token count. Completions of one token ([B, 1] entropies) TRL reads as one
    value per sequence: the sum / the number of rows, a padded row adding its entropy 0 (its label is -100;
    a tool-masked token's nonzero entropy, which TRL would add, is not in the kernel's sum)."""
    n_tok = mask.sum()
    count = n_tok if mask.shape[1] != 1 else torch.tensor(float(mask.shape[0]), device=n_tok.device,
                                                          dtype=n_tok.dtype)
    tot = self.accelerator.reduce(torch.stack([entropy * n_tok, count]), reduction="sum")
    return (tot[0] / tot[1].clamp(min=1.0)).item()


@torch.no_grad()
def _log_metrics(self, mode, logp, old, inputs, mask, entropy):
    """TRL's metrics for the loss types r1kernels runs, from the detached per-token log-probs; entropy: the
    masked mean over this micro-batch's tokens."""
    from trl.trainer.utils import nanmax, nanmin

    mask = mask.to(logp.dtype)
    # TRL's log-probs read 0 where the completion is padding (label -100), as linear_grpo_loss's do where its mask
    # (this one, or with tool_mask) is 0; kept explicit: TRL's unmasked reading of [B, 1] tensors (completions of one
    # token) sees those positions.
    logp = logp.masked_fill(inputs["completion_mask"] == 0, 0.0)
    adv = inputs["advantages"]
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    log_ratio = logp - (logp if old is None else old)
    if self.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef = torch.exp(log_ratio)

    def seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    def global_mean(x):
        if x.shape[1] == 1:
            s, n = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            s, n = (x * mask).sum(), mask.sum().float()
        tot = self.accelerator.reduce(torch.stack([s, n]), reduction="sum")
        return (tot[0] / tot[1].clamp(min=1.0)).item()

    m = self._metrics[mode]
    if self.beta != 0.0:
        d = inputs["ref_per_token_logps"] - logp
        kl = torch.exp(d) - d - 1
        m["kl"].append(global_mean(kl * coef if getattr(self.args, "use_bias_correction_kl", False) else kl))
    m["entropy"].append(_entropy_mean(self, entropy, mask))
    if self.loss_type == "cispo":
        m["cispo_clip_ratio"].append(global_mean(((coef > self.epsilon_high) & (adv > 0)).float()))
    elif self.loss_type != "sapo":
        if getattr(self.args, "delta", None) is not None:  # TRL's metrics see the ratio after the delta clamp
            coef = torch.clamp(coef, max=self.args.delta)
        low = ((coef < 1 - self.epsilon_low) & (adv < 0)).float()
        high = ((coef > 1 + self.epsilon_high) & (adv > 0)).float()
        m["clip_ratio/low_mean"].append(global_mean(low))
        m["clip_ratio/high_mean"].append(global_mean(high))
        m["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        m["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
        m["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())


# GenerationConfig fields the engine implements, with the values that mean "off" for the others
_ENGINE_KWARGS = ("input_ids", "attention_mask", "generation_config", "disable_compile")
_OFF = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "suppress_tokens": None,
        "begin_suppress_tokens": None, "bad_words_ids": None, "no_repeat_ngram_size": 0, "min_new_tokens": None,
        "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "forced_bos_token_id": None,
        "forced_eos_token_id": None, "sequence_bias": None, "guidance_scale": None, "penalty_alpha": None,
        "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "exponential_decay_length_penalty": None,
        "top_h": None, "assistant_model": None, "prompt_lookup_num_tokens": None, "stop_strings": None,
        "min_length": 0, "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
        "watermarking_config": None, "dola_layers": None, "token_healing": False, "max_time": None,
        "force_words_ids": None, "constraints": None, "use_mtp": False}


def _use_engine(trainer, backend, release_memory=False):
    """TRL's rollout through r1train's engine: the policy's generate (the model TRL's
    unwrap_model_for_generation yields, or under PEFT the base model its generate reaches)."""
    from r1train.generation.engine import SUPPORTED

    if getattr(trainer, "use_vllm", False) or getattr(trainer, "use_transformers_continuous_batching", False):
        return  # TRL's rollout never calls the policy's generate: nothing to replace, nothing lost
    why = None
    if not getattr(trainer.args, "ds3_gather_for_generation", True) and _zero3():
        why = "ds3_gather_for_generation=False (ZeRO-3 parameters stay sharded during generate)"
    elif getattr(trainer, "is_fsdp_enabled", False):
        why = "FSDP (the engine's captured decode steps cannot follow FSDP's per-module gathers)"
    model = _unwrap(trainer.model)
    if why is None and getattr(model.config, "model_type", None) not in SUPPORTED:
        why = f"the engine supports {SUPPORTED} models, not {getattr(model.config, 'model_type', None)!r}"
    if why is None and (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                        or getattr(model.config, "quantization_config", None) is not None):
        why = "a quantized model (the engine runs bf16 / fp16 / fp32 weights)"
    if why is not None:
        warnings.warn(f"r1kernels: rollout_engine='r1train' not used: {why}", stacklevel=3)
        return
    model.generate = _EngineGenerate(model)
    model._r1k_rollout_backend, model._r1k_rollout_release = backend, release_memory


class _EngineGenerate:
    """model.generate bound to _engine_generate, picklable (torch.save of the model: a bound method of a
    module-level function pickles as getattr(model, its name), which the model does not have) and copied with
    the model by copy.deepcopy (the copy's generate is bound to the copy)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return _engine_generate(self.model, *args, **kwargs)

    @property
    def __signature__(self):  # _engine_generate's parameters after self, as the bound method showed them
        return inspect.signature(functools.partial(_engine_generate, None))


def _zero3() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _active_dropout(model) -> str | None:
    """The first dropout `model`'s forward applies as it stands ('module name p=...'), else None: an nn.Dropout of
    p > 0 (e.g. a LoRA adapter's lora_dropout) or an attention module's attention_dropout > 0, in a module in
    training mode. TRL calls generate with the policy in training mode (Trainer.training_step calls model.train()
    before _prepare_inputs): transformers' generate samples through that dropout; the engine runs in eval mode."""
    for name, m in model.named_modules():
        if not m.training:
            continue
        p = m.p if isinstance(m, torch.nn.modules.dropout._DropoutNd) else getattr(m, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0:
            return f"{name or type(model).__name__} p={p}"
    return None


def _fallback_reason(model, gc, kwargs) -> str | None:
    """Why this generate call needs transformers' generate (None: the engine runs it). gc: the call's generation
    config merged with the model's own as transformers' generate merges them."""
    from r1train.generation.engine import rope_rescaled, window_passed

    extra = sorted(k for k, v in kwargs.items() if k not in _ENGINE_KWARGS and v is not None)
    if extra:
        return f"generate arguments {extra}"
    drop = _active_dropout(model)
    if drop is not None:
        return (f"dropout in training mode ({drop}; TRL's disable_dropout=True zeroes nn.Dropout, not "
                "attention_dropout)")
    if gc.max_new_tokens is None:
        return "no max_new_tokens"
    for k, off in _OFF.items():
        v = getattr(gc, k, off)
        if v is not None and v != off and not (off is None and v == []):
            return f"generation_config.{k}={v!r}"
    ids = kwargs.get("input_ids")
    if ids is None:
        return None
    # rope_rescaled: transformers' generate rescales step by step as TRL expects; the engine would not match it
    return (window_passed(model.config, ids.shape[1], gc.max_new_tokens)
            or rope_rescaled(model.config, ids.shape[1], gc.max_new_tokens))


def _engine_generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
    """model.generate for TRL's rollout (bound by _use_engine): r1train's engine where it implements the call
    (_fallback_reason), else the model class's own generate."""
    # transformers' merge: the call's values, then the model's generation_config for those it leaves unset
    gc, _ = self._prepare_generation_config(generation_config)
    why = _fallback_reason(self, gc, {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
    if why is not None or input_ids is None:
        if not getattr(self, "_r1k_rollout_warned", False):
            self._r1k_rollout_warned = True
            warnings.warn(f"r1kernels: transformers' generate runs this rollout ({why or 'no input_ids'})",
                          stacklevel=2)
        return type(self).generate(self, input_ids=input_ids, attention_mask=attention_mask,
                                   generation_config=generation_config, **kwargs)
    from r1train.generation import SamplingParams, eos_tuple, generate

    greedy = not gc.do_sample
    params = SamplingParams(max_new_tokens=int(gc.max_new_tokens),
                            temperature=1.0 if greedy or gc.temperature is None else float(gc.temperature),
                            top_k=0 if greedy or not gc.top_k else int(gc.top_k),
                            top_p=1.0 if greedy or gc.top_p is None else float(gc.top_p),
                            min_p=0.0 if greedy or not gc.min_p else float(gc.min_p), greedy=greedy)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    # one seed a row from torch's CPU RNG: TRL's seed (transformers' set_seed) fixes the rollout
    seeds = torch.randint(0, 2 ** 62, (input_ids.shape[0],), dtype=torch.int64).to(input_ids.device)
    # as transformers: an id the call's config leaves unset is the model's own (its generation_config); then a
    # missing pad id is the first eos id; no eos id at all: rows run to max_new_tokens
    own = self.generation_config
    eos_id = gc.eos_token_id if gc.eos_token_id is not None else own.eos_token_id
    empty = isinstance(eos_id, (list, tuple)) and not eos_id  # eos_token_id=[]: no stop token, as transformers
    eos = eos_tuple(eos_id) if eos_id is not None and not empty else ()
    pad = next((p for p in (gc.pad_token_id, own.pad_token_id, *eos[:1]) if p is not None), 0)
    tok, _ = generate(self, input_ids, mask, seeds, params, eos_id=eos or -1, pad_id=int(pad),
                      backend=self._r1k_rollout_backend)
    if getattr(self, "_r1k_rollout_release", False):
        from r1train.generation import release

        release(self)
    # the engine checks for finished rows every few steps, so it may return a few all-pad columns past the
    # step where the last row ended: cut them, as transformers' generate stops at that step (one host read)
    if tok.shape[1] and eos:
        hit = torch.isin(tok, torch.tensor(eos, device=tok.device))
        ends = torch.where(hit.any(1), hit.int().argmax(1) + 1, tok.shape[1])
        tok = tok[:, :int(ends.max())]
    return torch.cat([input_ids, tok.to(input_ids.dtype)], 1)
