"""The work-pool path a user follows (README "Continual-learning cycles"), end to end:

a real `prefect server start` → `prefect work-pool create gpu` → `prefect deploy --all` from
the tiny-built checkout → `prefect worker start --pool gpu` from another directory, with no
project variable set → run `cycle-on-demand` → the cycle completes and registers; its log
lines, phase table and report are on the flow run. The worker is stopped afterwards; the
server is the session's `prefect_server` (tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PrefectServer
from tests.e2e.conftest import Built, clone_built, sh

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: the worker's flow runs too
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_worker_runs_a_deployed_cycle_to_completion(
    tiny_built: Built, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    project = clone_built(tiny_built, tmp_path / "checkout")
    (project / "data/incoming").mkdir(parents=True)
    domain = project / "data/incoming/notes.jsonl"
    docs = [f'{{"text": "Note {i}: the pump on line {i} needs oil every {i + 2} days."}}' for i in range(12)]  # fmt: skip
    domain.write_text("\n".join(docs) + "\n")
    env = {**prefect_server.env, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"  # the worker polls every 1 s, not every 10 s
    assert "RETROLOOP_HOME" not in env
    sh(
        ["prefect", "work-pool", "create", "gpu", "--type", "process", "--overwrite"],
        project,
        env=env,
    )
    sh(["prefect", "--no-prompt", "deploy", "--all"], project, env=env)

    elsewhere = tmp_path / "worker-cwd"  # the worker does not start in the checkout
    elsewhere.mkdir()
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "gpu"],
            cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        run = sh(
            ["prefect", "deployment", "run", "retroloop-cycle/cycle-on-demand",
             "-p", "domain_data=data/incoming/notes.jsonl", "--watch", "--watch-interval", "1"],
            project, env=env, timeout=900, ok=False,
        )  # fmt: skip
        assert run.returncode == 0, f"{run.stdout[-3000:]}\n{log.read_text()[-5000:]}"
    finally:
        _stop(worker)

    cycle = project / "data/registry/cycles/cycle-0001"
    assert (cycle / "manifest.json").is_file() and (cycle / "adapter/adapter_config.json").is_file()
    flow_run_id = _flow_run_id(run.stdout)
    logs, artifacts = _logs_and_artifacts(prefect_server.api_url, flow_run_id)
    assert any("registered" in line and "cycle-0001" in line for line in logs), logs[-20:]
    assert any(line.startswith("cycle teacher") for line in logs), "retroloop's logs missing"
    assert {"cycle-0001-report", "cycle-0001-phases"} <= {a["key"] for a in artifacts}
    report = next(a for a in artifacts if a["key"] == "cycle-0001-report")
    assert report["type"] == "markdown" and "after_opd" in report["data"]


def _flow_run_id(output: str) -> str:
    import re

    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert found, output[-2000:]
    return found.group(1)


def _logs_and_artifacts(api: str, flow_run_id: str) -> tuple[list[str], list[dict]]:
    import json

    def post(path: str, body: dict) -> list[dict]:
        request = urllib.request.Request(
            f"{api}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    # The cycle's task runs and subflow logs all carry this flow run's id.
    logs = post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    artifacts = post("/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return [entry["message"] for entry in logs], artifacts
