"""Manifests, content hashes, atomic writes and the lineage walk (DESIGN.md §3).

Every stage writes its outputs into a temporary sibling directory and renames it into
place only after `manifest.json` is written, so a killed stage never leaves a
half-written artifact that looks whole. `content_sha256` is the hash of the sorted
(relative path, file sha256) list of everything in the artifact except the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from retroloop.envlock import environment
from retroloop.errors import ArtifactError

MANIFEST = "manifest.json"
METRICS = "metrics.json"
KINDS = ("model", "dataset", "analysis", "teacher_cache", "adapter", "rollouts", "report")
_LIBRARIES = ("torch", "transformers", "peft", "datasets", "polars", "prefect", "dvc", "vllm")


class InputRef(BaseModel):
    """An upstream artifact (or a file inside one) by role."""

    model_config = ConfigDict(extra="forbid")
    role: str
    path: str
    content_sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    stage: str
    content_sha256: str
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")
    outputs: dict[str, str] = Field(default_factory=dict, description="relative path -> kind")
    inputs: list[InputRef] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    params_sha256: str = ""
    seed: int | None = None
    code_version: str = "unknown"
    library_versions: dict[str, str] = Field(default_factory=dict)
    environment: dict[str, Any] = Field(
        default_factory=dict,
        description="requirements.lock's sha256 and installed packages that differ from it",
    )
    device: str = "cpu"
    started_at: str = ""
    ended_at: str = ""
    prefect_run_id: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)

    def input(self, role: str) -> InputRef:
        for ref in self.inputs:
            if ref.role == role:
                return ref
        raise ArtifactError(f"manifest of stage '{self.stage}' has no input with role '{role}'")


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> tuple[str, dict[str, str]]:
    """(content_sha256, per-file hashes) of a file or directory, manifest excluded."""
    root = Path(root)
    if root.is_file():
        return sha256_file(root), {root.name: sha256_file(root)}
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    listing = "".join(f"{rel}\0{sha}\n" for rel, sha in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest(), files


def find_manifest_dir(path: Path) -> Path | None:
    """The nearest directory at or above `path` that holds a manifest."""
    path = Path(path).resolve()
    for candidate in [path, *path.parents] if path.is_dir() else list(path.parents):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def read_manifest(artifact_dir: Path) -> Manifest:
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{path}: no manifest; run the stage that produces {artifact_dir} first"
        )
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ArtifactError(f"{path}: not a valid manifest: {str(err).splitlines()[0]}") from None


def input_ref(role: str, path: str | Path) -> InputRef:
    """Reference an upstream artifact. Directories with a manifest use its recorded hash
    (after checking the artifact is whole); anything else is hashed now."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: input '{role}' does not exist; run the upstream stage first")
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path)
        return InputRef(role=role, path=_display(path), content_sha256=manifest.content_sha256)
    owner = find_manifest_dir(path)
    if owner is not None:
        rel = path.resolve().relative_to(owner).as_posix()
        files = read_manifest(owner).files
        prefix = rel + "/"
        sub = {k[len(prefix) :]: v for k, v in files.items() if k.startswith(prefix)}
        if rel in files:
            return InputRef(role=role, path=_display(path), content_sha256=files[rel])
        if sub:
            listing = "".join(f"{k}\0{v}\n" for k, v in sorted(sub.items()))
            return InputRef(
                role=role,
                path=_display(path),
                content_sha256=hashlib.sha256(listing.encode()).hexdigest(),
            )
    return InputRef(role=role, path=_display(path), content_sha256=hash_tree(path)[0])


