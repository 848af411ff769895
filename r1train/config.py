"""Trainer configuration: one dataclass, TRL GRPOConfig/SFTConfig field names and defaults where TRL has
the field, one help string per field. YAML files + `key=value` overrides, type-checked; a bad key or value
raises ConfigError naming it.

Defaults that differ from TRL 1.16's, on purpose:
- bf16 False (TRL: True unless fp16): the default model is a built-in tiny one trained on the CPU (the demo, the
  tests), where bf16 is slower and changes every measured result; set bf16=true on a GPU.
- lr_scheduler_type constant (TRL: linear decay to 0): the demo's and r1_recipe.yaml's GRPO stages set no
  schedule and their measured results (README) were made at a constant rate; set linear for TRL's.
- learning_rate 1e-6 for SFT too: one dataclass serves both commands and keeps GRPOConfig's value (TRL's
  SFTConfig has 2e-5); every shipped SFT section sets its own.
- loss_type is GRPOConfig's key (dapo); SFT always minimizes TRL SFTConfig's loss_type nll (dft is not
  implemented).
- max_steps from num_train_epochs is ceil(epochs x rows / rows per step): the epochs are seeded permutations read
  back to back, every step full (TRL's GRPO sampler drops each epoch's partial batch of prompts; HF's Trainer
  counts ceil(rows / rows per step) steps an epoch, the last one partial: 10 rows, 4 a step, 3 epochs are 8 steps
  here, 9 in HF's SFTTrainer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Optional, Union


class ConfigError(ValueError):
    pass


def f(default, help: str, choices=None, items=None):
    """A field with its help text (and allowed values, checked on load). A list key names the kind of its items
    (a key of LIST_ITEMS), which check_type checks one by one."""
    kw = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "choices": choices, "items": items}, **kw)


# The items a list key may hold (f(items=...)): kind -> (test, what the message calls one). A YAML list holds
# any value (`[q_proj, 3]`, `[[q_proj]]`, `[null]`): each item is checked here, not deep in peft or a backend.
LIST_ITEMS = {
    "str": (lambda v: isinstance(v, str), "string"),
    "name": (lambda v: isinstance(v, str) and v.strip() != "", "non-empty string"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
               "finite number"),
}


@dataclass
class TrainConfig:
    # ---- model and data
    model_name_or_path: str = f("tiny-qwen2", "tiny-qwen2 | tiny-llama | tiny-deepseek-v3 (built in code) or a "
                                "local Hugging Face model directory")
    tokenizer_name_or_path: Optional[str] = f(None, "tokenizer directory; default: the model's, or the "
                                              "built-in character tokenizer for tiny models")
    model_hidden_size: int = f(96, "tiny models only: hidden size")
    model_num_layers: int = f(3, "tiny models only: number of layers")
    dataset_name: str = f("arith", "'arith' (built-in generated task), a .jsonl/.json/.parquet file, or a "
                          "Hugging Face dataset name/directory (needs `datasets`)")
    dataset_split: str = f("train", "split of a Hugging Face dataset")
    dataset_test_split: str = f("test", "split of eval_dataset_name where it is a Hugging Face dataset with splits "
                                "(TRL's script argument of this name)")
    eval_dataset_name: Optional[str] = f(None, "held-out set (same formats); default: built-in task's eval "
                                         "split, or none")
    answer_column: str = f("answer", "column the rewards receive as `answer` (the accuracy reward's gold answer; "
                           "evaluation reads it too); with reward accuracy the training set must have it")
    completion_column: str = f("completion", "SFT target column (TRL prompt-completion format)")
    task_min_terms: int = f(3, "arith task: fewest operands")
    task_max_terms: int = f(4, "arith task: most operands")
    task_max_operand: int = f(9, "arith task: operands are 1..task_max_operand")
    task_ops: str = f("+-", "arith task: operators to draw from ('+', '-' or '+-')")
    task_train_size: int = f(4000, "arith task: number of training problems")
    task_eval_size: int = f(200, "arith task: number of held-out problems")
    task_flaw_share: float = f(0.5, "arith task: share of cold-start SFT solutions with one wrong step")
    task_slip_share: float = f(0.6, "demo stages: share of cold-start solutions that forget every carry/borrow "
                               "(a systematic slip: above 0.5, greedy decoding makes it)")
    task_mix_share: float = f(0.3, "demo stages with step words: share of chain-of-thought lines written in the "
                              "second step-word language (language mixing in the cold-start set)")
    # ---- optimization (TRL / transformers TrainingArguments names)
    output_dir: str = f("outputs/r1train", "where metrics, completions, plots and checkpoints go")
    seed: int = f(42, "seed for data order, sampling and init")
    learning_rate: float = f(1e-6, "peak learning rate (AdamW)")
    weight_decay: float = f(0.0, "AdamW weight decay")
    adam_beta1: float = f(0.9, "AdamW beta1")
    adam_beta2: float = f(0.999, "AdamW beta2")
    adam_epsilon: float = f(1e-8, "AdamW epsilon (added to the root of the second moment)")
    optim: str = f("adamw_torch_fused", "optimizer (transformers' names and default): adamw_torch_fused = torch "
                   "AdamW, one fused kernel; adamw_torch = its multi-tensor path; adamw_torch_8bit = torchao's "
                   "AdamW8bit: fp32 master weights kept, both moments in 8 bits (6 bytes per parameter for "
                   "master + states instead of 12; needs torchao)", ["adamw_torch_fused", "adamw_torch",
                                                                      "adamw_torch_8bit"])
    lr_scheduler_type: str = f("constant", "learning-rate schedule (TRL's default is linear; see the module "
                               "docstring)", ["constant", "constant_with_warmup", "linear", "cosine"])
    warmup_ratio: float = f(0.0, "share of the optimizer steps spent warming up linearly from 0 (ceil(ratio * "
                            "steps), as TRL); not with constant (transformers' ignores it): constant_with_warmup")
    per_device_train_batch_size: int = f(8, "completions (GRPO) or examples (SFT) per micro-batch per device")
    gradient_accumulation_steps: int = f(1, "micro-batches per optimizer step")
    max_grad_norm: float = f(1.0, "gradient clipping norm (0 = off)")
    max_steps: int = f(-1, "optimizer steps; -1: derived from num_train_epochs")
    num_train_epochs: float = f(3.0, "passes over the training prompts when max_steps is -1 (TRL's default)")
    logging_steps: int = f(10, "print a metrics line every N steps (metrics.jsonl gets every step)")
    save_steps: int = f(500, "checkpoint every N steps (0 = only at the end)")
    save_total_limit: Optional[int] = f(None, "keep at most N checkpoints (oldest deleted)")
    resume_from_checkpoint: Optional[str] = f(None, "a checkpoint directory, or 'latest' in output_dir (true: "
                                              "latest; false: none, as in HF's Trainer)")
    overwrite_output_dir: bool = f(False, "a fresh run may start in an output_dir holding another run's "
                                   "checkpoints or metrics (they are deleted first), and `sample` may replace "
                                   "its samples.jsonl; otherwise that is an error")
    bf16: bool = f(False, "bf16 weights/compute via DeepSpeed (fp16 is not supported; TRL's default is true: see "
                   "the module docstring)")
    use_peft: bool = f(False, "LoRA through peft (TRL's keys): only the adapters train; the reference model is the "
                       "base with the adapters disabled (no second copy); checkpoints hold the adapter")
    lora_r: int = f(16, "LoRA rank")
    lora_alpha: int = f(32, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = f(0.05, "LoRA dropout")
    use_rslora: bool = f(False, "rank-stabilized LoRA (TRL's / peft's key): scale alpha / sqrt(r) instead of alpha / r")
    lora_target_modules: Optional[list] = f(None, "modules that get adapters; None: every linear layer of "
                                            "attention and MLP (peft's 'all-linear', lm_head excluded)",
                                            items="name")
    lora_modules_to_save: Optional[list] = f(None, "modules trained in full beside the adapters (e.g. lm_head)",
                                             items="name")
    adapter_path: Optional[str] = f(None, "`r1train merge`: a LoRA checkpoint directory to merge into "
                                    "model_name_or_path; the merged model goes to output_dir")
    gradient_checkpointing: bool = f(True, "recompute each decoder layer's activations in backward (transformers, "
                                     "non-reentrant): less memory for one more forward (TRL's default)")
    zero_stage: int = f(0, "DeepSpeed ZeRO stage (r1train/configs/ds_zero<N>.json)", [0, 1, 2, 3])
    deepspeed: Optional[str] = f(None, "a DeepSpeed JSON config path; overrides zero_stage")
    offload_optimizer: bool = f(False, "ZeRO-Offload: optimizer states and fp32 master weights in CPU memory, the "
                                "optimizer step on the CPU (zero_stage >= 1)")
    offload_param: bool = f(False, "ZeRO-3 parameter offload: parameters in CPU memory between uses "
                            "(zero_stage 3)")
    disable_tqdm: bool = f(False, "no progress bar")
    report_to: list = f([], "metrics backends, through their own clients: tensorboard, wandb, trackio (each "
                        "must be installed); 'all' (every installed one); 'none' or [] (TRL's default) for none "
                        "(metrics.jsonl and completions.jsonl are written whatever this is)", items="str")
    eval_steps: int = f(0, "evaluate held-out accuracy every N steps (0 = only before and after)")
    eval_num_samples: int = f(1, "samples per held-out prompt for pass@1 (temperature = eval_temperature)")
    eval_temperature: float = f(1.0, "sampling temperature of held-out evaluation")
    # ---- GRPO (TRL GRPOConfig names and defaults)
    num_generations: int = f(8, "G: completions per prompt")
    max_prompt_length: int = f(512, "GRPO: prompts longer than this (tokens) keep their last max_prompt_length "
                               "tokens (truncated from the left); SFT cuts no prompt (max_length bounds the row)")
    chat_template_kwargs: Optional[dict] = f(None, "GRPO: keywords for the chat template of conversational prompts "
                                             "(TRL GRPOConfig's), e.g. {enable_thinking: false}; a dict or its JSON "
                                             "text")
    max_completion_length: int = f(512, "tokens generated per completion at most")
    temperature: float = f(1.0, "sampling temperature of rollouts (also used in the loss's log-probs)")
    top_p: float = f(1.0, "nucleus sampling of rollouts")
    top_k: int = f(0, "top-k sampling of rollouts (0 = off)")
    min_p: float = f(0.0, "min-p sampling of rollouts: keep tokens with p >= min_p * max p (0 = off)")
    rollout_engine: str = f("r1train", "'r1train': the generation engine (static KV cache, CUDA-graph decode, "
                            "fused sampling and decode-attention kernels); 'transformers': the model's own "
                            "generate (any model; a completion then depends on its batch too)",
                            ["r1train", "transformers"])
    rollout_release_memory: bool = f(False, "free the engine's KV cache, decode buffers and CUDA graphs after each "
                                     "rollout, for the training step's use (the next rollout allocates and "
                                     "captures again: seconds a step); false keeps them between rollouts")
    beta: float = f(0.0, "KL coefficient; > 0 loads a reference model")
    kl_estimator: str = f("k3", "KL estimator", ["k1", "k2", "k3", "low_var_kl"])
    epsilon: float = f(0.2, "lower clip range of the ratio")
    epsilon_high: Optional[float] = f(None, "upper clip range (DAPO clip-higher 0.28); default epsilon")
    delta: Optional[float] = f(None, "two-sided clipping bound of the unclipped ratio (off when None)")
    loss_type: str = f("dapo", "loss formulation and normalization (luspo needs importance_sampling_level="
                       "sequence)", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
    importance_sampling_level: str = f("token", "'token' ratios or 'sequence' (GSPO)", ["token", "sequence"])
    sapo_temperature_pos: float = f(1.0, "sapo: gate temperature of tokens with advantage > 0")
    sapo_temperature_neg: float = f(1.05, "sapo: gate temperature of tokens with advantage <= 0")
    vespo_k_pos: float = f(2.0, "vespo: power k of the gamma weight, advantage >= 0")
    vespo_lambda_pos: float = f(3.0, "vespo: decay lambda of the gamma weight, advantage >= 0")
    vespo_k_neg: float = f(3.0, "vespo: power k of the gamma weight, advantage < 0")
    vespo_lambda_neg: float = f(2.0, "vespo: decay lambda of the gamma weight, advantage < 0")
    vllm_importance_sampling_correction: bool = f(True, "rollout correction: the policy term times the importance "
                                                  "weight exp(l_old - l_rollout) from the rollout engine's log-probs "
                                                  "(TRL's name; here any engine that returns them)")
    vllm_importance_sampling_mode: str = f("sequence_mask", "rollout correction: per-token or per-sequence weight, "
                                           "clipped (truncate) or zeroed outside the bounds (mask); loss_type=vespo "
                                           "needs a token mode",
                                           ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
    vllm_importance_sampling_clip_max: Optional[float] = f(3.0, "rollout correction: upper bound C_max")
    vllm_importance_sampling_clip_min: Optional[float] = f(None, "rollout correction: lower bound C_min")
    off_policy_mask_threshold: Optional[float] = f(None, "DeepSeek-V3.2 off-policy sequence masking: drop a "
                                                   "sequence with advantage < 0 whose mean l_rollout - l exceeds this")
    use_bias_correction_kl: bool = f(True, "the KL term times the (differentiable) ratio: the unbiased reverse-KL "
                                     "gradient (DeepSeek-V3.2)")
    top_entropy_quantile: float = f(1.0, "train only on the top quantile of each micro-batch's tokens by entropy, "
                                    "the threshold taken over every process's micro-batch as TRL does (0.2 in "
                                    "'Beyond the 80/20 rule'; 1.0 = all tokens; 0.0 = the highest-entropy token), "
                                    "in [0, 1]")
    entropy_coef: float = f(0.0, "entropy bonus: loss - entropy_coef * mean token entropy (the initial value "
                            "with use_adaptive_entropy)")
    use_adaptive_entropy: bool = f(False, "Skywork-OR1 adaptive entropy control: entropy_coef += delta when the "
                                   "step's entropy <= entropy_target, -= delta otherwise; applied only while the "
                                   "entropy is <= entropy_target. The step's entropy: the mean over every "
                                   "process's tokens the loss trains on (top_entropy_quantile's, TRL's)")
    entropy_coef_min: float = f(0.0, "adaptive entropy: lower bound of entropy_coef")
    entropy_coef_max: float = f(1.0, "adaptive entropy: upper bound of entropy_coef")
    entropy_coef_delta: float = f(0.005, "adaptive entropy: step of entropy_coef per optimizer step")
    entropy_target: float = f(0.2, "adaptive entropy: target mean token entropy (nats)")
    scale_rewards: str = f("group", "advantage scaling", ["group", "batch", "none"])
    multi_objective_aggregation: str = f("sum_then_normalize", "several rewards: weighted sum, then scale_rewards "
                                         "(sum_then_normalize); or each reward normalized in its group, the weighted "
                                         "sum normalized over the batch (normalize_then_sum, GDPO)",
                                         ["sum_then_normalize", "normalize_then_sum"])
    num_iterations: int = f(1, "optimization passes per generation batch (mu); > 1 uses old log-probs")
    mask_truncated_completions: bool = f(False, "completions without eos get no loss")
    dynamic_sampling: bool = f(False, "DAPO dynamic sampling: a prompt whose G rewards are all equal is replaced "
                               "by a newly drawn prompt (and G new completions) until each group varies")
    max_dynamic_sampling_rounds: int = f(10, "dynamic sampling: rollout rounds per step at most (the first "
                                         "included); groups still constant after them stay, advantage 0")
    reward_funcs: list = f(["accuracy", "format"], "reward names: accuracy, format, language, overlong, "
                           "a reward model's directory (sequence classification, num_labels=1), "
                           "or import paths 'module:function'", items="name")
    reward_weights: Optional[list] = f(None, "one weight per reward function; default all 1.0", items="number")
    reward_timeout: float = f(30.0, "seconds before a reward call is abandoned (its samples skipped); a reward "
                              "model's call scores all of a process's completions (its loading is not timed)")
    overlong_buffer_len: int = f(64, "DAPO soft overlong punishment buffer (tokens) for reward 'overlong'")
    language: str = f("en", "target language of the language-consistency reward", ["en", "zh"])
    sync_ref_model: bool = f(False, "re-sync the reference model to the policy (R1 recipe)")
    ref_model_sync_steps: int = f(512, "optimizer steps between reference syncs (TRL's global steps: a GRPO step "
                                  "makes num_iterations)")
    ref_model_mixup_alpha: float = f(0.6, "ref <- alpha * policy + (1 - alpha) * ref (1.0 = replace)")
    loss_impl: str = f("auto", "'linear': fused hidden->loss kernels (no [B,T,V] logits; at temperature / s for a "
                       "model that multiplies its logits by s, with the kernels' softcap for one that soft-caps them, "
                       "Gemma 2); 'logits': the model's own logits; 'auto': linear, unless the head's logits are not "
                       "what the fused kernels compute (an unknown rule, a cap outside their range) or "
                       "lora_target_modules names lm_head: then logits (logged)",
                       ["auto", "linear", "logits"])
    padding_free: bool = f(False, "GRPO and SFT: training forwards without padding (verl use_remove_padding, TRL "
                            "SFT's name): each micro-batch's rows (prompt + completion, pads removed) run as one "
                            "packed sequence, positions restarting per row (varlen flash attention on CUDA "
                            "bf16/fp16, elsewhere one torch sdpa over the rows re-padded for attention only); the "
                            "loss runs on the completion tokens only, normalized exactly as the padded micro-batches "
                            "of per_device_train_batch_size rows")
    max_tokens_per_batch: Optional[int] = f(None, "padding_free: a token budget per micro-batch (verl "
                                            "use_dynamic_bsz): rows packed into as few micro-batches of at most "
                                            "this many tokens as fit (the count varies per step; optimizer steps "
                                            "and losses stay those of the padded batch); >= max_prompt_length + "
                                            "max_completion_length (GRPO); >= max_length or the longest row "
                                            "(SFT). None: per_device_train_batch_size rows per micro-batch")
    kernel_backend: str = f("auto", "r1kernels backend for every loss/log-prob call (auto picks the fastest "
                            "eligible kernel)", ["auto", "triton", "cuda", "cpp", "torch"])
    log_completions: bool = f(False, "at each logging step print a few completions and send the completions "
                              "table to the report_to backends")
    log_entropy: bool = f(True, "compute the entropy metric (in the loss kernel's own pass over the logits)")
    patch_model: Optional[bool] = f(None, "rk.patch the policy: true = DeepseekV3 routers/experts and the RMSNorm / "
                                    "SiLU-MLP / rotary ops of Qwen2, Qwen3, Llama and Mistral become r1kernels' "
                                    "fused ones (forward and backward); None = DeepseekV3 only, on CUDA")
    moe_bias_update_rate: float = f(1e-3, "MoE policies: aux-loss-free balancing bias step (0 = off)")
    moe_router_replay: bool = f(False, "MoE policies (DeepseekV3): router replay (R3): the rollout records every "
                                "token's top-k experts per MoE layer and the training forward uses them as its "
                                "expert selection; the routing weights still come from the current router "
                                "(the gate learns); logs moe/routing_agreement. Needs rollout_engine=r1train")
    # ---- SFT (TRL SFTConfig names)
    max_length: int = f(1024, "SFT: the first max_length tokens of the whole prompt + completion + eos are kept "
                        "(TRL's truncation_mode keep_start; no prompt-only cut); with completion_only_loss a "
                        "row left with no completion token is an error naming it, before training")
    completion_only_loss: Optional[bool] = f(None, "SFT: loss on completion tokens only (None, TRL's default: true "
                                             "for prompt-completion rows, which SFT rows here always are); false: on "
                                             "the prompt tokens too (every token after a row's first)")
    # ---- pipeline / sampling
    rejection_num_samples: int = f(8, "rejection sampling: samples per prompt")
    rejection_max_per_prompt: int = f(1, "rejection sampling: correct samples kept per prompt")
    teacher_model: Optional[str] = f(None, "distill: teacher checkpoint directory (samples come from it)")

    def help(self) -> str:
        return "\n".join(f"{x.name} = {getattr(self, x.name)!r}: {x.metadata['help']}" for x in fields())

    def validate(self) -> TrainConfig:
        """Every check that needs no model, data or device work; a bad value raises ConfigError naming its
        key. GRPO's batch-vs-num_generations rule is in check_grpo_batch (SFT and `sample` do not need it)."""
        for x in fields():
            check_type(x, getattr(self, x.name))
            v = getattr(self, x.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{x.name} must be a finite number, got {v}")
        from .data import OWN_TEMPLATE_KEYS

        clash = [k for k in OWN_TEMPLATE_KEYS if k in (self.chat_template_kwargs or {})]
        if clash:
            raise ConfigError(f"chat_template_kwargs sets {clash}, which the prompt rendering sets itself")
        pos = ["per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
               "max_completion_length", "num_iterations", "max_prompt_length", "eval_num_samples",
               "ref_model_sync_steps", "max_length", "rejection_num_samples", "rejection_max_per_prompt",
               "model_hidden_size", "model_num_layers", "task_train_size", "max_dynamic_sampling_rounds"]
        for k in pos:
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.rejection_max_per_prompt > self.rejection_num_samples:  # it would keep at most num_samples
            raise ConfigError(f"rejection_max_per_prompt ({self.rejection_max_per_prompt}) must be <= "
                              f"rejection_num_samples ({self.rejection_num_samples}): the samples drawn per prompt")
        # the tiny models' 4 attention heads need an even head size (rotary); tiny-deepseek-v3 rotates half of
        # each head: a multiple of 4
        from .tasks import TINY_MODELS  # the key sizes only these (a local model directory ignores it)

        mult = 16 if self.model_name_or_path == "tiny-deepseek-v3" else 8
        if self.model_name_or_path in TINY_MODELS and self.model_hidden_size % mult:
            raise ConfigError(f"model_hidden_size must be a multiple of {mult} for {self.model_name_or_path} "
                              f"(4 attention heads, rotary halves), got {self.model_hidden_size}")
        non_neg = ["learning_rate", "weight_decay", "max_grad_norm", "logging_steps", "save_steps", "eval_steps",
                   "epsilon", "beta", "overlong_buffer_len", "moe_bias_update_rate", "task_eval_size"]
        for k in non_neg:
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed(seed + epoch) takes 64 bits
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be >= 1, or -1 to train for num_train_epochs; got {self.max_steps}")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit must be >= 1 (or unset to keep every checkpoint), "
                              f"got {self.save_total_limit}")
        for k in ("warmup_ratio", "ref_model_mixup_alpha", "task_flaw_share", "task_slip_share", "task_mix_share"):
            if not 0 <= getattr(self, k) <= 1:
                raise ConfigError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        for k in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise ConfigError(f"{k} must be in [0, 1), got {getattr(self, k)}")
        if self.lr_scheduler_type == "constant" and self.warmup_ratio > 0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} with lr_scheduler_type=constant: transformers' "
                              "constant schedule has no warmup; use lr_scheduler_type=constant_with_warmup")
        if not self.adam_epsilon > 0:
            raise ConfigError(f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.deepspeed is None:
            check_offload(self, self.zero_stage)
        else:
            dsc = read_deepspeed_config(self.deepspeed)
            check_deepspeed_values(self, dsc)
            check_offload(self, dsc.get("zero_optimization", {}).get("stage", 0))
        self._check_tokenizer_path()
        task_spec(self)  # the built-in task's settings: checked here, not when data loads
        if self.lora_target_modules == []:  # apply_lora would take [] as unset: every linear layer
            raise ConfigError("lora_target_modules: [] names no module; leave it unset (null) for every linear layer "
                              "of attention and MLP, or list the module names")
        if self.use_peft:
            import importlib.util

            if importlib.util.find_spec("peft") is None:  # the trainer's apply_lora imports it
                raise ConfigError("use_peft=true needs peft, which is not installed: pip install peft (or set "
                                  "use_peft=false)")
            if self.lora_r < 1 or self.lora_alpha < 1:
                raise ConfigError(f"lora_r and lora_alpha must be >= 1, got {self.lora_r} and {self.lora_alpha}")
            if not 0 <= self.lora_dropout < 1:
                raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if self.sync_ref_model:
                raise ConfigError("sync_ref_model: with use_peft the reference is the base model with the "
                                  "adapters disabled; it cannot be synced")
        from .loading import loss_impl_for

        loss_impl_for(None, self)  # an explicit linear the config alone rules out (the model's part: Trainer init)
        if self.sync_ref_model and self.beta == 0:  # as TRL 1.16's GRPOTrainer
            raise ConfigError("sync_ref_model: with beta 0 there is no reference model to sync; set beta > 0 or "
                              "sync_ref_model=false")
        rt = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        bad = [x for x in rt if x not in ("tensorboard", "wandb", "trackio", "all", "none")]
        if bad or (len(rt) > 1 and ("all" in rt or "none" in rt)):
            raise ConfigError(f"report_to must list tensorboard, wandb and/or trackio, or be 'all' or 'none'; "
                              f"got {self.report_to!r}")
        from .metrics import backend_installed

        missing = [x for x in rt if x not in ("all", "none") and not backend_installed(x)]
        if missing:  # 'all' takes the installed ones; a named backend must be there
            raise ConfigError(f"report_to lists {missing}, not installed (pip install {' '.join(missing)}); "
                              "report_to=all takes the installed backends")
        from r1kernels import _checks, check_sampling_options

        try:  # temperature / top_p / top_k / min_p: the ranges rk.sample_tokens itself accepts
            check_sampling_options(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                   min_p=self.min_p, greedy=False)
            _checks.temperature(self.eval_temperature, "eval_temperature")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ConfigError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None:
            eh = self.epsilon if self.epsilon_high is None else self.epsilon_high
            if self.delta <= 1 + eh:
                raise ConfigError(f"delta must be > 1 + epsilon_high = {1 + eh:g} (it bounds the ratio above the "
                                  f"upper clip), got {self.delta}")
        if self.moe_router_replay and self.rollout_engine != "r1train":
            raise ConfigError("moe_router_replay needs rollout_engine=r1train (the transformers fallback does not "
                              "record the routing)")
        if self.reward_timeout <= 0:
            raise ConfigError(f"reward_timeout must be > 0 seconds, got {self.reward_timeout}")
        self._check_packing()
        self._check_loss_options()
        self._check_rewards()
        _check_backend(self.kernel_backend)
        return self

    def _check_tokenizer_path(self):
        """A tokenizer_name_or_path written as a local path (absolute, ./, ../, ~) must be a directory; other
        names go to transformers (its cache; nothing is downloaded), whose errors loading wraps."""
        t = self.tokenizer_name_or_path
        if t is not None and (os.path.isabs(t) or t.startswith((".", "~"))) and not os.path.isdir(
                os.path.expanduser(t)):
            raise ConfigError(f"tokenizer_name_or_path: {t!r} is not a directory (a tokenizer saved with "
                              "save_pretrained)")

    def _check_loss_options(self):
        """The GRPO loss keys r1kernels validates (ValueError naming the key), and the adaptive-entropy bounds."""
        from r1kernels.reference.grpo import EXTRA_DEFAULTS, check_extra_options

        keys = {k: getattr(self, k) for k in EXTRA_DEFAULTS if hasattr(self, k)}
        try:
            check_extra_options(self.loss_type, self.importance_sampling_level, **keys)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        mode = self.vllm_importance_sampling_mode
        if self.loss_type == "vespo" and self.vllm_importance_sampling_correction and mode.startswith("sequence"):
            # both rollout engines (r1train's and transformers' generate) return the sampling log-probs the
            # correction reads, so the loss would raise this at the first step
            raise ConfigError(
                "loss_type=vespo folds per-token rollout importance-sampling weights into its sequence weight: with "
                f"vllm_importance_sampling_correction=true, vllm_importance_sampling_mode must be token_truncate or "
                f"token_mask, got {mode!r} (sequence_mask is TRL's default, which TRL applies only with vLLM; here "
                "the correction applies with every rollout_engine). Set vllm_importance_sampling_mode=token_mask "
                "(or token_truncate), or vllm_importance_sampling_correction=false")
        for k in ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.use_adaptive_entropy and not self.entropy_coef_min <= self.entropy_coef_max:
            raise ConfigError(f"entropy_coef_min ({self.entropy_coef_min}) must be <= entropy_coef_max "
                              f"({self.entropy_coef_max})")

    def _check_packing(self):
        b = self.max_tokens_per_batch
        if b is None:
            return
        if b < 1:
            raise ConfigError(f"max_tokens_per_batch must be a positive number of tokens (or unset), got {b}")
        if not self.padding_free:
            raise ConfigError(f"max_tokens_per_batch={b} needs padding_free=true (token-budget micro-batches are "
                              "packed)")
        # the budget's floor is the trainer's longest row (check_token_budget): GRPO's max_prompt_length +
        # max_completion_length (check_grpo_config, before a model loads), SFT's longest training row (the
        # trainer tokenizes its rows before any work): this config alone does not know which it runs

    def _check_rewards(self):
        # each name and weight is checked by check_type (the keys' LIST_ITEMS kinds)
        from .rewards import FLOAT32_MAX, check_reward_funcs

        if not self.reward_funcs:
            raise ConfigError(f"reward_funcs must be a non-empty list of names, got {self.reward_funcs!r}")
        if self.reward_weights is not None:  # their count: check_reward_weights (reward functions may come in code)
            # the weights become a float32 tensor (TRL's): past its range a weight is inf, and inf x a 0 reward NaN
            bad = [w for w in self.reward_weights if abs(w) > FLOAT32_MAX]  # finite: check_type
            if bad:
                raise ConfigError(f"reward_weights must be finite numbers within float32's range (+-3.4e38), got "
                                  f"{bad}")
        check_reward_funcs(self.reward_funcs, self)  # names, modules, callables, duplicates


def task_spec(cfg):
    """The built-in task's ArithSpec from the task_* keys; a bad value is a ConfigError naming its key."""
    from .tasks.arith import ArithSpec

    try:
        return ArithSpec(cfg.task_min_terms, cfg.task_max_terms, cfg.task_max_operand, cfg.task_ops)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# PyYAML implements YAML 1.1, which reads `017` as octal (15) and `1:30` / `1:30.5` as base 60 (90 / 90.5):
# silently not what a config means. The loader reads them as YAML 1.2 does: 017 is 17, 1:30 a string (a numeric
# key then fails its type check, naming the key). Every other scalar resolves as before (true/false, 1e-6 (a
# string that load_config makes a float), 0x1f, 0b101, 1_000, null, dates).
_YAML_INT = r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"""
_YAML_FLOAT = (r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"""
               r"""|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""")


