"""`code_version` is `-dirty` when the code differs from the commit, and only then."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from retroloop.artifacts import code_version


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed checkout with the project's layout: code, params, profiles, docs, dvc.lock."""
    files = {
        "retroloop/stages/distill.py": "x = 1\n",
        "flows/pipeline.py": "",
        "tasks/stages.py": "",
        "benchmarks/bench_opd.py": "",
        "pyproject.toml": "[project]\n",
        "requirements.lock": "torch==2\n",
        "dvc.yaml": "stages: {}\n",
        "dvc.lock": "schema: '2.0'\n",
        "params.yaml": "seed: 0\n",
        "profiles/tiny.yaml": "seed: 0\n",
        "README.md": "# r\n",
        "tests/unit/test_x.py": "",
        "data/registry/cycles/cycle-0001.dvc": "outs: []\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


@pytest.mark.parametrize(
    "edit",
    ["params.yaml", "profiles/tiny.yaml", "dvc.lock", "README.md", "tests/unit/test_x.py",
     "data/registry/cycles/cycle-0001.dvc", "untracked.py", "retroloop/untracked.py"],
)  # fmt: skip
def test_not_dirty_when_only_params_data_docs_or_untracked_files_change(repo, edit) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    assert code_version(repo) == sha
    (repo / edit).write_text("changed\n")  # the README's `cp profiles/tiny.yaml params.yaml`
    assert code_version(repo) == sha


@pytest.mark.parametrize(
    "edit",
    ["retroloop/stages/distill.py", "flows/pipeline.py", "tasks/stages.py",
     "benchmarks/bench_opd.py", "pyproject.toml", "requirements.lock", "dvc.yaml"],
)  # fmt: skip
def test_dirty_when_tracked_code_changes(repo, edit) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    (repo / edit).write_text("changed\n")
    assert code_version(repo) == f"{sha}-dirty"
    git(repo, "add", edit)  # staged but not committed is still not the commit
    assert code_version(repo) == f"{sha}-dirty"


def test_deleted_code_is_dirty_and_no_git_is_unknown(repo, tmp_path_factory) -> None:
    (repo / "tasks/stages.py").unlink()
    assert code_version(repo).endswith("-dirty")
    assert code_version(tmp_path_factory.mktemp("not-a-repo")) == "unknown"
