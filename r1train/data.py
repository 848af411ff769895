"""Datasets and collators. A dataset is a list of dict rows with a `prompt` column (a list of chat
messages {"role", "content"} or a plain string) plus any other columns (e.g. `answer`), which reward
functions receive by name. Sources: the built-in task ('arith'), .jsonl / .json / .parquet files, or a
Hugging Face dataset (name, saved directory or directory of data files; needs `datasets`). Bad rows raise
DatasetError with the row index and the reason.
"""

from __future__ import annotations

import json
import logging
import os

import torch

log = logging.getLogger("r1train")


class DatasetError(ValueError):
    pass


def validate_rows(rows: list, source: str, required=("prompt",)) -> list[dict]:
    if not rows:
        raise DatasetError(f"{source}: the dataset has no rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DatasetError(f"{source}: row {i}: expected an object with a 'prompt' column, got {type(r).__name__}")
        for col in required:
            if col not in r:
                raise DatasetError(f"{source}: row {i}: missing column {col!r} (has {sorted(r)})")
            if r[col] is None:  # e.g. a parquet / datasets row without the value: its schema fills in None
                raise DatasetError(f"{source}: row {i}: column {col!r} is null (None)")
        p = r["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise DatasetError(f"{source}: row {i}: 'prompt' is an empty string")
        elif isinstance(p, list):
            if not p:
                raise DatasetError(f"{source}: row {i}: 'prompt' is an empty message list")
            for j, m in enumerate(p):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                        m.get("content"), str):
                    raise DatasetError(f"{source}: row {i}: prompt message {j} must be "
                                       f"{{'role': str, 'content': str}}, got {m!r}")
        else:
            raise DatasetError(f"{source}: row {i}: 'prompt' must be a string or a list of chat messages, "
                               f"got {type(p).__name__}")
    return rows


def _json_lines(path, lines) -> list:
    """The rows of JSON Lines (one JSON value a line; blank lines skipped), lines as text or as UTF-8 bytes; a
    bad line (not UTF-8, not JSON) is a DatasetError naming its row and line."""
    rows = []
    for i, line in enumerate(lines):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}: row {len(rows)} (line {i + 1}): not UTF-8 text: {e.reason} at byte "
                                   f"{e.start} of the line") from e
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: row {len(rows)} (line {i + 1}): invalid JSON: {e.msg}") from e
    return rows


def _read_jsonl(path):
    with open(path, "rb") as fh:
        return _json_lines(path, fh)


def _read_json(path, key):
    """A .json file's rows, read once: a JSON list of rows, or JSON Lines (one object a line, which datasets'
    json loader reads from .json files too; a one-object file is one row)."""
    from .config import read_file

    def parse(fh):
        text = fh.read()
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:  # a second value after the first: JSON Lines
            if e.msg == "Extra data" and text.lstrip().startswith("{"):
                return _json_lines(path, text.split("\n"))
            raise
        return [rows] if isinstance(rows, dict) else rows

    rows = read_file(path, key, parse, "JSON", (json.JSONDecodeError,), error=DatasetError)
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of rows or JSON Lines (one object a line)")
    return rows