def _display(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


# --------------------------------------------------------------------------- provenance


def code_version() -> str:
    """Git sha of the checkout, with `-dirty` when tracked files differ from it."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- atomic output


_run_started_at: str | None = None


def mark_run_started() -> None:
    """Record now as the start of the current stage run (`stages.common.setup_run` calls it),
    so a manifest's `started_at` covers the stage's work, not only the writing at its end."""
    global _run_started_at
    _run_started_at = now_iso()


class ArtifactWriter:
    """Collects what a stage needs to write its manifest; created by `atomic_artifact`."""

    def __init__(self, tmp_dir: Path, final_dir: Path, stage: str, kind: str) -> None:
        self.dir = tmp_dir
        self.final_dir = final_dir
        self.stage = stage
        self.kind = kind
        self.started_at = _run_started_at or now_iso()
        self.inputs: list[InputRef] = []
        self.outputs: dict[str, str] = {}
        self.metrics: dict[str, Any] = {}
        self.manifest: Manifest | None = None

    def add_input(self, role: str, path: str | Path) -> InputRef:
        ref = input_ref(role, path)
        self.inputs.append(ref)
        return ref

    def finish(
        self, *, params: dict[str, Any], params_sha256: str, seed: int | None, device: str
    ) -> Manifest:
        """Write `metrics.json` (what `dvc metrics show` reads) and `manifest.json`."""
        write_json_atomic(self.dir / METRICS, self.metrics)
        content, files = hash_tree(self.dir)
        self.manifest = Manifest(
            kind=self.kind,
            stage=self.stage,
            content_sha256=content,
            files=files,
            outputs=self.outputs,
            inputs=self.inputs,
            params=params,
            params_sha256=params_sha256,
            seed=seed,
            code_version=code_version(),
            library_versions=library_versions(),
            environment=environment(),
            device=device,
            started_at=self.started_at,
            ended_at=now_iso(),
            prefect_run_id=os.environ.get("PREFECT__FLOW_RUN_ID") or _prefect_run_id(),
            metrics=self.metrics,
        )
        write_json_atomic(self.dir / MANIFEST, self.manifest.model_dump(mode="json"))
        return self.manifest


def _prefect_run_id() -> str | None:
    # Set by tasks/ before calling a stage; the core never imports Prefect.
    return os.environ.get("RETROLOOP_PREFECT_RUN_ID")


@contextlib.contextmanager
def atomic_artifact(out_dir: str | Path, *, stage: str, kind: str) -> Iterator[ArtifactWriter]:
    """Write into `.<name>.tmp-<pid>` beside `out_dir`; rename into place on success.

    On any exception the temporary directory is removed and `out_dir` is untouched.
    The caller must call `writer.finish(...)` before leaving the block.
    """
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer = ArtifactWriter(tmp, final, stage, kind)
    try:
        yield writer
        if writer.manifest is None:
            raise RuntimeError(f"stage '{stage}' left atomic_artifact without calling finish()")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_orphans(final: Path) -> None:
    """Remove `.<name>.tmp-<pid>` / `.old-<pid>` leftovers of killed writers (pid not running)."""
    for leftover in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if not pid.isdigit() or not kind.endswith((".tmp", ".old")) or _pid_alive(int(pid)):
            continue
        shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- verify / lineage / audit


def verify(artifact_dir: Path) -> list[str]:
    """Re-hash an artifact; return one line per mismatch (empty = intact)."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    content, files = hash_tree(artifact_dir)
    problems = []
    for rel, sha in manifest.files.items():
        if rel not in files:
            problems.append(f"{artifact_dir / rel}: missing")
        elif files[rel] != sha:
            problems.append(
                f"{artifact_dir / rel}: sha256 {files[rel][:12]} != manifest {sha[:12]}"
            )
    for rel in files.keys() - manifest.files.keys():
        problems.append(f"{artifact_dir / rel}: not in the manifest")
    if not problems and content != manifest.content_sha256:
        problems.append(f"{artifact_dir}: content_sha256 differs from the manifest")
    return problems


def lineage(
    path: str | Path, *, role: str = "artifact", _seen: set[str] | None = None
) -> dict[str, Any]:
    """The provenance tree of an artifact: itself, then each input's tree, recursively."""
    _seen = set() if _seen is None else _seen
    path = Path(path)
    owner = find_manifest_dir(path)
    node: dict[str, Any] = {"role": role, "path": _display(path)}
    if owner is None:
        node.update(kind="external", content_sha256=hash_tree(path)[0] if path.exists() else None)
        return node
    manifest = read_manifest(owner)
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


def find_manifests(root: str | Path = "data") -> list[tuple[Path, Manifest]]:
    root = Path(root)
    found = []
    for path in sorted(root.rglob(MANIFEST)):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # temporary or old directories
        try:
            found.append((path.parent, read_manifest(path.parent)))
        except ArtifactError:
            continue
    return found


def audit(root: str | Path = "data") -> list[dict[str, Any]]:
    """Every adapter under `root` with the teacher(s) that produced it."""
    rows = []
    for directory, manifest in find_manifests(root):
        adapters = [rel for rel, kind in manifest.outputs.items() if kind == "adapter"]
        if manifest.kind == "adapter" and not adapters:
            adapters = ["."]
        for rel in adapters:
            teacher = _resolve_teacher(manifest)
            rows.append(
                {
                    "adapter": _display(directory / rel),
                    "stage": manifest.stage,
                    "adapter_sha256": manifest.content_sha256,
                    "teacher": teacher,
                    "student": next(
                        (r.model_dump() for r in manifest.inputs if r.role == "student"), None
                    ),
                    "parent_adapter": next(
                        (r.model_dump() for r in manifest.inputs if r.role == "parent_adapter"),
                        None,
                    ),
                    "code_version": manifest.code_version,
                    "lock_sha256": manifest.environment.get("lock_sha256"),
                    "created": manifest.ended_at,
                }
            )
    return rows


def _resolve_teacher(manifest: Manifest) -> dict[str, Any] | None:
    """The model that graded this adapter: a direct `teacher` input, or the teacher
    recorded in the manifest of the `teacher_cache` it was distilled from."""
    for ref in manifest.inputs:
        if ref.role == "teacher":
            return {"path": ref.path, "content_sha256": ref.content_sha256}
    for ref in manifest.inputs:
        if ref.role == "teacher_cache":
            owner = find_manifest_dir(Path(ref.path))
            if owner is not None:
                with contextlib.suppress(ArtifactError):
                    inner = read_manifest(owner).input("teacher")
                    return {
                        "path": inner.path,
                        "content_sha256": inner.content_sha256,
                        "via": ref.path,
                    }
    return None
