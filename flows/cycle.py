"""The continual-learning cycle as a Prefect flow, and its cron schedule.

    retroloop cycle --domain-data notes.jsonl        # one cycle now (temporary local API)
    retroloop schedule --cron "0 3 * * *"            # serve: every night, a cycle per new file
                                                     # in cycle.watch_dir (data/incoming)

Each step of `retroloop.cycle` is a task run; the cycle's phase table is published as a
Prefect table artifact. A global concurrency limit named "gpu" (create it once with
`prefect gcl create gpu --limit 1`) keeps two cycles from sharing one GPU worker; without
the limit on the server the cycle runs unthrottled.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from retroloop import cycle
from retroloop.artifacts import sha256_file
from retroloop.config import load_params

log = logging.getLogger(__name__)
GPU_LIMIT = "gpu"


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(params_path: str, domain_data: str, fmt: str) -> cycle.CycleState:
    return cycle.start(load_params(params_path), Path(domain_data), fmt=fmt)


@task(name="load-models", cache_policy=NO_CACHE)
def load_models(state: cycle.CycleState) -> cycle.CycleState:
    cycle.load_models(state)
    return state


@task(name="evaluate", task_run_name="evaluate-{phase}", cache_policy=NO_CACHE)
def evaluate(state: cycle.CycleState, phase: str) -> dict[str, Any]:
    return cycle.evaluate_phase(state, phase)


@task(name="midtrain", cache_policy=NO_CACHE)
def midtrain(state: cycle.CycleState) -> list[float]:
    return cycle.midtrain(state)


@task(name="opd-recovery", cache_policy=NO_CACHE)
def opd_recovery(state: cycle.CycleState, work_dir: str) -> dict[str, Any]:
    return cycle.recover_with_opd(state, Path(work_dir))


@task(name="sft-self-baseline", cache_policy=NO_CACHE)
def sft_baseline(state: cycle.CycleState, snapshot: dict) -> dict[str, Any]:
    return cycle.sft_self_baseline(state, snapshot)


@task(name="register", cache_policy=NO_CACHE)
def register(state: cycle.CycleState, work_dir: str) -> str:
    out = cycle.register(state, Path(work_dir))
    rows = [
        {"phase": phase, **{k: m.get(k) for k in cycle.PHASE_COLUMNS}}
        for phase, m in state.phases.items()
    ]
    create_table_artifact(
        key=f"cycle-{state.number:04d}-phases",
        table=rows,
        description=f"cycle {state.number}: forgetting and recovery",
    )
    create_markdown_artifact(
        key=f"cycle-{state.number:04d}-report", markdown=(out / "report.md").read_text()
    )
    return str(out)


@flow(name="retroloop-cycle", log_prints=True)
def cycle_flow(
    domain_data: str, params_path: str = "params.yaml", fmt: str = "text"
) -> dict[str, Any]:
    """Ingest → mid-train → evaluate forgetting → OPD with the earlier model → evaluate → register."""
    import copy

    from peft import get_peft_model_state_dict

    with concurrency(GPU_LIMIT, occupy=1, strict=False):
        state = ingest(params_path, domain_data, fmt)
        state = load_models(state)
        evaluate(state, "before")
        midtrain(state)
        evaluate(state, "after_midtrain")
        snapshot = copy.deepcopy(get_peft_model_state_dict(state.student))
        with tempfile.TemporaryDirectory(prefix="retroloop-cycle-") as tmp:
            opd_recovery(state, tmp)
            evaluate(state, "after_opd")
            if state.cfg.evaluate.baseline_sft:
                sft_baseline(state, snapshot)
            out = register(state, tmp)
    return cycle.summary(Path(out))


def new_files(watch_dir: Path, registry: Path) -> list[Path]:
    """Files in `watch_dir` whose content has not been ingested into the registry yet."""
    seen = {p.name for p in (registry / "datasets").glob("*") if p.is_dir()}
    files = sorted(
        p for p in Path(watch_dir).glob("*") if p.is_file() and not p.name.startswith(".")
    )
    return [p for p in files if sha256_file(p)[:12] not in seen]


@flow(name="retroloop-watch", log_prints=True)
def watch_flow(
    params_path: str = "params.yaml", watch_dir: str | None = None, fmt: str = "text"
) -> list[dict[str, Any]]:
    """One cycle per new file in the watched folder, oldest name first (what the schedule runs)."""
    cfg = load_params(params_path)
    folder = Path(watch_dir or cfg.cycle.watch_dir)
    if not folder.is_dir():
        from retroloop.errors import DataError

        raise DataError(
            f"cycle.watch_dir: {folder} does not exist; create it and drop domain files into it"
        )
    results = []
    for path in new_files(folder, Path(cfg.cycle.registry)):
        results.append(cycle_flow(domain_data=str(path), params_path=params_path, fmt=fmt))
    if not results:
        print(f"no new files in {folder}")
    return results


def build_deployment(
    cron: str,
    *,
    params_path: str = "params.yaml",
    watch_dir: str | None = None,
    name: str = "retroloop-cycle",
):
    """The scheduled deployment of `watch_flow` (served by `retroloop schedule`)."""
    return watch_flow.to_deployment(
        name=name,
        cron=cron,
        parameters={"params_path": params_path, "watch_dir": watch_dir},
        description="retroloop continual-learning cycles on new files in the watched folder",
        tags=["retroloop", "cycle"],
    )


def serve_schedule(
    cron: str,
    *,
    params_path: str = "params.yaml",
    watch_dir: str | None = None,
    name: str = "retroloop-cycle",
) -> None:
    from prefect import serve

    serve(build_deployment(cron, params_path=params_path, watch_dir=watch_dir, name=name))
