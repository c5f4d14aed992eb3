"""The pipeline as a Prefect flow: one task run per stage, in dvc.yaml's order.

DVC decides what reruns: before each stage the flow asks `dvc status` whether the
stage is up to date; if so the task run records a skip. After a stage runs in-process
the flow commits it (`dvc commit`), so `dvc.lock` stays true and a later `dvc repro`
skips it too — but only after checking that the manifest on disk is the one the task
just wrote (stage tasks have no result cache; this is the second line of defence).

    retroloop run                       # temporary local API, no server needed
    prefect server start --host 127.0.0.1 &  # or: watch it in the UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api retroloop run

On a worker that shares no disk with you (prefect.yaml's `pipeline-remote` deployment clones
the repository at the deployed commit), `push_to="origin"` makes the run a DVC experiment:
checked first (a DVC remote, the git remote, a free experiment name), the recorded outputs
pulled, the stages run, then outputs and the experiment's git ref pushed (tasks/remote.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

import tasks.slot  # noqa: F401  (`retroloop run`'s temporary Prefect server dies with its parent too)
from retroloop.artifacts import read_manifest
from retroloop.config import STAGES
from retroloop.errors import ArtifactError, BusyError, ConfigError
from retroloop.runlock import dvc_lock_holder
from retroloop.stages.common import PATHS
from tasks.remote import check_remote, fetch_inputs, push_experiment
from tasks.stages import STAGE_TASKS

log = logging.getLogger(__name__)


def dvc_stage_names(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


@contextlib.contextmanager
def _dvc_repo(root: Path) -> Iterator[Any]:
    """DVC's `Repo`, with its lock error (another `dvc repro` / `dvc exp run` is running here)
    turned into one line naming `.dvc/tmp/lock` and its holder."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            yield repo
    except LockError:
        raise BusyError(
            f"another DVC command is running in this repository: {dvc_lock_holder(root)}; "
            "wait for it to finish (or stop it), then rerun `retroloop run`"
        ) from None


def stage_is_current(name: str, root: Path = Path(".")) -> bool:
    """True when DVC sees no change in the stage's deps, params or outs."""
    with _dvc_repo(root) as repo:
        return not repo.status(targets=[name])


def commit_stage(name: str, root: Path = Path(".")) -> None:
    """Record the stage's current deps/params/outs in dvc.lock (what `dvc repro` would write)."""
    with _dvc_repo(root) as repo:
        repo.commit(name, force=True)


@flow(name="retroloop-pipeline", log_prints=True)
def pipeline_flow(
    params_path: str = "params.yaml",
    force: bool = False,
    push_to: str | None = None,
    experiment: str | None = None,
) -> list[dict[str, Any]]:
    """Every stage in dvc.yaml's order; with `push_to` (a git remote), as a DVC experiment
    pushed there and to the DVC remote when all stages are done (named `experiment`, or a
    generated name)."""
    assert dvc_stage_names() == list(STAGES), "dvc.yaml and retroloop.config.STAGES disagree"
    track = Path(params_path).resolve() == Path("params.yaml").resolve()
    if push_to is not None:
        if not track:
            raise ConfigError(
                f"push_to={push_to!r} with params_path={params_path!r}: an experiment is "
                "params.yaml + dvc.lock; run it with params_path=params.yaml"
            )
        check_remote(push_to, experiment)
        fetch_inputs()
    if not track:
        log.warning(
            "params %s is not params.yaml: DVC skip logic and dvc.lock are bypassed", params_path
        )
    results = []
    for name in STAGES:
        current = track and not force and stage_is_current(name)
        result = STAGE_TASKS[name](params_path=params_path, up_to_date=current)
        if track and not current:
            on_disk = read_manifest(PATHS[name]).content_sha256
            if result.get("status") != "ran" or result.get("content_sha256") != on_disk:
                raise ArtifactError(
                    f"{PATHS[name]}: task result {result} is not the artifact on disk "
                    f"({on_disk}); not committing it to dvc.lock"
                )
            commit_stage(name)
        results.append(result)
    if push_to is not None:
        push_experiment(push_to, experiment)
    return results