def _yaml_loader():
    """yaml.SafeLoader that rejects a key repeated in one mapping (yaml keeps the last value, dropping the first
    without a word), with YAML 1.2's reading of leading-zero and colon-separated numbers (_YAML_INT)."""
    import re

    import yaml

    int_re, float_re = re.compile(_YAML_INT), re.compile(_YAML_FLOAT)
    resolvers = {c: [(tag, int_re if tag == "tag:yaml.org,2002:int" else float_re
                      if tag == "tag:yaml.org,2002:float" else r) for tag, r in rs]
                 for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    class UniqueKeyLoader(yaml.SafeLoader):
        yaml_implicit_resolvers = resolvers  # no base-60 ints / floats: `1:30` is a string

        def construct_yaml_int(self, node):
            text = self.construct_scalar(node).replace("_", "")
            digits = text.lstrip("+-")
            if len(digits) > 1 and digits[0] == "0" and digits.isdigit():  # 017: 17, not octal 15
                return int(text, 10)
            return super().construct_yaml_int(node)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                    continue
                k = self.construct_object(key_node, deep=deep)
                try:
                    dup = k in seen
                    seen.add(k)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if dup:
                    raise yaml.constructor.ConstructorError(None, None, f"found duplicate key {k!r}",
                                                            key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)
    return UniqueKeyLoader


def read_file(path: str, key: str, parse, what: str, parse_errors, error=ConfigError):
    """parse(the UTF-8 text file at path); an unreadable file, non-UTF-8 bytes or a parse error (parse_errors)
    is `error` naming the key and the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return parse(fh)
    except OSError as e:
        raise error(f"{key}: cannot read {path}: {e}") from e
    except (UnicodeDecodeError, *parse_errors) as e:
        raise error(f"{key}: {path} is not valid {what}: {e}") from e


CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")  # r1train's DeepSpeed JSONs and recipes


def deepspeed_file(cfg) -> str:
    """The DeepSpeed JSON a run is built from: its `deepspeed` key, else r1train's configs/ds_zero<zero_stage>.json."""
    return cfg.deepspeed or os.path.join(CONFIG_DIR, f"ds_zero{cfg.zero_stage}.json")


def read_deepspeed_config(path: str) -> dict:
    """The `deepspeed` key's JSON file as a dict; a missing or malformed file is a ConfigError naming the key."""
    c = read_file(path, "deepspeed", json.load, "JSON", (json.JSONDecodeError,))
    if not isinstance(c, dict) or not all(isinstance(c.get(k, {}), dict) for k in ("zero_optimization", "bf16")):
        raise ConfigError(f"deepspeed: {path!r} must hold a JSON object of DeepSpeed settings "
                          "(zero_optimization and bf16, if given, objects)")
    stage = c.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: {path!r} sets zero_optimization.stage={stage!r}; it must be 0, 1, 2 or 3")
    return c


def ds_bf16_enabled(cfg, c: dict):
    """DeepSpeed's bf16.enabled for a run built from the `deepspeed` file c (read_deepspeed_config): the file's
    value, or the config's bf16 where the file has "auto" or none. The one rule engine.ds_config fills and
    checkpoint.ds_precision_of reads."""
    v = c.get("bf16", {}).get("enabled", "auto")
    return cfg.bf16 if v == "auto" else v


def check_token_budget(cfg, longest: int, what: str):
    """max_tokens_per_batch (with padding_free) must hold the trainer's longest row, `longest` tokens (`what`
    says whose); packing.build_packs raised on it mid-training. The trainer calls it before any work: the
    config alone does not know whether its rows are GRPO's or SFT's (it calls this when padding_free with a
    budget)."""
    if cfg.max_tokens_per_batch < longest:
        raise ConfigError(f"max_tokens_per_batch must be >= {what} = {longest}, got {cfg.max_tokens_per_batch}")


# a `deepspeed` file's keys that r1train fills from its config ("auto"), and the config keys they come from
DEEPSPEED_FILLED = (("train_micro_batch_size_per_gpu", "per_device_train_batch_size"),
                    ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                    ("gradient_clipping", "max_grad_norm"))


def check_deepspeed_values(cfg, c: dict):
    """A `deepspeed` file's value for a key r1train fills (DEEPSPEED_FILLED, bf16.enabled) must be "auto" or
    equal the config's (as transformers' HfTrainerDeepSpeedConfig.fill_match): DeepSpeed would otherwise run
    with the file's value over the config's (a file's GA 4 with the config's 1 stepped the optimizer every 4th
    micro-batch, none in 3 steps). bf16.enabled=false with bf16=true is allowed: bf16 weights stepped directly
    without DeepSpeed's mixed precision (r1train/configs/ds_zero0_bf16.json). Also, when the config loads (before
    any model): fp16 off, managed_gradient_accumulation absent or true, the optimizer / scheduler sections
    (check_optimizer_sections), and no offload section of
    device "none" under an offload_* key that is on, and train_batch_size against the number of processes
    (check_train_batch_size)."""
    for ds_key, key in DEEPSPEED_FILLED:
        v, want = c.get(ds_key, "auto"), getattr(cfg, key)
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != want):
            raise ConfigError(f"deepspeed: {cfg.deepspeed!r} sets {ds_key}={v!r} but the config has {key}={want!r}; "
                              f"set one of them so they match, or {ds_key} to \"auto\" (filled from {key})")
    v = c.get("bf16", {}).get("enabled", "auto")  # bf16 is an object (read_deepspeed_config)
    if v != "auto" and (not isinstance(v, bool) or (v and not cfg.bf16)):
        raise ConfigError(f"deepspeed: {cfg.deepspeed!r} sets bf16.enabled={v!r} but the config has bf16={cfg.bf16!r}; "
                          "set bf16=true, or bf16.enabled to \"auto\" (filled from bf16) or false (with bf16=true: "
                          "bf16 weights stepped without DeepSpeed's mixed precision)")
    fp16 = c.get("fp16", {})  # transformers fills "auto" from its fp16 key; r1train has none (bf16 or fp32)
    if not isinstance(fp16, dict) or fp16.get("enabled", False) not in (False, "auto"):
        raise ConfigError(f"deepspeed: {cfg.deepspeed!r} sets fp16={fp16!r}; r1train does not support fp16 (loss "
                          "scaling skips optimizer steps): set fp16.enabled to false or \"auto\", and bf16=true for "
                          "16-bit training")
    mga = c.get("managed_gradient_accumulation", True)  # DeepSpeed >= 0.19's unmanaged mode (any falsy value there)
    if not mga:  # makes every engine.step() an optimizer step: r1train calls it after each micro-batch
        raise ConfigError(f"deepspeed: {cfg.deepspeed!r} sets managed_gradient_accumulation={mga!r}; r1train lets "
                          "DeepSpeed place the optimizer step at every gradient_accumulation_steps-th micro-batch "
                          "(unmanaged, each micro-batch would step the optimizer): remove the key or set it to true")
    check_optimizer_sections(cfg, c)
    check_train_batch_size(cfg, c)
    zo = c.get("zero_optimization", {})
    for k in ("offload_optimizer", "offload_param"):  # the key on and the file's section off: which one holds?
        sec = zo.get(k)
        if getattr(cfg, k) and isinstance(sec, dict) and str(sec.get("device", "cpu")).lower() == "none":
            raise ConfigError(f"deepspeed: {cfg.deepspeed!r} sets zero_optimization.{k}.device='none' but the config "
                              f"has {k}=true; set {k}=false, or the file's device to cpu")


