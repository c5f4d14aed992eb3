"""The whole pipeline through `dvc repro` on the tiny profile, in a temporary copy of the repo.

1. `dvc repro` runs all seven stages and every artifact has a manifest;
2. a second `dvc repro` runs nothing;
3. after one distill parameter changes, only distill and what follows rerun;
4. `retroloop run` (the Prefect flow, temporary local API) skips every stage DVC calls current.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from retroloop.config import STAGES

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def _sh(cmd: list[str], cwd: Path, timeout: int = 900, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return proc.stdout if stdout_only else out


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("repo")
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
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


def test_repro_runs_every_stage_then_nothing(repo_copy: Path) -> None:
    first = _sh(["dvc", "repro"], repo_copy)
    assert _ran(first) == list(STAGES)
    for name in STAGES:
        manifest = json.loads((repo_copy / "data" / name / "manifest.json").read_text())
        assert manifest["stage"] == name
        assert manifest["code_version"] != "unknown"
    assert (repo_copy / "data" / "evaluate" / "metrics.json").is_file()
    assert list((repo_copy / "data" / "evaluate").glob("*.png"))

    second = _sh(["dvc", "repro"], repo_copy)
    assert _ran(second) == []

    metrics = _sh(["dvc", "metrics", "show", "--json"], repo_copy, stdout_only=True)
    assert "data/evaluate/metrics.json" in metrics
    plots = json.loads(_sh(["dvc", "plots", "show", "--json"], repo_copy, stdout_only=True))
    assert {"distill_loss", "opd_reverse_kl", "block_influence", "recurrence_scaling"} <= set(
        plots["data"]
    )
    assert "OK " in _sh(["retroloop", "verify"], repo_copy, stdout_only=True)

    audit = json.loads(_sh(["retroloop", "audit", "--json"], repo_copy, stdout_only=True))
    stages = {row["stage"] for row in audit}
    assert {"distill", "opd"} <= stages
    assert all(row["teacher"] and row["teacher"]["content_sha256"] for row in audit)


def test_changing_a_distill_param_reruns_only_distill_and_after(repo_copy: Path) -> None:
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["distill"]["lr"] = params["distill"]["lr"] * 2
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _sh(["dvc", "repro"], repo_copy)
    assert _ran(out) == ["distill", "opd", "evaluate"]


def test_prefect_flow_honours_dvc_skip_logic(repo_copy: Path) -> None:
    out = _sh(["retroloop", "run"], repo_copy, timeout=600, stdout_only=True)
    result = json.loads(out.strip().splitlines()[-1])
    assert [r["stage"] for r in result] == list(STAGES)
    assert all(r["status"] == "skipped" for r in result)
