"""Prefect tasks for the continual-learning cycle: thin wrappers of `retroloop.stages.cycle`.

Each step is one task run (so the UI shows where a cycle is and where it failed); the tasks
add only what Prefect owns: the "gpu" concurrency slot, artifacts, and routing the library's
log lines into the run's logs. The order of the steps is the recipe in `flows/cycle.py`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from retroloop import registry
from retroloop.config import load_params
from retroloop.stages import cycle
from retroloop.stages.cycle import CycleState

GPU_LIMIT = "gpu"
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Prefect plumbing


@contextlib.contextmanager
def gpu_slot(name: str = GPU_LIMIT) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `name`, creating it (limit 1) if the server
    has none. `strict=True`: a cycle never runs unthrottled because the limit is missing, and
    a second cycle on the same server waits here for the first. The slot is a lease the
    server takes back when its holder dies (kill -9 included)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another cycle created it first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            log.info("created the global concurrency limit %r (limit 1)", name)
    with concurrency(name, occupy=1, strict=True):
        yield


@contextlib.contextmanager
def library_logs_to_prefect(name: str = "retroloop") -> Iterator[None]:
    """Send the `retroloop` logger's records to the run's logs in the UI, as Prefect does for
    `PREFECT_LOGGING_EXTRA_LOGGERS` (which only takes effect if set before Prefect starts: a
    worker's flow process has started Prefect before it imports our code)."""
    logger = logging.getLogger(name)
    added = [h for h in logging.getLogger("prefect.extra").handlers if h not in logger.handlers]
    level = logger.level
    for handler in added:
        logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for handler in added:
            logger.removeHandler(handler)
        logger.setLevel(level)


# --------------------------------------------------------------------------- the steps


@task(name="read-inputs", cache_policy=NO_CACHE)
def read_inputs(params_path: str, domain_data: str, fmt: str) -> CycleState:
    return cycle.read_inputs(load_params(params_path), Path(domain_data), fmt)


@task(name="load-models", cache_policy=NO_CACHE)
def load_models(state: CycleState, claim: registry.Claim) -> CycleState:
    state.number = claim.number
    return cycle.load_models(state, claim.root)


@task(name="evaluate", task_run_name="evaluate-{phase}", cache_policy=NO_CACHE)
def evaluate(state: CycleState, phase: str) -> dict[str, Any]:
    return cycle.evaluate_phase(state, phase)


@task(name="midtrain", cache_policy=NO_CACHE)
def midtrain(state: CycleState) -> list[float]:
    return cycle.midtrain(state)


@task(name="opd-recovery", cache_policy=NO_CACHE)
def opd_recovery(state: CycleState, work_dir: str) -> dict[str, Any]:
    return cycle.recover_with_opd(state, Path(work_dir))


@task(name="sft-self-baseline", cache_policy=NO_CACHE)
def sft_baseline(state: CycleState, snapshot: dict) -> dict[str, Any]:
    return cycle.sft_self_baseline(state, snapshot)


@task(name="register", cache_policy=NO_CACHE)
def register(state: CycleState, claim: registry.Claim, work_dir: str) -> str:
    """Publish the cycle, put it under DVC, then show its phase table and report on the run."""
    out = cycle.register(state, claim, Path(work_dir))
    track_registered(claim.root)
    publish_report(state, out)
    return str(out)


def track_with_dvc(cycle_dir: Path) -> Path | None:
    """`dvc add` a registered cycle: `cycle-NNNN.dvc` beside it (git-tracked; .gitignore lets
    registry/cycles/*.dvc through) and its files in the DVC cache, so `dvc push` / `dvc pull`
    carry the registry like the pipeline's outputs and `retroloop lineage` works after a pull.
    A cycle never changes once registered, so one .dvc file per cycle never conflicts with a
    concurrent cycle. Outside a DVC repository the cycle is left untracked, with a warning."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    cycle_dir = Path(cycle_dir).resolve()
    try:
        root = Repo.find_root(str(cycle_dir))
    except NotDvcRepoError:
        log.warning("%s is outside any DVC repository: not tracked, dvc push won't carry it", cycle_dir)  # fmt: skip
        return None
    with Repo(root) as repo:
        repo.add([str(cycle_dir)])
    return cycle_dir.with_name(cycle_dir.name + ".dvc")


def track_registered(root: Path) -> list[Path]:
    """`dvc add` every registered cycle that has no .dvc file yet, oldest first: the one just
    registered, and any whose cycle was killed between its rename and its `dvc add` (under the
    registry lock, so no other cycle is adding it). Outside a DVC repository: one warning."""
    added, untracked = [], registry.untracked_cycles(root)
    for cycle_dir in untracked:
        if (dvc_file := track_with_dvc(cycle_dir)) is None:
            break
        if cycle_dir != untracked[-1]:
            log.warning("%s had no .dvc file (its cycle was killed before `dvc add`): added %s", cycle_dir, dvc_file)  # fmt: skip
        added.append(dvc_file)
    return added


def publish_report(state: CycleState, out: Path) -> None:
    create_table_artifact(
        key=f"cycle-{state.number:04d}-phases",
        table=cycle.phase_rows(state),
        description=f"cycle {state.number}: forgetting and recovery, phase by phase",
    )
    create_markdown_artifact(
        key=f"cycle-{state.number:04d}-report",
        markdown=(out / "report.md").read_text(encoding="utf-8"),
        description=f"cycle {state.number} report ({out})",
    )


def publish_watch_report(rows: list[dict[str, Any]]) -> None:
    """What the watch flow did with each file: the place a failed or given-up file shows."""
    if rows:
        create_table_artifact(
            key="cycle-watch", table=rows, description="continual-learning watch: files this tick"
        )