def launch_world_size() -> int:
    """The number of training processes before any process group: the launcher's WORLD_SIZE (torchrun, the
    deepspeed launcher and accelerate set it before the process starts; engine.setup_distributed sets 1 where
    there is none, and the process group takes it from there)."""
    w = os.environ.get("WORLD_SIZE", "1")
    if not w.strip().isdigit() or int(w) < 1:
        raise ConfigError(f"WORLD_SIZE={w!r} in the environment: the launcher's number of processes must be an "
                          "integer >= 1")
    return int(w)


def check_train_batch_size(cfg, c: dict):
    """DeepSpeed's train_batch_size is micro-batch x gradient accumulation x processes (the process group's, else
    the launch's: launch_world_size): a `deepspeed` file's must be "auto" or that product (transformers'
    fill_match); another value was dropped silently (a file written for another world size). Checked when the
    config loads, before any model: the file's micro-batch and accumulation are "auto" or the config's
    (check_deepspeed_values), so the product is the config's."""
    tbs = c.get("train_batch_size", "auto")
    if tbs == "auto":
        return
    mb, ga = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    import torch.distributed as dist  # a group made before the config (mp.spawn, a notebook) has its own size

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launch_world_size()
    if isinstance(tbs, bool) or not isinstance(tbs, (int, float)) or tbs != mb * ga * world:
        raise ConfigError(f"deepspeed: {cfg.deepspeed!r} sets train_batch_size={tbs!r} but train_micro_batch_size_"
                          f"per_gpu x gradient_accumulation_steps x processes = {mb} x {ga} x {world} = "
                          f"{mb * ga * world} (per_device_train_batch_size, gradient_accumulation_steps); set "
                          "train_batch_size to \"auto\" or drop it")


