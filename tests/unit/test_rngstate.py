"""The random state a cycle step hands to the next (retroloop.rngstate): restored, every
generator draws what it would have drawn had nothing happened in between."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from retroloop.rngstate import restore_rng_state, save_rng_state


def _draws() -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        torch.rand(3).tolist(),
        torch.randn(2).tolist(),
    )


def test_restored_generators_draw_the_same_numbers(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    _draws()  # somewhere in the stream, not at a seed
    path = save_rng_state(tmp_path / "rng.safetensors")
    expected = _draws()
    torch.manual_seed(2), np.random.seed(2), random.seed(2)  # e.g. loading a model draws
    assert _draws() != expected
    restore_rng_state(path)
    assert _draws() == expected
    assert {p.name for p in tmp_path.iterdir()} == {"rng.safetensors", "rng.json"}  # no pickle
