"""Model, tokenizer and dataset loading from a TrainConfig."""

from __future__ import annotations

import logging
import os

import torch

from r1kernels.patch import deepseek_v3 as dsv3

from .config import ConfigError, TrainConfig, task_spec
from .data import DatasetError, load_rows
from .tasks import TINY_MODELS, char_tokenizer, generate, tiny_model


def load_model_and_tokenizer(cfg: TrainConfig, path: str | None = None):
    """A tiny built-in model, or a local Hugging Face directory (e.g. a checkpoint-<step>/): model_name_or_path, or
    `path` (distill's teacher_model, a predecessor's checkpoint). tokenizer_name_or_path is model_name_or_path's
    tokenizer only: a model given as `path` comes with its own (a tiny model's is the character tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok, path, mkey, tkey = _tokenizer_of(cfg, path)
    if path in TINY_MODELS:
        model = tiny_model(path, tok, seed=cfg.seed, hidden_size=cfg.model_hidden_size,
                           num_layers=cfg.model_num_layers)
        return patch_layers(model, cfg), tok
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    except (OSError, ValueError) as e:  # no or unreadable config / weights, an unknown model type
        raise ConfigError(f"{mkey}: cannot load a model from {path!r}: {e}") from e
    n_emb = model.get_input_embeddings().num_embeddings
    if len(tok) > n_emb:  # a token id past the embedding: an IndexError (a device assert on CUDA) mid-run
        raise ConfigError(f"{tkey}: the tokenizer has {len(tok)} tokens, the model's embedding {n_emb} rows; resize "
                          "the model's embeddings (model.resize_token_embeddings(len(tokenizer))) and save it first")
    return patch_layers(model, cfg), tok


def tokenizer_of(cfg: TrainConfig, path: str | None = None):
    """The tokenizer load_model_and_tokenizer(cfg, path) returns, without loading the model (its path is checked
    alike)."""
    return _tokenizer_of(cfg, path)[0]


def _tokenizer_of(cfg: TrainConfig, path: str | None):
    """(tokenizer, model path, the key naming the model, the key naming the tokenizer) of
    load_model_and_tokenizer(cfg, path)."""
    tok_name = cfg.tokenizer_name_or_path if path is None else None
    path = path or cfg.model_name_or_path
    if path in TINY_MODELS:
        tok = char_tokenizer() if tok_name is None else load_tokenizer(tok_name, "tokenizer_name_or_path")
        return tok, path, "model_name_or_path", "tokenizer_name_or_path"
    mkey = ("model_name_or_path" if path == cfg.model_name_or_path else
            "teacher_model" if path == getattr(cfg, "teacher_model", None) else "model directory")
    if not os.path.isdir(path):
        raise ConfigError(f"{mkey}: {path!r} is neither one of {TINY_MODELS} nor a local model "
                          "directory (nothing is downloaded)")
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
            os.path.join(path, "config.json")):
        raise ConfigError(f"{mkey}: {path!r} holds LoRA adapters (adapter_config.json), not a whole model: fold "
                          "them into their base model first (r1train merge model_name_or_path=BASE "
                          f"adapter_path={path} output_dir=OUT)")
    tkey = "tokenizer_name_or_path" if tok_name else mkey
    tok = load_tokenizer(tok_name or path, tkey)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, path, mkey, tkey


def load_tokenizer(name: str, key: str):
    """AutoTokenizer.from_pretrained(name); a name it cannot load is a ConfigError naming the key."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:  # no such directory / repo id, no tokenizer files, unknown tokenizer class
        raise ConfigError(f"{key}: cannot load a tokenizer from {name!r}: {e}") from e


