"""One Prefect task per pipeline stage. No logic: load params, call `run`, publish.

Each task publishes the stage's manifest summary (Markdown) and its scalar metrics
(table) as Prefect artifacts, keyed `<stage>-manifest` / `<stage>-metrics`; a stage DVC
calls current is recorded under its own key, `<stage>-skipped`, so the manifest artifact
keeps showing the run that produced the outputs.

Stage tasks never use Prefect's result cache: the outputs live in `data/` and DVC decides
what is current. A cached result would be served for a stage whose params changed (all
seven tasks once shared one cache key), and the flow would then `dvc commit` stale outputs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from retroloop.artifacts import Manifest, read_manifest
from retroloop.config import STAGES, load_params
from retroloop.errors import ArtifactError
from retroloop.launch import run_stage
from retroloop.stages.common import PATHS


def publish_manifest(manifest: Manifest, key: str) -> None:
    """Manifest summary + flat metrics as Prefect artifacts (keys: lowercase, dashes)."""
    key = key.replace("_", "-").lower()
    inputs = "\n".join(
        f"| {r.role} | `{r.path}` | `{r.content_sha256[:16]}` |" for r in manifest.inputs
    )
    create_markdown_artifact(
        key=f"{key}-manifest",
        markdown=(
            f"### {manifest.stage} → {manifest.kind}\n\n"
            f"content_sha256 `{manifest.content_sha256}` · code `{manifest.code_version}` · "
            f"{manifest.started_at} → {manifest.ended_at}\n\n"
            f"| role | path | sha256 |\n|---|---|---|\n{inputs}\n"
        ),
        description=f"{manifest.stage} manifest",
    )
    rows = [
        {"metric": k, "value": json.dumps(v) if isinstance(v, dict | list) else v}
        for k, v in flatten(manifest.metrics).items()
    ]
    if rows:
        create_table_artifact(
            key=f"{key}-metrics", table=rows, description=f"{manifest.stage} metrics"
        )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _run(name: str, params_path: str) -> dict[str, Any]:
    os.environ["RETROLOOP_PREFECT_RUN_ID"] = str(flow_run.get_id() or "")
    cfg = load_params(params_path)
    manifest = run_stage(name, cfg, params_path)  # over launch.nproc_per_node ranks if it splits
    publish_manifest(manifest, name)
    report = PATHS[name] / "report.md"
    if report.is_file():  # evaluate's tables, readable on the flow run in the UI
        create_markdown_artifact(
            key=f"{name.replace('_', '-')}-report",
            markdown=report.read_text(encoding="utf-8"),
            description=f"{name} report ({report})",
        )
    return {"stage": name, "status": "ran", "content_sha256": manifest.content_sha256}


def _skipped(name: str) -> dict[str, Any]:
    try:
        sha: str | None = read_manifest(PATHS[name]).content_sha256
    except ArtifactError:
        sha = None
    create_markdown_artifact(
        key=f"{name.replace('_', '-')}-skipped",
        markdown=f"### {name}: skipped (DVC: up to date)\n\ncontent_sha256 `{sha}`",
        description=f"{name} skipped",
    )
    return {"stage": name, "status": "skipped", "content_sha256": sha}


def make_stage_task(name: str):
    @task(name=name, task_run_name=name, retries=0, cache_policy=NO_CACHE, persist_result=False)
    def stage_task(params_path: str = "params.yaml", up_to_date: bool = False) -> dict[str, Any]:
        return _skipped(name) if up_to_date else _run(name, params_path)

    return stage_task


STAGE_TASKS = {name: make_stage_task(name) for name in STAGES}
