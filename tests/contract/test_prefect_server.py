"""Against a real Prefect server on loopback (the `prefect_server` fixture): the scheduler turns
the cycle schedule into flow runs, and `prefect deploy --all` registers every deployment in
prefect.yaml.

These are the checks that would have caught the environment drifting under the pipeline:
with SQLAlchemy 2.1 the server's scheduler raised on every loop and a served schedule never got
a run; with fastapi >= 0.151 the client's filter requests got 422 and `prefect deploy --all`
stopped after the first deployment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, PrefectServer, prefect_settings

pytestmark = pytest.mark.timeout(600)


def test_the_served_cycle_schedule_gets_flow_runs_from_the_scheduler(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """`retroloop schedule --cron` serves `flows.cycle.build_deployment`; the server's scheduler
    must create its runs (the test does not run them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.cycle import build_deployment

    with prefect_settings(prefect_server):
        deployment = build_deployment(
            "* * * * *", params_path="params.yaml", watch_dir=str(tmp_path), name="schedule-test"
        )
        deployment_id = deployment.apply()
        only_this = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        runs, deadline = [], time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while not runs and time.monotonic() < deadline:
                runs = client.read_flow_runs(deployment_filter=only_this)
                time.sleep(1)
    assert runs, "the scheduler created no flow run for an every-minute schedule within 120 s"
    assert {run.state_type.value for run in runs} == {"SCHEDULED"}
    assert len({run.expected_start_time for run in runs}) == len(runs)


def test_prefect_deploy_all_registers_every_deployment_in_prefect_yaml(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """The documented GPU-pool path: create the pool, `prefect deploy --all` (no prompts)."""
    from prefect.client.orchestration import get_client

    project = tmp_path / "project"  # deploy may write state next to prefect.yaml: use a copy
    project.mkdir()
    for name in ("prefect.yaml", "params.yaml"):
        shutil.copy(REPO_ROOT / name, project / name)
    for name in ("flows", "tasks"):
        shutil.copytree(
            REPO_ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    prefect = str(Path(sys.executable).with_name("prefect"))
    spec = yaml.safe_load((project / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    env = {**prefect_server.env, "RETROLOOP_HOME": str(REPO_ROOT)}
    for pool in sorted(pools):
        subprocess.run(
            [prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"],
            env=env, cwd=project, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    done = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"],
        env=env, cwd=project, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with prefect_settings(prefect_server), get_client(sync_client=True) as client:
        deployed = {d.name: d for d in client.read_deployments()}
    wanted = {d["name"] for d in spec["deployments"]}
    assert wanted <= deployed.keys(), f"missing: {wanted - deployed.keys()}"
    for d in spec["deployments"]:
        assert deployed[d["name"]].work_pool_name == d["work_pool"]["name"]
        if d.get("schedules"):
            assert deployed[d["name"]].schedules, f"{d['name']} lost its schedule"