def check_optimizer_sections(cfg, c: dict):
    """r1train builds the optimizer (`optim`, learning_rate, adam_*, weight_decay) and the schedule
    (lr_scheduler_type, warmup_ratio) itself, and DeepSpeed takes those over a file's `optimizer` / `scheduler`
    sections: a section's value that would not hold was ignored silently. An optimizer section may stay with
    AdamW and its params "auto" or equal to the config's (transformers' fill_match); a scheduler section is an
    error (DeepSpeed's schedules are not lr_scheduler_type's)."""
    if c.get("scheduler") is not None:
        raise ConfigError(f"deepspeed: {cfg.deepspeed!r} has a scheduler section, which r1train does not run (its "
                          "schedule is lr_scheduler_type and warmup_ratio); remove it and set those keys")
    o = c.get("optimizer")
    if o is None:
        return
    if not isinstance(o, dict) or not isinstance(o.get("params", {}), dict):
        raise ConfigError(f"deepspeed: {cfg.deepspeed!r}: optimizer must be an object (with a params object)")
    if str(o.get("type", "AdamW")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"deepspeed: {cfg.deepspeed!r} sets optimizer.type={o.get('type')!r}; r1train's optimizer "
                          "is AdamW of the `optim` key; remove the optimizer section")
    want = {"lr": ("learning_rate", cfg.learning_rate), "betas": ("adam_beta1, adam_beta2",
                                                                   [cfg.adam_beta1, cfg.adam_beta2]),
            "eps": ("adam_epsilon", cfg.adam_epsilon), "weight_decay": ("weight_decay", cfg.weight_decay)}
    for k, v in o.get("params", {}).items():
        key, w = want.get(k, (None, None))
        if v == "auto" or (key is not None and not isinstance(v, bool) and
                           (list(v) if isinstance(v, (list, tuple)) else v) == w):
            continue
        raise ConfigError(f"deepspeed: {cfg.deepspeed!r} sets optimizer.params.{k}={v!r}"
                          + (f" but the config has {key}={w!r}; set one of them so they match, or {k} to \"auto\""
                             if key else "; r1train's optimizer does not take it (set through the `optim` key and "
                             "learning_rate, adam_beta1/2, adam_epsilon, weight_decay); remove it"))


