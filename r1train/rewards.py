"""Rule rewards with TRL's signature, a registry, and a runner that survives bad reward functions.

Signature: f(prompts, completions, completion_ids, **columns) -> list[float | None]; may be async.
None means "not applicable" (counts as 0 in the weighted sum beside another reward's value, left out of
that function's mean, as TRL); a completion for which every reward returns None is unscorable: as in TRL,
left out of its group's mean and std and of the logged reward, advantage 0. A function that raises or runs
past the timeout is logged and counted; the affected samples are marked failed and the trainer treats them
as unscorable and gives them zero loss weight; the run goes on unless every sample of a step failed
(RewardError naming the reward). A return value that is not one finite float or None per completion is a
RewardError at once, and so is a value beyond float32's range (TRL's reward table is float32). After a
chat-message prompt its completion is passed as TRL does: [{"role": "assistant", "content": text}]. The dataset
columns are passed by name, all but `prompt`, `completion` and `completion_ids` (NOT_FORWARDED, as TRL); a function
that names `prompts_text` also gets the rendered generation prompts (PROMPTS_TEXT; TRL passes none). Each
call gets its own copies of the prompts, completions and columns it can take (TRL's rows are fresh per
completion); this module's rewards, which only read them, get them uncopied. Calls run in
daemon threads, an async function's awaited on one event loop of its own for the process's life (TRL keeps one):
a hung call is abandoned at the timeout and never keeps the process alive.
A reward_funcs entry naming a local model directory, or a transformers model object, is a neural reward model
(reward_model.RewardModel, TRL's sequence-classification reward), loaded before its first timed call.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import importlib
import inspect
import json
import logging
import math
import numbers
import os
import pickle
import re
import threading
import weakref
from fractions import Fraction

from .reward_model import (
    RewardModel,
    check_model_dir,
    is_model_dir,
    is_model_object,
    model_dir_name,
    model_object_name,
    wraps_model,
)

log = logging.getLogger("r1train.rewards")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)
_TAGS = re.compile(r"</?(?:think|answer)>")
# A generation prompt that ends by opening the thought ("<think>", maybe whitespace after it: the chat templates of
# DeepSeek-R1-Distill and of Qwen3's thinking models end theirs with "<think>\n") makes the model's completion start
# inside the thought, without the tag. TRL 1.16's think_format_reward requires the completion itself to open with
# <think> (^<think>(?!.*<think>)...) and its trainer passes reward functions only the prompts as given (chat messages,
# not their rendering), so it scores 0 under such templates (huggingface/trl#6966). The rule here: where the rendered
# prompt (prompts_text, else a text prompt itself) ends with this, the rewards that read the thought score the
# prompt's tail + the completion; a completion that opens <think> again then holds two and is not the format.
# Prompts without it score their completions as they are. The <answer> rewards read the completion alone.
# A prompt that ends with an empty closed thought ("<think>\n\n</think>\n\n": Qwen3's template with
# enable_thinking=False) is read the same way: the template wrote the thought, the completion should answer; a
# completion that opens <think> again holds two thoughts (not the format), and the thought has no words.
_PREFILL = re.compile(r"<think>\s*(?:</think>\s*)?\Z")
# a word: one Han character (Chinese has no spaces between words) or a run of other letters
_WORD = re.compile(r"[\u4e00-\u9fff]|[^\W\d_\u4e00-\u9fff]+")
# digits grouped in threes by "," or " " (1,000 / 1 000 000.5): the only commas and spaces a number may hold
_GROUPED = re.compile(r"[-+]?\d{1,3}(?:([, ])\d{3})(?:\1\d{3})*(?:\.\d*)?")
_MAX_EXPONENT = 400  # 1e400 is a number; 1e999999999 would build a 10**999999999 fraction (a hung reward)


def _content_text(content) -> str:
    """A message's content as text: a string, None (no text), or a list of parts [{"type": "text", "text": ...}]."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content
                       if isinstance(p, dict) and p.get("type", "text") == "text")
    return str(content)


def completion_text(c) -> str:
    """A completion as text: plain string or TRL conversational [{"role": "assistant", "content": ...}]. Of a
    conversational completion the FIRST message is read, as TRL's own rewards do (completion[0]["content"] in
    trl.rewards): a multi-message completion (assistant turn, tool result, ...) scores its first turn in both.
    A missing completion (None, no messages, None content) is "" -- never the text "None" for the rewards to
    score."""
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and not c:
        return ""
    if isinstance(c, list) and isinstance(c[0], dict):
        return _content_text(c[0].get("content"))
    return str(c)


def _prefill(prompt) -> str:
    """The "<think>" (and its trailing whitespace; or an empty closed thought) that a rendered prompt ends with, or
    "" (a chat-message prompt, unrendered, or None: none known)."""
    m = _PREFILL.search(prompt) if isinstance(prompt, str) else None
    return m.group(0) if m else ""


