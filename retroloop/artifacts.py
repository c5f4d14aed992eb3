"""Manifests, content hashes, atomic writes and the lineage walk (DESIGN.md §3).

Every stage writes its outputs into a temporary sibling directory and renames it into
place only after `manifest.json` is written, so a killed stage never leaves a
half-written artifact that looks whole. `content_sha256` is the hash of the sorted
(relative path, file sha256) list of everything in the artifact except the manifest and
the run-dependent files (`run.json`, `run_*.csv`), computed by `retroloop.canonical.hash_tree`;
what a manifest records about the run (code version, libraries, compute) is `retroloop.runinfo`.
Both stay importable from here.

Inputs are verified before they are consumed: `input_ref` / `verify_inputs` re-hash the
bytes on disk, compare them file by file with the upstream manifest, and refuse a mismatch
with an `ArtifactError` naming the file and both hashes. The hash recorded for an input is
the hash of those bytes, never the upstream manifest's word for it. `verify`, `lineage` and
`audit` live in `retroloop.provenance`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from retroloop.canonical import (
    MANIFEST,
    RUN,
    canonicalize,
    hash_tree,
    is_run_file,
    listing_sha256,  # noqa: F401  (re-exported: callers import it from here)
    sha256_file,  # noqa: F401  (re-exported: callers import it from here)
    split_run_columns,
    split_run_dependent,
)
from retroloop.envlock import environment
from retroloop.errors import ArtifactError, WriteError, disk_full_reason
from retroloop.runinfo import (
    CODE_PATHS,  # noqa: F401  (re-exported: callers import it from here)
    code_version,
    compute_environment,
    library_versions,
    now_iso,
)

METRICS = "metrics.json"
KINDS = ("model", "dataset", "analysis", "teacher_cache", "adapter", "rollouts", "report")


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
        description="requirements.lock's sha256, installed packages that differ from it, and"
        " the compute: torch's CPU kernel level (cpu_capability), threads, accelerator",
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


# --------------------------------------------------------------------------- verify before consume

# resolved path -> (stat signature of its files, verified hash): a stage verifies its inputs
# before loading them and records them at the end; the second look re-hashes only what changed.
_verified: dict[str, tuple[tuple, str]] = {}


def _signature(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns, st.st_ino) for p in files)


def verify_input(path: str | Path, role: str = "input") -> str:
    """Re-hash `path` (an artifact, or a file or folder inside one), check every file against
    the owning manifest's per-file hashes, and return the hash of the bytes read.

    Raises `ArtifactError` naming the file and both hashes on a mismatch, a file missing from
    disk or from the manifest, or an unreadable manifest. A path outside any artifact (a
    user's source file) has nothing to check against and is only hashed.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: input '{role}' does not exist; run the upstream stage first")
    key, sig = str(path.resolve()), _signature(path)
    if key in _verified and _verified[key][0] == sig:
        return _verified[key][1]
    content, files = hash_tree(path)
    owner = find_manifest_dir(path)
    if owner is not None:
        manifest = read_manifest(owner)
        rel = path.resolve().relative_to(owner).as_posix()
        if path.is_file():
            actual, recorded = {rel: content}, {rel: manifest.files.get(rel, "")}
        else:
            prefix = "" if rel == "." else rel + "/"
            actual = {prefix + k: v for k, v in files.items()}
            recorded = {k: v for k, v in manifest.files.items() if k.startswith(prefix)}
        fix = f"rerun `retroloop stage {manifest.stage}` or `dvc checkout` it"
        for name in sorted(actual.keys() | recorded.keys()):
            got, want = actual.get(name, "(missing)"), recorded.get(name) or "(not recorded)"
            if got != want:
                raise ArtifactError(
                    f"{owner / name}: input '{role}' has sha256 {got} but "
                    f"{owner / MANIFEST} records {want}; {fix}"
                )
        if rel == "." and content != manifest.content_sha256:
            raise ArtifactError(
                f"{owner / MANIFEST}: content_sha256 {manifest.content_sha256} but the files "
                f"hash to {content}; the manifest was edited; {fix}"
            )
    _verified[key] = (sig, content)
    return content


def input_ref(role: str, path: str | Path) -> InputRef:
    """Reference an upstream artifact by role, verified now (see `verify_input`)."""
    return InputRef(role=role, path=_display(Path(path)), content_sha256=verify_input(path, role))


def verify_inputs(
    paths: Mapping[str, str | Path], *, optional: tuple[str, ...] = ()
) -> dict[str, InputRef]:
    """`input_ref` for every role, before a stage reads any of them. Roles in `optional`
    are skipped when their path does not exist (the stage decides what that means)."""
    return {
        role: input_ref(role, path)
        for role, path in paths.items()
        if role not in optional or Path(path).exists()
    }


def contained(path: str | Path, *roots: str | Path) -> Path:
    """`path` resolved, if it lies inside one of `roots`; else `ArtifactError`. Paths read
    from artifacts (index shards, manifest inputs, registry entries) go through this."""
    resolved = Path(path).resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    where = ", ".join(str(r) for r in roots)
    raise ArtifactError(f"{path}: resolves to {resolved}, outside {where}; refusing to read it")


def repo_root() -> Path:
    """The repository the artifacts belong to: the working directory (where dvc runs)."""
    return Path.cwd().resolve()


def _display(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).resolve().as_posix()


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
        """Record a verified input (re-hashed unless it was verified unchanged this run)."""
        ref = input_ref(role, path)
        self.inputs.append(ref)
        return ref

    def finish(
        self, *, params: dict[str, Any], params_sha256: str, seed: int | None, device: str
    ) -> Manifest:
        """Write `metrics.json` and `run.json` (what `dvc metrics show` reads) and the manifest.

        Run-dependent figures (timings, throughput; `retroloop.canonical`) go to `run.json`
        and `run_<name>.csv` beside the stage's CSVs, outside the content hash; safetensors
        headers and adapter configs are put in canonical order before hashing. The manifest
        keeps every metric (it is not part of the content hash)."""
        steady, run = split_run_dependent(self.metrics)
        ended_at = now_iso()
        write_json_atomic(self.dir / METRICS, steady)
        write_json_atomic(
            self.dir / RUN, {"started_at": self.started_at, "ended_at": ended_at, **run}
        )
        for csv in sorted(self.dir.glob("*.csv")):
            if not is_run_file(csv.name):
                split_run_columns(csv)
        canonicalize(self.dir)
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
            environment={**environment(), **compute_environment()},
            device=device,
            started_at=self.started_at,
            ended_at=ended_at,
            prefect_run_id=os.environ.get("PREFECT__FLOW_RUN_ID") or _prefect_run_id(),
            metrics=self.metrics,
        )
        write_json_atomic(self.dir / MANIFEST, self.manifest.model_dump(mode="json"))
        return self.manifest


