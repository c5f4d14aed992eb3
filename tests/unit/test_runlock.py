"""Two runs at once on one repository are refused at once, in one line naming the holder (issue
19, item 6): a stage whose output folder another process is writing (`retroloop.runlock`), and
`retroloop run`'s DVC calls while a `dvc repro` holds `.dvc/tmp/lock`. A holder killed with -9
never blocks the next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retroloop.cli import main
from retroloop.errors import BusyError
from retroloop.runlock import folder_lock
from tests.conftest import TINY_PROFILE
from tests.unit.test_cli_errors import error_line


def _holder(cwd: Path, code: str) -> subprocess.Popen:
    """A process that runs `code` (which takes a lock) and then waits; returns once it holds."""
    script = textwrap.dedent(code) + "\nprint('held', flush=True)\nimport time\ntime.sleep(120)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_stage_another_process_is_running_is_refused_at_once_naming_it(in_tmp, capsys) -> None:
    holder = _holder(
        in_tmp,
        """
        import sys; sys.argv = ["retroloop", "stage", "distill"]
        from retroloop.runlock import folder_lock
        held = folder_lock("data/distill", "distill")
        held.__enter__()
        """,
    )
    try:
        code = main(["stage", "distill", "--params", str(TINY_PROFILE)])
        line = error_line(capsys.readouterr().err, "data/distill", f"pid {holder.pid}")
        assert code == 2
        assert "`retroloop stage distill`" in line and "data/.distill.lock" in line
        assert not Path("data/distill").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_with_sigkill_never_blocks_the_next_run(in_tmp) -> None:
    holder = _holder(
        in_tmp,
        """
        from retroloop.runlock import folder_lock
        held = folder_lock("data/distill", "distill")
        held.__enter__()
        """,
    )
    with pytest.raises(BusyError), folder_lock(Path("data/distill"), "distill"):
        pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with folder_lock(Path("data/distill"), "distill") as path:  # the kernel dropped its flock
        assert str(os.getpid()) in path.read_text()
    assert not path.exists()  # released: nothing left behind


def test_a_second_run_in_the_same_process_is_refused_and_the_first_keeps_the_lock(in_tmp) -> None:
    with folder_lock(Path("data/x"), "x"):
        with pytest.raises(BusyError, match=f"pid {os.getpid()}"):
            with folder_lock(Path("data/x"), "x"):
                pass
        with pytest.raises(BusyError):  # the refusal did not release the holder's lock
            with folder_lock(Path("data/x"), "x"):
                pass
    with folder_lock(Path("data/x"), "x"):
        pass


def test_pipeline_dvc_calls_while_dvc_repro_runs_are_one_line_naming_the_lock(in_tmp) -> None:
    from dvc.repo import Repo

    from flows.pipeline import commit_stage, stage_is_current

    Repo.init(str(in_tmp), no_scm=True).close()
    Path("dvc.yaml").write_text("stages:\n  prepare:\n    cmd: echo hi\n")
    assert stage_is_current("prepare") is False  # DVC works while nobody holds its lock
    holder = _holder(
        in_tmp,
        """
        import zc.lockfile
        lock = zc.lockfile.LockFile(".dvc/tmp/lock")
        """,
    )
    try:
        for call in (stage_is_current, commit_stage):
            with pytest.raises(BusyError) as err:
                call("prepare")
            message = str(err.value)
            assert ".dvc/tmp/lock" in message and f"pid {holder.pid}" in message, message
            assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()