def thought_texts(prompts, completions, prompts_text=None) -> list[str]:
    """Each completion's text as the rewards that read its thought score it: after a prompt that ends by opening
    the thought (_PREFILL), that tail + the completion; else the completion alone. prompts_text: the rendered
    prompts, one per completion (what RewardRunner passes); without it a text prompt is its own rendering."""
    rendered = prompts_text if prompts_text is not None else prompts
    if rendered is None:
        return [completion_text(c) for c in completions]
    _one_per_completion(PROMPTS_TEXT if prompts_text is not None else "prompts", rendered, completions)
    return [_prefill(p) + completion_text(c) for p, c in zip(rendered, completions)]


def extract_answer(text: str) -> str | None:
    """Content of the last <answer>...</answer>, or None when there is none."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def _as_number(s: str) -> Fraction | None:
    """s as an exact number (an integer, decimal, a/b, or scientific notation, maybe in $...$ or \\boxed{}), or None.
    Commas and spaces inside it count only as thousands separators: "2,3" and "1 5" are not numbers."""
    s = s.strip().strip("$").strip()
    m = re.fullmatch(r"\\boxed\{(.*)\}", s)
    s = m.group(1).strip() if m else s
    s = re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", s)  # "- 5", "1 / 2": spaces not between two digits
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "").replace(" ", "")
    e = re.search(r"[eE]([-+]?\d+)$", s)
    if e and abs(int(e.group(1))) > _MAX_EXPONENT:
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _numbers_match(p: Fraction, g: Fraction) -> bool:
    """An integer gold answer is matched exactly (off by one is wrong however large the answer); any other
    number within a relative 1e-6 (decimals rounded by the model or the dataset)."""
    if g.denominator == 1:
        return p == g
    return abs(p - g) <= Fraction(1, 10**6) * max(abs(p), abs(g))


# LaTeX text commands around a word answer: MATH's golds write \text{(C)}, \text{Monday}
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")


def _unwrapped(s: str) -> str:
    """s without the $...$ and \\boxed{} around it, in either order ($\\boxed{...}$, \\boxed{$...$})."""
    for _ in range(2):
        s = s.strip().strip("$").strip()
        m = re.fullmatch(r"\\boxed\{(.*)\}", s)
        s = m.group(1).strip() if m else s
    return s


def _normalized_text(x: str) -> str:
    """Case- and whitespace-insensitive text, without $...$, \\boxed{}, LaTeX text commands (\\text{Monday} is
    "Monday") or a final full stop ("Paris." is "Paris"); a choice letter in parentheses is the letter ("(C)")."""
    x = _unwrapped(" ".join(x.split()))  # on one line: a \boxed{} spanning lines is unwrapped too
    x = " ".join(_TEXT_CMD.sub(r"\1", x).lower().split()).rstrip(".。").rstrip()
    m = re.fullmatch(r"\(([a-z])\)", x)
    return m.group(1) if m else x


# LaTeX spellings of a number: \$5 (an escaped dollar sign), \frac{a}{b} (and \dfrac, \tfrac), 10\,000 / 10{,}000 /
# 10,\!000 (thousands separators), a leading "x =" / "answer:"
_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\{\s*([-+]?\d+)\s*\}\{\s*(\d+)\s*\}$")
_LEAD = re.compile(r"^(?:[A-Za-z]\w*\s*=|answer\s*[:=]|\\text\{[^}]*\}\s*[:=]?)\s*", re.I)


def _latex_number(s: str) -> Fraction | None:
    """_as_number of s after its LaTeX spellings of a number (above) are undone; None when s is not a number
    literal (an expression such as "7+5-7+8" is not: its value is what the question asks for)."""
    s = _LEAD.sub("", _unwrapped(s))
    s = s.replace("\\$", "").replace("\\!", "").replace("{,}", ",").strip().rstrip(".").strip()
    s = re.sub(r"(?<=\d)\\,(?=\d{3})", ",", s)  # 10\,000: a thin space between digit groups
    m = _FRAC.fullmatch(s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    return _as_number(s)


# math-verify (sympy) evaluates powers and factorials exactly, in C code that holds the GIL, so RewardRunner's
# timeout cannot stop it: an exponent or factorial operand this large, or a nested power, is not sent to it
# (2^{2^{40}}, 10^{999999999} and 99999999999! each ran past 20 s)
_POW = r"(?:\^|\*\*)"
_COSTLY = re.compile(rf"{_POW}\s*\{{[^{{}}]*{_POW}|{_POW}\s*[\w.]+\s*{_POW}|{_POW}\s*\{{?\s*[-+]?\d{{4,}}"
                     r"|\d{4,}\s*!|[})\]]\s*!")
# an answer is math (sent to math-verify) when it has a digit, an operator, a bracket or a LaTeX command; a word
# or phrase is not: math-verify reads bare letters as a product of symbols ("listen" = "silent")
_MATHLIKE = re.compile(r"[\d\\^_=+\-*/()\[\]{}<>]")


# a binary arithmetic operation (a power too: 2^3 for 8): a numeric gold answer's question asks for its value
# ("What is 7+5-7+8?" answered "7+5-7+8" is the question, not its answer)
_ARITH = re.compile(r"[\d)}\]]\s*(?:[-+*/×÷·^]|\*\*)\s*[\d(\\{]|\\(?:times|cdot|div)\b")


# a numeric gold answer's prediction that states no single value, which math-verify would still read one number of:
# sign clutter ('--3', '3-', '+-3'), an equation with a number left of '=' ('13=12'), two numbers ('13\n12',
# '12 \approx 13'; a root's index \sqrt[3]{..} is not counted)
_SIGNS = re.compile(r"[-+]\s*[-+]|[-+]\s*$")
_ROOT_INDEX = re.compile(r"\\sqrt\s*\[[^\]]*\]")


def _no_single_value(pred: str) -> bool:
    if _SIGNS.search(pred) or re.search(r"\d", pred.rpartition("=")[0]):
        return True
    return len(re.findall(r"\d+(?:\.\d+)?", _ROOT_INDEX.sub("", pred))) > 1


def answers_match(pred: str, gold: str) -> bool:
    """A numeric gold answer (_latex_number) is matched by a number literal equal to it (_numbers_match), or by a
    form math-verify finds equal (\\sqrt{4} for 2) that is not an arithmetic operation (_ARITH) and states one value
    (_no_single_value: '--3', '13=12', '13\\n12' do not). Other answers
    match when math-verify (if installed) finds them equivalent -- both being math (_MATHLIKE), the prediction not
    too costly to evaluate (_COSTLY) -- or when they are equal as normalized text."""
    g = _latex_number(gold)
    if g is not None:
        p = _latex_number(pred)
        if p is not None:
            return _numbers_match(p, g)
        if _ARITH.search(pred) or _no_single_value(pred):
            return False
    if _MATHLIKE.search(pred) and _MATHLIKE.search(gold) and not _COSTLY.search(pred) and _math_verify(pred, gold):
        return True
    return _normalized_text(pred) == _normalized_text(gold)


def _math_verify(pred: str, gold: str) -> bool | None:
    """math-verify's verdict, or None when it is not installed or fails. Its signal-based timeouts only
    work in the main thread and rewards run in worker threads, so they are switched off."""
    try:
        import math_verify
    except ImportError:
        return None
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": RewardRunner has one
    try:
        # bare answers (the <answer> content) need math delimiters for math-verify's LaTeX extraction
        # (an escaped \$ is a dollar sign, not a delimiter)
        gold, pred = (x if re.search(r"(?<!\\)\$", x) or "\\boxed" in x else f"${x}$" for x in (gold, pred))
        try:
            g, p = math_verify.parse(gold, parsing_timeout=None), math_verify.parse(pred, parsing_timeout=None)
            return bool(math_verify.verify(g, p, timeout_seconds=None))
        except TypeError:  # an older math-verify without the timeout switches
            return bool(math_verify.verify(math_verify.parse(gold), math_verify.parse(pred)))
    except Exception:  # noqa: BLE001 -- any parser failure falls back to the text comparison
        return None


def has_gold(gold) -> bool:
    """A row's gold answer is missing when it is None, NaN (pandas' missing value) or blank text (an empty
    <answer> must never match it), or a list (of accepted answers) of none."""
    if isinstance(gold, (list, tuple)):
        return any(has_gold(a) for a in gold)
    if gold is None or (isinstance(gold, numbers.Real) and not isinstance(gold, numbers.Rational)
                        and math.isnan(gold)):  # also numpy's float32 NaN (not a float subclass)
        return False
    return str(gold).strip() != ""


def _one_per_completion(name: str, values, completions, hint: str = "give one per completion"):
    """A per-row column holds one value per completion: zip would silently score only a prefix."""
    if len(values) != len(completions):
        raise ValueError(f"{name}: {len(values)} values for {len(completions)} completions; {hint}")


# the rewards this module made that never change their arguments: RewardRunner passes them the caller's objects,
# uncopied. By identity: an attribute would reach a user's functools.wraps wrapper of one (update_wrapper copies
# __dict__), whose own code may change them
_READS_ONLY = weakref.WeakSet()


def _reads_only(fn):
    _READS_ONLY.add(fn)
    return fn


@_reads_only
def accuracy_reward(prompts, completions, completion_ids=None, answer=None, **_):
    """1.0 if the <answer> matches the `answer` column (see answers_match; a list of accepted answers: any of
    them), 0.0 if not or if there is no <answer>, None if the row has no gold answer (None, blank, or a list of
    none)."""
    golds = answer if answer is not None else [None] * len(completions)
    _one_per_completion("answer", golds, completions)
    out = []
    for c, gold in zip(completions, golds):
        # a list (or tuple) of accepted answers: any of them (its text "['5', 'five']" matched none)
        accepted = [str(a) for a in (gold if isinstance(gold, (list, tuple)) else [gold]) if has_gold(a)]
        if not accepted:
            out.append(None)
            continue
        pred = extract_answer(completion_text(c))
        out.append(1.0 if pred is not None and any(answers_match(pred, a) for a in accepted) else 0.0)
    return out


@_reads_only
def format_reward(prompts, completions, completion_ids=None, prompts_text=None, **_):
    """1.0 for exactly <think>...</think><answer>...</answer> (whitespace around allowed), else 0.0: each of the
    four tags once, in that order (a second <answer>, or a tag inside the other's body, is not the format). After a
    prompt that opens the thought (_PREFILL) the completion is scored with that <think> before it (thought_texts)."""
    out = []
    for text in thought_texts(prompts, completions, prompts_text):
        once = _TAGS.findall(text) == ["<think>", "</think>", "<answer>", "</answer>"]
        out.append(1.0 if once and _FORMAT.match(text) else 0.0)
    return out


def _in_language(word: str, language: str) -> bool:
    if language == "en":
        return word.isascii()
    if language == "zh":
        return all("\u4e00" <= ch <= "\u9fff" for ch in word)
    raise ValueError(f"language: unsupported {language!r} (use 'en' or 'zh')")


@_reads_only
def language_consistency_reward(prompts, completions, completion_ids=None, language="en", prompts_text=None, **_):
    """R1: share of chain-of-thought words (inside <think>, else the whole text, tags left out; each Chinese
    character a word) in the target language: `language` ('en' or 'zh'), or one per completion (a dataset column
    of that name, as TRL passes columns). None when the chain of thought has no words (e.g. pure arithmetic).
    After a prompt that opens the thought (_PREFILL) the thought runs from the completion's start (thought_texts)."""
    langs = [language] * len(completions) if isinstance(language, str) else list(language)
    _one_per_completion("language", langs, completions, "give one language or one per completion")
    out = []
    for text, lang in zip(thought_texts(prompts, completions, prompts_text), langs):
        m = _THINK.search(text)
        words = _WORD.findall(_TAGS.sub(" ", m.group(1) if m else text))  # a tag's name is not a word of the thought
        out.append(sum(_in_language(w, lang) for w in words) / len(words) if words else None)
    return out


def _language_reward_for(language: str):
    """The language reward bound to the config's target language. A dataset column named `language` reaches it
    by name too (every column does) and must not replace it, as it would a functools.partial's keyword."""
    def reward(prompts, completions, completion_ids=None, **columns):
        columns["language"] = language
        return language_consistency_reward(prompts, completions, completion_ids, **columns)

    return _reads_only(functools.update_wrapper(reward, language_consistency_reward))


def soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int):
    """DAPO overlong shaping on token length L: 0 if L <= Lmax - cache, -1 if L > Lmax, linear between."""
    if soft_punish_cache < 0 or soft_punish_cache > max_completion_len:
        raise ValueError(f"overlong_buffer_len must be in [0, {max_completion_len}], got {soft_punish_cache}")

    def overlong_reward(prompts, completions, completion_ids, **_):
        out = []
        for ids in completion_ids:
            L, start = len(ids), max_completion_len - soft_punish_cache
            if L <= start:
                out.append(0.0)
            elif L <= max_completion_len:
                out.append((start - L) / soft_punish_cache)
            else:
                out.append(-1.0)
        return out

    return _reads_only(overlong_reward)