def load_rows(name: str, split: str = "train", required=("prompt",), key: str = "dataset",
              split_key: str = "dataset_split") -> list[dict]:
    """Rows of a .jsonl/.json/.parquet file or a Hugging Face dataset, validated. key: the config key that named
    it, split_key the one that named the split, for the errors (DatasetError naming the key and the file)."""
    if name.endswith((".jsonl", ".json", ".parquet")) and not os.path.isfile(name):
        raise DatasetError(f"{key}: dataset file {name!r} does not exist")
    if name.endswith(".jsonl"):
        rows = _read_jsonl(name)
    elif name.endswith(".json"):
        rows = _read_json(name, key)
    elif name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DatasetError(f"{name}: reading parquet needs pyarrow (pip install pyarrow)") from e
        try:
            rows = pq.read_table(name).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DatasetError(f"{key}: {name} is not a readable parquet file: {e}") from e
    elif os.path.isfile(name):  # datasets.load_dataset(file) finds "no data file" there: name the formats
        raise DatasetError(f"{key}: {name!r} is a file of a format r1train does not read: use a .jsonl, .json or "
                           ".parquet file, or a directory of data files (e.g. train.csv) that datasets.load_dataset "
                           "reads")
    else:
        try:
            import datasets
        except ImportError as e:
            raise DatasetError(f"{key}: {name!r} is not a .jsonl/.json/.parquet file and `datasets` is not "
                               "installed (pip install datasets)") from e
        # a directory saved by datasets (save_to_disk) or one of data files (train.jsonl, data/test-*.parquet, ...)
        # that datasets.load_dataset reads, as TRL's scripts do (load_dataset(dataset_name))
        saved = os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f))
                                            for f in ("dataset_dict.json", "state.json"))
        try:
            ds = datasets.load_from_disk(name) if saved else datasets.load_dataset(name)
        except Exception as e:  # datasets raises FileNotFoundError, ConnectionError, ValueError, its own errors
            what = "a directory saved by datasets (save_to_disk)" if saved else \
                "a directory saved by datasets (save_to_disk) or of data files for datasets.load_dataset (e.g. " \
                "train.jsonl, test.jsonl)" if os.path.isdir(name) else \
                "a Hugging Face dataset name (from the Hub or its cache)"
            raise DatasetError(f"{key}: cannot load {name!r} as {what}: {type(e).__name__}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetError(f"{key}: dataset {name!r}: no split {split!r} (has {list(ds)}; {split_key} "
                                   "names the split)")
            ds = ds[split]
        rows = list(ds)
    return validate_rows(rows, f"{key}={name!r}", required)  # errors name the key and the file


def reward_columns(rows, repeats: int, answer_column: str) -> dict:
    """The dataset columns reward functions receive, each row's value repeated for its `repeats` samples:
    every column but `prompt` under its own name (rewards.RewardRunner forwards those TRL forwards), and
    `answer` = the values of `answer_column` (what the accuracy reward reads; evaluation reads the same column)."""
    names = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "prompt"]
    cols = {k: [r.get(k) for r in rows for _ in range(repeats)] for k in names}
    if answer_column in cols:
        cols["answer"] = cols[answer_column]
    return cols


