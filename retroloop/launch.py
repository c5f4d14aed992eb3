"""Every GPU of a worker: a training stage relaunches itself under PyTorch's elastic launcher.

With `launch.nproc_per_node: N` (and, across machines, `launch.nnodes` + a rendezvous
endpoint), `run_stage` — what `retroloop stage NAME` (so `dvc repro`), `retroloop run` and the
Prefect stage task all call — starts `python -m torch.distributed.run … -m retroloop.cli stage
NAME` instead of running the stage in this process. Each rank then runs the same stage:
`training.init_distributed` joins the process group (NCCL on CUDA, gloo on CPU), the ranks
split the global batch and all-reduce gradients, and rank 0 alone writes the artifact, which
this process then reads back. We use torch's launcher rather than spawning ranks ourselves: it
already does rendezvous, per-rank environment (RANK, LOCAL_RANK, WORLD_SIZE) and failure
propagation.

OPD splits each step's prompts over the ranks (each samples its share from its own copy of the
current policy, so rollouts stay on-policy per rank) and all-reduces the gradients. Stages that
do not split over ranks (everything but distill, static and opd) run in this one process, with
a warning, so a profile with `nproc_per_node: 8` still runs end to end.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path

from retroloop.artifacts import Manifest, read_manifest
from retroloop.config import LaunchParams, Params
from retroloop.errors import ConfigError, RetroloopError

log = logging.getLogger(__name__)

# The stages whose loop splits its global batch over ranks (training.DistEnv); the rest run once.
MULTI_PROCESS_STAGES = ("distill", "static", "opd")


class LaunchError(RetroloopError):
    """A rank of a multi-process stage failed; its own error line is printed above."""


def launched() -> bool:
    """True inside a rank started by torch's launcher (so never relaunch from there)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def world_size(p: LaunchParams) -> int:
    return p.nproc_per_node * p.nnodes


def torchrun_argv(p: LaunchParams) -> list[str]:
    """The launcher's command line: standalone on one machine, c10d rendezvous across several."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={p.nproc_per_node}"]
    if p.nnodes == 1 and p.rdzv_endpoint is None:
        return [*argv, "--standalone"]
    return [*argv, f"--nnodes={p.nnodes}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={p.rdzv_endpoint}", f"--rdzv_id={p.rdzv_id}"]  # fmt: skip


def check_devices(cfg: Params) -> None:
    """One process per GPU: refuse more processes per node than this node has GPUs."""
    import torch

    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not cuda:
        return  # CPU ranks (gloo) share the cores; any count runs
    present = torch.cuda.device_count()
    if cfg.launch.nproc_per_node > present:
        raise ConfigError(
            f"launch.nproc_per_node: {cfg.launch.nproc_per_node}, but this machine has {present} "
            f"CUDA device(s); set it to at most {present} (one process per GPU)"
        )


def run_stage(
    name: str, cfg: Params, params_path: str | Path = "params.yaml", sets: tuple[str, ...] = ()
) -> Manifest:
    """Run stage `name`: in this process, or over `launch.nproc_per_node` ranks when it splits.
    `params_path` and `sets` (the CLI's `--set KEY=VALUE`s) are what every rank reloads."""
    module = importlib.import_module(f"retroloop.stages.{name}")
    if world_size(cfg.launch) == 1 or launched():
        return module.run(cfg)
    if name not in MULTI_PROCESS_STAGES:
        log.warning(
            "launch.nproc_per_node: %d: %s does not split over processes yet; it runs in one",
            cfg.launch.nproc_per_node,
            name,
        )
        return module.run(cfg)
    check_devices(cfg)
    cmd = [*torchrun_argv(cfg.launch), "-m", "retroloop.cli", "stage", name,
           "--params", str(params_path), *(f"--set={s}" for s in sets)]  # fmt: skip
    env = dict(os.environ)
    if cfg.threads:  # each rank gets this many intra-op threads, not all of the node's cores
        env.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    log.info("%s: %d processes via torch.distributed.run", name, world_size(cfg.launch))
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)  # ranks' stderr: the user's
    if done.returncode != 0:
        raise LaunchError(
            f"{name}: the {world_size(cfg.launch)}-process run failed (torch.distributed.run "
            f"exit {done.returncode}); the failing rank's error is above; nothing was published"
        )
    from retroloop.stages.common import PATHS

    return read_manifest(PATHS[name])