REGISTRY = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_consistency_reward,
}


class RewardError(RuntimeError):
    """A reward function broke its contract (what it returned) or failed on every sample of a step."""


def _model_kwargs(cfg) -> dict:
    """RewardModel's dtype and chat-template keywords under cfg (bf16 runs score in bf16, as TRL's)."""
    import torch

    return {"dtype": torch.bfloat16 if getattr(cfg, "bf16", False) else None,
            "chat_template_kwargs": getattr(cfg, "chat_template_kwargs", None)}


def resolve(name, cfg=None):
    """A callable, a registry name, "overlong" (built from cfg), a reward model's local directory (one with a
    config.json: a RewardModel, its config checked, its weights loaded on first use), a sequence-classification
    model object (a RewardModel scoring it, its tokenizer loaded from its config._name_or_path now), or an import
    path "module:function". Unknown names, bad model directories or objects, modules that do not import and
    non-callables raise ConfigError naming reward_funcs."""
    from .config import ConfigError

    if is_model_object(name):  # callable, but its forward takes token ids
        return _reads_only(RewardModel.of_model(name, **_model_kwargs(cfg)))
    if wraps_model(name):
        raise ConfigError(f"reward_funcs: a {type(name).__name__} around a transformers model is no reward "
                          "function; pass the sequence-classification model itself (a PreTrainedModel) or its "
                          "directory")
    if callable(name):
        return name
    if not isinstance(name, str):
        raise ConfigError(f"reward_funcs: {name!r} is neither a reward name nor a callable")
    if name == "overlong":
        L = cfg.max_completion_length if cfg is not None else 256
        try:
            return soft_overlong_punishment(L, cfg.overlong_buffer_len if cfg is not None else L // 4)
        except ValueError as e:
            raise ConfigError(f"reward_funcs: 'overlong': {e}") from e
    if name == "language" and cfg is not None:
        return _language_reward_for(cfg.language)
    if name in REGISTRY:
        return REGISTRY[name]
    if is_model_dir(name):
        check_model_dir(name)
        return _reads_only(RewardModel(name, **_model_kwargs(cfg)))
    if os.path.isdir(name):
        raise ConfigError(f"reward_funcs: {name!r} is a directory with no model in it (no config.json); a reward "
                          "model is a sequence-classification model saved with save_pretrained")
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward_funcs: cannot import {name!r}: {e}") from e
        except Exception as e:  # noqa: BLE001 -- the user's module raised while importing
            raise ConfigError(f"reward_funcs: importing {name!r} raised {e!r}") from e
        if not callable(fn):
            raise ConfigError(f"reward_funcs: {name!r} is not callable (it is a {type(fn).__name__})")
        return fn
    raise ConfigError(f"reward_funcs: unknown reward {name!r}; built-ins: {sorted(REGISTRY) + ['overlong']}, "
                      "a reward model's directory, or an import path 'module:function'")


def reward_name(name) -> str:
    """The name a reward logs under: a callable's as TRL's get_callable_name gives it (its __name__; a
    functools.partial's wrapped function's; a callable object without one, its class's), a model directory's
    basename, a model object's config._name_or_path's last part (TRL's), an import path's function name."""
    if is_model_object(name):
        return model_object_name(name)
    if callable(name):
        while isinstance(name, functools.partial):
            name = name.func
        return getattr(name, "__name__", type(name).__name__)
    return model_dir_name(name) if is_model_dir(name) else name.rpartition(":")[2]


def _short(entry) -> str:
    """A reward_funcs entry as an error names it: a model object by its class and _name_or_path (its repr is the
    whole module tree)."""
    if is_model_object(entry):
        return f"{type(entry).__name__}({entry.config._name_or_path!r})"
    return repr(entry)


def _model_source(entry):
    """Where a reward model entry (a directory or a model object) was loaded from, its real path where it is a
    directory; None for another entry."""
    if is_model_object(entry):
        entry = entry.config._name_or_path
    elif not is_model_dir(entry):
        return None
    return os.path.realpath(entry) if os.path.isdir(entry) else entry


def check_reward_funcs(names, cfg=None) -> list:
    """Resolve every reward (ConfigError on a bad one) and refuse one listed twice; -> the callables."""
    from .config import ConfigError

    funcs = [resolve(n, cfg) for n in names]
    seen = {}
    for n in names:
        key = reward_name(n)
        if key in seen and is_model_dir(n) and isinstance(seen[key], str) and \
                os.path.realpath(n) != os.path.realpath(seen[key]):
            raise ConfigError(f"reward_funcs: reward models {seen[key]!r} and {n!r} would both log as {key!r} (a "
                              "reward model logs under its directory's name): rename one directory")
        models = is_model_object(n) or is_model_object(seen.get(key))
        if key in seen and models and _model_source(n) != _model_source(seen[key]):
            raise ConfigError(f"reward_funcs: {_short(seen[key])} and {_short(n)} would both log as {key!r} (a "
                              "reward model logs under its directory's name, a model object under its "
                              "config._name_or_path's last part): give one another name")
        if key in seen and not models and callable(n) and callable(seen[key]) and n is not seen[key]:
            raise ConfigError(f"reward_funcs: {seen[key]!r} and {n!r} would both log as {key!r} (a partial logs "
                              "under its function's name, a callable object under its class's): give one another "
                              "__name__")
        if key in seen:
            raise ConfigError(f"reward_funcs: {_short(n)} is listed twice (as {_short(seen[key])}); each reward is "
                              "counted once (use reward_weights to weight it more)")
        seen[key] = n
    return funcs


def is_chat_prompt(prompt) -> bool:
    """TRL's rule for one prompt: a list of chat messages."""
    return isinstance(prompt, list) and (not prompt or isinstance(prompt[0], dict))


def as_trl_completions(prompts, completions) -> list:
    """TRL's reward input format, each completion in its own prompt's: after chat messages [{"role":
    "assistant", "content": text}], after a string the text itself. TRL reads the batch's first prompt, the
    same thing where a datasets column holds one format; a .jsonl dataset may mix them (then a batch's first
    prompt would decide for every completion of the batch)."""
    return [[{"role": "assistant", "content": c}] if isinstance(c, str) and is_chat_prompt(p) else c
            for p, c in zip(prompts, completions, strict=True)]


class _Timeout(Exception):
    pass


_loop_lock = threading.Lock()
_loops: dict = {}  # id(reward function) -> (its event loop, the process that started it): _event_loop


def _run_loop(loop):
    loop.run_forever()
    loop.close()  # stopped by _drop_if_blocked: its thread ends and its resources go


def _event_loop(fn):
    """fn's event loop, in a daemon thread, that every async call of fn runs on for the process's life, as TRL
    1.16 runs async rewards on one loop: what a reward keeps between calls (an httpx / openai AsyncClient, an
    asyncio.Semaphore) is bound to the loop it was first used on. One loop (and default thread pool) per function:
    a reward that blocks its loop or fills its pool with hung to_thread calls delays only itself. A forked child
    starts its own (it has the loop but not its thread)."""
    with _loop_lock:
        loop, pid = _loops.get(id(fn), (None, None))
        if loop is None or pid != os.getpid():
            loop = asyncio.new_event_loop()
            _loops[id(fn)] = (loop, os.getpid())
            threading.Thread(target=_run_loop, args=(loop,), name="reward-async-loop", daemon=True).start()
        return loop


def _drop_if_blocked(fn, loop, wait: float = 1.0):
    """After fn's async call timed out: a loop that runs nothing within `wait` s is blocked (sync code inside the
    async reward); it stops once that code returns and fn's next call gets a new one, so the blocking reward does
    not time out on every later step (what it bound to the old loop is lost: it blocked it)."""
    alive = threading.Event()
    try:
        loop.call_soon_threadsafe(alive.set)  # a callback, not a coroutine: a stopped loop leaves none un-awaited
    except RuntimeError:  # closed already
        alive.set()
    if not alive.wait(wait):
        with _loop_lock:
            if _loops.get(id(fn), (None,))[0] is loop:
                del _loops[id(fn)]
        loop.call_soon_threadsafe(loop.stop)


def _call_in_thread(fn, kw, timeout: float):
    """fn(**kw) in a daemon thread (an awaitable it returns awaited on _event_loop(fn)); _Timeout after `timeout`
    s. A call that hangs is abandoned: a daemon thread never keeps the process from exiting (a
    ThreadPoolExecutor's workers are joined at exit, which would make a hung reward hang the process); the
    thread waiting on an async call gives up one second past the timeout."""
    box = {}

    def target():
        try:
            r = fn(**kw)
            if inspect.isawaitable(r):
                async def wait():
                    return await asyncio.wait_for(r, timeout)
                box["loop"] = _event_loop(fn)
                r = asyncio.run_coroutine_threadsafe(wait(), box["loop"]).result(timeout + 1.0)
            box["value"] = r
        except BaseException as e:  # noqa: BLE001 -- handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if "loop" in box:
            _drop_if_blocked(fn, box["loop"])
        raise _Timeout()
    if "error" in box:
        if isinstance(box["error"], asyncio.TimeoutError):
            raise _Timeout()
        raise box["error"]
    return box["value"]


def _describe(v) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r[:80] + '...' if len(r) > 80 else r}"


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _not_a_list(v) -> bool:
    """Not a sequence of one value per completion (a 0-d array or tensor has __len__, but len() of it raises)."""
    return inspect.isgenerator(v) or inspect.isawaitable(v) or isinstance(v, (str, bytes, dict)) or \
        not hasattr(v, "__len__") or not hasattr(v, "__getitem__") or getattr(v, "ndim", None) == 0


