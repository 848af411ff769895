"""A neural reward model as a reward function, as TRL 1.16's GRPOTrainer runs one (reward_funcs entry = a model).

The model is AutoModelForSequenceClassification.from_pretrained(path, num_labels=1) and its tokenizer
AutoTokenizer.from_pretrained(path) (pad = eos when it has none; the model's pad_token_id follows the tokenizer,
as the head reads the last non-pad token). Each completion is scored on one text: with chat-message prompts the
tokenizer's chat template over prompt + completion messages (tokenize=False), otherwise prompt + completion.
Texts are tokenized with right padding and no added special tokens; the reward is logits[:, 0] under
inference_mode. Right padding under a causal mask leaves every real token's output as if unpadded, so a score
does not depend on batch_size or on the other texts of its batch.

A model object in reward_funcs (TRL takes a PreTrainedModel there) is scored the same way (RewardModel.of_model),
with the tokenizer TRL loads for it, from its config._name_or_path.

A directory is checked without loading weights when the config loads (check_model_dir) and loaded on first use,
on this process's training device; every process scores its own completions (no collectives). The model is not
under DeepSpeed: each process holds a whole copy, never partitioned by ZeRO-3.
"""

from __future__ import annotations

import os
import sys
import threading

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def is_model_dir(name) -> bool:
    """A reward_funcs entry naming a local model directory (one with a config.json)."""
    return isinstance(name, str) and os.path.isfile(os.path.join(name, "config.json"))


def is_model_object(obj) -> bool:
    """A transformers model given as an object (TRL takes a PreTrainedModel in reward_funcs). Without transformers
    imported no object is one."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(obj, tf.PreTrainedModel)


def wraps_model(obj) -> bool:
    """A torch module around a transformers model, not one itself (peft's PeftModel, torch.compile's module): it has
    a transformers config."""
    torch, tf = sys.modules.get("torch"), sys.modules.get("transformers")
    return torch is not None and tf is not None and isinstance(obj, torch.nn.Module) and not is_model_object(obj) \
        and isinstance(getattr(obj, "config", None), tf.PretrainedConfig)


def model_object_name(model) -> str:
    """The name a reward model object logs under: its config._name_or_path's last part (TRL's)."""
    return model_dir_name(model.config._name_or_path)


def check_model_object(model):
    """ConfigError naming reward_funcs unless model is a sequence-classification model with num_labels == 1."""
    from .config import ConfigError

    name = type(model).__name__
    if not name.endswith("ForSequenceClassification"):
        raise ConfigError(f"reward_funcs: a {name} object is no reward model: a reward model is a "
                          "sequence-classification model with num_labels=1 "
                          "(AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)), or its directory")
    if model.config.num_labels != 1:
        raise ConfigError(f"reward_funcs: reward model {name} (config._name_or_path "
                          f"{model.config._name_or_path!r}) has num_labels={model.config.num_labels}; a reward model "
                          "gives one score per text (num_labels=1)")


def model_dir_name(path: str) -> str:
    """The name a reward model logs under: its directory's basename (TRL: config._name_or_path's last part)."""
    return os.path.basename(os.path.normpath(path))


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def declared_labels(raw: dict, config) -> int | None:
    """The labels config.json declares (an id2label or a num_labels of its own), None where it declares none: such
    a config gets transformers' default of 2 when it loads, while TRL (and RewardModel) load the model with
    num_labels=1, which fits a one-output head (transformers itself saves a 2-label config so: head_mismatch)."""
    return config.num_labels if "id2label" in raw or "num_labels" in raw else None


def safetensors_files(path: str) -> list[str]:
    """The directory's safetensors weight files (the shards an index names), [] when it has none."""
    import json

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(path, f) for f in shards]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def head_mismatch(path: str, config) -> str | None:
    """The first saved tensor whose shape differs from the num_labels=1 model's (a head saved for more labels),
    read from the safetensors headers (the model built on the meta device: no weights read or allocated); None
    when every tensor fits or the weights are not safetensors (loading compares them then)."""
    import copy

    import torch
    from safetensors import SafetensorError, safe_open
    from transformers import AutoModelForSequenceClassification

    try:
        files = safetensors_files(path)
        if not files:
            return None
        one = copy.deepcopy(config)
        one.num_labels = 1
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(one)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for f in files:
            with safe_open(f, "pt") as st:
                for k in st.keys():
                    got = tuple(st.get_slice(k).get_shape())
                    if k in want and got != want[k]:
                        return f"{k} has shape {got}, a one-label model's {want[k]}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):  # loading reports these
        return None
    return None


