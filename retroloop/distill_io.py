"""distill's way in (`stages/distill.py`'s `run`): the input paths and their refs, the
training sequences, the teacher (the cache, checked against this student and these sequences,
or the online model) and the student in train mode (LoRA via PEFT, or fully trainable).
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import torch

from retroloop import teacher_cache as tc
from retroloop.artifacts import find_manifest_dir, input_ref, read_manifest
from retroloop.config import Params
from retroloop.errors import ArtifactError, ConfigError, DataError
from retroloop.models.loading import load_model, load_tokenizer, tokenizer_fingerprint
from retroloop.sequences import Sequence, training_sequences
from retroloop.stages.common import (
    CONVERTED_MODEL,
    PATHS,
    dataset_path,
    resolve_inputs,
    teacher_dir,
)

log = logging.getLogger(__name__)


def input_paths(inputs: dict | None, d) -> tuple[dict[str, Path], list]:
    """The input paths (defaults for the missing roles) and the verified refs of those used."""
    defaults = {
        "student": CONVERTED_MODEL,
        "train_instruct": dataset_path("instruct", "train"),
        "train_domain": dataset_path("domain", "train"),
        "teacher_cache": PATHS["cache_teacher"],
        "teacher": teacher_dir(),  # prepare.teacher, else the source model
    }
    paths = resolve_inputs(inputs, defaults)
    cached = d.distillation and d.teacher == "cached"
    online = d.distillation and d.teacher == "online"
    roles = list(defaults)[:3] + ["teacher_cache"] * cached + ["teacher"] * online
    return paths, [input_ref(role, paths[role]) for role in roles]


def training_data(tokenizer, paths: dict[str, Path], max_seq_len: int) -> list[Sequence]:
    seqs = training_sequences(
        tokenizer,
        pl.read_parquet(paths["train_instruct"]),
        pl.read_parquet(paths["train_domain"]),
        max_seq_len,
    )
    if not seqs:
        raise DataError(
            f"{paths['train_instruct']}, {paths['train_domain']}: no training sequence with a trainable token"
        )
    return seqs


def online_teacher(path: Path, tokenizer, dtype: str, device: torch.device) -> torch.nn.Module:
    """`distill.teacher: online`: the teacher model, once its tokenizer matches the student's."""
    teacher_fp = {"tokenizer": tokenizer_fingerprint(load_tokenizer(path))}
    tc.check_compatible(teacher_fp, tokenizer, str(path))
    return load_model(path, dtype, device)


def open_cache(
    paths: dict, tokenizer, seqs: list[Sequence], temperature: float, divergence: str
) -> tc.TeacherCache:
    """Open the teacher cache and check it fits this student and these sequences."""
    cache = tc.TeacherCache(paths["teacher_cache"])
    cache.check_tokenizer(tokenizer)
    if abs(cache.temperature - temperature) > 1e-9:
        raise ConfigError(
            f"distill.temperature: {temperature} but the teacher cache was built at "
            f"cache_teacher.temperature={cache.temperature}; set them equal"
        )
    cache.check_sequences(seqs)
    cache.verify_all()
    if cache.tail_samples and divergence != "forward_kl":
        log.warning(
            "the teacher cache has %d tail samples per position; only forward_kl uses them, "
            "distill.divergence=%s compares on the top-k + tail bucket",
            cache.tail_samples,
            divergence,
        )
    _warn_if_other_teacher(paths["student"], paths["teacher_cache"])
    return cache


def load_student(path: Path, cfg: Params, device: torch.device) -> torch.nn.Module:
    """The student in train mode: wrapped with LoRA (PEFT), or fully trainable (LoRA off).

    `distill.activation_checkpointing`: transformers' decoder layers are
    `GradientCheckpointingLayer`s, so enabling it makes every layer call (each recurrence
    iteration of the looped block included) keep only its input and recompute in the backward.
    """
    model = load_model(path, cfg.dtype, device)
    if cfg.distill.activation_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    if cfg.distill.lora.enabled:
        from peft import get_peft_model

        from retroloop.models.lora import fp32_trainable, lora_config_from

        model = fp32_trainable(get_peft_model(model, lora_config_from(model, cfg.distill.lora)))
    else:
        model.requires_grad_(True)
    return model.train()


def _warn_if_other_teacher(student: Path, cache: Path) -> None:
    """The cache's teacher should be the model the student was converted from (DESIGN.md §3);
    a different one is legitimate (e.g. a continual-learning cycle), so this only warns."""
    owner = find_manifest_dir(Path(student))
    try:
        base = read_manifest(owner).input("base_model").content_sha256 if owner else None
        used = read_manifest(cache).input("teacher").content_sha256
    except ArtifactError:  # provenance is advisory here; the tokenizer check is the guard
        return
    if base is not None and base != used:
        log.warning(
            "the teacher cache was built from another model (%s) than the student's base (%s)",
            used[:12],
            base[:12],
        )