def _as_real(v):
    """v as a Python real number, or None if it is not one: a 0-d array or tensor counts as its item (so a
    complex or string one is no number, as a complex or a str is not)."""
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        v = v.item()
    return v if isinstance(v, numbers.Real) else None


def check_values(name: str, vals, n: int) -> list:
    """A reward's return value -> n floats or None; anything else raises RewardError naming the reward
    and what it returned. None is the only "not applicable"; NaN, inf and values beyond float32's range
    (inf in the float32 reward table, as in TRL's) are errors."""
    if _not_a_list(vals):
        raise RewardError(f"reward {name!r} returned {_describe(vals)}; a reward function must return a list "
                          f"with one float (or None) per completion ({n} here)")
    if len(vals) != n:
        raise RewardError(f"reward {name!r} returned {len(vals)} values for {n} completions; it must return "
                          "one float (or None) per completion")
    out = []
    for i, v in enumerate(vals):
        if v is None:
            out.append(None)
            continue
        real = _as_real(v)
        if real is None:
            raise RewardError(f"reward {name!r} returned {_describe(v)} at index {i}; expected a float or None")
        f = float(real)
        if not math.isfinite(f):
            raise RewardError(f"reward {name!r} returned {f} at index {i}; rewards must be finite (return None "
                              "for 'not applicable')")
        if abs(f) > FLOAT32_MAX:
            raise RewardError(f"reward {name!r} returned {f} at index {i}; rewards must lie within float32's range "
                              f"(|r| <= {FLOAT32_MAX:.7g}: the reward table is float32, as TRL's, where this is inf)")
        out.append(f)
    return out