def _prefect_run_id() -> str | None:
    # Set by tasks/ before calling a stage; the core never imports Prefect.
    return os.environ.get("RETROLOOP_PREFECT_RUN_ID")


def check_output_dir(out_dir: str | Path, *, stage: str, unmarked_ok: bool = False) -> Path:
    """`out_dir` as an absolute path, if a writer for `stage` may replace it; else
    `ArtifactError` (one line: the path, what it is, what to do), before anything is written.

    A writer replaces its output folder whole, so the folder must be new, empty, or an artifact
    this same stage wrote (a rerun). Refused: the working directory or a folder above it, a
    repository root (a `dvc.yaml` or `.git` in it), the repository's `data/`, a folder inside an
    artifact, an artifact another stage wrote (whatever its kind), a file, and a non-empty
    folder that is not an artifact (no `manifest.json`: e.g. a parent of artifacts, or code).
    An artifact whose manifest does not parse may be replaced (rerunning its stage repairs it).
    `unmarked_ok` (a stage's own output folder, from `atomic_artifact`) lets a folder without a
    manifest and without artifacts below be replaced: `dvc repro` deletes a stage's declared
    outs, the manifest among them, and leaves the rest. `export` checks without it first."""
    given = Path(out_dir)
    final = Path(os.path.abspath(given))  # "." and ".." by name, so the temp dir is a sibling
    resolved, cwd = final.resolve(), Path.cwd().resolve()

    def refuse(what: str) -> ArtifactError:
        return ArtifactError(
            f"{given}: {what}; refusing to replace it (nothing was written); give a new or empty "
            "folder, e.g. exported/model"
        )

    if resolved == cwd or cwd.is_relative_to(resolved):
        raise refuse("is the working directory or a folder above it")
    if (resolved / "dvc.yaml").exists() or (resolved / ".git").exists():
        raise refuse("is a repository root")
    if resolved.name == "data" and (resolved.parent / "dvc.yaml").is_file():
        raise refuse("is the repository's data/ folder, which holds every artifact")
    if (owner := find_manifest_dir(resolved.parent)) is not None:
        raise refuse(f"is inside the artifact {_display(owner)}")
    if resolved.exists() and not resolved.is_dir():
        raise refuse("is a file")
    if not resolved.is_dir() or not any(resolved.iterdir()):
        return final
    if (resolved / MANIFEST).is_file():
        try:
            manifest = read_manifest(resolved)
        except ArtifactError:
            return final
        if manifest.stage != stage:
            raise refuse(f"is the {manifest.kind} artifact of stage '{manifest.stage}'")
        return final
    # The first artifact at most three levels down names the case; deeper ones are not searched.
    nested = next((p for depth in ("*/", "*/*/", "*/*/*/") for p in resolved.glob(depth + MANIFEST)), None)  # fmt: skip
    if nested is not None:
        raise refuse(f"holds artifacts (e.g. {_display(nested.parent)})")
    if unmarked_ok:
        return final
    raise refuse("is a folder with files and no manifest.json (not an artifact)")


@contextlib.contextmanager
def atomic_artifact(out_dir: str | Path, *, stage: str, kind: str) -> Iterator[ArtifactWriter]:
    """Write into `.<name>.tmp-<pid>` beside `out_dir`; rename into place on success.

    `out_dir` is checked first (`check_output_dir`, a stage's folder that `dvc repro` emptied
    of its declared outs allowed). On any exception, the final rename
    included, the temporary directory is removed and `out_dir` is untouched.
    The caller must call `writer.finish(...)` before leaving the block.
    """
    final = Path(out_dir)
    target = check_output_dir(final, stage=stage, unmarked_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer = ArtifactWriter(tmp, final, stage, kind)
    try:
        yield writer
        if writer.manifest is None:
            raise RuntimeError(f"stage '{stage}' left atomic_artifact without calling finish()")
        if target.exists():
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if old.exists() and not target.exists():
                old.rename(target)  # put the previous artifact back
            raise
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if reason := disk_full_reason(err):
            raise WriteError(
                f"{final}: cannot write ({reason}); nothing was published and the partial "
                "output was removed; free disk space (or raise `ulimit -f`) and rerun"
            ) from err
        raise
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
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
