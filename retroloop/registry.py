"""The cycle registry: exactly-once cycle numbers, all-or-nothing registration, retry records.

Layout (`cycle.registry`, default data/registry):

    .lock                  held (flock) by the one cycle running on this registry; says who
    cycles/cycle-NNNN/     registered cycles: complete, each with its manifest — nothing else
    .work/                 a cycle being written; renamed into cycles/ in one step, or removed
    attempts/<sha16>.json  what the watch flow tried on each domain file, and how it ended

Why a lock for the whole cycle and not only for the number: cycle n is the parent and, by
default, the teacher of cycle n+1, so two cycles on one registry cannot overlap in any useful
way. The lock is `fcntl.flock` on `.lock`: the kernel drops it when its holder dies, kill -9
included, so a killed cycle never blocks the next one (local filesystems; on NFS use one
registry per machine). A second cycle that finds it held refuses with one line naming the holder.

Why registration is a rename: the whole cycle (adapter, data split, report, manifest) is written
under `.work/` and renamed to `cycles/cycle-NNNN` at the very end. A rename is atomic on one
filesystem, so `audit`, `lineage` and the next cycle see either the complete cycle or nothing,
whatever point a kill lands on. Leftovers of killed cycles in `.work/` are removed by the next
cycle, under the lock. A number is `1 + the highest registered`, so a failed cycle leaves no gap.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retroloop.artifacts import ArtifactWriter, now_iso, read_manifest, write_json_atomic
from retroloop.errors import ArtifactError
from retroloop.runlock import try_flock

LOCK = ".lock"
WORK = ".work"
CYCLE_PREFIX = "cycle-"
TRAIN_DATA = "train_data"  # the manifest role of the domain file a cycle trained on


class RegistryBusyError(ArtifactError):
    """Another cycle holds the registry: the refusal a concurrent cycle gets."""


@dataclass(frozen=True)
class Claim:
    """The right to register cycle `number`: valid from `acquire` until `release` (or for the
    duration of a `claim_next_cycle` block); `fd` holds the registry's flock meanwhile."""

    root: Path
    number: int
    fd: int = field(default=-1, compare=False, repr=False)

    @property
    def final_dir(self) -> Path:
        return cycle_dir(self.root, self.number)


def cycle_dir(root: Path, number: int) -> Path:
    return Path(root) / "cycles" / f"{CYCLE_PREFIX}{number:04d}"


def cycle_dirs(root: Path) -> list[Path]:
    """Registered cycles, oldest first (a directory counts only with its manifest)."""
    return [p for p in _numbered(root) if (p / "manifest.json").is_file()]


def untracked_cycles(root: Path) -> list[Path]:
    """Registered cycles with no `cycle-NNNN.dvc` beside them, oldest first: the one being
    registered, and any whose cycle was killed between its rename and its `dvc add`."""
    return [p for p in cycle_dirs(root) if not p.with_name(p.name + ".dvc").is_file()]


def _numbered(root: Path) -> list[Path]:
    """Every `cycles/cycle-NNNN` directory, registered or not, by number."""
    found = Path(root).joinpath("cycles").glob(f"{CYCLE_PREFIX}*")
    return sorted((p for p in found if _number(p) is not None), key=_number)


def _number(path: Path) -> int | None:
    digits = path.name.removeprefix(CYCLE_PREFIX)
    return int(digits) if digits.isdigit() else None


def registered_sources(root: Path) -> dict[str, Path]:
    """sha256 of each domain file a registered cycle trained on -> that cycle's directory.

    This, not an ingested copy, is what makes a file "done" for the watch flow: a cycle that
    failed or was killed registered nothing, so its file is still to do."""
    out: dict[str, Path] = {}
    for directory in cycle_dirs(root):
        with contextlib.suppress(ArtifactError):
            for ref in read_manifest(directory).inputs:
                if ref.role == TRAIN_DATA:
                    out.setdefault(ref.content_sha256, directory)
    return out


# --------------------------------------------------------------------------- the claim