# TRL 1.16's keyword arguments beside the columns (GRPOTrainer._calculate_rewards)
TRL_KWARGS = ("trainer_state", "log_extra", "log_metric")
# every argument a reward function gets besides the dataset columns: a column of one of these names would
# replace it (in TRL a prompts or completions column is a TypeError, a trainer_state or log_* one replaced, a
# completion_ids one left out: NOT_FORWARDED); the dataset check names such a column: loading.load_datasets
REWARD_ARGS = ("prompts", "completions", "completion_ids", *TRL_KWARGS)
# the dataset columns TRL 1.16 does not pass to reward functions (GRPOTrainer._calculate_rewards)
NOT_FORWARDED = ("prompt", "completion", "completion_ids")
# the rendered generation prompts (chat messages through the chat template, a text prompt as it is), one per
# completion: passed only to a function that names this parameter (TRL 1.16 passes no such argument, so a function
# taking **kwargs gets exactly TRL's); where passed, it takes the place of a dataset column of this name
PROMPTS_TEXT = "prompts_text"


def _keywords(fn, follow_wrapped: bool = True) -> frozenset | None:
    """The names fn takes by keyword; None when it takes any (**kwargs) or has no signature to read."""
    try:
        params = inspect.signature(fn, follow_wrapped=follow_wrapped).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _names_param(fn, name: str) -> bool:
    """fn names `name` among the parameters it takes by keyword (whether or not it also takes **kwargs)."""
    try:
        p = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        return False
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def _takes(fn) -> set:
    """Which of TRL_KWARGS fn accepts: all with **kwargs (as TRL's reward functions have) or no signature to read
    (as TRL passes them), else those it names (a function with neither worked before they were passed and still
    does)."""
    names = _keywords(fn)
    return set(TRL_KWARGS) if names is None else set(TRL_KWARGS) & names


