"""A character-level tokenizer built in code: a real `PreTrainedTokenizerFast` (save_pretrained, chat
template, padding), so the built-in task and user models go through the same code path.

Invariants: every printable ASCII character plus newline is one token; the R1 tags and the role markers
are single special tokens; decode() concatenates with no separators (so decode(encode(s)) == s).
"""

from __future__ import annotations

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL = [PAD, BOS, EOS, UNK] + ROLES + TAGS
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]

# Role markers + content; the assistant turn ends with eos. Generation prompt = "<|assistant|>".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(vocab_size: int | None = None):
    """Build the character-level tokenizer (vocab: 11 special tokens + 96 characters = 107; `vocab_size`
    pads it with unused filler tokens, e.g. to give a benchmark model a real-size vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    vocab.update({f"<|x{i}|>": i for i in range(len(vocab), vocab_size or 0)})
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()  # join with no separator
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=ROLES + TAGS, padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 4096
    return tok
