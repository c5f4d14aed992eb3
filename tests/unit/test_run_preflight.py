"""Issue 19, item 6: `retroloop run` while a `dvc repro` runs in the same repository is refused
at once, in one line naming DVC's lock and its holder, before Prefect starts (it used to start
the flow and end in a LockError traceback, exit 1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_PROFILE
from tests.unit.test_cli_errors import cli, error_line


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "flows.pipeline", None)  # the flow must not start
    return tmp_path


def test_run_while_dvc_holds_the_repository_lock_is_refused_at_once(repo, capsys) -> None:
    import zc.lockfile  # what DVC locks `.dvc/tmp/lock` with

    lock = zc.lockfile.LockFile(str(repo / ".dvc" / "tmp" / "lock"))  # writes this pid
    try:
        code, err = cli(capsys, "run", "--params", str(TINY_PROFILE))
    finally:
        lock.close()
    assert code == 2
    error_line(err, "another DVC command", f"pid {os.getpid()}", ".dvc/tmp/lock", "wait for it")


def test_a_free_or_stale_lock_lets_the_run_start(repo, capsys) -> None:
    """A lock file nobody holds (a finished or killed dvc repro leaves one) is no refusal:
    the run goes on to the flow (here: the import this test blocks)."""
    (repo / ".dvc" / "tmp" / "lock").write_text("12345")
    code, err = cli(capsys, "run", "--params", str(TINY_PROFILE))
    assert code == 1, err
    error_line(err, "import of flows.pipeline halted")