def _copied(fn) -> frozenset | None:
    """The arguments fn's calls get copies of (None: all): none for a reward of this module (_reads_only), else
    those fn itself takes by keyword: any other makes the call raise TypeError (as TRL's) while binding, before fn's
    code runs, so fn never holds it. Read from fn's own signature, not a function it wraps: a functools.wraps
    wrapper runs before the wrapped function's binding fails."""
    try:
        if fn in _READS_ONLY:
            return frozenset()
    except TypeError:  # an unhashable callable object: not one of this module's
        pass
    return _keywords(fn, follow_wrapped=False)


class _Logged:
    """One reward call's log_extra(column, values) and log_metric(name, value) calls (TRL's hooks). The runner
    keeps them when the call returns (RewardRunner._keep) and drops them when it raised or timed out."""

    def __init__(self):
        self.extra, self.metrics = [], []

    def log_extra(self, column, values):
        self.extra.append((column, values))

    def log_metric(self, name, value):
        self.metrics.append((name, value))


class _Copies:
    """Fresh copies of one RewardRunner call's arguments: TRL's rows are fresh per completion (a datasets row per
    index), so a reward that changes its prompts or columns in place (prompt += completion) changes no other
    completion's input, no later call's (another reward's, a retry's) and no dataset row; the caller's lists share
    the rows' objects (a group's G samples share one). Strings and numbers are immutable: not copied. Each other
    object is pickled once and every copy of it unpickled from those bytes (several times faster than
    copy.deepcopy on nested lists and dicts): no reward changes the caller's objects (each that may gets copies),
    so one pickle serves every completion, function and retry of the call. What pickle cannot hold is
    deep-copied."""

    def __init__(self):
        self._pickles = {}  # id(object) -> its pickle, None if it has none; the caller's lists keep the objects

    def fresh(self, values) -> list:
        return [v if isinstance(v, (str, bytes, int, float, type(None))) else self._copy(v) for v in values]

    def _copy(self, v):
        if id(v) not in self._pickles:
            try:
                self._pickles[id(v)] = pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # noqa: BLE001 -- a lambda, a local class, a lock ...: copy.deepcopy's rules
                self._pickles[id(v)] = None
        data = self._pickles[id(v)]
        return copy.deepcopy(v) if data is None else pickle.loads(data)


