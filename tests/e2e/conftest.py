"""One tiny-profile pipeline build per test session, shared by the e2e modules.

`tiny_built` copies the repository (tracked and untracked-but-not-ignored files) into a
temporary git repo, puts the tiny profile in params.yaml, runs `dvc repro` once and commits
the result. Tests that change it work on `clone_built(...)`, a plain copy (seconds), so the
suite pays for one build, not one per module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def sh(
    cmd: list[str], cwd: Path, *, timeout: int = 900, env: dict | None = None, ok: bool = True
) -> subprocess.CompletedProcess:
    """Run a command with the test interpreter's bin/ first on PATH; assert success if `ok`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return proc


def git_commit(cwd: Path, message: str) -> None:
    sh(["git", "add", "-A"], cwd)
    sh(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message], cwd)


def copy_repo(dst: Path) -> Path:
    """A fresh git repo holding this checkout's files, with the tiny profile as params.yaml."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in listed:
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    (dst / "dvc.lock").unlink(missing_ok=True)
    shutil.copy2(REPO / "profiles" / "tiny.yaml", dst / "params.yaml")
    sh(["git", "init", "-q"], dst)
    git_commit(dst, "copy")
    return dst


@dataclass(frozen=True)
class Built:
    path: Path
    repro_log: str  # output of the first `dvc repro`


def build(dst: Path, same_code_as: Built | None = None) -> Built:
    """Copy the checkout (or, with `same_code_as`, the files that build started from: the
    checkout may change while the session runs) and run `dvc repro` on the tiny profile."""
    if same_code_as is None:
        copy_repo(dst)
    else:
        sh(["git", "clone", "-q", str(same_code_as.path), str(dst)], dst.parent)
        sh(["git", "checkout", "-q", "-B", "fresh", "HEAD~1"], dst)  # the copy, before dvc.lock
    log = sh(["dvc", "repro"], dst).stdout
    git_commit(dst, "tiny build")
    return Built(dst, log)


def clone_built(built: Built, dst: Path) -> Path:
    """A copy of a built repo (working tree, .git and DVC cache) to change freely."""
    shutil.copytree(built.path, dst, symlinks=True)
    return dst


@pytest.fixture(scope="session")
def tiny_built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("built"))
