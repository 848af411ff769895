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
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"task terms: need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        if self.max_operand < 1:
            raise ValueError(f"task max_operand must be >= 1, got {self.max_operand}")
        if not self.ops or set(self.ops) - set("+-"):
            raise ValueError(f"task ops must be a non-empty subset of '+-', got {self.ops!r}")


def make_problem(rng: random.Random, spec: ArithSpec) -> tuple[list[int], list[str]]:
    """Operands [a0, a1, ...] and operators [op1, ...] with non-negative running totals."""
    n = rng.randint(spec.min_terms, spec.max_terms)
    nums = [rng.randint(1, spec.max_operand)]
    ops, total = [], nums[0]
    for _ in range(n - 1):
        op = rng.choice(spec.ops)
        b = rng.randint(1, spec.max_operand)
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


def generate(n: int, seed: int, spec: ArithSpec = ArithSpec(), flaw_share: float = 0.0) -> list[dict]:
    """n rows: {"prompt": [chat messages], "answer": str, "solution": worked (possibly flawed) text}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        nums, ops = make_problem(rng, spec)
        truth = worked_solution(nums, ops)[1]
        flawed = rng.random() < flaw_share
        step = rng.randrange(len(ops)) if flawed else None
        delta = rng.choice([-2, -1, 1, 2]) if flawed else 0
        text, _ = worked_solution(nums, ops, step, delta)
        msgs = [{"role": "user", "content": f"What is {expression(nums, ops)}?"}]
        if SYSTEM_PROMPT:
            msgs.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        rows.append({"prompt": msgs, "answer": str(truth), "solution": text})
    return rows
