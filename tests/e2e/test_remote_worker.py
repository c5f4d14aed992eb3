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

The same worker also runs a continual-learning cycle (`cycle-remote`) on a domain file on its
own disk: without a DVC remote it fails and the bare repo gets no cycles branch; configured, it
pulls the cycle's inputs, trains, and pushes the registered cycle (DVC objects, then its `.dvc`
file on the `retroloop-cycles` branch). Back in A, `git fetch` + `git merge` of that branch and
`dvc pull` bring it home: `audit --json` shows the worker's cycle with its teacher and hash,
`verify` exits 0.
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

from retroloop.provenance import recorded_hash
from tests.conftest import PrefectServer
from tests.e2e.conftest import Built, clone_built, git_commit, sh
from tests.e2e.test_cycle_worker import _flow_run_id, _logs_and_artifacts, _stop

# A Prefect server, a worker process and two clones: ~90 s on an idle 2-core CPU, which `make
# test`'s 15-minute budget no longer holds; `make test-slow` runs it (tests/unit/test_remote.py
# keeps the push order and the refusals in the suite).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
EXPERIMENT = "worker-opd-3"
CYCLES = "refs/heads/retroloop-cycles"


def _exp_refs(bare: Path) -> list[str]:
    out = sh(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], bare).stdout
    return out.split()


def _run_deployment(
    project: Path, env: dict, *params: str, name: str = "retroloop-pipeline/pipeline-remote"
) -> subprocess.CompletedProcess:
    args = ["prefect", "deployment", "run", name]
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
    sh(["prefect", "--no-prompt", "deploy", "--name", "pipeline-remote", "--name", "cycle-remote"], a, env=env)  # fmt: skip

    b = tmp_path / "B"  # the worker's machine: an empty directory and its own DVC config
    b.mkdir()
    worker_env = {**env, "DVC_GLOBAL_CONFIG_DIR": str(tmp_path / "worker-dvc-config")}
    worker_env |= {"GIT_AUTHOR_NAME": "w", "GIT_AUTHOR_EMAIL": "w@w", "GIT_COMMITTER_NAME": "w", "GIT_COMMITTER_EMAIL": "w@w"}  # fmt: skip
    inbox = b / "inbox"  # the cycle's domain file: on the worker's disk
    inbox.mkdir()
    docs = [f'{{"text": "Note {i}: valve {i} on the far pump is checked every {i + 3} days."}}' for i in range(12)]  # fmt: skip
    (inbox / "notes.jsonl").write_text("\n".join(docs) + "\n")
    cycle_params = (f"domain_data={inbox / 'notes.jsonl'}",)
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
            failed = _run_deployment(away, env, *cycle_params, name=CYCLE_DEPLOYMENT)
            assert failed.returncode != 0 and "UUID" in failed.stdout, failed.stdout + failed.stderr
            logs, _ = _logs_and_artifacts(prefect_server.api_url, _flow_run_id(failed.stdout))
            assert any("no DVC remote is configured on this worker" in line for line in logs)
            assert not _has_ref(bare, CYCLES)  # the failed cycle pushed nothing
            # 2. configured (outside the repository), the reruns complete and push
            sh(["dvc", "remote", "add", "--global", "-d", "store", str(store)], b, env=worker_env)
            run = _run_deployment(away, env, f"experiment={EXPERIMENT}")
            assert run.returncode == 0, f"{run.stdout[-3000:]}\n{log.read_text()[-6000:]}"
            cycle_run = _run_deployment(away, env, *cycle_params, name=CYCLE_DEPLOYMENT)
            assert cycle_run.returncode == 0, f"{cycle_run.stdout[-3000:]}\n{log.read_text()[-6000:]}"  # fmt: skip
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

    # The worker's cycle, home: back to the committed state (the experiment stays on its ref),
    # then the cycles branch (one commit on the deployed one: a fast-forward) and its files.
    sh(["git", "reset", "-q", "--hard"], a)
    sh(["dvc", "checkout", "-q", "--force"], a)
    assert _has_ref(bare, CYCLES)
    sh(["git", "fetch", "-q", "origin", "retroloop-cycles"], a)
    sh(["git", "merge", "-q", "--ff-only", "FETCH_HEAD"], a)
    cycle = a / "data/registry/cycles/cycle-0001"
    assert (cycle.parent / "cycle-0001.dvc").is_file() and not cycle.exists()
    sh(["dvc", "pull", "-q", "-R", "data/registry/cycles"], a)
    sh(["retroloop", "verify"], a)
    manifest = json.loads((cycle / "manifest.json").read_text())
    audited = json.loads(sh(["retroloop", "audit", "--json"], a).stdout)
    [row] = [r for r in audited if r["stage"] == "cycle"]
    assert row["status"] == "OK" and row["adapter"].endswith("registry/cycles/cycle-0001/adapter")
    assert row["adapter_sha256"] == manifest["content_sha256"]
    assert row["teacher"]["path"] == "data/opd/adapter"  # cycle 1's teacher: the pipeline's model
    assert row["teacher"]["content_sha256"] == recorded_hash(a / "data/opd/adapter")
    assert str(inbox / "notes.jsonl") in {i["path"] for i in manifest["inputs"]}
    shutil.rmtree(b, ignore_errors=True)


CYCLE_DEPLOYMENT = "retroloop-cycle/cycle-remote"


def _has_ref(bare: Path, ref: str) -> bool:
    return bool(sh(["git", "for-each-ref", ref], bare).stdout.strip())
