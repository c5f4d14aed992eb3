"""One writer at a time for each output folder (issue 19: two runs at once are safe and say so).

Two `retroloop stage distill` at once used to share `data/checkpoints/distill/` (its checkpoints
and live dvclive logs) and both died on a corrupted JSON file. Each stage's `run` is wrapped in
`@exclusive("out_dir", ...)`, so whoever calls it (the CLI that `dvc repro` calls, the Prefect
task, a test) first takes one lock per folder it writes:

    data/.distill.lock               for data/distill/
    data/checkpoints/.distill.lock   for data/checkpoints/distill/

an advisory `flock` on the file, which holds the holder's pid, command and start time (JSON) for
the refusal message. `flock` belongs to the open file: the kernel drops it when the holder exits,
however it exits (kill -9 included), so a dead holder never blocks the next run and there is
nothing to reclaim. A second run is refused at once with `BusyError` (one line, exit 2) naming
the holder. Under torchrun only rank 0 locks (every rank runs the same stage together).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from retroloop.errors import ArtifactError, BusyError

F = TypeVar("F", bound=Callable[..., Any])


def _holder_text(info: dict) -> str:
    if not info.get("pid"):
        return "another process"
    command = f" (`{info['command']}`)" if info.get("command") else ""
    since = f" since {info['since']}" if info.get("since") else ""
    return f"pid {info['pid']}{command}{since}"


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""


def try_flock(fd: int) -> bool:
    """Take an exclusive `flock` on the open file `fd` without waiting: True when taken, False
    when another open file holds it (EWOULDBLOCK / EAGAIN, or EACCES where a filesystem says so);
    any other error propagates. The one non-blocking probe behind the stage locks here, the
    registry's cycle lock, `retroloop run`'s check that DVC is idle and the cycle slot's
    dead-holder check (`tasks/slot.py`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def lock_path(folder: Path) -> Path:
    """The lock file of `folder`: `.<name>.lock` beside it."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def folder_lock(folder: Path, stage: str) -> Iterator[Path]:
    """Hold `folder`'s lock while the block runs, or raise `BusyError` at once if another
    process (or another run in this one) holds it."""
    path = lock_path(folder)
    blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ArtifactError(
            f"{blocker}: is a file, but stage '{stage}' writes in this folder; move or delete "
            "the file, then rerun"
        )
    # Folders made only to hold the lock are removed again if the run leaves them empty: a
    # stage refused on bad input must not leave a `data/` behind.
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not try_flock(fd):
            os.close(fd)
            raise BusyError(
                f"{folder}: stage '{stage}' is already writing it in this repository: "
                f"{_holder_text(_read_holder(path))} holds {path}; wait for it to finish "
                "(or stop it), then rerun"
            ) from None
        # A holder that was releasing unlinked the file between our open and our flock: the
        # lock we hold is on a name nobody else will open. Start again on the current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "command": _command(), "since": dt.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding it: a waiting opener re-checks the inode
        os.close(fd)
        for folder in made:  # deepest first
            with contextlib.suppress(OSError):  # not empty: the run wrote there; keep it
                folder.rmdir()


def exclusive(*folder_args: str) -> Callable[[F], F]:
    """Decorate a stage's `run`: hold the lock of each named folder argument (its value, or the
    default) for the whole call. `@exclusive("out_dir", "checkpoint_dir")`."""

    def wrap(run: F) -> F:
        signature = inspect.signature(run)
        stage = run.__module__.rsplit(".", 1)[-1]

        @functools.wraps(run)
        def locked(*args: Any, **kwargs: Any) -> Any:
            if os.environ.get("RANK", "0") != "0":
                return run(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with contextlib.ExitStack() as stack:
                for name in folder_args:
                    stack.enter_context(folder_lock(Path(bound.arguments[name]), stage))
                return run(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return wrap


def dvc_lock_holder(repo: Path = Path(".")) -> str:
    """Who holds DVC's repository lock, `.dvc/tmp/lock` (zc.lockfile writes the pid in it)."""
    path = Path(repo) / ".dvc" / "tmp" / "lock"
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except OSError:
        pid = ""
    if not pid.isdigit():
        return f"another DVC process holds {path}"
    command = ""
    with contextlib.suppress(OSError):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        command = " ".join(" ".join(Path(args[0]).name.split() + args[1:]).split())
        command = command if len(command) <= 80 else command[:77] + "..."
    return f"pid {pid}" + (f" (`{command}`)" if command else "") + f" holds {path}"