def apply_lora(model, cfg: TrainConfig):
    """The peft LoRA model of cfg's lora_* keys (only the adapters, and lora_modules_to_save, train)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError("use_peft needs peft (pip install peft)") from e
    # peft takes "all-linear" only as a string; TRL's ModelConfig passes a one-item list on as its item (which
    # would make any other name a full-match regex, so only this one is unwrapped: [q_proj] stays a suffix match)
    target = cfg.lora_target_modules
    target = "all-linear" if not target or target == ["all-linear"] else target
    # MoE routers keep no adapter: on transformers 5, peft maps "all-linear" to the v4 names, router ("gate")
    # included, and wraps DeepSeek-V3's router weight (a ParamWrapper), which hides it from the aux-loss-free
    # balancing (moe_load.ExpertLoad would find no router: no bias update, no moe/* metrics). The linear layers'
    # own names target the same modules and expert weights without it.
    routers = len(dsv3.moe_routers(model))
    if routers and target == "all-linear":
        head = model.get_output_embeddings()
        target = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and m is not head})
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    use_rslora=cfg.use_rslora, target_modules=target, modules_to_save=cfg.lora_modules_to_save,
                    task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, lc)
    except ValueError as e:  # e.g. a target module that does not exist
        raise ConfigError(f"lora_target_modules / lora_modules_to_save: {e}") from e
    if len(dsv3.moe_routers(peft_model)) < routers:
        raise ConfigError(f"lora_target_modules={cfg.lora_target_modules}: an adapter on the MoE router (gate) hides "
                          "it from the aux-loss-free load balancing (no bias update); leave the router out")
    return peft_model


def merge_adapters(model):
    """A peft model -> its base model with the adapters folded into the weights (a trained lm_head copy, or an
    adapter on a tied embed_tokens / lm_head, leaves the two untied: each keeps its own adapted weight); any other
    model as it is."""
    import torch

    try:
        from peft import PeftModel
    except ImportError:
        return model
    if not isinstance(model, PeftModel):
        return model
    inner = model.get_base_model()
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    base_emb, base_head = (getattr(m, "get_base_layer", lambda m=m: m)() for m in (emb, head))
    if head is not None and (emb is not base_emb or head is not base_head) and base_head.weight is base_emb.weight:
        # an adapter on a tied embed_tokens or lm_head: merged into the one shared weight, its delta would land on
        # the other module too (peft's merge does; logits ~3 off the adapted model's). Each gets its own weight
        base_head.weight = torch.nn.Parameter(base_head.weight.detach().clone(), requires_grad=False)
        inner.config.tie_word_embeddings = False
    merged = model.merge_and_unload()
    emb, head = merged.get_input_embeddings(), merged.get_output_embeddings()
    if head is not None and head.weight is not emb.weight and getattr(merged.config, "tie_word_embeddings", False):
        merged.config.tie_word_embeddings = False  # lora_modules_to_save=lm_head trained its own copy
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    return merged


# the keys a built-in tiny model's weights come from (tiny_model: its name, seed and sizes)
TINY_BASE_KEYS = ("model_name_or_path", "seed", "model_hidden_size", "model_num_layers")


def _check_tiny_base(cfg: TrainConfig):
    """merge_lora onto a built-in tiny model: its weights are built from TINY_BASE_KEYS, so an adapter trained on
    one built with other values (recorded in the checkpoint's trainer_state.json) would merge into another base,
    silently. A ConfigError naming the key and the value the adapter was trained with."""
    from .checkpoint import read_trainer_state

    if cfg.model_name_or_path not in TINY_MODELS or not os.path.isfile(os.path.join(cfg.adapter_path,
                                                                                   "trainer_state.json")):
        return
    trained = read_trainer_state(cfg.adapter_path).get("config") or {}
    for k in TINY_BASE_KEYS:
        if k in trained and trained[k] != getattr(cfg, k):
            raise ConfigError(f"{k}={getattr(cfg, k)!r}: the adapter at adapter_path={cfg.adapter_path!r} was "
                              f"trained on {trained.get('model_name_or_path')!r} built with {k}={trained[k]!r} (a "
                              f"built-in tiny model's weights come from {', '.join(TINY_BASE_KEYS)}); pass "
                              f"{k}={trained[k]}")


def merge_lora(cfg: TrainConfig) -> str:
    """model_name_or_path + the adapter at adapter_path -> a plain save_pretrained model in output_dir (the
    adapters folded into the weights; a trained lm_head copy stays untied from the embeddings)."""
    from peft import PeftModel

    if not cfg.adapter_path or not os.path.isfile(os.path.join(cfg.adapter_path, "adapter_config.json")):
        raise ConfigError(f"adapter_path: {cfg.adapter_path!r} is not a LoRA checkpoint (no adapter_config.json)")
    _check_tiny_base(cfg)
    base, tok = load_model_and_tokenizer(cfg)
    try:
        adapted = PeftModel.from_pretrained(base, cfg.adapter_path)
    except RuntimeError as e:  # an adapter of another model: peft's "size mismatch for ..." traceback
        raise ConfigError(f"adapter_path={cfg.adapter_path!r} does not fit model_name_or_path="
                          f"{cfg.model_name_or_path!r} (the base the adapter was trained on): {e}") from e
    merged = merge_adapters(adapted)
    os.makedirs(cfg.output_dir, exist_ok=True)
    merged.save_pretrained(cfg.output_dir)
    if hasattr(tok, "save_pretrained"):
        tok.save_pretrained(cfg.output_dir)
    return cfg.output_dir


def enable_activation_checkpointing(model):
    """Non-reentrant activation checkpointing of each decoder layer (transformers' own)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(model).__name__} does not support it; set "
                          "gradient_checkpointing=false")
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def loss_impl_for(model, cfg: TrainConfig, *, log: bool = False) -> str:
    """The loss_impl ("linear" or "logits") a run of `model` trains with: the one place that decides. linear
    scores tokens with log_softmax(s * (hidden @ lm_head.weight.T + bias) / T), r1kernels' fused head kernels at
    temperature T / s (rollout.Policy), where the model's forward multiplies its logits by s (Cohere's logit_scale,
    Granite's 1 / logits_scaling, ...; logit_scaling), soft-capped at c (Gemma 2's final_logit_softcapping) by
    the kernels' softcap: the model's own log-probs. It cannot follow a logit rule r1kernels does not know, an
    lm_head other than a torch.nn.Linear, or a LoRA adapter on lm_head (it reads lm_head.weight). loss_impl=auto
    then takes the model's own logits (one log line says why; with log), else linear; an explicit linear is a
    ConfigError naming loss_impl.
    model None (TrainConfig.validate): only what the config alone rules out; returns cfg.loss_impl."""

    why = scaling = None
    if model is not None:
        import torch

        from r1kernels.patch.lm_head import logit_scaling

        head, scaling = model.get_output_embeddings(), logit_scaling(model)
    if cfg.use_peft and "lm_head" in (cfg.lora_target_modules or []):
        why = ("lora_target_modules puts a LoRA adapter on lm_head, which the fused head kernels do not see (they "
               "read lm_head.weight); use lora_modules_to_save=lm_head")
    elif model is not None and type(head) is not torch.nn.Linear:
        why = (f"{type(model).__name__}'s lm_head is a {type(head).__name__}; the fused head kernels compute a "
               "torch.nn.Linear's output only")
    elif scaling is not None and scaling.unfused_reason is not None:
        why = f"{type(model).__name__}: {scaling.unfused_reason}"
    if cfg.loss_impl == "linear" and why:
        raise ConfigError(f"loss_impl=linear: {why} (its log-probs and loss would be wrong); set loss_impl=logits "
                          "(or auto)")
    if cfg.loss_impl != "auto" or model is None:
        return cfg.loss_impl
    impl = "logits" if why else "linear"
    if log and why:  # [B, T, V] logits per micro-batch: a memory cost the user did not ask for
        logging.getLogger("r1train").warning("loss_impl=auto: logits (the model's own); %s", why)
    elif log:
        kw = scaling.head_kwargs
        how = "".join(f", {k}={v:g}" for k, v in kw.items())  # logit_scale s: scored at temperature / s
        logging.getLogger("r1train").info("loss_impl=auto: linear (r1kernels' fused head kernels, no [B, T, V] logits):"
                                          " %s: %s%s", type(model).__name__, scaling, how)
    return impl


def patch_layers(model, cfg: TrainConfig):
    """rk.patch(model): with patch_model=true DeepseekV3's fused MoE routing and the fused RMSNorm / SiLU-MLP /
    rotary ops of Qwen2, Qwen3, Llama and Mistral (forward and backward; r1kernels/patch/layers.py); by
    default (None) DeepseekV3 on CUDA only. A model patched here (model._r1k_patched: its backend, else None)
    follows each config it is called with -- the recipe hands one model from stage to stage: patched again with
    this cfg's backend, or unpatched (rk.patch.unpatch, the trained values kept) where this cfg patches nothing. A
    model patched by its caller is patched over (wanted) or left as it is."""

    import torch

    from r1kernels.patch import unpatch
    from r1kernels.patch.layers import FUSED_MODEL_TYPES, layers_backend

    # None: DeepseekV3 only, on CUDA. The fused layers are opt-in (patch_model=true) until an H200 A/B in one
    # session decides: with them the step measured 5.17 s against 4.27 s a session earlier, on a host that also
    # ran TRL's host-bound generate 1.5x slower; TRL + the same layers ran 12% faster than TRL in one session.
    types = ("deepseek_v3", *FUSED_MODEL_TYPES) if cfg.patch_model else ("deepseek_v3",)
    want = cfg.patch_model if cfg.patch_model is not None else torch.cuda.is_available()
    want = want and getattr(model.config, "model_type", "") in types
    backend = layers_backend(cfg.kernel_backend)
    done = getattr(model, "_r1k_patched", None)
    if done == (backend if want else None):
        return model
    if not want:  # patched here for an earlier config
        unpatch(model)
        model._r1k_patched = None
        return model
    try:
        import r1kernels as rk

        rk.patch(model, backend=backend)  # a patched model: its backend set
        model._r1k_patched = backend
    except (ImportError, AttributeError, NotImplementedError, ValueError) as e:
        if cfg.patch_model:
            raise
        logging.getLogger("r1train").warning("rk.patch unavailable for this model, using HF modules: %r", e)
    return model


def load_datasets(cfg: TrainConfig, sft: bool = False):
    """(train_rows, eval_rows). For the built-in task, SFT rows carry the (possibly flawed) worked
    solution as `completion`; the held-out rows come from their own seed and no training row repeats one."""
    if cfg.dataset_name == "arith":
        spec = task_spec(cfg)
        try:
            ev = generate(cfg.task_eval_size, cfg.seed + 10_000, spec, distinct=True)
            held_out = frozenset(r["expression"] for r in ev)  # never trained on
            train = generate(cfg.task_train_size, cfg.seed, spec, flaw_share=cfg.task_flaw_share, exclude=held_out)
        except ValueError as e:
            sizes = f"task_train_size={cfg.task_train_size}, task_eval_size={cfg.task_eval_size}"
            raise ConfigError(f"{e} ({sizes})") from e
        if sft:
            for r in train:
                r[cfg.completion_column] = r["solution"]
    else:
        required = ("prompt", cfg.completion_column) if sft else ("prompt",)
        train = load_rows(cfg.dataset_name, cfg.dataset_split, required, key="dataset_name")
        ev = []
    if cfg.eval_dataset_name:  # instead of the built-in task's held-out problems
        ev = load_rows(cfg.eval_dataset_name, cfg.dataset_test_split, key="eval_dataset_name",
                       split_key="dataset_test_split")
    if not sft:
        if "accuracy" in cfg.reward_funcs:  # else None for every sample: no learning signal
            check_answer_column(cfg, train, repr(cfg.dataset_name), "the accuracy reward reads as `answer`")
        check_reward_columns(cfg, train)
    if ev:  # evaluation scores against it: else 0 for every row
        check_answer_column(cfg, ev, f"eval_dataset_name={cfg.eval_dataset_name!r}", "evaluation scores against")
    return train, ev


def check_reward_columns(cfg: TrainConfig, rows, source: str | None = None):
    """Reward functions get every column but rewards.NOT_FORWARDED (TRL's: prompt, completion, completion_ids)
    by name, beside their own arguments (rewards.REWARD_ARGS): a forwarded column of such a name would take the
    argument's place (in TRL a TypeError or silently replaced)."""
    from .rewards import NOT_FORWARDED, REWARD_ARGS

    columns = dict.fromkeys(k for r in rows for k in r)
    clash = [k for k in columns if k in REWARD_ARGS and k not in NOT_FORWARDED]
    where = source or f"dataset_name={getattr(cfg, 'dataset_name', None)!r}"
    if clash:
        raise DatasetError(f"{where}: column(s) {clash} have the name of an argument "
                           f"reward functions receive ({', '.join(REWARD_ARGS)}); rename them")
    answer_column = getattr(cfg, "answer_column", "answer")
    if answer_column != "answer" and "answer" in columns and answer_column in columns:
        logging.getLogger("r1train").warning(
            "%s: reward functions receive `answer` = the answer_column=%r values, in place of the rows' own `answer` "
            "column (data.reward_columns); rename that column to pass it too", where, answer_column)


def check_answer_column(cfg: TrainConfig, rows, source: str, reader: str):
    """Some row of `source` has a gold answer in answer_column (not None, NaN or blank: rewards.has_gold), which
    `reader` reads: else an error naming the key."""
    from .rewards import has_gold

    if not any(has_gold(r.get(cfg.answer_column)) for r in rows):
        cols = sorted(dict.fromkeys(k for r in rows[:100] for k in r))
        there = any(cfg.answer_column in r for r in rows)
        raise DatasetError(f"answer_column={cfg.answer_column!r}: no row of {source} has "
                           f"{'a value (not None, NaN or blank) in ' if there else ''}this column, which {reader} "
                           f"(columns: {cols})")