def prompt_text(tok, prompt, **template_kwargs) -> str:
    """Chat messages through the tokenizer's chat template (with the generation prompt; template_kwargs, e.g.
    tools, passed on to it); strings as is."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tok, "chat_template", None) is None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
    return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **template_kwargs)


def rendered_prompts(tok, prompts, chat_template_kwargs, n: int = 1) -> list[str]:
    """Each prompt as sampling renders it (prompt_text with GRPO's template keywords, grpo_template_kwargs), each
    repeated n times (one per completion): the rewards' prompts_text (rewards.PROMPTS_TEXT)."""
    kw = grpo_template_kwargs(tok, prompts, chat_template_kwargs)
    return [t for p in prompts for t in [prompt_text(tok, p, **kw)] * n]


def prompt_ids(tok, prompt, **template_kwargs) -> list[int]:
    """A prompt's token ids as TRL 1.16's GRPOTrainer encodes them: a string with the tokenizer's defaults
    (processing_class(text=prompts): add_special_tokens=True, e.g. a Llama tokenizer's BOS); chat messages
    through the chat template (with the generation prompt; template_kwargs passed on) without extra special
    tokens (the template has them). With no chat template, messages are rendered as plain text and encoded as
    a string is."""
    return _text_ids(tok, prompt, prompt_text(tok, prompt, **template_kwargs))


def _text_ids(tok, prompt, text: str) -> list[int]:
    """The ids of `text`, prompt's rendering (prompt_text): extra special tokens only for a string prompt or a
    tokenizer with no chat template (a template has its own)."""
    templated = not isinstance(prompt, str) and getattr(tok, "chat_template", None) is not None
    return tok(text, add_special_tokens=not templated)["input_ids"]


_warned_truncation: set = set()  # max_prompt_length values already warned about in this process


def keep_prompt_tail(ids: list, max_prompt_length: int) -> list:
    """A GRPO prompt's last max_prompt_length tokens (SFT cuts no prompt: sft_tokens); the first cut prompt of a
    process logs a warning that names the key (TRL 1.16 cuts no prompt: a cut drops a system message or the start
    of a chat template unseen)."""
    if len(ids) > max_prompt_length and max_prompt_length not in _warned_truncation:
        _warned_truncation.add(max_prompt_length)
        log.warning("a prompt of %d tokens keeps its last max_prompt_length=%d (its start, e.g. a system message, "
                    "is dropped; this warning is shown once): raise max_prompt_length to keep whole prompts",
                    len(ids), max_prompt_length)
    return ids[-max_prompt_length:]


# keywords the prompt and SFT renderings set themselves: chat-template keywords may not set them (TRL: a TypeError)
OWN_TEMPLATE_KEYS = ("add_generation_prompt", "tokenize", "return_dict")


def grpo_template_kwargs(tok, prompts, chat_template_kwargs) -> dict:
    """The chat-template keywords of GRPO's prompts: the trainer-level chat_template_kwargs (TRL 1.16 GRPOConfig's
    key, passed to every conversational prompt's rendering; string prompts are encoded without them). TRL's
    GRPOTrainer reads no per-row `tools` / `chat_template_kwargs` column for its prompts (they reach the reward
    functions as columns). None: none. Not a dict, a keyword the rendering sets itself, or keywords with chat
    prompts and a tokenizer with no chat template (r1train's plain rendering would drop them unseen): a
    DatasetError naming chat_template_kwargs."""
    if chat_template_kwargs is None:
        return {}
    if not isinstance(chat_template_kwargs, dict):
        raise DatasetError(f"chat_template_kwargs must be a dict of chat-template keywords, got "
                           f"{type(chat_template_kwargs).__name__}")
    clash = [k for k in OWN_TEMPLATE_KEYS if k in chat_template_kwargs]
    if clash:
        raise DatasetError(f"chat_template_kwargs sets {clash}, which the prompt rendering sets itself")
    if chat_template_kwargs and getattr(tok, "chat_template", None) is None and any(
            isinstance(p, list) for p in prompts):
        raise DatasetError("chat_template_kwargs is passed to the chat template, and the tokenizer has none (set "
                           "tokenizer.chat_template)")
    return chat_template_kwargs


def encode_prompts(tok, prompts, max_prompt_length: int, chat_template_kwargs: dict | None = None):
    """Left-padded prompt ids/mask [B, P] (prompt_ids; chat prompts rendered with chat_template_kwargs:
    grpo_template_kwargs); longer prompts keep their last max_prompt_length tokens."""
    return encode_rendered_prompts(tok, prompts, max_prompt_length, chat_template_kwargs)[:2]


def encode_rendered_prompts(tok, prompts, max_prompt_length: int, chat_template_kwargs: dict | None = None):
    """(ids, mask, texts): encode_prompts' ids and mask and each prompt's rendering they were encoded from (the
    whole text, before max_prompt_length's cut: what rendered_prompts gives), rendered once."""
    kw = grpo_template_kwargs(tok, prompts, chat_template_kwargs)
    texts = [prompt_text(tok, p, **kw) for p in prompts]
    ids, mask = left_pad([keep_prompt_tail(_text_ids(tok, p, t), max_prompt_length) for p, t in zip(prompts, texts)],
                         tok.pad_token_id)
    return ids, mask, texts


def left_pad(seqs, pad_id):
    P = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, P - len(s):] = torch.tensor(s)
            mask[i, P - len(s):] = 1
    return ids, mask


