"""`retroloop schedule --remote` against a real Prefect server (the `prefect_server` fixture):
the deployment it registers is the one a worker that shares no disk can run — its pull step
clones the pushed HEAD from origin at that exact commit, each cycle pushes back to origin, and
the cron schedule is on it. (Its refusals are in tests/unit/test_remote.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, PrefectServer, prefect_settings

pytestmark = pytest.mark.timeout(300)


def _sh(cwd: Path, *cmd: str) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_schedule_remote_registers_a_git_clone_deployment_of_the_pushed_commit(
    prefect_server: PrefectServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from retroloop.cli import main

    project, bare = tmp_path / "project", tmp_path / "origin.git"
    project.mkdir()
    shutil.copy(REPO_ROOT / "profiles" / "tiny.yaml", project / "params.yaml")
    for name in ("flows", "tasks"):
        shutil.copytree(REPO_ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    _sh(tmp_path, "git", "init", "-q", "--bare", str(bare))
    _sh(project, "git", "init", "-q")
    _sh(project, "git", "add", "-A")
    _sh(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    _sh(project, "git", "remote", "add", "origin", str(bare))
    _sh(project, "git", "push", "-q", "origin", "HEAD:refs/heads/main")
    head = _sh(project, "git", "rev-parse", "HEAD").strip()
    monkeypatch.chdir(project)
    with prefect_settings(prefect_server):
        with get_client(sync_client=True) as client:
            pool = WorkPoolCreate(name="remote-gpu", type="process")
            client.create_work_pool(work_pool=pool, overwrite=True)
        argv = ["schedule", "--remote", "--cron", "0 3 * * *", "--pool", "remote-gpu",
                "--watch-dir", "/srv/inbox", "--name", "nightly-remote"]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        with get_client(sync_client=True) as client:
            deployed = client.read_deployment_by_name("retroloop-watch/nightly-remote")
    assert deployed.work_pool_name == "remote-gpu"
    assert deployed.entrypoint == "flows/cycle.py:watch_flow"
    assert deployed.parameters == {
        "params_path": "params.yaml", "watch_dir": "/srv/inbox", "push_to": "origin",
        "cycle_branch": "retroloop-cycles",
    }  # fmt: skip
    [step] = deployed.pull_steps
    clone = step["prefect.deployments.steps.git_clone"]
    assert clone["repository"] == str(bare) and clone["commit_sha"] == head
    assert [s.schedule.cron for s in deployed.schedules] == ["0 3 * * *"]
    assert deployed.job_variables["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "retroloop"