def check_offload(cfg, stage: int):
    """The offload keys against the ZeRO stage they need (from zero_stage or the `deepspeed` file)."""
    if cfg.offload_optimizer and stage < 1:
        raise ConfigError(f"offload_optimizer needs ZeRO stage 1, 2 or 3 (zero_stage), got stage {stage}")
    if cfg.offload_param and stage != 3:
        raise ConfigError(f"offload_param needs ZeRO stage 3 (zero_stage=3), got stage {stage}")


# values another trainer's config takes under the same key (a TRL SFTConfig ported as is)
CHOICE_HINTS = {("loss_type", "nll"): " (loss_type is GRPO's key; SFT always minimizes the NLL, TRL SFTConfig's "
                                      "loss_type=nll: leave it unset for sft)"}


def check_grpo_batch(cfg: TrainConfig):
    """GRPO compares each prompt's G >= 2 completions, kept on one rank: the per-rank batch must hold whole
    groups (`r1train sample` may draw one completion a prompt)."""
    n, G = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps, cfg.num_generations
    if G < 2:
        raise ConfigError(f"num_generations must be >= 2 for group advantages, got {G}")
    if n % G:
        raise ConfigError(f"num_generations: per_device_train_batch_size * gradient_accumulation_steps = {n} must "
                          f"be a multiple of num_generations = {G} (each prompt's G completions stay on one rank)")


