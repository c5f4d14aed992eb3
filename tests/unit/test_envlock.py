"""requirements.lock: it matches pyproject.toml, an edit to one without the other is a one-line
error from `make setup`'s first step, and manifests record the lock's hash."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from retroloop import envlock
from tests.conftest import REPO_ROOT


def _copy_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "retroloop").mkdir(parents=True)
    for name in ("pyproject.toml", envlock.LOCK_NAME):
        shutil.copy(REPO_ROOT / name, root / name)
    shutil.copy(REPO_ROOT / "retroloop" / "envlock.py", root / "retroloop" / "envlock.py")
    return root


def _check(root: Path) -> subprocess.CompletedProcess:
    # What `make setup` runs first, with the system Python: the standard library only.
    return subprocess.run(
        [sys.executable, "-I", str(root / "retroloop" / "envlock.py"), "check"],
        capture_output=True,
        text=True,
    )


def test_the_committed_lock_matches_pyproject():
    assert envlock.check(REPO_ROOT) is None, "run `make lock` and commit requirements.lock"


def test_every_dependency_is_pinned_with_hashes():
    text = (REPO_ROOT / envlock.LOCK_NAME).read_text()
    pins = envlock.pins(REPO_ROOT / envlock.LOCK_NAME)
    assert {
        "torch",
        "transformers",
        "peft",
        "prefect",
        "dvc",
        "sqlalchemy",
        "fastapi",
    } <= pins.keys()
    assert {"setuptools", "wheel", "pytest"} <= pins.keys()  # build backend and dev tools too
    assert text.count("--hash=sha256:") >= len(pins)
    assert pins["torch"].startswith("2.13.0")


def test_a_dependency_edit_without_relocking_is_a_one_line_error(tmp_path):
    root = _copy_project(tmp_path)
    assert _check(root).returncode == 0
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"polars>=1.0"', '"polars>=1.1"'))
    done = _check(root)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "make lock" in done.stderr
    assert "pyproject.toml" in done.stderr and envlock.LOCK_NAME in done.stderr


def test_edits_outside_the_dependencies_need_no_relock(tmp_path):
    root = _copy_project(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("line-length = 100", "line-length = 99"))
    assert _check(root).returncode == 0


def test_a_missing_lock_is_a_one_line_error(tmp_path):
    root = _copy_project(tmp_path)
    (root / envlock.LOCK_NAME).unlink()
    done = _check(root)
    assert done.returncode == 2 and "make lock" in done.stderr


def test_stamp_makes_an_edited_lock_current_again(tmp_path):
    root = _copy_project(tmp_path)
    pyproject = root / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"polars>=1.0"', '"polars>=1.1"'))
    assert envlock.check(root) is not None
    envlock.stamp(root)
    assert envlock.check(root) is None
    assert (root / envlock.LOCK_NAME).read_text().count(envlock.HEADER) == 1


def test_environment_names_what_differs_from_the_lock(tmp_path):
    root = _copy_project(tmp_path)
    assert envlock.environment(root)["lock_sha256"] == envlock.lock_sha256(REPO_ROOT)
    lock = root / envlock.LOCK_NAME
    lock.write_text(lock.read_text().replace("\ntorch==", "\ntorch==0.0.1+other #", 1))
    differs = envlock.environment(root)["differs_from_lock"]
    assert differs["torch"].startswith("0.0.1+other -> ")
    assert envlock.environment(tmp_path / "nowhere") == {
        "lock_sha256": None,
        "differs_from_lock": {},
    }
