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

A continual-learning cycle there (flows/cycle.py, `push_to=`) is not an experiment: it adds a
registered cycle, one `.dvc` file, to the registry. Its round trip:

1. `check_remote(git_remote, None)` and `check_cycle_branch(branch)`, before anything runs.
2. `fetch_cycle_inputs(cfg, git_remote, branch)`: the cycles branch (default `CYCLE_BRANCH`) is
   fetched, the registry's `.dvc` files it holds are written into the clone, and `dvc pull` brings
   those cycles and only the pipeline outputs a cycle reads (`cycle_targets`), so cycle n on the
   worker continues cycle n-1 whoever trained it. Returns the commit the new cycle goes on.
3. the cycle runs and registers (`dvc add` of the cycle: tasks/cycle.py).
4. `push_cycle(...)`: `dvc push` of the new cycle's `.dvc` targets first; then one commit on that
   base adding only the new `.dvc` file(s) (git plumbing on a scratch index: the clone's HEAD
   and branches are untouched), pushed to `refs/heads/<branch>` without force. The branch moves
   last and only forward: a failed push or a branch another cycle moved meanwhile leaves nothing
   a user can see (the pushed cache objects are inert without their `.dvc` file).

At home: `git fetch origin retroloop-cycles && git merge FETCH_HEAD && dvc pull -R
data/registry/cycles`, then `retroloop audit` / `retroloop verify` (README "A GPU worker that
shares no disk with you").
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from retroloop.config import Params
from retroloop.errors import RemoteError
from retroloop.stages.common import DATASETS

CYCLE_BRANCH = "retroloop-cycles"  # the git branch remote-trained cycles are pushed to

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
            stats = repo.pull(allow_missing=True)["stats"]  # {"stats": {"fetched": n, …}}
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


# --------------------------------------------------------------------------- a cycle's round trip


def check_cycle_branch(branch: str, cfg: Params, root: Path = Path(".")) -> None:
    """The cycles branch is a valid branch name and the registry lies inside the clone (its
    `.dvc` files are what the branch carries)."""
    if _git(root, "check-ref-format", "--branch", branch).returncode != 0 or branch in ("HEAD",):
        raise RemoteError(
            f"cycle_branch={branch!r}: not a valid git branch name; pass a name such as "
            f"{CYCLE_BRANCH!r}"
        )
    registry = Path(cfg.cycle.registry)
    if registry.is_absolute() or ".." in registry.parts:
        raise RemoteError(
            f"cycle.registry: {registry} lies outside the repository, so its .dvc files cannot "
            "travel on a git branch; set it to a path inside it (default data/registry)"
        )


def _dvc_yaml_outs(root: Path) -> list[Path]:
    import yaml

    if not (root / "dvc.yaml").is_file():  # no pipeline here: nothing of it to pull
        return []
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    outs = [o for stage in stages.values() for o in stage.get("outs", [])]
    return [Path(next(iter(o)) if isinstance(o, dict) else o) for o in outs]


def cycle_targets(cfg: Params, root: Path = Path(".")) -> list[str]:
    """The pipeline outputs a cycle reads, as `dvc pull` targets: the outs of dvc.yaml that hold
    (or lie in) cycle.base_model, cycle.base_adapter, a teacher path and the prepared
    instruction prompts, each with its stage's manifest.json (what lineage and audit read).
    The rest (the source model, the teacher cache, …) stays on the DVC remote."""
    c = cfg.cycle
    wanted = [Path(c.base_model), DATASETS]
    wanted += [Path(c.base_adapter)] if c.base_adapter else []
    wanted += [Path(c.teacher)] if c.teacher not in ("previous", "base") else []
    outs = _dvc_yaml_outs(root)
    held = [o for o in outs if any(o == w or o in w.parents or w in o.parents for w in wanted)]
    stages = {o.parts[:2] for o in held}  # data/<stage>
    manifests = [o for o in outs if o.name == "manifest.json" and o.parts[:2] in stages]
    return list(dict.fromkeys(str(o) for o in held + manifests))


def _cycle_files(tree: str, registry: str, root: Path) -> set[str]:
    """The registry's `.dvc` files in git tree-ish `tree`."""
    listed = _git(root, "ls-tree", "--name-only", tree, f"{registry}/cycles/")
    return {n for n in listed.stdout.split() if n.endswith(".dvc")}


def cycles_base(git_remote: str, branch: str, root: Path = Path(".")) -> str:
    """The commit a new cycle goes on: the cycles branch on `git_remote` (fetched), or this
    clone's HEAD (the deployed commit) when the branch does not exist yet."""
    listed = _git(root, "ls-remote", git_remote, f"refs/heads/{branch}")
    if listed.returncode != 0:
        raise RemoteError(
            f"git remote {git_remote!r}: cannot list it ({_last_line(listed.stderr)}); "
            "check `git remote -v` and the worker's git credentials"
        )
    if not listed.stdout.strip():
        return _git(root, "rev-parse", "HEAD").stdout.strip()
    fetched = _git(root, "fetch", "-q", git_remote, f"refs/heads/{branch}")
    if fetched.returncode != 0:
        raise RemoteError(
            f"git fetch {git_remote} {branch} failed ({_last_line(fetched.stderr)}); "
            "check the worker's git credentials"
        )
    return _git(root, "rev-parse", "FETCH_HEAD").stdout.strip()


@task(name="fetch-cycle-inputs", cache_policy=NO_CACHE, persist_result=False)
def fetch_cycle_inputs(cfg: Params, git_remote: str, branch: str, root: str = ".") -> str:
    """The registered cycles of the cycles branch and the pipeline outputs a cycle reads, from
    the DVC remote; returns the commit the new cycle goes on (`cycles_base`)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    here = Path(root)
    base = cycles_base(git_remote, branch, here)
    registry = Path(cfg.cycle.registry).as_posix()
    for name in sorted(_cycle_files(base, registry, here)):
        if not (here / name).exists():  # the deployed commit's own .dvc files win
            (here / name).parent.mkdir(parents=True, exist_ok=True)
            show = ["git", "show", f"{base}:{name}"]
            shown = subprocess.run(show, cwd=here, capture_output=True, check=True)
            (here / name).write_bytes(shown.stdout)
    cycles = sorted(str(p.relative_to(here)) for p in (here / registry / "cycles").glob("*.dvc"))
    targets = cycle_targets(cfg, here) + cycles
    try:
        with Repo(root) as repo:
            stats = repo.pull(targets=[str(here / t) for t in targets])["stats"]  # not cwd's
    except (DvcException, OSError) as err:
        raise RemoteError(
            f"dvc pull of the cycle's inputs ({', '.join(targets)}) failed: "
            f"{_last_line(str(err))}; `dvc push` them from the checkout that built them"
        ) from err
    _log().info("fetched %s file(s) (%d registered cycle(s)) on %s", stats.get("fetched", 0),
                len(cycles), base[:12])  # fmt: skip
    return base


def _identity_env(root: Path) -> dict[str, str]:
    """The worker's git identity, or a stand-in naming the host when it has none (a commit
    needs one; nothing is written to any git config)."""
    if _git(root, "var", "GIT_COMMITTER_IDENT").returncode == 0:
        return {}
    who = {"NAME": "retroloop worker", "EMAIL": f"retroloop@{socket.gethostname()}"}
    return {f"GIT_{role}_{k}": v for role in ("AUTHOR", "COMMITTER") for k, v in who.items()}


def commit_files(base: str, files: list[str], message: str, root: Path = Path(".")) -> str:
    """A commit on `base` whose tree is base's plus `files` (as they are in the working tree),
    made on a scratch index: HEAD, the index and every branch of the clone stay as they are."""
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, **_identity_env(root), "GIT_INDEX_FILE": str(Path(scratch) / "index")}

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True,
                                  text=True, check=True).stdout.strip()  # fmt: skip

        git("read-tree", base)
        for name in files:
            blob = git("hash-object", "-w", "--", name)
            git("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
        return git("commit-tree", git("write-tree"), "-p", base, "-m", message)


@task(name="push-cycle", cache_policy=NO_CACHE, persist_result=False)
def push_cycle(git_remote: str, branch: str, base: str, registry: str, root: str = ".") -> str:
    """The cycles registered here since `base`: their files to the DVC remote, then their `.dvc`
    files in one commit on `base`, pushed to `refs/heads/<branch>` (fast-forward only). Returns
    the commit. Order matters: the branch is what a user sees, so it goes last."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    here = Path(root)
    on_base = _cycle_files(base, Path(registry).as_posix(), here)
    new = sorted(str(p.relative_to(here)) for p in (here / registry / "cycles").glob("*.dvc"))
    new = [n for n in new if n not in on_base]
    assert new, f"push_cycle: no registered cycle in {registry} that {base[:12]} lacks"
    try:
        with Repo(root) as repo:
            pushed = repo.push(targets=[str(here / n) for n in new])
    except (DvcException, OSError) as err:  # a store that refuses raises OSError
        raise RemoteError(
            f"dvc push of {', '.join(new)} failed: {_last_line(str(err))}; nothing visible was "
            f"published (branch {branch!r} moves last); fix the DVC remote and rerun the cycle"
        ) from err
    _log().info("pushed %s file(s) to the DVC remote", pushed)
    names = ", ".join(Path(n).stem for n in new)
    commit = commit_files(base, new, f"{names}: trained on {socket.gethostname()}", here)
    sent = _git(here, "push", "-q", git_remote, f"{commit}:refs/heads/{branch}")
    if sent.returncode != 0:
        raise RemoteError(
            f"git remote {git_remote!r} refused branch {branch!r} ({_last_line(sent.stderr)}): "
            "another cycle was pushed there meanwhile, or the remote is read-only; nothing "
            "visible was published; rerun the cycle (it continues the branch's newest cycle)"
        )
    _log().info("%s pushed to %s %s: at home, `git fetch %s %s && git merge FETCH_HEAD && "
                "dvc pull -R %s/cycles`", names, git_remote, branch, git_remote, branch,
                Path(registry).as_posix())  # fmt: skip
    return commit