def right_pad(seqs, pad_id):
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def decode_completions(tok, rollout) -> list[str]:
    """Completion texts up to (not including) the first eos: any id of the rollout's eos_ids (those it was
    sampled with, e.g. the model's end-of-turn token) or the tokenizer's eos; pad ids are dropped. Special
    tokens such as the R1 tags are kept."""
    eos = {tok.eos_token_id, *getattr(rollout, "eos_ids", ())}
    out = []
    for ids, m in zip(rollout.completion_ids_BT.tolist(), rollout.completion_mask_BT.tolist()):
        keep = []
        for t in (t for t, k in zip(ids, m) if k):
            if t in eos:
                break
            if t != tok.pad_token_id:
                keep.append(t)
        out.append(tok.decode(keep, skip_special_tokens=False))
    return out


def common_prefix_length(a: list, b: list) -> int:
    """The count of leading ids a and b share (TRL's common_prefix_length)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_completion(prompt_ids: list, full: list) -> tuple[list, list, list]:
    """(context, completion, left out) of a prompt + completion row tokenized whole (full) and its prompt alone
    (prompt_ids), as TRL 1.16's SFTTrainer splits them: the completion starts where the two diverge. Left out:
    the prompt's ids past that point (none when prompt_ids is a prefix of full), which the row trains without."""
    n = common_prefix_length(prompt_ids, full)
    return full[:n], full[n:], prompt_ids[n:]


_warned_not_prefix = False  # whether this process has warned of a prompt that is not a prefix (warn_not_prefix)


def warn_not_prefix(tok, i, left_out: list):
    """The first SFT row of a process whose tokenized prompt is not a prefix of its tokenized prompt + completion
    (TRL 1.16's SFTTrainer warns once too) logs a warning naming the row and the prompt's end the row trains
    without."""
    global _warned_not_prefix
    if left_out and not _warned_not_prefix:
        _warned_not_prefix = True
        log.warning("SFT row %d: the tokenized prompt is not a prefix of the tokenized prompt + completion (the chat "
                    "template renders the prompt alone unlike its start in prompt + completion, or tokens merge "
                    "across the prompt/completion boundary); the completion starts where they diverge, and the "
                    "prompt's end %r is not in the row the model trains on, so it trains on a context unlike the one "
                    "it is prompted with. Shown once; other rows likely share it. Render the prompt alike in both, "
                    "or end the prompt on a token boundary", i, tok.decode(left_out, skip_special_tokens=False))


class TokenCache(dict):
    """Token ids of prompts and completions already encoded: SFT revisits its rows every epoch, and encoding
    (chat template + tokenizer) was 9% of the demo's SFT step. Holds at most max_entries texts' ids, and as
    many decoded JSON texts (json_value)."""

    def __init__(self, tok, max_entries: int = 1 << 16):
        super().__init__()
        self.tok, self.max_entries = tok, max_entries
        self.json_values = {}  # JSON text -> its value (rows' `tools` text); at most max_entries, beside the ids

    def json_value(self, text: str):
        """text's JSON value, decoded once per text and shared: its users only read it (sft_template_kwargs)."""
        if text in self.json_values:
            return self.json_values[text]
        v = json.loads(text)
        if len(self.json_values) < self.max_entries:
            self.json_values[text] = v
        return v

    def _get(self, key, encode):
        ids = self.get(key)
        if ids is None:
            ids = encode()
            if len(self) < self.max_entries:
                self[key] = ids
        return ids

    def prompt(self, prompt, template_kwargs: dict | None = None) -> list[int]:
        kw = template_kwargs or {}
        return self._get(("prompt", repr(prompt), repr(kw)), lambda: prompt_ids(self.tok, prompt, **kw))

    def string_row(self, prompt: str, completion: str) -> tuple[list, list, list]:
        """A string row's (prompt ids, completion ids, left out) as TRL 1.16's SFTTrainer tokenizes them: the
        completion + the eos token's text (unless it ends with it), prompt and prompt + completion each encoded
        with the tokenizer's defaults (e.g. a BOS), split by split_completion."""
        def encode():
            eos = self.tok.eos_token or ""
            full = self.tok(prompt + completion + ("" if completion.endswith(eos) else eos))["input_ids"]
            return split_completion(self.tok(prompt)["input_ids"], full)
        return self._get(("string_row", prompt, completion), encode)

    def chat_row(self, prompt: list, completion: list, template_kwargs: dict | None = None) -> tuple[list, list, list]:
        """A conversational row's (prompt ids, completion ids, left out) as TRL 1.16's SFTTrainer tokenizes them:
        the chat template of prompt + completion split (split_completion) by the prompt's rendering with the
        generation prompt (every completion message is trained on, the template's end-of-turn tokens included);
        both renderings get template_kwargs (the row's tools and chat_template_kwargs: sft_template_kwargs). With
        no chat template, the messages as plain text (prompt_text's rendering) + eos."""
        kw = template_kwargs or {}

        def encode():
            tok = self.tok
            if getattr(tok, "chat_template", None) is None:
                full = with_eos(tok, tok(prompt_text(tok, prompt + completion)[:-len("assistant: ")])["input_ids"])
            else:
                full = list(tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True,
                                                    **kw)["input_ids"])
            return split_completion(prompt_ids(tok, prompt, **kw), full)
        return self._get(("chat_row", repr(prompt), repr(completion), repr(kw)), encode)

    def text(self, text: str) -> list[int]:
        return self._get(("text", text), lambda: self.tok(text, add_special_tokens=False)["input_ids"])


