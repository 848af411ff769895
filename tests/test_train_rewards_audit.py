"""A missing gold answer given as numpy's float32 NaN (not a Python float subclass) is "no gold answer" (None),
as a Python NaN is: never a gold "nan" that an <answer>nan</answer> matches."""
from __future__ import annotations

import random

import numpy as np

from r1train.rewards import accuracy_reward, has_gold


def test_numpy_nan_gold_is_missing():
    x = random.randint(-10**6, 10**6)
    golds = [np.float32("nan"), np.float16("nan"), float("nan"), None, np.float32(x), x, 10**400]
    assert [has_gold(g) for g in golds] == [False, False, False, False, True, True, True]
    comps = ["<answer>nan</answer>"] * 4 + [f"<answer>{x}</answer>"] * 3
    out = accuracy_reward(None, comps, answer=golds)
    assert out[:4] == [None] * 4 and out[4] == 1.0 and out[5] == 1.0 and out[6] == 0.0
