"""tasks/remote.py on a bare git remote and a directory DVC remote, without Prefect or a model:
the pre-flight refusals (one line each) and the push order (outputs first, the git ref last, so
a push that fails leaves nothing a user can see)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from retroloop.errors import RemoteError
from tasks.remote import check_remote, push_experiment


def _sh(cwd: Path, *cmd: str) -> str:
    if cmd[0] == "dvc":  # the test interpreter's dvc, whatever PATH says
        cmd = (str(Path(sys.executable).with_name("dvc")), *cmd[1:])
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC repository with one tracked output and an `origin` bare remote."""
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(tmp_path / "dvc-system"))
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "t")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "t@t")
    root, bare = tmp_path / "repo", tmp_path / "origin.git"
    root.mkdir()
    _sh(tmp_path, "git", "init", "-q", "--bare", str(bare))
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "remote", "add", "origin", str(bare))
    _sh(root, "dvc", "init", "-q")
    (root / "data").mkdir()
    (root / "data" / "weights.bin").write_bytes(b"\x00" * 64)
    _sh(root, "dvc", "add", "-q", "data/weights.bin")
    _sh(root, "git", "add", "-A")
    _sh(root, "git", "commit", "-qm", "base")
    _sh(root, "git", "push", "-q", "origin", "HEAD:refs/heads/main")
    monkeypatch.chdir(root)
    return root


def _exp_refs(bare: Path) -> list[str]:
    return _sh(bare, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()


def test_a_worker_without_a_dvc_remote_is_refused_before_anything_runs(repo: Path) -> None:
    with pytest.raises(RemoteError, match="no DVC remote is configured on this worker") as err:
        check_remote("origin", None, repo)
    assert "\n" not in str(err.value) and "dvc remote add --global" in str(err.value)


def test_an_unknown_git_remote_is_refused_by_name(repo: Path) -> None:
    _sh(repo, "dvc", "remote", "add", "--local", "-d", "store", str(repo.parent / "store"))
    with pytest.raises(RemoteError, match="push_to='upstream': no such git remote"):
        check_remote("upstream", None, repo)
    assert check_remote("origin", None, repo) == "store"


def test_a_push_that_fails_leaves_no_ref_and_the_rerun_pushes(repo: Path) -> None:
    bare = repo.parent / "origin.git"
    broken = repo.parent / "store-is-a-file"
    broken.write_text("not a directory")
    _sh(repo, "dvc", "remote", "add", "--local", "-d", "store", str(broken))
    (repo / "data" / "weights.bin").write_bytes(b"\x01" * 64)  # what the worker "trained"
    _sh(repo, "dvc", "add", "-q", "data/weights.bin")
    with pytest.raises(RemoteError, match="nothing visible was published"):
        push_experiment.fn("origin", "trained-here", str(repo))
    assert _exp_refs(bare) == []

    store = repo.parent / "store"
    _sh(repo, "dvc", "remote", "modify", "--local", "store", "url", str(store))
    assert push_experiment.fn("origin", "trained-here-2", str(repo)) == "trained-here-2"
    assert [r.rsplit("/", 1)[-1] for r in _exp_refs(bare)] == ["trained-here-2"]
    assert any(p.is_file() for p in store.rglob("*"))  # the outputs went first

    with pytest.raises(RemoteError, match="'trained-here-2'.*already exists on git remote"):
        check_remote("origin", "trained-here-2", repo)
