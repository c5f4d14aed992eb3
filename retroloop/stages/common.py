"""What every stage shares: the default artifact layout, seeding, threads, device."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from retroloop.artifacts import mark_run_started
from retroloop.config import Params
from retroloop.models.loading import resolve_device

log = logging.getLogger(__name__)

DATA = Path("data")

# Default locations (relative to the repo root, where dvc runs). dvc.yaml names the same paths;
# tests/contract checks that it does.
PATHS: dict[str, Path] = {
    "prepare": DATA / "prepare",
    "analyze": DATA / "analyze",
    "convert": DATA / "convert",
    "cache_teacher": DATA / "cache_teacher",
    "distill": DATA / "distill",
    "static": DATA / "static",
    "opd": DATA / "opd",
    "evaluate": DATA / "evaluate",
}
BASE_MODEL = PATHS["prepare"] / "model"  # the source model; it is the teacher
DATASETS = PATHS["prepare"] / "datasets"  # {domain,instruct}_{train,eval}.parquet
MODEL_CACHE = DATA / "cache"  # downloaded wheels (not an artifact; reused across runs)
CONVERTED_MODEL = PATHS["convert"] / "model"
DISTILL_ADAPTER = PATHS["distill"] / "adapter"
DISTILL_CHECKPOINTS = DATA / "checkpoints" / "distill"  # persist: survives dvc repro
OPD_ADAPTER = PATHS["opd"] / "adapter"


def dataset_path(name: str, split: str, root: Path = DATASETS) -> Path:
    """`name` in {domain, instruct}; `split` in {train, eval}."""
    return Path(root) / f"{name}_{split}.parquet"


def setup_run(cfg: Params) -> torch.device:
    """Seed every RNG, set torch threads, pick the device, mark the run's start time (the
    manifest's `started_at`). Call first in every stage."""
    mark_run_started()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    log.info(
        "device=%s dtype=%s threads=%d seed=%d",
        device,
        cfg.dtype,
        torch.get_num_threads(),
        cfg.seed,
    )
    return device


def resolve_inputs(
    given: dict[str, str | Path] | None, defaults: dict[str, Path]
) -> dict[str, Path]:
    """Stage inputs by role: the defaults, overridden by what the caller passed."""
    out = dict(defaults)
    for role, path in (given or {}).items():
        out[role] = Path(path)
    return out