def with_eos(tok, ids: list) -> list:
    """ids + the tokenizer's eos id, unless they end with it or the tokenizer has none (as the eos text TRL's
    SFTTrainer adds to a string completion: none is added where it already ends with it)."""
    eos = tok.eos_token_id
    return ids if eos is None or ids[-1:] == [eos] else ids + [eos]


def check_sft_completion(row, i, completion_column: str):
    """Row i's completion: a string, or (with a message-list prompt) a non-empty list of messages
    ({"role": str, "content": str}); anything else is a DatasetError naming the row and the column."""
    if completion_column not in row:  # not "got None", which reads as a null value
        raise DatasetError(f"SFT row {i}: missing column {completion_column!r} (has {sorted(row)})")
    c = row[completion_column]
    if isinstance(c, str):
        return c
    if not isinstance(c, list):
        raise DatasetError(f"SFT row {i}: column {completion_column!r} must be a string or a list of messages, "
                           f"got {c!r}")
    if not c or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                        for m in c):
        raise DatasetError(f"SFT row {i}: column {completion_column!r} must be a non-empty list of messages "
                           f'{{"role": str, "content": str}}, got {c!r}')
    if not isinstance(row.get("prompt"), list):
        raise DatasetError(f"SFT row {i}: a conversational {completion_column!r} (a list of messages) needs a "
                           f"conversational prompt (a list of messages), got prompt {row.get('prompt')!r}")
    return c