def _open_lock(root: Path) -> int:
    """Create the registry and its lock file: the first write, and the writability check."""
    if (blocker := next((p for p in (Path(root), *Path(root).parents) if p.exists()), None)) and not blocker.is_dir():  # fmt: skip
        raise ArtifactError(
            f"cycle.registry: {blocker} is a file, not a folder; point cycle.registry at a "
            "folder (new or a registry), or move the file"
        )
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        probe = Path(root) / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")  # root ignores mode bits in os.access; only a real write tells
        probe.unlink()
        return os.open(Path(root) / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ArtifactError(
            f"cycle.registry: {root} is not writable ({err.strerror or err}); "
            "point cycle.registry at a writable folder"
        ) from None


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"cycle {info['cycle']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    return "another cycle"


def acquire(root: str | Path) -> Claim:
    """Take the registry lock and the next cycle number; hold them until `release(claim)`.

    Refuses at once with `RegistryBusyError` when another cycle holds the lock (callers that
    should wait, wait before this: the Prefect flow queues on its concurrency slot). The kernel
    drops the lock if this process dies, so a killed cycle never keeps the registry.
    """
    root = Path(root)
    fd = _open_lock(root)
    try:
        if not try_flock(fd):
            raise RegistryBusyError(
                f"cycle.registry: {root} is busy with {_holder(fd)}; "
                "run this cycle when it has finished (or give it its own cycle.registry)"
            )
        shutil.rmtree(root / WORK, ignore_errors=True)  # leftovers of killed cycles
        number = max((_number(p) for p in _numbered(root)), default=0) + 1
        info = {"cycle": number, "pid": os.getpid(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info | {"since": now_iso()}).encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return Claim(root, number, fd)


def release(claim: Claim) -> None:
    """Give the registry lock back (closing the last descriptor releases the flock)."""
    try:
        os.ftruncate(claim.fd, 0)
    finally:
        os.close(claim.fd)


@contextlib.contextmanager
def claim_next_cycle(root: str | Path) -> Iterator[Claim]:
    """`acquire` for the duration of the block, then `release`."""
    claim = acquire(root)
    try:
        yield claim
    finally:
        release(claim)


@contextlib.contextmanager
def publish(claim: Claim, *, stage: str, kind: str) -> Iterator[ArtifactWriter]:
    """Write the cycle under `.work/` and rename it to `cycles/cycle-NNNN` in one step.

    Unlike `artifacts.atomic_artifact` this never replaces an existing directory: a registered
    cycle is never overwritten. The caller must call `writer.finish(...)` in the block.
    """
    final = claim.final_dir
    tmp = claim.root / WORK / final.name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = ArtifactWriter(tmp, final, stage, kind)
    try:
        yield writer
        assert writer.manifest is not None, "publish(): call writer.finish() in the block"
        if final.exists():
            raise ArtifactError(f"{final} already exists; a registered cycle is never overwritten")
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename survives a power cut, not only a kill
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------- watch attempts


def _attempts_file(root: Path, sha256: str) -> Path:
    return Path(root) / "attempts" / f"{sha256[:16]}.json"


def attempts(root: str | Path, sha256: str) -> list[dict[str, Any]]:
    """Earlier attempts on the file with this content, oldest first ("busy" = the registry was
    held by another cycle: not the file's fault, not counted against it)."""
    path = _attempts_file(Path(root), sha256)
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("attempts", []))


def failed_attempts(root: str | Path, sha256: str) -> list[dict[str, Any]]:
    """Attempts that did not register a cycle. One still marked "started" was killed: a
    running attempt holds the registry lock, and the watch flow only reads this between runs."""
    return [a for a in attempts(root, sha256) if a.get("status") not in ("registered", "busy")]


def record_attempt(
    root: str | Path, source: Path, sha256: str, status: str, error: str | None = None
) -> None:
    """Append ("started") or settle ("registered" | "failed") the latest attempt on a file."""
    history = attempts(root, sha256)
    if status == "started" or not history:
        history.append({"file": str(source), "started_at": now_iso(), "pid": os.getpid()})
    history[-1].update(status=status, error=error, updated_at=now_iso())
    path = _attempts_file(Path(root), sha256)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"sha256": sha256, "attempts": history})
    except OSError as err:
        raise ArtifactError(
            f"cycle.registry: cannot record the attempt in {path} ({err.strerror or err}); "
            "point cycle.registry at a writable folder"
        ) from None
