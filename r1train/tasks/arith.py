"""Generated arithmetic-reasoning problems with a unique numeric answer, and cold-start worked solutions.

A problem is a chain of additions/subtractions of small numbers, e.g. "7+5-3+9". Its worked solution
evaluates left to right, one step per line, inside <think></think>, then gives the result in <answer>:

    <think>7+5=12\n12-3=9\n9+9=18</think><answer>18</answer>

A *flawed* solution gets one step's result wrong by a small amount and carries the error to the end (so
its answer is wrong but the chain is self-consistent): the cold-start SFT data teaches the model to make
such slips at a rate close to `flaw_share`, and RL has something to fix.
Invariants: correct running totals never go negative (a flawed chain may dip below zero after its
slip); the same seed always gives the same problems.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM_PROMPT = ""  # the built-in task needs none; the chat template still marks the roles


@dataclass(frozen=True)
class ArithSpec:
    min_terms: int = 3  # number of operands, inclusive range
    max_terms: int = 4
    max_operand: int = 9  # operands are drawn from 1..max_operand
    ops: str = "+-"  # allowed operators; "-" is only used when the running total stays >= 0

    def __post_init__(self):
        # the messages name the config keys (task_<field>) that set these
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"task_min_terms / task_max_terms: need 2 <= task_min_terms <= task_max_terms, got "
                             f"{self.min_terms}, {self.max_terms}")
        if self.max_operand < 1:
            raise ValueError(f"task_max_operand must be >= 1, got {self.max_operand}")
        # each operator once: '++-' drew '+' twice as often, silently
        if not self.ops or set(self.ops) - set("+-") or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"task_ops must be '+', '-' or '+-' (each operator once), got {self.ops!r}")
        if set(self.ops) == {"-"} and self.max_terms - 1 > self.max_operand:
            raise ValueError(f"task_ops='-': every step subtracts at least 1 from the first operand, so "
                             f"task_max_operand ({self.max_operand}) must be >= task_max_terms - 1 "
                             f"({self.max_terms - 1})")


def make_problem(rng: random.Random, spec: ArithSpec) -> tuple[list[int], list[str]]:
    """Operands [a0, a1, ...] and operators [op1, ...] with non-negative running totals."""
    n = rng.randint(spec.min_terms, spec.max_terms)
    minus_only = set(spec.ops) == {"-"}  # the total must leave each later step at least 1 to subtract
    nums = [rng.randint(n - 1 if minus_only else 1, spec.max_operand)]
    ops, total = [], nums[0]
    for i in range(n - 1):
        op = rng.choice(spec.ops)
        b = rng.randint(1, min(spec.max_operand, total - (n - 2 - i)) if minus_only else spec.max_operand)
        if op == "-" and b > total:
            op = "+" if "+" in spec.ops else "-"
            b = min(b, total) if op == "-" else b
        if op == "-" and b == 0:
            op, b = "+", 1
        total = total + b if op == "+" else total - b
        nums.append(b)
        ops.append(op)
    return nums, ops


def expression(nums: list[int], ops: list[str]) -> str:
    return str(nums[0]) + "".join(f"{o}{b}" for o, b in zip(ops, nums[1:]))


def draw(rng: random.Random, spec: ArithSpec, n: int, exclude=frozenset(),
         what: str = "problems outside the held-out set"):
    """Yields n problems (nums, ops, expression) from rng whose expression is not in `exclude` (a held-out
    set, or the expressions drawn so far when the caller adds each one); ValueError naming `what` when the
    spec leaves too few. Lazy: the caller may draw from rng, or add to exclude, in between."""
    got = tries = 0
    while got < n:
        nums, ops = make_problem(rng, spec)
        e = expression(nums, ops)
        tries += 1
        if tries > 100 * (n + 10):
            raise ValueError(f"task: cannot draw {n} {what} from this spec; widen it")
        if e not in exclude:
            got += 1
            yield nums, ops, e


def worked_solution(nums, ops, flaw_step: int | None = None, flaw_delta: int = 0) -> tuple[str, int]:
    """The step-by-step solution text and its final value; step `flaw_step` is off by `flaw_delta`."""
    lines, total = [], nums[0]
    for i, (op, b) in enumerate(zip(ops, nums[1:])):
        new = total + b if op == "+" else total - b
        if i == flaw_step:
            new = new + flaw_delta if new + flaw_delta >= 0 else new - flaw_delta  # wrong, never negative
        lines.append(f"{total}{op}{b}={new}")
        total = new
    return "<think>" + "\n".join(lines) + "</think><answer>" + str(total) + "</answer>", total


def generate(n: int, seed: int, spec: ArithSpec = ArithSpec(), flaw_share: float = 0.0,
             exclude=frozenset(), distinct: bool = False) -> list[dict]:
    """n rows: {"prompt": [chat messages], "answer": str, "solution": worked (possibly flawed) text,
    "expression": "7+5-3"}. exclude: expressions never drawn (a held-out set, for the training set beside it);
    distinct: no problem twice (a held-out set). So a distinct set from seed + 10_000 and the set from seed
    excluding it are split()'s problems. The problems depend on seed and spec only: the slips come from a stream
    of their own, and flaw_share only picks the rows that have theirs (the flawed rows at a share are among those
    at any larger share)."""
    rng, rng_flaw = random.Random(seed), random.Random(f"arith-flaws-{seed}")
    seen = set(exclude) if distinct else exclude  # draw() reads it lazily: each problem added as drawn
    what = "distinct held-out problems" if distinct else "problems outside the held-out set"
    rows = []
    for nums, ops, expr in draw(rng, spec, n, seen, what=what):
        if distinct:
            seen.add(expr)
        truth = worked_solution(nums, ops)[1]
        u, step, delta = rng_flaw.random(), rng_flaw.randrange(len(ops)), rng_flaw.choice([-2, -1, 1, 2])
        text, _ = worked_solution(nums, ops, step if u < flaw_share else None, delta)
        msgs = [{"role": "user", "content": f"What is {expr}?"}]
        if SYSTEM_PROMPT:
            msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        rows.append({"prompt": msgs, "answer": str(truth), "solution": text, "expression": expr})
    return rows


# ---- the demo stages' task family: held-out splits, systematic cold-start slips, two step-word
# languages, and a plain-text pretraining corpus for the R1-Zero base

# step words of the two "languages" of the language-consistency stage (en = the target)
STEP_WORDS = {"en": {"+": "plus", "-": "minus"}, "zh": {"+": "\u52a0", "-": "\u51cf"}}


def carries(total: int, op: str, b: int) -> bool:
    """True when the step total op b needs a carry (+) or a borrow (-) in the units digit."""
    return (total % 10 + b % 10 >= 10) if op == "+" else (total % 10 < b % 10 and total >= 10)


def split(n_train: int, n_eval: int, seed: int, spec: ArithSpec = ArithSpec()):
    """(train, eval) problems [(nums, ops)], the eval expressions never among the training ones. Eval is
    drawn first from its own stream (distinct expressions); train draws from the seed's stream, skipping
    eval expressions (repeats among training problems are allowed)."""
    rng_e, rng_t = random.Random(seed + 10_000), random.Random(seed)
    ev, seen = [], set()
    for nums, ops, e in draw(rng_e, spec, n_eval, seen, what="distinct held-out problems"):
        seen.add(e)
        ev.append((nums, ops))
    train = [(nums, ops) for nums, ops, _ in draw(rng_t, spec, n_train, seen)]
    return train, ev


def chain(nums, ops, *, slip: bool = False, mix_share: float = 0.0, rng=None, words: bool = False):
    """A worked chain: (step lines, final value, languages used). slip: every carry/borrow step is written
    without its carry (the tens digit left as it was: +10/-10 off), the error carried to the end. words: each
    line reads "a plus b = c" (en) or, with probability mix_share, in the other vocabulary "a 加 b = c" (zh);
    without words, "a+b=c"."""
    lines, langs, total = [], set(), nums[0]
    for op, b in zip(ops, nums[1:]):
        new = total + b if op == "+" else total - b
        if slip and carries(total, op, b):
            new = new - 10 if op == "+" else new + 10  # forgot to carry / to borrow
        if words:
            lang = "zh" if mix_share and rng.random() < mix_share else "en"
            langs.add(lang)
            lines.append(f"{total} {STEP_WORDS[lang][op]} {b} = {new}")
        else:
            lines.append(f"{total}{op}{b}={new}")
        total = new
    return lines, total, langs


def r1_text(lines, answer) -> str:
    return "<think>" + "\n".join(lines) + "</think><answer>" + str(answer) + "</answer>"


def question(nums, ops) -> str:
    return f"What is {expression(nums, ops)}?"


def rl_rows(problems, *, chat: bool = True) -> list[dict]:
    """Prompt + gold answer rows (chat messages, or the bare question text for a base model)."""
    return [{"prompt": [{"role": "user", "content": question(n, o)}] if chat else question(n, o) + "\n",
             "answer": str(chain(n, o)[1])} for n, o in problems]


def cold_start_rows(problems, seed: int, *, slip_share: float = 0.0, mix_share: float = 0.0,
                    words: bool = False) -> list[dict]:
    """rl_rows plus `completion`: the cold-start worked solution in the R1 format. A share slip_share of the
    solutions come from an annotator who never carries (every carry/borrow step forgotten: a systematic slip,
    which greedy decoding makes when slip_share > 1/2); with words, step words mix two languages."""
    rng = random.Random(seed + 20_000)
    rows = rl_rows(problems)
    for r, (n, o) in zip(rows, problems):
        lines, total, _ = chain(n, o, slip=rng.random() < slip_share, mix_share=mix_share, rng=rng, words=words)
        r["completion"] = r1_text(lines, total)
    return rows


def pretrain_rows(problems, seed: int, *, work_share: float = 0.4, tag_share: float = 0.2,
                  fact_share: float = 0.5, max_operand: int = 9) -> list[dict]:
    """A plain-text corpus for the R1-Zero base: each document is a question, then its correct answer. The
    problems' documents answer directly ("9") or, with probability work_share, show their working
    ("7+5=12\n12-3=9\nso 9"); with probability tag_share (independently) a document uses the
    <think>/<answer> markup instead (empty think when there is no working). fact_share * len(problems) more
    documents are one-step facts ("What is 23+7?" -> "30", totals up to the problems' largest), which working
    chains together. No chat template, no instruction; the order is shuffled."""
    rng = random.Random(seed + 30_000)
    rows = rl_rows(problems, chat=False)
    for r, (n, o) in zip(rows, problems):
        lines, total, _ = chain(n, o)
        work = lines if rng.random() < work_share else []
        if rng.random() < tag_share:
            r["completion"] = r1_text(work, total)
        else:
            r["completion"] = "\n".join(work + [f"so {total}" if work else str(total)])
    top = max((sum(n) for n, _ in problems), default=max_operand)
    for _ in range(int(fact_share * len(problems))):
        t, b = rng.randint(1, top), rng.randint(1, max_operand)
        op = "-" if b <= t and rng.random() < 0.5 else "+"
        rows.append({"prompt": question([t, b], [op]) + "\n", "answer": str(t + b if op == "+" else t - b)})
        rows[-1]["completion"] = rows[-1]["answer"]
    rng.shuffle(rows)
    return rows
