"""A GPU worker that shares no disk with the user (issue 21), as two machines on one.

The user's clone A has a bare git remote and a directory DVC remote (its own `--local` config),
pushes the tiny build, changes `opd.steps`, pushes that commit and deploys `pipeline-remote`.
A worker started in an empty directory B, with its own DVC config naming the same store and A
moved out of reach while it runs, clones the deployed commit, pulls the outputs dvc.lock
records, reruns only what the change touched and pushes a DVC experiment. Back in A,
`dvc exp pull` / `dvc exp show` / `dvc exp apply` bring it home, and `retroloop verify` and
`audit` see the worker's OPD adapter with its teacher and hashes.

Before that, the same worker without a DVC remote fails in one line and pushes nothing; the
second run, after the worker is configured, completes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import PrefectServer
from tests.e2e.conftest import Built, clone_built, git_commit, sh
from tests.e2e.test_cycle_worker import _stop

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
EXPERIMENT = "worker-opd-3"


def _exp_refs(bare: Path) -> list[str]:
    out = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], bare).stdout
    return out.split()


def _run_deployment(project: Path, env: dict, *params: str) -> subprocess.CompletedProcess:
    args = ["prefect", "deployment", "run", "retroloop-pipeline/pipeline-remote"]
    for p in params:
        args += ["-p", p]
    return sh([*args, "--watch", "--watch-interval", "1"], project, env=env, timeout=900, ok=False)


def test_a_worker_without_the_users_disk_trains_and_the_user_pulls_it_back(
    tiny_built: Built, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    a = clone_built(tiny_built, tmp_path / "A")
    bare, store = tmp_path / "origin.git", tmp_path / "dvc-store"
    sh(["git", "init", "-q", "--bare", str(bare)], tmp_path)
    sh(["git", "remote", "add", "origin", str(bare)], a)
    sh(["dvc", "remote", "add", "--local", "-d", "store", str(store)], a)
    sh(["dvc", "push", "-q"], a)
    params = yaml.safe_load((a / "params.yaml").read_text())
    params["opd"]["steps"] = 3  # the change the worker trains
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit(a, "opd: 3 steps")
    sh(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], a)

    env = {**prefect_server.env, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    sh(["prefect", "work-pool", "create", "gpu", "--type", "process", "--overwrite"], a, env=env)
    sh(["prefect", "--no-prompt", "deploy", "--name", "pipeline-remote"], a, env=env)

    b = tmp_path / "B"  # the worker's machine: an empty directory and its own DVC config
    b.mkdir()
    worker_env = {**env, "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "worker-dvc-config")}
    worker_env |= {"GIT_AUTHOR_NAME": "w", "GIT_AUTHOR_EMAIL": "w@w", "GIT_COMMITTER_NAME": "w", "GIT_COMMITTER_EMAIL": "w@w"}  # fmt: skip
    away = tmp_path / "A-out-of-reach"
    log = tmp_path / "worker.log"
    a.rename(away)  # the worker cannot read the user's checkout: it is not there
    try:
        with open(log, "w") as out:
            worker = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", "gpu"],
                cwd=b, env=worker_env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            # 1. no DVC remote on the worker: one line, nothing pushed
            failed = _run_deployment(away, env, f"experiment={EXPERIMENT}")
            assert failed.returncode != 0
            worker_log = log.read_text()
            assert "no DVC remote is configured on this worker" in worker_log, worker_log[-4000:]
            assert _exp_refs(bare) == []
            # 2. configured (outside the repository), the rerun completes and pushes
            sh(["dvc", "remote", "add", "--global", "-d", "store", str(store)], b, env=worker_env)
            run = _run_deployment(away, env, f"experiment={EXPERIMENT}")
            assert run.returncode == 0, f"{run.stdout[-3000:]}\n{log.read_text()[-6000:]}"
        finally:
            _stop(worker)
    finally:
        away.rename(a)

    worker_log = log.read_text()
    assert str(a) not in worker_log  # and nothing in its log names the user's checkout
    assert [r.rsplit("/", 1)[-1] for r in _exp_refs(bare)] == [EXPERIMENT]

    # Back home: pull, list, apply, verify, audit.
    before = {
        s: json.loads((a / f"data/{s}/manifest.json").read_text()) for s in ("distill", "opd")
    }
    sh(["dvc", "exp", "pull", "origin", EXPERIMENT], a)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], a).stdout)
    exps = {rev["name"]: rev["data"] for b in shown for e in b.get("experiments") or [] for rev in e["revs"]}  # fmt: skip
    assert exps[EXPERIMENT]["params"]["params.yaml"]["data"]["opd"]["steps"] == 3
    assert "data/opd/metrics.json" in exps[EXPERIMENT]["metrics"]
    sh(["dvc", "exp", "apply", EXPERIMENT], a)
    after = {s: json.loads((a / f"data/{s}/manifest.json").read_text()) for s in ("distill", "opd")}
    assert after["distill"] == before["distill"]  # pulled, not retrained: its inputs did not change
    assert after["opd"]["content_sha256"] != before["opd"]["content_sha256"]  # trained there
    assert after["opd"]["params"]["opd"]["steps"] == 3
    assert yaml.safe_load((a / "params.yaml").read_text())["opd"]["steps"] == 3
    sh(["retroloop", "verify"], a)
    rows = {row["stage"]: row for row in json.loads(sh(["retroloop", "audit", "--json"], a).stdout)}
    assert rows["opd"]["status"] == "OK"
    assert rows["opd"]["adapter_sha256"] == after["opd"]["content_sha256"]
    assert rows["opd"]["teacher"]["path"] == "data/prepare/model"
    shutil.rmtree(b, ignore_errors=True)