def check_model_dir(path: str):
    """ConfigError naming reward_funcs and path unless path holds weights and a config of a model type with a
    sequence-classification head, that declares one label (or none, and its weights fit one: head_mismatch), of a
    model saved as no causal LM (its `architectures`). Reads config.json and the safetensors headers only."""
    import json

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from .config import ConfigError

    if not os.path.isdir(path):
        raise ConfigError(f"reward_funcs: reward model {path!r} is not a directory")
    try:
        config = AutoConfig.from_pretrained(path)
        with open(os.path.join(path, "config.json")) as fh:
            raw = json.load(fh)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:  # unreadable or malformed config.json
        raise ConfigError(f"reward_funcs: cannot read a reward model's config from {path!r}: {e}") from e
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ConfigError(f"reward_funcs: reward model {path!r} is a {config.model_type!r} model, which has no "
                          "sequence-classification head (AutoModelForSequenceClassification)")
    n = declared_labels(raw, config)
    if n is not None and n != 1:
        raise ConfigError(f"reward_funcs: reward model {path!r} has num_labels={n}; a reward model gives one score "
                          "per text (a sequence-classification model with num_labels=1)")
    archs = raw.get("architectures") or []
    if archs and all(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in archs):
        raise ConfigError(f"reward_funcs: reward model {path!r} was saved as a causal LM ({', '.join(archs)}); a "
                          "reward model is a sequence-classification model with num_labels=1 "
                          "(AutoModelForSequenceClassification)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
        raise ConfigError(f"reward_funcs: reward model {path!r} has no weights (none of {', '.join(WEIGHT_FILES)})")
    bad = head_mismatch(path, config) if n is None else None
    if bad:  # transformers saves no id2label for its default of 2 labels
        raise ConfigError(f"reward_funcs: reward model {path!r} declares no labels and its weights hold more than "
                          f"one ({bad}): it has num_labels=2; a reward model gives one score per text (a "
                          "sequence-classification model with num_labels=1)")


def training_device():
    """This process's training device: cuda:LOCAL_RANK when CUDA is available, else the CPU. Read from the
    environment, not torch.cuda.current_device(): a reward thread starts on CUDA device 0 whatever the rank."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


class RewardModel:
    """reward_funcs entry for a sequence-classification model directory (or, through of_model, a model object):
    __call__(prompts, completions, **_) -> one float per completion. device None: the training device; dtype None:
    the checkpoint's (transformers' "auto"; a model object's own); resolve() passes bfloat16 when the run trains in
    bf16, as TRL 1.16 scores in bf16 then (its DeepSpeed engine casts the reward model's weights; without
    DeepSpeed, bf16 autocast); batch_size: texts per forward."""

    def __init__(self, path: str, device=None, dtype=None, batch_size: int = 32, chat_template_kwargs=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.device, self.dtype, self.batch_size = path, device, dtype, batch_size
        self.chat_template_kwargs = chat_template_kwargs or {}  # TRL renders reward-model texts with GRPO's
        self.__name__ = model_dir_name(path)
        self.model = self.tokenizer = None
        self._given = None  # of_model's model object: scored instead of loading one from path
        self._lock = threading.Lock()  # one load, also when a timed-out call's thread is still running

    @classmethod
    def of_model(cls, model, **kw) -> RewardModel:
        """The entry for a sequence-classification model object with num_labels=1 (TRL 1.16 takes a PreTrainedModel
        in reward_funcs), scored as a directory's model is. Its tokenizer is TRL's,
        AutoTokenizer.from_pretrained(model.config._name_or_path), loaded now: a ConfigError naming reward_funcs
        when there is none there (a model built from a config, or saved without its tokenizer). On first use the
        model itself moves to the device (and to dtype when one is given) and to eval mode, in place (as TRL's
        accelerator / DeepSpeed preparation does)."""
        check_model_object(model)
        rm = cls(model.config._name_or_path, **kw)
        rm._given = model
        rm.tokenizer = rm._load_tokenizer()
        return rm

    def __repr__(self):
        if self._given is not None:
            return f"RewardModel({type(self._given).__name__} of {self.path!r})"
        return f"RewardModel({self.path!r})"

    def load(self):
        """Load the model and tokenizer once (ConfigError naming reward_funcs and the path if they cannot be)."""
        with self._lock:
            if self.model is None:
                self._load()
        return self

    def _what(self) -> str:
        """The reward model as its errors name it."""
        if self._given is not None:
            return f"reward_funcs: reward model {type(self._given).__name__} (config._name_or_path {self.path!r})"
        return f"reward_funcs: reward model {self.path!r}"

    def _load_tokenizer(self):
        """The tokenizer at path, padding with eos when it has no pad token (TRL's)."""
        from .config import ConfigError
        from .loading import load_tokenizer

        tok = load_tokenizer(self.path, self._what())
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise ConfigError(f"{self._what()}: its tokenizer has neither a pad nor an eos token to pad batches "
                                  "with")
            tok.pad_token = tok.eos_token
        return tok

    def _load_model(self):
        """The directory's model, in dtype (the checkpoint's when None); every weight from the checkpoint."""
        from transformers import AutoModelForSequenceClassification

        from .config import ConfigError

        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.path, num_labels=1, dtype=self.dtype or "auto", output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:  # unreadable or mismatched weights
            raise ConfigError(f"reward_funcs: cannot load reward model {self.path!r}: {e}") from e
        if info.get("missing_keys"):  # a head or layer initialized at random would score noise
            raise ConfigError(f"reward_funcs: reward model {self.path!r} has no weights for "
                              f"{sorted(info['missing_keys'])[:4]}: not a trained sequence-classification model")
        return model

    def _load(self):
        import torch

        from .config import ConfigError

        if self._given is None:
            check_model_dir(self.path)
        tok = self.tokenizer if self.tokenizer is not None else self._load_tokenizer()
        model = self._load_model() if self._given is None else self._given
        n_emb = model.get_input_embeddings().num_embeddings
        if len(tok) > n_emb:  # a token id past the embedding would fail every call
            raise ConfigError(f"{self._what()}: its tokenizer has {len(tok)} tokens, its embedding {n_emb} rows")
        model.config.get_text_config().pad_token_id = tok.pad_token_id
        self.device = torch.device(self.device) if self.device is not None else training_device()
        if self._given is not None and self.dtype is not None:
            model = model.to(self.dtype)
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
