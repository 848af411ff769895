"""A character-level tokenizer built in code: a real `PreTrainedTokenizerFast` (save_pretrained, chat
template, padding), so the built-in task and user models go through the same code path.

Invariants: every printable ASCII character plus newline (and the two CJK step words of the language
demo) is one token; the R1 tags and the role markers
are single special tokens; decode() concatenates with no separators (so decode(encode(s)) == s).

A saved copy reloads as itself through `AutoTokenizer.from_pretrained(dir)`: the tokenizer is an
`R1CharTokenizer` registered for AutoTokenizer, so save_pretrained writes an `auto_map` entry (and a copy of
this file, for trust_remote_code=True). Without it, transformers >= 5 rebuilds any directory whose model
config says `qwen2` as a byte-level BPE Qwen2Tokenizer, which drops spaces and newlines; with it, the
tokenizer.json is loaded as written (no custom code is run unless trust_remote_code=True).
This file is copied into checkpoints as remote code: keep it free of relative imports.
"""

from __future__ import annotations

import json
import os

from transformers import PreTrainedTokenizerFast

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL = [PAD, BOS, EOS, UNK] + ROLES + TAGS
# the two CJK step words of the language-consistency demo ("add", "subtract") come last
CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\u52a0", "\u51cf"]

# Role markers + content; the assistant turn ends with eos. Generation prompt = "<|assistant|>".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class R1CharTokenizer(PreTrainedTokenizerFast):
    """The character tokenizer's class: no __init__ of its own, so tokenizer.json is always loaded as is."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        # name a transformers class (the auto_map names this one): AutoTokenizer then has local code to load
        # the directory with for every model type, and runs this file only with trust_remote_code=True
        path = os.path.join(save_directory, "tokenizer_config.json")
        with open(path) as fh:
            c = json.load(fh)
        c["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w") as fh:
            json.dump(c, fh, indent=2)
        return out


R1CharTokenizer.register_for_auto_class("AutoTokenizer")


def char_tokenizer(vocab_size: int | None = None):
    """Build the character-level tokenizer (vocab: 11 special tokens + 98 characters = 109; `vocab_size`
    pads it with unused filler tokens, e.g. to give a benchmark model a real-size vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)
                                   or vocab_size < len(vocab)):
        raise ValueError(f"vocab_size must be an int >= {len(vocab)} (the tokenizer's own tokens), got {vocab_size!r}")
    vocab.update({f"<|x{i}|>": i for i in range(len(vocab), vocab_size or 0)})
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()  # join with no separator
    tok = R1CharTokenizer(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=ROLES + TAGS, padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    return tok
