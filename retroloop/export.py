"""Adapters that load from anywhere, and merged models to hand to someone else.

A PEFT adapter records its base model as `base_model_name_or_path`. The stages keep it
repo-relative (`data/convert/model`): an absolute path would make the adapter's bytes, and
so its `content_sha256`, depend on where the repository was checked out (DESIGN.md §3).
`resolve_base_model` turns that reference into a path from any working directory: relative
to the repository that holds the adapter (the nearest folder above it with a `dvc.yaml`),
else as given, and refuses one that resolves outside that repository before anything is
loaded from it. `export` writes a merged, self-contained model directory
(`save_pretrained` safetensors + tokenizer + manifest) that needs no adapter or repo:

    retroloop export data/opd/adapter --out exported/opd-merged
"""

from __future__ import annotations

import json
from pathlib import Path

from retroloop.artifacts import (
    Manifest,
    atomic_artifact,
    check_output_dir,
    contained,
    repo_root,
    verify_input,
)
from retroloop.errors import ArtifactError


def _repo_of(path: Path) -> Path | None:
    for candidate in [path, *path.parents]:
        if (candidate / "dvc.yaml").is_file():
            return candidate
    return None


def resolve_base_model(adapter_dir: str | Path) -> Path:
    """The base model directory an adapter was trained on, from any working directory.

    The reference is read from the adapter, so it is contained before anything is loaded from
    it: the base must lie inside the adapter's repository (or, for an adapter outside any
    repository, inside the working directory). A relative reference is looked up in the
    adapter's repository first, then as given."""
    adapter_dir = Path(adapter_dir).resolve()
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise ArtifactError(f"{config}: not a PEFT adapter (no adapter_config.json)")
    ref = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not ref:
        raise ArtifactError(f"{config}: no base_model_name_or_path; pass the base model explicitly")
    repo = _repo_of(adapter_dir)
    root = repo if repo is not None else repo_root()
    candidates = [Path(ref)]
    if repo is not None and not Path(ref).is_absolute():
        candidates.insert(0, repo / ref)
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            try:
                return contained(candidate, root)
            except ArtifactError:
                raise ArtifactError(
                    f"{config}: base_model_name_or_path {ref!r} resolves to "
                    f"{candidate.resolve()}, outside the adapter's repository {root}; refusing "
                    "to load it; point it at the base model inside the repository (e.g. "
                    "data/convert/model)"
                ) from None
    raise ArtifactError(
        f"{config}: base model {ref!r} not found (looked in {', '.join(map(str, candidates))}); "
        "run `dvc pull` in the adapter's repository or export a merged model there"
    )


def load_adapted(adapter_dir: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Base model + adapter, from any working directory (the base found by `resolve_base_model`).

    Both are verified against their manifests (when they have one) before either is loaded."""
    from retroloop.models.loading import load_adapter, load_model

    base = resolve_base_model(adapter_dir)
    verify_input(adapter_dir, "adapter")
    verify_input(base, "base_model")
    return load_adapter(load_model(base, dtype, device), Path(adapter_dir).resolve()).eval()


def export(adapter_dir: str | Path, out_dir: str | Path) -> Manifest:
    """Merge the adapter into its base and write a self-contained model directory.

    `out_dir` is checked before anything is read or written (`check_output_dir`): export never
    replaces the repository, `data/`, or an artifact another stage wrote."""
    from retroloop.models.loading import load_tokenizer

    check_output_dir(out_dir, stage="export")
    base = resolve_base_model(adapter_dir)
    merged = load_adapted(adapter_dir).merge_and_unload()
    with atomic_artifact(out_dir, stage="export", kind="model") as w:
        w.add_input("adapter", adapter_dir)
        w.add_input("base_model", base)
        merged.save_pretrained(w.dir)
        load_tokenizer(base).save_pretrained(w.dir)
        w.outputs = {".": "model"}
        w.metrics = {"parameters": sum(p.numel() for p in merged.parameters())}
        return w.finish(params={}, params_sha256="", seed=None, device="cpu")