def deployable_commit(git_remote: str = "origin", root: Path = Path(".")) -> tuple[str, str]:
    """(URL, commit) a worker can clone: this checkout's `git_remote` and its HEAD, which must
    be on that remote (a branch or tag tip, or behind one). One line when it is not."""
    url = _git(root, "remote", "get-url", git_remote)
    if url.returncode != 0:
        raise RemoteError(
            f"this checkout has no git remote {git_remote!r}, so a worker could not clone it; "
            f"`git remote add {git_remote} URL` and `git push {git_remote} HEAD`, then rerun"
        )
    head = _git(root, "rev-parse", "--verify", "HEAD^{commit}")
    if head.returncode != 0:
        raise RemoteError("this checkout has no commit yet; commit and push it, then rerun")
    commit = head.stdout.strip()
    listed = _git(root, "ls-remote", "--heads", "--tags", git_remote)
    if listed.returncode != 0:
        raise RemoteError(
            f"git remote {git_remote!r}: cannot list it ({_last_line(listed.stderr)}); "
            "check `git remote -v` and your git credentials"
        )
    tips = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    on = commit in tips or any(
        _git(root, "merge-base", "--is-ancestor", commit, tip).returncode == 0 for tip in tips
    )
    if not on:
        raise RemoteError(
            f"commit {commit[:12]} (HEAD) is not on git remote {git_remote!r} "
            f"({url.stdout.strip()}), so a worker could not clone it; `git push {git_remote} "
            "HEAD` first, then rerun"
        )
    return url.stdout.strip(), commit
