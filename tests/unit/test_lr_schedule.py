"""training.lr_factor: the LR multiplier of distill's schedules (warm-up, constant, cosine)."""

from __future__ import annotations

import math

import pytest

from retroloop.training import lr_factor


def test_constant_without_warmup_is_one_at_every_step() -> None:
    assert [lr_factor(s, 8, "constant", 0) for s in range(8)] == [1.0] * 8


def test_warmup_rises_linearly_to_the_peak_then_holds() -> None:
    assert [lr_factor(s, 8, "constant", 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_starts_at_the_peak_after_warmup_and_falls_without_reaching_zero() -> None:
    f = [lr_factor(s, 10, "cosine", 2) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0]  # step 2 is the first cosine step: cos(0) = 1
    assert all(a > b for a, b in zip(f[2:], f[3:], strict=False))  # strictly falling
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8))) and f[-1] > 0
    assert lr_factor(6, 10, "cosine", 2) == pytest.approx(0.5)  # half-way: ½(1 + cos(π/2))
