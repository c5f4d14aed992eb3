"""The continual-learning cycle: the recipe, the watch flow that runs it per new file, its schedule.

    retroloop cycle --domain-data notes.jsonl        # one cycle now
    retroloop schedule --cron "0 3 * * *"            # serve: every night, a cycle per new file
                                                     # in cycle.watch_dir (data/incoming)
    prefect deploy --all && prefect worker start --pool gpu   # the same on GPU workers (README)

`cycle_flow` only orders the tasks of `tasks/cycle.py`, one per step of `retroloop.cycle` (read
that module for what each step does, with the same numbers):

 1. read the domain file and check the pipeline's outputs are there      (writes nothing)
 2. claim the registry (its lock and the next cycle number); load and check the parent (the
    model the last registered cycle left) and the teacher
 3. evaluate "before" → LoRA mid-training on the domain → evaluate "after_midtrain" (forgetting)
 4. OPD with the earlier model as teacher → evaluate "after_opd" (recovery)
    (+ the SFT-on-own-samples baseline with evaluate.baseline_sft)
 5. register: the whole cycle appears as registry/cycles/cycle-NNNN in one rename

On a worker that shares no disk with you (prefect.yaml's `cycle-remote`, or `retroloop schedule
--remote`: the run clones the deployed commit), `push_to="origin"` brings the cycle's inputs from
the DVC remote first and pushes the registered cycle after (its files, then its `.dvc` file on
the `cycle_branch` git branch: tasks/remote.py); refused in one line before anything runs when
the worker has no DVC remote or no such git remote.

Exactly once: two cycles on one Prefect server queue on its concurrency slot (`tasks.slot`: a
killed holder's slot is given back, a live one's waited for up to cycle.slot_timeout_s); two on
one registry from anywhere else are kept apart by the registry lock (the second refuses with one
line). A failure or a kill at any step leaves the registry as it was (see `retroloop.registry`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Failed

from retroloop import registry
from retroloop.artifacts import sha256_file
from retroloop.config import Params, load_params
from retroloop.cycle import summary
from retroloop.errors import DataError, RemoteError
from tasks.cycle import (
    claim_registry,
    evaluate,
    gpu_slot,
    library_logs_to_prefect,
    load_models,
    midtrain,
    opd_recovery,
    publish_watch_report,
    read_inputs,
    register,
    release_registry,
    sft_baseline,
    slot_name,
)
from tasks.remote import (
    CYCLE_BRANCH,
    check_cycle_branch,
    check_remote,
    deployable_commit,
    fetch_cycle_inputs,
    push_cycle,
)

log = logging.getLogger("retroloop.flows.cycle")


@flow(name="retroloop-cycle", log_prints=True)
def cycle_flow(
    domain_data: str,
    params_path: str = "params.yaml",
    fmt: str = "text",
    push_to: str | None = None,
    cycle_branch: str = CYCLE_BRANCH,
) -> dict[str, Any]:
    """One cycle: mid-train on `domain_data`, measure forgetting, recover with OPD, register;
    with `push_to` (a git remote), inputs pulled first and the registered cycle pushed after."""
    os.environ["RETROLOOP_PREFECT_RUN_ID"] = str(flow_run.get_id() or "")
    cfg = load_params(params_path)
    base = remote_cycle_inputs(cfg, push_to, cycle_branch) if push_to is not None else None
    slot = slot_name(cfg.cycle.gpu_limit)
    with library_logs_to_prefect(), gpu_slot(slot, timeout_s=cfg.cycle.slot_timeout_s):
        inputs = read_inputs(cfg, domain_data, fmt)  # 1
        claim = claim_registry(inputs)  # 2
        try:
            run = load_models(inputs, claim)  # 2
            before = evaluate(run, "before", run.start)  # 3
            midtrained = midtrain(run)  # 3
            after_midtrain = evaluate(run, "after_midtrain", midtrained.student)  # 3
            recovered = opd_recovery(run, after_midtrain.student)  # 4
            after_opd = evaluate(run, "after_opd", recovered.student)  # 4
            phases = [before, after_midtrain, after_opd]
            if cfg.evaluate.baseline_sft:  # 4
                phases.append(sft_baseline(run, after_midtrain.student, after_opd.student))
            out = register(run, claim, phases, midtrained, recovered)  # 5
        finally:
            release_registry(claim)
    if push_to is not None:  # the registry lock is released: the push only reads the cycle
        push_cycle(push_to, cycle_branch, base, cfg.cycle.registry)
    return summary(Path(out))


def remote_cycle_inputs(cfg: Params, push_to: str, cycle_branch: str) -> str:
    """Before a cycle on a worker that shares no disk: refuse one that could not push (one line
    each), then pull its inputs; returns the commit its cycle goes on (tasks/remote.py)."""
    check_remote(push_to, None)
    check_cycle_branch(cycle_branch, cfg)
    return fetch_cycle_inputs(cfg, push_to, cycle_branch)


# --------------------------------------------------------------------------- watch + schedule


@flow(name="retroloop-watch", log_prints=True)
def watch_flow(
    params_path: str = "params.yaml",
    watch_dir: str | None = None,
    fmt: str = "text",
    max_attempts: int = 3,
    push_to: str | None = None,
    cycle_branch: str = CYCLE_BRANCH,
):
    """One cycle per file in the watched folder that no registered cycle has trained on yet,
    oldest name first (what the schedule runs). A file whose cycle failed or was killed is
    tried again on the next tick, up to `max_attempts` times; the `cycle-watch` table artifact
    shows each file's state and last error, and a tick with a failed cycle ends Failed. With
    `push_to`, each cycle as `cycle_flow`'s (the registry's cycles pulled first, so files
    done on an earlier tick stay done)."""
    cfg = load_params(params_path)
    if push_to is not None:
        remote_cycle_inputs(cfg, push_to, cycle_branch)
    folder, root = Path(watch_dir or cfg.cycle.watch_dir), Path(cfg.cycle.registry)
    if not folder.is_dir():
        raise DataError(
            f"cycle.watch_dir: {folder} does not exist; create it and drop domain files into it"
        )
    done = registry.registered_sources(root)
    rows: list[dict[str, Any]] = []
    with library_logs_to_prefect():
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name[0] != "."):
            sha = sha256_file(path)
            failed = registry.failed_attempts(root, sha)
            row = {"file": path.name, "sha256": sha[:16], "attempts": len(failed)}
            if sha in done:
                rows.append(row | {"status": f"done ({done[sha].name})", "error": None})
                continue
            if len(failed) >= max_attempts:
                error = failed[-1].get("error")
                log.warning("%s: given up after %d failed cycles: %s", path, len(failed), error)
                rows.append(row | {"status": "given up", "error": error})
                continue
            registry.record_attempt(root, path, sha, "started")
            try:
                result = cycle_flow(
                    domain_data=str(path), params_path=params_path, fmt=fmt, push_to=push_to,
                    cycle_branch=cycle_branch,
                )  # fmt: skip
            except registry.RegistryBusyError as err:  # not the file's fault: retry next tick
                registry.record_attempt(root, path, sha, "busy", str(err))
                rows.append(row | {"status": "busy", "error": str(err)})
                break
            except Exception as err:
                error = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
                registry.record_attempt(root, path, sha, "failed", error)
                log.error("%s: cycle failed (attempt %d of %d): %s", path, len(failed) + 1, max_attempts, error)  # fmt: skip
                rows.append(row | {"status": "failed", "attempts": len(failed) + 1, "error": error})
                continue
            registry.record_attempt(root, path, sha, "registered")
            rows.append(row | {"status": f"registered (cycle {result['cycle']})", "error": None})
    publish_watch_report(rows)
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        names = ", ".join(r["file"] for r in failures)
        return Failed(message=f"{len(failures)} cycle(s) failed ({names}); retried next tick")
    if not rows:
        print(f"no files in {folder}")
    return rows


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


# The worker's environment for a deployment `retroloop schedule --remote` creates (as prefect.yaml's
# work pool section): the stages' log lines on the run, no analytics.
REMOTE_ENV = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": "retroloop",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
}


def deploy_remote_schedule(
    cron: str,
    *,
    params_path: str = "params.yaml",
    watch_dir: str | None = None,
    name: str = "retroloop-cycle-remote",
    pool: str = "gpu",
    cycle_branch: str = CYCLE_BRANCH,
) -> tuple[str, str]:
    """`retroloop schedule --remote`: the scheduled `watch_flow` as a work-pool deployment whose
    pull step clones this checkout's HEAD from `origin` (Prefect's `git_clone` at that commit,
    as prefect.yaml's `cycle-remote`), each cycle pushed back to `origin`'s `cycle_branch`.
    Returns (deployment id, commit). Refuses in one line when the worker could not clone HEAD."""
    from prefect.runner.storage import GitRepository
    from prefect.settings import PREFECT_API_URL

    url, commit = deployable_commit("origin")
    if not PREFECT_API_URL.value():
        raise RemoteError(
            "--remote registers a deployment on your Prefect server for its workers; set "
            "PREFECT_API_URL (e.g. http://127.0.0.1:4200/api) to that server"
        )
    source = GitRepository(url=url, commit_sha=commit)
    remote_flow = watch_flow.from_source(source, entrypoint="flows/cycle.py:watch_flow")
    deployment_id = remote_flow.deploy(
        name=name, work_pool_name=pool, cron=cron, build=False, push=False,
        parameters={"params_path": params_path, "watch_dir": watch_dir, "push_to": "origin",
                    "cycle_branch": cycle_branch},
        job_variables={"env": REMOTE_ENV}, tags=["retroloop", "cycle", "remote"],
        description="retroloop cycles on new files in the watched folder, on a worker that "
        "shares no disk (clones the deployed commit, pushes each cycle to origin)",
        print_next_steps=False,
    )  # fmt: skip
    return str(deployment_id), commit
