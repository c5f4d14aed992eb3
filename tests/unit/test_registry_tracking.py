"""Registered cycles travel with `dvc push` / `dvc pull` (tasks/cycle.py::track_with_dvc):
one .dvc file per cycle that the project's .gitignore lets git see, and the cycle's files
restored in a fresh clone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tasks.cycle import track_registered, track_with_dvc
from tests.conftest import REPO_ROOT


def sh(*cmd: str, cwd: Path) -> str:
    env_bin = str(Path(sys.executable).parent)
    return subprocess.run(
        cmd, cwd=cwd, check=True, capture_output=True, text=True,
        env={"PATH": f"{env_bin}:/usr/bin:/bin", "HOME": str(cwd), "DVC_NO_ANALYTICS": "1"},
    ).stdout  # fmt: skip


def test_a_registered_cycle_is_pushed_and_pulled_with_dvc(tmp_path: Path) -> None:
    repo, remote, clone = tmp_path / "repo", tmp_path / "remote", tmp_path / "clone"
    repo.mkdir()
    shutil.copy(REPO_ROOT / ".gitignore", repo / ".gitignore")
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo)
    cycle = repo / "data" / "registry" / "cycles" / "cycle-0001"
    (cycle / "adapter").mkdir(parents=True)
    (cycle / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (cycle / "manifest.json").write_text("{}")
    (repo / "data" / "registry" / ".lock").write_text("")  # registry internals stay ignored

    assert track_with_dvc(cycle) == cycle.with_name("cycle-0001.dvc")
    sh("git", "add", "-A", cwd=repo)
    staged = sh("git", "diff", "--cached", "--name-only", cwd=repo).split()
    assert "data/registry/cycles/cycle-0001.dvc" in staged
    assert not any("adapter" in name or name.endswith(".lock") for name in staged)
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "cycle 1", cwd=repo)
    sh("dvc", "push", "-q", cwd=repo)

    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    sh("dvc", "pull", "-q", cwd=clone)
    pulled = clone / "data" / "registry" / "cycles" / "cycle-0001"
    assert (pulled / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"
    assert "up to date" in sh("dvc", "status", cwd=clone)


def test_outside_a_dvc_repository_the_cycle_is_left_untracked(tmp_path: Path, caplog) -> None:
    cycle = tmp_path / "cycles" / "cycle-0001"
    cycle.mkdir(parents=True)
    assert track_with_dvc(cycle) is None
    assert "not tracked" in caplog.text


def test_a_cycle_killed_before_its_dvc_add_is_tracked_by_the_next(tmp_path: Path) -> None:
    """Issue 19: kill -9 between the registry rename and `dvc add` left cycle 1 registered with
    no .dvc file, and the next cycle only added its own."""
    repo = tmp_path / "repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    root = repo / "data" / "registry"
    for name in ("cycle-0001", "cycle-0002", "cycle-0003"):
        (root / "cycles" / name / "adapter").mkdir(parents=True)
        (root / "cycles" / name / "adapter" / "w.bin").write_bytes(name.encode())
    for name in ("cycle-0001", "cycle-0002"):  # 3 has no manifest: not registered
        (root / "cycles" / name / "manifest.json").write_text("{}")

    added = track_registered(root)  # what cycle 2's register runs (cycle 1 was killed)
    cycles = root / "cycles"
    assert added == [cycles / "cycle-0001.dvc", cycles / "cycle-0002.dvc"]
    assert all(p.is_file() for p in added) and not (cycles / "cycle-0003.dvc").exists()
    assert track_registered(root) == []  # nothing left to add
