"""The models `evaluate` compares: what names one (`ModelSpec`), loading it with its adapter
merged, its default recurrence, its identity (the generation cache's key) and the checks that
every model shares the reference's tokenizer (split from `retroloop.stages.evaluate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retroloop.artifacts import input_ref
from retroloop.errors import ArtifactError, MismatchError
from retroloop.models.loading import load_model, load_tokenizer, tokenizer_fingerprint


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a `save_pretrained` dir, optionally a PEFT adapter on it, and
    the recurrence count for a looped model (None = the model's configured default).
    `model_role` / `adapter_role` name the inputs in the manifest (default: the model name)."""

    model_dir: Path
    adapter_dir: Path | None = None
    recurrence: int | None = None
    model_role: str | None = None
    adapter_role: str | None = None


def chosen_teacher(teacher: Path, converted: Path) -> dict[str, Any] | None:
    """{path, content_sha256, source} of the teacher when it is not the model `converted` was
    built from (a `prepare.teacher`), else None: the report then stays as it was, the teacher
    being the source model its `base_model` input names."""
    from retroloop.artifacts import find_manifest_dir, read_manifest

    ref = input_ref("teacher", teacher)
    owner = find_manifest_dir(Path(converted))
    if owner is not None:
        bases = [r for r in read_manifest(owner).inputs if r.role == "base_model"]
        if bases and bases[0].content_sha256 == ref.content_sha256:
            return None
    source_file = Path(teacher) / "retroloop_source.json"
    source = json.loads(source_file.read_text()) if source_file.is_file() else {}
    source.pop("tiny", None)  # the whole spec; `source: tiny_random` says enough here
    source.pop("tiny_training", None)
    return {"path": ref.path, "content_sha256": ref.content_sha256, "source": source}


def load_spec(spec: ModelSpec, dtype: str, device: torch.device | str) -> torch.nn.Module:
    """The model of `spec`, with its adapter (if any) merged in."""
    model = load_model(spec.model_dir, dtype, device)
    if spec.adapter_dir is not None:
        from peft import PeftModel

        if not (Path(spec.adapter_dir) / "adapter_config.json").is_file():
            raise ArtifactError(
                f"{spec.adapter_dir}: not a PEFT adapter directory (no adapter_config.json)"
            )
        model = PeftModel.from_pretrained(
            model, spec.adapter_dir, trust_remote_code=False
        ).merge_and_unload()
    return model.eval()


def _is_looped(model: torch.nn.Module) -> bool:
    from retroloop.models.recurrent import RecurrentForCausalLM

    return isinstance(model, RecurrentForCausalLM)


def default_recurrence(model: torch.nn.Module) -> int | None:
    """The R stored in a looped model's config; None for a plain model."""
    if not _is_looped(model):
        return None
    for attr in ("recurrence", "num_recurrence", "mean_recurrence"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int):
            return value
    raise ArtifactError(
        "looped model config has no default recurrence count; re-run `retroloop stage convert`"
    )


def spec_identity(spec: ModelSpec) -> dict[str, Any]:
    """Content hashes of the model (and adapter): the generation-cache key of a spec."""
    ident: dict[str, Any] = {"model": input_ref("model", spec.model_dir).content_sha256}
    if spec.adapter_dir is not None:
        ident["adapter"] = input_ref("adapter", spec.adapter_dir).content_sha256
    return ident


def check_tokenizer(name: str, spec: ModelSpec, fingerprint: dict, teacher_spec: ModelSpec) -> None:
    """Every model is prompted with the teacher's tokenizer, so theirs must be the same."""
    if spec.model_dir == teacher_spec.model_dir:
        return
    theirs = tokenizer_fingerprint(load_tokenizer(spec.model_dir))
    for key in ("tokenizer_sha256", "chat_template_sha256"):
        if theirs[key] != fingerprint[key]:
            raise MismatchError(
                f"{spec.model_dir}: {key} of '{name}' differs from the reference model "
                f"{teacher_spec.model_dir}; evaluate models that share one tokenizer and chat template"
            )
