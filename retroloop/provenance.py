"""Reading lineage back: verify artifacts, walk provenance trees, audit adapters.

Nothing here trusts what it reads: a manifest that does not parse is reported (never
skipped), a recorded input hash is compared with what that input holds now, and a path
read from a manifest is followed only if it resolves inside the repository. A broken link
is BAD in `verify` and `audit`: an upstream artifact that is gone, one recorded outside the
repository, one that now holds something else (a user's source file, `SOURCE_ROLES`, may
live anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retroloop.artifacts import (
    MANIFEST,
    Manifest,
    _display,
    contained,
    find_manifest_dir,
    hash_tree,
    listing_sha256,
    read_manifest,
    repo_root,
)
from retroloop.errors import ArtifactError


@dataclass
class Found:
    """One `manifest.json` under a root: its manifest, or why it could not be read."""

    dir: Path
    manifest: Manifest | None
    error: str | None = None


def find_artifacts(root: str | Path = "data") -> list[Found]:
    """Every manifest under `root` (temporary `.name.tmp-*` directories aside), readable or not."""
    root = Path(root)
    found = []
    for path in sorted(root.rglob(MANIFEST)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # temporary or old directories of a writer
        try:
            found.append(Found(path.parent, read_manifest(path.parent)))
        except ArtifactError as err:
            found.append(Found(path.parent, None, str(err)))
    return found


def find_manifests(root: str | Path = "data") -> list[tuple[Path, Manifest]]:
    """Readable manifests only; callers that report must use `find_artifacts`."""
    return [(f.dir, f.manifest) for f in find_artifacts(root) if f.manifest is not None]


def recorded_hash(path: str | Path) -> str | None:
    """What the owning manifest says `path` (an artifact, or a file/folder in one) hashes to."""
    path = Path(path)
    owner = find_manifest_dir(path)
    if owner is None:
        return None
    manifest = read_manifest(owner)
    rel = path.resolve().relative_to(owner).as_posix()
    if rel == ".":
        return manifest.content_sha256
    if rel in manifest.files:
        return manifest.files[rel]
    sub = {k[len(rel) + 1 :]: v for k, v in manifest.files.items() if k.startswith(rel + "/")}
    return listing_sha256(sub) if sub else None


def verify(artifact_dir: Path) -> list[str]:
    """Re-hash an artifact and check its inputs still hold what it recorded; one line per
    problem (empty = intact). An unreadable manifest is one problem, never a skip."""
    artifact_dir = Path(artifact_dir)
    try:
        manifest = read_manifest(artifact_dir)
    except ArtifactError as err:
        return [str(err)]
    content, files = hash_tree(artifact_dir)
    problems = []
    for rel, sha in sorted(manifest.files.items()):
        if rel not in files:
            problems.append(f"{artifact_dir / rel}: missing")
        elif files[rel] != sha:
            problems.append(f"{artifact_dir / rel}: sha256 {files[rel]} != manifest {sha}")
    for rel in sorted(files.keys() - manifest.files.keys()):
        problems.append(f"{artifact_dir / rel}: not in the manifest")
    if not problems and content != manifest.content_sha256:
        problems.append(
            f"{artifact_dir / MANIFEST}: content_sha256 {manifest.content_sha256} != files {content}"
        )
    return problems + input_problems(manifest)


# Roles that name a user's source file, not an upstream artifact: prepare's `source_*` (a local
# model or dataset), evaluate's `ifeval` / `gsm8k` (e.g. ../shared/data/...), a cycle's
# `train_data` (`--domain-data`, anywhere). They were hashed when read; one outside the
# repository is listed, not followed. Every other role names an upstream artifact.
SOURCE_ROLES = frozenset(
    {"source_model", "source_domain", "source_instructions", "ifeval", "gsm8k", "train_data"}
)


def _check_input(role: str, path: str, sha: str) -> list[str]:
    """Problems with one recorded input (empty = it still holds what was recorded).

    An upstream artifact that is gone, lies outside the repository, cannot be read or now
    holds something else is a broken link. A source file (`SOURCE_ROLES`) is checked only
    where it lies inside an artifact of this repository."""
    try:
        target = contained(path, repo_root())
    except ArtifactError:
        if role in SOURCE_ROLES:
            return []  # a user's source file outside the repository: nothing here to compare
        return [
            f"input '{role}' {path}: outside the repository {repo_root()}; its lineage cannot "
            "be checked; rebuild this artifact from inputs inside the repository"
        ]
    owner = find_manifest_dir(target)
    if owner is None:
        if role in SOURCE_ROLES:
            return []
        if not target.exists():
            return [
                f"input '{role}' {path}: no longer exists; restore it (`dvc checkout` or "
                "`dvc pull`) or rerun the stage that writes it"
            ]
        now = hash_tree(target)[0]  # not an artifact: compare the bytes themselves
    else:
        try:
            now = recorded_hash(target) if target.exists() else None
        except ArtifactError as err:
            return [f"input '{role}' {path}: {err}"]
    if now is None:
        return [
            f"input '{role}' {path}: no longer exists; restore it (`dvc checkout` or "
            "`dvc pull`) or rerun the stage that writes it"
        ]
    if now != sha:
        return [f"input '{role}' {path}: recorded sha256 {sha} but it now holds {now} (stale)"]
    return []


def input_problems(manifest: Manifest) -> list[str]:
    """Every broken link among a manifest's inputs (see `_check_input`)."""
    return [line for ref in manifest.inputs for line in _check_input(ref.role, ref.path, ref.content_sha256)]  # fmt: skip


