"""A neural reward model as a reward function, as TRL 1.16's GRPOTrainer runs one (reward_funcs entry = a model).

The model is AutoModelForSequenceClassification.from_pretrained(path, num_labels=1) and its tokenizer
AutoTokenizer.from_pretrained(path) (pad = eos when it has none; the model's pad_token_id follows the tokenizer,
as the head reads the last non-pad token). Each completion is scored on one text: with chat-message prompts the
tokenizer's chat template over prompt + completion messages (tokenize=False), otherwise prompt + completion.
Texts are tokenized with right padding and no added special tokens; the reward is logits[:, 0] under
inference_mode. Right padding under a causal mask leaves every real token's output as if unpadded, so a score
does not depend on batch_size or on the other texts of its batch.

A directory is checked without loading weights when the config loads (check_model_dir) and loaded on first use,
on this process's training device; every process scores its own completions (no collectives). The model is not
under DeepSpeed: each process holds a whole copy, never partitioned by ZeRO-3.
"""

from __future__ import annotations

import os
import threading

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_model_dir(name) -> bool:
    """A reward_funcs entry naming a local model directory (one with a config.json)."""
    return isinstance(name, str) and os.path.isfile(os.path.join(name, "config.json"))


def model_dir_name(path: str) -> str:
    """The name a reward model logs under: its directory's basename (TRL: config._name_or_path's last part)."""
    return os.path.basename(os.path.normpath(path))


def check_model_dir(path: str):
    """ConfigError naming reward_funcs and path unless path holds weights and a config of a model type with a
    sequence-classification head and num_labels == 1. Reads config.json only."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from .config import ConfigError

    if not os.path.isdir(path):
        raise ConfigError(f"reward_funcs: reward model {path!r} is not a directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:  # unreadable or malformed config.json
        raise ConfigError(f"reward_funcs: cannot read a reward model's config from {path!r}: {e}") from e
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ConfigError(f"reward_funcs: reward model {path!r} is a {config.model_type!r} model, which has no "
                          "sequence-classification head (AutoModelForSequenceClassification)")
    if config.num_labels != 1:
        raise ConfigError(f"reward_funcs: reward model {path!r} has num_labels={config.num_labels}; a reward model "
                          "gives one score per text (a sequence-classification model with num_labels=1; a causal "
                          "LM's directory is not one)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise ConfigError(f"reward_funcs: reward model {path!r} has no weights (none of {', '.join(WEIGHT_FILES)})")


def training_device():
    """This process's training device: cuda:LOCAL_RANK when CUDA is available, else the CPU. Read from the
    environment, not torch.cuda.current_device(): a reward thread starts on CUDA device 0 whatever the rank."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


class RewardModel:
    """reward_funcs entry for a sequence-classification model directory: __call__(prompts, completions, **_) ->
    one float per completion. device None: the training device; dtype None: the checkpoint's (transformers'
    "auto"); resolve() passes bfloat16 when the run trains in bf16, as TRL 1.16 scores in bf16 then (its
    DeepSpeed engine casts the reward model's weights; without DeepSpeed, bf16 autocast); batch_size: texts per
    forward."""

    def __init__(self, path: str, device=None, dtype=None, batch_size: int = 32, chat_template_kwargs=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.device, self.dtype, self.batch_size = path, device, dtype, batch_size
        self.chat_template_kwargs = chat_template_kwargs or {}  # TRL renders reward-model texts with GRPO's
        self.__name__ = model_dir_name(path)
        self.model = self.tokenizer = None
        self._lock = threading.Lock()  # one load, also when a timed-out call's thread is still running

    def __repr__(self):
        return f"RewardModel({self.path!r})"

    def load(self):
        """Load the model and tokenizer once (ConfigError naming reward_funcs and the path if they cannot be)."""
        with self._lock:
            if self.model is None:
                self._load()
        return self

    def _load(self):
        import torch
        from transformers import AutoModelForSequenceClassification

        from .config import ConfigError
        from .loading import load_tokenizer

        check_model_dir(self.path)
        tok = load_tokenizer(self.path, f"reward_funcs: reward model {self.path!r}")
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ConfigError(f"reward_funcs: reward model {self.path!r}: its tokenizer has neither a pad nor an "
                                  "eos token to pad batches with")
            tok.pad_token = tok.eos_token
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.path, num_labels=1, dtype=self.dtype or "auto", output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:  # unreadable or mismatched weights
            raise ConfigError(f"reward_funcs: cannot load reward model {self.path!r}: {e}") from e
        if info.get("missing_keys"):  # a head or layer initialized at random would score noise
            raise ConfigError(f"reward_funcs: reward model {self.path!r} has no weights for "
                              f"{sorted(info['missing_keys'])[:4]}: not a trained sequence-classification model")
        n_emb = model.get_input_embeddings().num_embeddings
        if len(tok) > n_emb:  # a token id past the embedding would fail every call
            raise ConfigError(f"reward_funcs: reward model {self.path!r}: its tokenizer has {len(tok)} tokens, its "
                              f"embedding {n_emb} rows")
        model.config.get_text_config().pad_token_id = tok.pad_token_id
        self.device = torch.device(self.device) if self.device is not None else training_device()
        self.model, self.tokenizer = model.to(self.device).eval().requires_grad_(False), tok

    def texts(self, prompts, completions) -> list[str]:
        """The text each completion is scored on (TRL's), by its own prompt's format (a dataset may mix them):
        chat messages through the chat template, a string prompt + completion."""
        from .rewards import as_trl_completions, is_chat_prompt

        completions = as_trl_completions(prompts, completions)
        chat = [is_chat_prompt(p) for p in prompts]
        if any(chat) and self.tokenizer.chat_template is None:
            raise ValueError(f"reward model {self.path!r}: chat-message prompts need a chat template, and its "
                             "tokenizer has none")
        return [self.tokenizer.apply_chat_template(p + c, tokenize=False, **self.chat_template_kwargs) if is_chat
                else p + c
                for p, c, is_chat in zip(prompts, completions, chat)]

    def __call__(self, prompts, completions, **_) -> list[float]:
        import torch

        self.load()
        texts, out = self.texts(prompts, completions), []
        with torch.inference_mode():  # thread-local: set in the thread that runs the forward
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     padding_side="right", add_special_tokens=False).to(self.device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out