def sft_template_kwargs(tok, row, i, cache: TokenCache | None = None) -> dict:
    """Row i's chat-template keywords, as TRL 1.16's SFTTrainer reads them from a conversational row: its `tools`
    column (a list of tool schemas, or their JSON text as datasets may store it) and its `chat_template_kwargs`
    column (a dict, e.g. {"enable_thinking": false}), passed to the template when the row's prompt and
    prompt + completion are rendered. Absent or None: none. A bad value, or either column with a tokenizer that
    has no chat template to render it (r1train's plain rendering would drop it unseen), is a DatasetError naming
    the row and the column. A cache decodes each `tools` text once (cache.json_value)."""
    tools, extra = row.get("tools"), row.get("chat_template_kwargs")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if cache is None else cache.json_value(tools)
        except json.JSONDecodeError as e:
            raise DatasetError(f"SFT row {i}: column 'tools' is text that is not JSON: {e.msg}") from e
    if tools is not None and not isinstance(tools, list):
        raise DatasetError(f"SFT row {i}: column 'tools' must be a list of tool schemas (or its JSON text), "
                           f"got {type(tools).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise DatasetError(f"SFT row {i}: column 'chat_template_kwargs' must be a dict, got {type(extra).__name__}")
    kw = {**({"tools": tools} if tools is not None else {}), **(extra or {})}  # TRL: the row's kwargs win
    clash = [k for k in OWN_TEMPLATE_KEYS if k in kw]
    if clash:
        raise DatasetError(f"SFT row {i}: column 'chat_template_kwargs' sets {clash}, which SFT's tokenization "
                           "sets itself")
    if (tools or extra) and getattr(tok, "chat_template", None) is None:
        col = "tools" if tools else "chat_template_kwargs"
        raise DatasetError(f"SFT row {i}: column {col!r} is passed to the chat template, and the tokenizer has "
                           "none (set tokenizer.chat_template)")
    return kw


def sft_tokens(tok, row, i, *, completion_column: str, max_length: int, completion_only_loss: bool = True,
               cache: TokenCache | None = None) -> tuple[list, list]:
    """One SFT row's (context ids, scored ids): the whole prompt + completion + eos (string and conversational
    rows tokenized as TRL's SFTTrainer: TokenCache.string_row/chat_row; a conversational row with its tools and
    chat_template_kwargs columns, sft_template_kwargs; a prompt that is not a prefix of prompt + completion is
    warned of once, warn_not_prefix), truncated to the first max_length
    tokens (TRL 1.16 SFT's truncation_mode keep_start; as there, no cut of the prompt alone: max_prompt_length
    is GRPO's). The scored ids are the completion's; with completion_only_loss=false every token after the
    first (TRL: the prompt is scored too). Invariant: len(context) + len(scored) <= max_length. A row left with
    no scored token is a DatasetError naming row i (and max_length where the cut left none; TRL drops it)."""
    cache = TokenCache(tok, 0) if cache is None else cache
    c = check_sft_completion(row, i, completion_column)
    # a conversational prompt is rendered with the row's tools / chat_template_kwargs (TRL: a string one ignores them)
    kw = sft_template_kwargs(tok, row, i, cache) if isinstance(row["prompt"], list) else {}
    if isinstance(c, list):
        p, comp, left_out = cache.chat_row(row["prompt"], c, kw)
    elif isinstance(row["prompt"], str):
        p, comp, left_out = cache.string_row(row["prompt"], c)
    else:  # the completion's ids follow the prompt's: nothing left out
        p, comp, left_out = cache.prompt(row["prompt"], kw), with_eos(tok, cache.text(c)), []
    warn_not_prefix(tok, i, left_out)
    if not p:  # the prompt merged whole into the completion's first token: as in TRL, no token scores the first
        p, comp = comp[:1], comp[1:]
    if (len(comp) if completion_only_loss else len(p) + len(comp) - 1) < 1:  # before any cut: not max_length's doing
        what = "after the prompt" if completion_only_loss else "after the row's first token"
        raise DatasetError(f"SFT row {i}: no token to train on: column {completion_column!r} = {c!r} tokenizes to "
                           f"nothing {what} (the tokenizer's eos token: {tok.eos_token!r})")
    n_prompt = len(p)
    p = p[:max_length]
    comp = comp[:max_length - len(p)]
    if not completion_only_loss:
        p, comp = (p + comp)[:1], (p + comp)[1:]
    if not comp:
        why = (f"its prompt takes {n_prompt} tokens, so max_length={max_length} leaves no completion token to train "
               "on (completion_only_loss=true; TRL's SFTTrainer drops such a row unseen); raise max_length"
               if completion_only_loss else f"max_length={max_length} leaves no token after the first to train on")
        raise DatasetError(f"SFT row {i}: {why}")
    return p, comp


def sft_collate(tok, rows, *, completion_column: str, max_length: int, completion_only_loss: bool = True,
                cache: TokenCache | None = None):
    """(context ids/mask left-padded [B, P], scored ids/mask right-padded [B, T]) of sft_tokens' rows."""
    p_ids, c_ids = zip(*(sft_tokens(tok, r, i, completion_column=completion_column, max_length=max_length,
                                    completion_only_loss=completion_only_loss, cache=cache)
                         for i, r in enumerate(rows))) if rows else ((), ())
    return (*left_pad(p_ids, tok.pad_token_id), *right_pad(c_ids, tok.pad_token_id))