def check_reward_weights(cfg: TrainConfig):
    """GRPO with the config's reward_funcs (the CLI, the recipe's stages): one reward_weights entry per function.
    Functions given in code (GRPOTrainer(reward_funcs=...)) are counted there instead (TRL's rule)."""
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.reward_funcs):
        raise ConfigError(f"reward_weights has {len(cfg.reward_weights)} entries but reward_funcs has "
                          f"{len(cfg.reward_funcs)}")


def check_grpo_config(cfg: TrainConfig):
    """A GRPO config whose reward functions are its reward_funcs (the CLI's grpo, the recipe's and the demo's
    grpo sections), checked before a model loads: whole groups per rank, one reward_weights entry each, a token
    budget that holds the longest GRPO row."""
    check_grpo_batch(cfg)
    check_reward_weights(cfg)
    if cfg.padding_free and cfg.max_tokens_per_batch is not None:
        check_token_budget(cfg, *grpo_longest_row(cfg))


def grpo_longest_row(cfg) -> tuple[int, str]:
    """(tokens, what): a GRPO row's most tokens, prompt + completion."""
    return cfg.max_prompt_length + cfg.max_completion_length, \
        "max_prompt_length + max_completion_length (the longest GRPO row)"


# the ops every trainer calls with backend=kernel_backend
_TRAIN_OPS = ("token_logprobs", "linear_token_logprobs", "grpo_loss", "linear_grpo_loss")