def lineage(
    path: str | Path, *, role: str = "artifact", _seen: set[str] | None = None
) -> dict[str, Any]:
    """The provenance tree of an artifact: itself, then each input's tree, recursively.
    Inputs outside the repository are listed, not followed."""
    path = Path(path)
    if _seen is None and not path.exists():
        raise ArtifactError(f"{path}: no such artifact; give a path under data/ (see `dvc status`)")
    _seen = set() if _seen is None else _seen
    node: dict[str, Any] = {"role": role, "path": _display(path)}
    try:
        contained(path, repo_root())
    except ArtifactError:
        node.update(kind="outside the repository (not followed)", content_sha256=None)
        return node
    owner = find_manifest_dir(path)
    if owner is None:
        node.update(kind="external", content_sha256=hash_tree(path)[0] if path.exists() else None)
        return node
    try:
        manifest = read_manifest(owner)
    except ArtifactError as err:
        node.update(kind="BAD", error=str(err), content_sha256=None)
        return node
    node.update(kind=manifest.kind, stage=manifest.stage, content_sha256=manifest.content_sha256)
    node["code_version"] = manifest.code_version
    key = str(owner)
    if key in _seen:
        node["inputs"] = "(seen above)"
        return node
    _seen.add(key)
    node["inputs"] = [
        {**lineage(ref.path, role=ref.role, _seen=_seen), "content_sha256": ref.content_sha256}
        for ref in manifest.inputs
    ]
    return node


def audit(root: str | Path = "data") -> list[dict[str, Any]]:
    """Every adapter under `root` with the teacher(s) that produced it. Status BAD, with the
    problem in `error`: a manifest that cannot be read, or an input whose link is broken (a
    missing upstream artifact, one outside the repository, a stale one; `input_problems`)."""
    rows = []
    for found in find_artifacts(root):
        manifest = found.manifest
        if manifest is None:
            rows.append(
                {"adapter": _display(found.dir), "stage": "?", "status": "BAD",
                 "error": found.error, "teacher": None, "student": None, "parent_adapter": None,
                 "adapter_sha256": None, "code_version": None, "lock_sha256": None,
                 "device": None, "cpu_capability": None, "created": None}
            )  # fmt: skip
            continue
        adapters = [rel for rel, kind in manifest.outputs.items() if kind == "adapter"]
        if manifest.kind == "adapter" and not adapters:
            adapters = ["."]
        problems = input_problems(manifest) if adapters else []
        for rel in adapters:
            by_role = {r.role: r.model_dump() for r in manifest.inputs}
            rows.append(
                {
                    "adapter": _display(found.dir / rel),
                    "stage": manifest.stage,
                    "status": "BAD" if problems else "OK",
                    "error": "; ".join(problems) or None,
                    "adapter_sha256": manifest.content_sha256,
                    "teacher": _resolve_teacher(manifest),
                    "student": by_role.get("student"),
                    "parent_adapter": by_role.get("parent_adapter"),
                    "code_version": manifest.code_version,
                    "lock_sha256": manifest.environment.get("lock_sha256"),
                    "device": manifest.device,
                    "cpu_capability": manifest.environment.get("cpu_capability"),
                    "created": manifest.ended_at,
                }
            )
    return rows


def _resolve_teacher(manifest: Manifest) -> dict[str, Any] | None:
    """The model that graded this adapter: a direct `teacher` input, or the teacher
    recorded in the manifest of the `teacher_cache` it was distilled from (when that cache
    is gone or unreadable: its path, no hash, and the error)."""
    for ref in manifest.inputs:
        if ref.role == "teacher":
            return {"path": ref.path, "content_sha256": ref.content_sha256}
    for ref in manifest.inputs:
        if ref.role == "teacher_cache":
            try:
                owner = find_manifest_dir(contained(ref.path, repo_root()))
                if owner is not None:
                    inner = read_manifest(owner).input("teacher")
                    return {
                        "path": inner.path,
                        "content_sha256": inner.content_sha256,
                        "via": ref.path,
                    }
                raise ArtifactError(f"{ref.path}: teacher_cache no longer exists")
            except ArtifactError as err:
                return {"path": ref.path, "content_sha256": None, "error": str(err)}
    return None
