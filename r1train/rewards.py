"""Rule rewards with TRL's signature, a registry, and a runner that survives bad reward functions.

Signature: f(prompts, completions, completion_ids, **columns) -> list[float | None]; may be async.
None means "not applicable" (counts as 0 in the weighted sum, left out of that function's mean, as TRL).
A function that raises or runs past the timeout is logged and counted; the affected samples are marked
failed and the trainer skips them (zero loss weight); the run goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import importlib
import inspect
import logging
import math
import re

log = logging.getLogger("r1train.rewards")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)
_WORD = re.compile(r"[^\W\d_]+")


def completion_text(c) -> str:
    """A completion as text: plain string or TRL conversational [{"role": "assistant", "content": ...}]."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    return str(c)


def extract_answer(text: str) -> str | None:
    """Content of the last <answer>...</answer>, or None when there is none."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def _as_number(s: str) -> float | None:
    s = s.strip().strip("$").replace(",", "").replace(" ", "")
    m = re.fullmatch(r"\\boxed\{(.*)\}", s)
    s = m.group(1) if m else s
    try:
        if re.fullmatch(r"[-+]?\d+/\d+", s):
            a, b = s.split("/")
            return int(a) / int(b) if int(b) else None
        return float(s)
    except ValueError:
        return None


def answers_match(pred: str, gold: str) -> bool:
    """Numbers compare numerically (rel. tol 1e-6); other answers match when math-verify (if installed)
    finds them equivalent or when they are equal as normalized text."""
    p, g = _as_number(pred), _as_number(gold)
    if p is not None and g is not None:
        return math.isclose(p, g, rel_tol=1e-6, abs_tol=1e-9)
    if _math_verify(pred, gold):
        return True
    norm = lambda x: " ".join(x.lower().split())
    return norm(pred) == norm(gold)


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
        gold, pred = (x if "$" in x or "\\boxed" in x else f"${x}$" for x in (gold, pred))
        try:
            g, p = math_verify.parse(gold, parsing_timeout=None), math_verify.parse(pred, parsing_timeout=None)
            return bool(math_verify.verify(g, p, timeout_seconds=None))
        except TypeError:  # an older math-verify without the timeout switches
            return bool(math_verify.verify(math_verify.parse(gold), math_verify.parse(pred)))
    except Exception:  # noqa: BLE001 -- any parser failure falls back to the text comparison
        return None


def accuracy_reward(prompts, completions, completion_ids=None, answer=None, **_):
    """1.0 if the <answer> matches the `answer` column (see answers_match), 0.0 if not or if there is no
    <answer>, None if the row has no gold answer."""
    golds = answer if answer is not None else [None] * len(completions)
    out = []
    for c, gold in zip(completions, golds):
        if gold is None:
            out.append(None)
            continue
        pred = extract_answer(completion_text(c))
        out.append(1.0 if pred is not None and answers_match(pred, str(gold)) else 0.0)
    return out


def format_reward(prompts, completions, completion_ids=None, **_):
    """1.0 for exactly <think>...</think><answer>...</answer> (whitespace around allowed), else 0.0."""
    return [1.0 if _FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def _in_language(word: str, language: str) -> bool:
    if language == "en":
        return word.isascii()
    if language == "zh":
        return all("\u4e00" <= ch <= "\u9fff" for ch in word)
    raise ValueError(f"language: unsupported {language!r} (use 'en' or 'zh')")


def language_consistency_reward(prompts, completions, completion_ids=None, language: str = "en", **_):
    """R1: share of chain-of-thought words (inside <think>, else the whole text) in the target language.
    None when the chain of thought has no words (e.g. pure arithmetic)."""
    out = []
    for c in completions:
        text = completion_text(c)
        m = _THINK.search(text)
        words = _WORD.findall(m.group(1) if m else text)
        out.append(sum(_in_language(w, language) for w in words) / len(words) if words else None)
    return out


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

    return overlong_reward


REGISTRY = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_consistency_reward,
}


def resolve(name, cfg=None):
    """A callable, a registry name, "overlong" (built from cfg), or an import path "module:function"."""
    if callable(name):
        return name
    if name == "overlong":
        L = cfg.max_completion_length if cfg is not None else 256
        return soft_overlong_punishment(L, cfg.overlong_buffer_len if cfg is not None else L // 4)
    if name == "language" and cfg is not None:
        return functools.update_wrapper(functools.partial(language_consistency_reward, language=cfg.language),
                                        language_consistency_reward)
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward_funcs: cannot import {name!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"reward_funcs: {name!r} is not callable")
        return fn
    raise ValueError(f"reward_funcs: unknown reward {name!r}; built-ins: {sorted(REGISTRY) + ['overlong']}, "
                     "or give an import path 'module:function'")


def reward_name(name) -> str:
    return getattr(name, "__name__", "reward") if callable(name) else name.rpartition(":")[2]


class RewardRunner:
    """Calls each reward function with a timeout; returns rewards [N][R] with None / NaN semantics."""

    def __init__(self, names, cfg=None, timeout: float = 30.0):
        self.names = [reward_name(n) for n in names]
        self.funcs = [resolve(n, cfg) for n in names]
        self.timeout = timeout
        self.pool = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")
        self.failures = {n: 0 for n in self.names}

    def _call(self, fn, args, columns):
        """fn(prompts=..., completions=..., completion_ids=..., **columns), all by keyword as TRL does."""
        kw = dict(zip(("prompts", "completions", "completion_ids"), args), **columns)
        if inspect.iscoroutinefunction(fn):
            coro = lambda: asyncio.run(asyncio.wait_for(fn(**kw), self.timeout))
            return self.pool.submit(coro).result(timeout=self.timeout + 1)
        return self.pool.submit(fn, **kw).result(timeout=self.timeout)

    def _run_one(self, name, fn, prompts, completions, completion_ids, columns):
        """values (float or None) and failed flags, per sample."""
        n = len(completions)
        try:
            vals = self._call(fn, (prompts, completions, completion_ids), columns)
            if len(vals) != n:
                raise ValueError(f"returned {len(vals)} values for {n} completions")
            return [None if v is None else float(v) for v in vals], [False] * n
        except (cf.TimeoutError, asyncio.TimeoutError):
            log.warning("reward %s timed out after %.1fs; skipping %d samples", name, self.timeout, n)
            return [None] * n, [True] * n
        except Exception as e:  # a bad batch: find the bad samples one by one
            log.warning("reward %s raised %r; retrying per sample", name, e)
        vals, failed = [], []
        for i in range(n):
            try:
                cols = {k: [v[i]] for k, v in columns.items()}
                v = self._call(fn, ([prompts[i]], [completions[i]], [completion_ids[i]]), cols)[0]
                vals.append(None if v is None else float(v))
                failed.append(False)
            except Exception as e:  # noqa: BLE001 -- any failure of user code skips the sample
                log.warning("reward %s failed on sample %d: %r", name, i, e)
                vals.append(None)
                failed.append(True)
        return vals, failed

    def __call__(self, prompts, completions, completion_ids, columns):
        """-> (values [N][R] floats or None, failed [N] bool: some function failed on the sample)."""
        n = len(completions)
        table, failed = [[None] * len(self.funcs) for _ in range(n)], [False] * n
        for j, (name, fn) in enumerate(zip(self.names, self.funcs)):
            vals, bad = self._run_one(name, fn, prompts, completions, completion_ids, columns)
            for i in range(n):
                v = vals[i]
                table[i][j] = None if v is None or math.isnan(v) else v
                failed[i] = failed[i] or bad[i]
            self.failures[name] += sum(bad)
        return table, failed