def _check_backend(backend: str):
    """kernel_backend=triton/cuda/cpp must have the trainer's kernels and be able to run them here."""
    if backend in ("auto", "torch"):
        return
    import torch

    from r1kernels import _backend

    missing = _backend.lacking(_TRAIN_OPS, backend)
    if missing:
        raise ConfigError(f"kernel_backend={backend!r}: r1kernels has no {backend} kernel for "
                          f"{', '.join(missing)}; use auto, triton or torch")
    if backend == "triton":
        if not _backend.HAS_TRITON:
            raise ConfigError("kernel_backend='triton': triton is not installed; use auto or torch")
        if not torch.cuda.is_available() and not _backend.TRITON_INTERPRET:
            raise ConfigError("kernel_backend='triton': no CUDA device here, and Triton runs on CPU only "
                              "with TRITON_INTERPRET=1 (slow); use auto or torch")


def fields():
    return dataclasses.fields(TrainConfig)


_HINTS = None


def check_type(x: dataclasses.Field, v):
    global _HINTS
    _HINTS = _HINTS or typing.get_type_hints(TrainConfig)
    t = _HINTS[x.name]
    opt = typing.get_origin(t) is Union and type(None) in typing.get_args(t)
    base = [a for a in typing.get_args(t) if a is not type(None)][0] if opt else t
    if v is None:
        if not opt:
            raise ConfigError(f"{x.name}: None is not allowed (expected {base.__name__})")
        return
    ok = {bool: lambda: isinstance(v, bool), int: lambda: isinstance(v, int) and not isinstance(v, bool),
          float: lambda: isinstance(v, (int, float)) and not isinstance(v, bool), str: lambda: isinstance(v, str),
          list: lambda: isinstance(v, list), dict: lambda: isinstance(v, dict)}[base]()
    if not ok:
        raise ConfigError(f"{x.name}: expected {base.__name__}, got {type(v).__name__} {v!r}")
    if base is list:
        test, what = LIST_ITEMS[x.metadata["items"]]
        for i, item in enumerate(v):
            if not test(item):
                raise ConfigError(f"{x.name} must be a list of {what}s, got {v!r} (item {i}: {type(item).__name__} "
                                  f"{item!r})")
    choices = x.metadata.get("choices")
    if choices is not None and v not in choices:
        hint = CHOICE_HINTS.get((x.name, v), "")
        raise ConfigError(f"{x.name}: {v!r} is not one of {choices}{hint}")
    if base is dict and not all(isinstance(k, str) for k in v):
        raise ConfigError(f"{x.name} must be a dict with string keys, got {v!r}")


def parse_override(x: dataclasses.Field, raw: str):
    """Parse a command-line value with YAML rules (so 1e-5, true, [a, b] work), then type-check. A string
    key's value is its text as typed (stripped): YAML only removes quotes around it, and null / ~ / nothing
    is None."""
    import yaml

    t = typing.get_type_hints(TrainConfig)[x.name]
    text = raw.strip()
    if (t is str or t == Optional[str]) and not (len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""):
        # not YAML's reading: `a #b` would be `a`, `2024-01-01` a date, `@x` an error
        return None if text in ("", "~", "null", "Null", "NULL") else text
    try:
        v = yaml.load(raw, Loader=_yaml_loader()) if raw != "" else None  # the config file's reading of numbers
    except yaml.YAMLError as e:
        raise ConfigError(f"{x.name}: cannot parse {raw!r}: {e}") from e
    if v is not None and not isinstance(v, str) and (t is str or t == Optional[str]):
        v = raw  # a quoted string that YAML does not read as a string
    if isinstance(v, int) and not isinstance(v, bool) and (t is float or t == Optional[float]):
        v = float(v)
    if isinstance(v, str) and (t is list or t == Optional[list]):
        v = _split(v)
    return v


def _split(v: str) -> list:
    return [s.strip() for s in v.split(",") if s.strip()]


STAGES = ("sft", "grpo", "rejection", "grpo2", "distill")


# Keys only some commands read. One YAML may hold every stage's keys, so `sft`, `grpo`, `sample` and `distill` warn
# (warn_unread_keys) about a key of another command's set away from its default, and go on.
SFT_ONLY_KEYS = frozenset(("max_length", "completion_only_loss", "completion_column"))
# besides checkpoint.GRPO_ONLY_RUN_KEYS: GRPO's rollouts and rewards (SFT's evaluation samples at eval_temperature)
GRPO_ONLY_KEYS = frozenset(("temperature", "language", "reward_timeout", "rollout_release_memory", "log_completions"))
OTHER_COMMANDS_KEYS = frozenset(("rejection_num_samples", "rejection_max_per_prompt",  # pipeline's rejection stage
                                 "teacher_model",  # distill
                                 "adapter_path",  # merge
                                 "task_slip_share", "task_mix_share"))  # the demo's stages
