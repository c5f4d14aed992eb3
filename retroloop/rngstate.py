"""The process's random state (python, numpy, torch CPU and CUDA) as files, no pickle.

What a step that hands its model to the next step through a folder saves beside it, so the
next step, after loading its models (whose initialisers draw from the same generators), goes
on drawing the numbers one process keeping its models in memory would have drawn
(`retroloop.cycle`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

JSON_SUFFIX = ".json"  # python + numpy, beside the torch states' .safetensors


def save_rng_state(path: Path) -> Path:
    """Write the state to `path` (.safetensors: torch) and `path` with .json (python, numpy)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(tensors, path)
    numpy = [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]
    state = {"python": random.getstate(), "numpy": numpy}
    path.with_suffix(JSON_SUFFIX).write_text(json.dumps(state), encoding="utf-8")
    return path


def restore_rng_state(path: Path) -> None:
    """Set every generator to the state `save_rng_state(path)` wrote."""
    tensors = load_file(path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(sum(k.startswith("cuda") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    state = json.loads(path.with_suffix(JSON_SUFFIX).read_text(encoding="utf-8"))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
