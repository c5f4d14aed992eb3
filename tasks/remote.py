"""A worker that shares no disk with you: what the pipeline flow does around its stages there.

The remote deployments in prefect.yaml clone the repository at the deployed commit (Prefect's
`git_clone` pull step); this module is the rest of the round trip, with DVC's own engines:

1. `check_remote(git_remote, experiment)`: before anything runs, the worker has a DVC remote
   (from its own DVC config or environment, never from the repository), the git remote exists,
   and the experiment name is free there. Each failure is one line naming what to set.
2. `fetch_inputs()`: `dvc pull --allow-missing` of the outputs the deployed `dvc.lock` records,
   so DVC's skip logic sees what the user already built and only changed stages rerun.
3. the stages run (flows/pipeline.py).
4. `push_experiment(git_remote, experiment)`: `dvc push` of the workspace's outputs first, then
   `dvc exp save` + `dvc exp push --no-cache` of the git ref. The ref goes last, so a push that
   fails leaves nothing a user can see at home (content-addressed cache objects without a ref
   are inert), and a failed stage pushes nothing at all.

At home: `dvc exp pull origin NAME` brings the ref and its outputs, `dvc exp show` lists it with
its metrics, `dvc exp apply NAME` puts it in the workspace for `retroloop audit` / `verify`.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from retroloop.errors import RemoteError

_NO_DVC_REMOTE = (
    "no DVC remote is configured on this worker, so what it trains could not come back; "
    "configure one in the worker's own DVC config, outside the repository "
    "(`dvc remote add --global -d store s3://bucket/path`, or `--local` in the clone), "
    "with credentials from its environment"
)


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger (its lines show on the flow run in the UI), or retroloop's outside one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("retroloop")


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def dvc_remote_name(root: Path = Path(".")) -> str | None:
    """The DVC remote a bare `dvc push` would use here (repo, local, global or system config)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        core = repo.config["core"]
        remotes = repo.config["remote"]
        default = core.get("remote")
        if default:
            return default
        return next(iter(remotes)) if len(remotes) == 1 else None


def experiment_ref_on(git_remote: str, experiment: str, root: Path = Path(".")) -> str | None:
    """The `refs/exps/…/<experiment>` ref already on `git_remote`, if any."""
    listed = _git(root, "ls-remote", git_remote, "refs/exps/*")
    if listed.returncode != 0:
        raise RemoteError(
            f"git remote {git_remote!r}: cannot list it ({_last_line(listed.stderr)}); "
            "check `git remote -v` and the worker's git credentials"
        )
    for line in listed.stdout.splitlines():
        ref = line.split("\t")[-1]
        if ref.rsplit("/", 1)[-1] == experiment:
            return ref
    return None


def check_remote(git_remote: str, experiment: str | None, root: Path = Path(".")) -> str:
    """Refuse, before any stage runs, a worker whose results could not come back. Returns the
    DVC remote's name."""
    if _git(root, "remote", "get-url", git_remote).returncode != 0:
        raise RemoteError(
            f"push_to={git_remote!r}: no such git remote in {root.resolve()}; "
            "pass the name of a remote from `git remote -v` (the deployment's clone has 'origin')"
        )
    name = dvc_remote_name(root)
    if name is None:
        raise RemoteError(_NO_DVC_REMOTE)
    if experiment is not None:
        taken = experiment_ref_on(git_remote, experiment, root)
        if taken:
            raise RemoteError(
                f"experiment={experiment!r}: {taken} already exists on git remote "
                f"{git_remote!r}; pick another name (or leave it empty for a generated one)"
            )
    return name


@task(name="fetch-inputs", cache_policy=NO_CACHE, persist_result=False)
def fetch_inputs(root: str = ".") -> None:
    """`dvc pull --allow-missing`: every output the deployed dvc.lock records that the remote
    holds, so DVC skips the stages the user already ran and this worker reruns only what
    changed."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(root) as repo:
            stats = repo.pull(allow_missing=True)
    except (DvcException, OSError) as err:
        raise RemoteError(f"dvc pull from the DVC remote failed: {_last_line(str(err))}") from err
    _log().info("fetched %s file(s) from the DVC remote", stats.get("fetched", 0))


@task(name="push-experiment", cache_policy=NO_CACHE, persist_result=False)
def push_experiment(git_remote: str, experiment: str | None = None, root: str = ".") -> str:
    """Outputs to the DVC remote, then the experiment's git ref to `git_remote`; returns the
    experiment's name. Order matters: the ref is what a user sees, so it goes last."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from scmrepo.exceptions import SCMError

    try:
        with Repo(root) as repo:
            pushed = repo.push()
            _log().info("pushed %s file(s) to the DVC remote", pushed)
            rev = repo.experiments.save(name=experiment, force=False)
            name = repo.experiments.get_exact_name([rev])[rev] or experiment
            result = repo.experiments.push(git_remote, [name], push_cache=False)
    except (DvcException, SCMError, OSError) as err:  # a store that refuses raises OSError
        raise RemoteError(
            f"pushing the experiment failed: {_last_line(str(err))}; nothing visible was "
            "published (the git ref goes last); fix the remote and rerun"
        ) from err
    if name not in result.get("success", []) + result.get("up_to_date", []):
        raise RemoteError(
            f"git remote {git_remote!r} refused experiment {name!r} ({result}); "
            "pick another experiment name and rerun"
        )
    _log().info("experiment %s pushed to %s: at home, `dvc exp pull %s %s`", name, git_remote,
             git_remote, name)  # fmt: skip
    return name