# of the keys above, those `sample` reads: num_generations samples a prompt at temperature (rollout.sample_rows),
# scored by reward_funcs (rewards.RewardRunner: reward_timeout; the language and overlong rewards' keys)
SAMPLE_READS = frozenset(("num_generations", "temperature", "reward_funcs", "reward_timeout", "language",
                          "overlong_buffer_len"))
# of the keys above, those `distill` reads beside SFT's: the teacher's rejection sampling (pipeline.rejection_sample
# at temperature, its language filter)
DISTILL_READS = frozenset(("teacher_model", "rejection_num_samples", "rejection_max_per_prompt", "temperature",
                           "language"))


def unread_keys(command: str, cfg) -> list[str]:
    """The keys of cfg that `command` (sft, grpo, sample or distill) never reads, set away from their defaults."""
    from .checkpoint import GRPO_ONLY_RUN_KEYS

    grpo = GRPO_ONLY_RUN_KEYS | GRPO_ONLY_KEYS
    never = {"sft": OTHER_COMMANDS_KEYS | grpo,
             "grpo": OTHER_COMMANDS_KEYS | SFT_ONLY_KEYS,
             "sample": (OTHER_COMMANDS_KEYS | SFT_ONLY_KEYS | grpo) - SAMPLE_READS,
             "distill": (OTHER_COMMANDS_KEYS | grpo) - DISTILL_READS}[command]
    default = TrainConfig()
    return [k for k in vars(cfg) if k in never and getattr(cfg, k) != getattr(default, k)]


def warn_unread_keys(command: str, cfg):
    """One warning (rank 0) naming unread_keys(command, cfg) with their values; the run goes on."""
    unread = unread_keys(command, cfg)
    if unread and launch_rank() == 0:
        logging.getLogger("r1train").warning(
            "`r1train %s` does not read %s: they have no effect on this run", command,
            ", ".join(f"{k}={getattr(cfg, k)!r}" for k in unread))


def launch_rank() -> int:
    """This process's rank: torch.distributed's once initialized, else the launcher's RANK (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def read_config_file(path: str) -> dict:
    """The --config YAML file's top-level mapping, as written (load_config checks its keys and values)."""
    import yaml

    data = read_file(path, "--config", lambda fh: yaml.load(fh, Loader=_yaml_loader()) or {}, "YAML",
                     (yaml.YAMLError,))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def load_config(path: Optional[str] = None, overrides=(), section: Optional[str] = None, **defaults) -> TrainConfig:
    """defaults (code) < YAML top level < YAML `section:` block < key=value overrides. Validated."""
    names = {x.name: x for x in fields()}
    values = dict(defaults)
    if path:
        data = read_config_file(path)
        for k, v in data.items():
            if not isinstance(k, str):  # YAML reads `1:` as an int key
                raise ConfigError(f"{path}: {_unknown(str(k))}")
            if k in STAGES:
                if not isinstance(v, dict):
                    raise ConfigError(f"{path}: section {k!r} must be a mapping")
                for kk in v:  # every section's keys, used by this command or not
                    if kk not in names:
                        raise ConfigError(f"{path}: section {k!r}: {_unknown(str(kk))}")
                if k == section:
                    values.update({f"__sec__{kk}": vv for kk, vv in v.items()})
            else:
                values[k] = v
        values = {k: v for k, v in values.items() if not k.startswith("__sec__")} | {
            k[7:]: v for k, v in values.items() if k.startswith("__sec__")}
    for item in overrides:
        k, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r}: expected key=value")
        if k.strip() not in names:
            raise ConfigError(_unknown(k.strip()))
        values[k.strip()] = parse_override(names[k.strip()], raw)
    for k in values:
        if k not in names:
            raise ConfigError(_unknown(k))
    hints = typing.get_type_hints(TrainConfig)
    for k, v in values.items():  # `reward_funcs: accuracy,format` in YAML works as on the command line
        if hints[k] in (list, Optional[list]) and isinstance(v, str):
            values[k] = _split(v)
        elif hints[k] in (list, Optional[list]) and isinstance(v, (int, float)) and not isinstance(v, bool):
            values[k] = [v]  # reward_weights=2 with one reward
        elif hints[k] == Optional[dict] and isinstance(v, str):  # TRL: a dict key given as JSON text
            try:
                values[k] = json.loads(v)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{k}: expected a dict or its JSON text, got {v!r} ({e})") from None
    sr = values.get("scale_rewards")  # TRL also accepts True / False
    if isinstance(sr, bool) or str(sr).lower() in ("true", "false"):
        values["scale_rewards"] = "group" if str(sr).lower() == "true" else "none"
    rc = values.get("resume_from_checkpoint")  # HF Trainer's True (the newest checkpoint) / False (no resume)
    if isinstance(rc, bool) or (isinstance(rc, str) and rc.lower() in ("true", "false") and not os.path.isdir(rc)):
        values["resume_from_checkpoint"] = "latest" if str(rc).lower() == "true" else None
    if isinstance(values.get("reward_weights"), list):  # [1, 0.5] from key=value or YAML
        values["reward_weights"] = [_num(w, "reward_weights") for w in values["reward_weights"]]
    values = {k: _as_type(k, v, hints[k]) for k, v in values.items()}
    return TrainConfig(**values).validate()


# transformers' string_to_bool (HfArgumentParser's type of a bool key), case-insensitive
_BOOL_TEXT = {"yes": True, "true": True, "t": True, "y": True, "1": True,
              "no": False, "false": False, "f": False, "n": False, "0": False}


def _as_type(key: str, v, hint):
    """A string value of an int / float / bool key read as TRL reads it: TrlParser makes a YAML config's values
    argparse defaults, and argparse reads a string default through the key's type as it reads the command line
    (int(), float(), string_to_bool). So `seed: 018` and `seed: '42'` (strings to YAML 1.1) are 18 and 42,
    `learning_rate: 1e-5` is 1e-05, `bf16: y` is True; text the type does not read is a ConfigError naming the
    key. An int for a float key is that float, and 0 / 1 for a bool key False / True (string_to_bool's "0" /
    "1"). Every other value is left to check_type."""
    base = {Optional[int]: int, Optional[float]: float, Optional[bool]: bool}.get(hint, hint)
    if base not in (int, float, bool) or v is None or isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return _BOOL_TEXT[v.strip().lower()] if base is bool else base(v)
        except (KeyError, ValueError):
            raise ConfigError(f"{key}: expected {base.__name__}, got str {v!r}") from None
    if isinstance(v, int) and base is float:
        return float(v)
    if isinstance(v, int) and base is bool and v in (0, 1):
        return bool(v)
    return v


def _num(v, key):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            raise ConfigError(f"{key}: {v!r} is not a number") from None
    return v


def _unknown(k: str) -> str:
    import difflib

    close = difflib.get_close_matches(k, [x.name for x in fields()], n=3)
    return f"unknown config key {k!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
