"""Prefect tasks for the continual-learning cycle: one task per function of `retroloop.cycle`.

Each step is one task run (so the UI shows where a cycle is and where it failed), numbered as in
`retroloop.cycle` (the recipe) and `flows/cycle.py` (which only orders these tasks). The tasks
add only what Prefect and DVC own: the registry claim held across tasks, the concurrency slot
(`tasks.slot`), `dvc add` of a registered cycle, artifacts, and routing the library's log lines
into the run's logs.
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

from retroloop import cycle, cycle_publish, registry
from retroloop.config import Params
from retroloop.cycle import Checkpoint, CycleInputs, CycleRun, Evaluated, Trained
from tasks.slot import GPU_LIMIT, gpu_slot, slot_name  # noqa: F401  (the flow's slot)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Prefect plumbing


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
def read_inputs(cfg: Params, domain_data: str, fmt: str) -> CycleInputs:
    """1. read and split the domain data."""
    return cycle.read_inputs(cfg, Path(domain_data), fmt)


@task(name="claim-registry", cache_policy=NO_CACHE)
def claim_registry(inputs: CycleInputs) -> registry.Claim:
    """2. the registry lock and the next cycle number, held until `release_registry`."""
    return registry.acquire(inputs.cfg.cycle.registry)


@task(name="release-registry", cache_policy=NO_CACHE)
def release_registry(claim: registry.Claim) -> None:
    registry.release(claim)


@task(name="load-models", cache_policy=NO_CACHE)
def load_models(inputs: CycleInputs, claim: registry.Claim) -> CycleRun:
    """2. resolve and check the parent and the teacher; the student's starting adapter."""
    return cycle.load_models(inputs, claim)


@task(name="evaluate", task_run_name="evaluate-{phase}", cache_policy=NO_CACHE)
def evaluate(run: CycleRun, phase: str, student: Checkpoint) -> Evaluated:
    """3-4. one phase's metrics (before / after_midtrain / after_opd)."""
    return cycle.evaluate_phase(run, phase, student)


@task(name="midtrain", cache_policy=NO_CACHE)
def midtrain(run: CycleRun) -> Trained:
    """3. LoRA mid-training on the domain."""
    return cycle.midtrain(run)


@task(name="opd-recovery", cache_policy=NO_CACHE)
def opd_recovery(run: CycleRun, student: Checkpoint) -> Trained:
    """4. OPD against the earlier model."""
    return cycle.recover_with_opd(run, student)


@task(name="sft-self-baseline", cache_policy=NO_CACHE)
def sft_baseline(run: CycleRun, after_midtrain: Checkpoint, after_opd: Checkpoint) -> Evaluated:
    """4. (evaluate.baseline_sft) the contrast: SFT on the model's own samples."""
    return cycle.sft_self_baseline(run, after_midtrain, after_opd)


@task(name="register", cache_policy=NO_CACHE)
def register(
    run: CycleRun, claim: registry.Claim, phases: list[Evaluated], midtrained: Trained,
    recovered: Trained,
) -> str:  # fmt: skip
    """5. publish the cycle, put it under DVC, then show its phase table and report on the run."""
    out = cycle.register(run, claim, phases, midtrained, recovered)
    track_registered(claim.root)
    publish_report(run.number, {e.phase: e.metrics for e in phases}, out)
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


def publish_report(number: int, phases: dict[str, dict[str, Any]], out: Path) -> None:
    create_table_artifact(
        key=f"cycle-{number:04d}-phases",
        table=cycle_publish.phase_rows(phases),
        description=f"cycle {number}: forgetting and recovery, phase by phase",
    )
    create_markdown_artifact(
        key=f"cycle-{number:04d}-report",
        markdown=(out / "report.md").read_text(encoding="utf-8"),
        description=f"cycle {number} report ({out})",
    )


def publish_watch_report(rows: list[dict[str, Any]]) -> None:
    """What the watch flow did with each file: the place a failed or given-up file shows."""
    if rows:
        create_table_artifact(
            key="cycle-watch", table=rows, description="continual-learning watch: files this tick"
        )
