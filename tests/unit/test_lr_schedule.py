"""The LR schedule: linear warmup, then cosine decay to min_ratio or constant."""
import math

import pytest

from qwen_moe_ft.lr_schedule import lr_lambda


def test_warmup_rises_linearly_then_cosine_reaches_the_floor_at_the_last_step():
    f = lr_lambda("cosine", warmup_steps=4, total_steps=24, min_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)
    assert f(14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert f(24) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)  # never below the floor
    values = [f(s) for s in range(4, 25)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_after_warmup_and_no_warmup():
    f = lr_lambda("constant", warmup_steps=2, total_steps=10, min_ratio=0.1)
    assert [f(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    g = lr_lambda("cosine", warmup_steps=0, total_steps=10, min_ratio=0.0)
    assert g(0) == pytest.approx(1.0) and g(10) == pytest.approx(0.0)
