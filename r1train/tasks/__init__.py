"""Built-in offline tasks and tiny model/tokenizer factories (the embedded default)."""

from .arith import ArithSpec, generate
from .models import TINY_MODELS, tiny_config, tiny_model
from .tokenizer import char_tokenizer

__all__ = ["ArithSpec", "generate", "TINY_MODELS", "tiny_config", "tiny_model", "char_tokenizer"]