class RewardRunner:
    """Calls each reward function with a timeout; returns rewards [N][R] with None / failure semantics.
    With chat-message prompts the completions are passed in TRL's conversational format. As TRL 1.16, a
    function also gets trainer_state (a transformers.TrainerState), log_extra(column, values: one per
    completion) -> last_extra, the completions log's extra columns per sample, and log_metric(name, value)
    -> take_metrics(), the values to average into the step's metrics."""

    def __init__(self, names, cfg=None, timeout: float = 30.0):
        self.names = [reward_name(n) for n in names]
        self.funcs = check_reward_funcs(names, cfg)
        self.takes = {n: _takes(f) for n, f in zip(self.names, self.funcs)}
        self.takes_text = {n: _names_param(f, PROMPTS_TEXT) for n, f in zip(self.names, self.funcs)}
        self.copied = {n: _copied(f) for n, f in zip(self.names, self.funcs)}
        self.timeout = timeout
        self.failures = {n: 0 for n in self.names}
        self.last_errors = {}  # reward name -> what went wrong in the latest call (for RewardError)
        self.last_extra: list[dict] = []  # per sample of the latest call: log_extra's {column: value}
        self._metrics: dict[str, list[float]] = {}  # log_metric's values since take_metrics()
        self._state = None

    def take_metrics(self) -> dict[str, list[float]]:
        """The log_metric values logged since the last take (TRL averages them into the step's metrics)."""
        out, self._metrics = self._metrics, {}
        return out

    def _call(self, name, fn, args, columns, copies):
        """fn(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=..., log_extra=...,
        log_metric=...), all by keyword as TRL does -> (its value, what it logged); args: (prompts, completions,
        completion_ids, prompts_text or None), prompts_text passed where fn names it (PROMPTS_TEXT). The prompts,
        completions and columns that fn may hold are copies (`copies`, a _Copies); completion_ids are shared, as
        TRL shares them."""
        logged = _Logged()
        copied = self.copied[name]
        kw = {**columns, "prompts": args[0], "completions": args[1]}
        if args[3] is not None and self.takes_text[name]:
            kw[PROMPTS_TEXT] = args[3]
        kw = {k: copies.fresh(v) if copied is None or k in copied else v for k, v in kw.items()}
        kw["completion_ids"] = args[2]
        extra = {"trainer_state": self._state, "log_extra": logged.log_extra, "log_metric": logged.log_metric}
        kw.update((k, v) for k, v in extra.items() if k in self.takes[name])
        return _call_in_thread(fn, kw, self.timeout), logged

    def _keep(self, name, logged, rows):
        """A returned call's log_extra columns (rows: the call's sample indices; one JSON value per completion)
        and log_metric values (finite numbers); anything else is a RewardError naming the reward."""
        n, cols = len(rows), {}
        for col, values in logged.extra:
            if not isinstance(col, str) or _not_a_list(values):
                raise RewardError(f"reward {name!r} called log_extra({_describe(col)}, {_describe(values)}); it "
                                  f"takes a column name (str) and a list with one value per completion ({n} here)")
            cols.setdefault(col, []).extend(values)
        for col, values in cols.items():
            if len(values) != n:
                raise RewardError(f"reward {name!r} logged {len(values)} values for column {col!r} through "
                                  f"log_extra for {n} completions; it takes one value per completion")
            try:
                json.dumps(values)
            except (TypeError, ValueError) as e:
                raise RewardError(f"reward {name!r} logged a value the completions log (JSON) cannot hold for "
                                  f"column {col!r} through log_extra: {e}") from e
            for i, v in zip(rows, values):
                self.last_extra[i][col] = v
        for metric, value in logged.metrics:
            real = _as_real(value)
            if not isinstance(metric, str) or real is None or not math.isfinite(float(real)):
                raise RewardError(f"reward {name!r} called log_metric({_describe(metric)}, {_describe(value)}); "
                                  "it takes a metric name (str) and a finite number")
            self._metrics.setdefault(metric, []).append(float(real))

    def _run_one(self, name, fn, prompts, completions, completion_ids, columns, copies, prompts_text=None):
        """values (float or None) and failed flags, per sample."""
        n = len(completions)
        try:
            vals, logged = self._call(name, fn, (prompts, completions, completion_ids, prompts_text), columns,
                                      copies)
        except _Timeout:
            log.warning("reward %s timed out after %.1fs; skipping %d samples", name, self.timeout, n)
            self.last_errors[name] = f"timed out after {self.timeout:g}s (reward_timeout)"
            return [None] * n, [True] * n
        except Exception as e:  # a bad batch: find the bad samples one by one
            log.warning("reward %s raised %r; retrying per sample", name, e)
        else:
            vals = check_values(name, vals, n)
            self._keep(name, logged, range(n))
            return vals, [False] * n
        vals, failed = [], []
        for i in range(n):
            cols = {k: [v[i]] for k, v in columns.items()}
            try:
                one_text = None if prompts_text is None else [prompts_text[i]]
                v, logged = self._call(name, fn, ([prompts[i]], [completions[i]], [completion_ids[i]], one_text),
                                       cols, copies)
            except _Timeout:
                err = f"timed out after {self.timeout:g}s (reward_timeout)"
            except Exception as e:  # noqa: BLE001 -- any failure of user code skips the sample
                err = f"raised {e!r}"
            else:
                vals.append(check_values(name, v, 1)[0])
                self._keep(name, logged, [i])
                failed.append(False)
                continue
            log.warning("reward %s failed on sample %d: %s", name, i, err)
            self.last_errors[name] = err
            vals.append(None)
            failed.append(True)
        return vals, failed

    def __call__(self, prompts, completions, completion_ids, columns, trainer_state=None, prompts_text=None):
        """-> (values [N][R] floats or None, failed [N] bool: some function failed on the sample).
        trainer_state: what the functions get as TRL's trainer_state (None: a TrainerState at step 0).
        prompts_text: the rendered generation prompts, one per completion (PROMPTS_TEXT; None: not passed)."""
        if trainer_state is None:
            from transformers import TrainerState

            trainer_state = TrainerState()
        for fn in self.funcs:  # loaded here, in this thread: reward_timeout bounds the scoring, not the loading
            if isinstance(fn, RewardModel):
                fn.load()
        n = len(completions)
        if prompts_text is not None:
            _one_per_completion(PROMPTS_TEXT, prompts_text, completions)
        completions = as_trl_completions(prompts, completions)
        columns = {k: v for k, v in columns.items() if k not in NOT_FORWARDED}
        table, failed = [[None] * len(self.funcs) for _ in range(n)], [False] * n
        self.last_errors, self.last_extra, self._state = {}, [{} for _ in range(n)], trainer_state
        copies = _Copies()
        for j, (name, fn) in enumerate(zip(self.names, self.funcs)):
            vals, bad = self._run_one(name, fn, prompts, completions, completion_ids, columns, copies, prompts_text)
            for i in range(n):
                table[i][j] = vals[i]
                failed[i] = failed[i] or bad[i]
            self.failures[name] += sum(bad)
        return table, failed

    def all_failed_error(self, n: int) -> RewardError:
        """The error for a step where every one of its n samples failed some reward."""
        what = "; ".join(f"{k}: {v}" for k, v in self.last_errors.items()) or "failed on other ranks"
        return RewardError(f"every sample of the step ({n}) failed its rewards, so nothing can be learned: {what}. "
                           f"Check the reward function (TRL signature f(prompts, completions, completion_ids, "
                           f"**columns) -> list[float | None]; with chat-message prompts each completion is "
                           f"[{{'role': 'assistant', 'content': text}}])")
