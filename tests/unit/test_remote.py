"""tasks/remote.py on a bare git remote and a directory DVC remote, without Prefect or a model:
the pre-flight refusals (one line each) and the push order (outputs first, the git ref last, so
a push that fails leaves nothing a user can see), for the pipeline's experiment and for a
registered cycle's branch; and `retroloop schedule --remote`'s refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from retroloop.cli import main
from retroloop.config import load_params
from retroloop.errors import RemoteError
from tasks.remote import (
    CYCLE_BRANCH,
    check_cycle_branch,
    check_remote,
    cycle_targets,
    cycles_base,
    deployable_commit,
    fetch_cycle_inputs,
    push_cycle,
    push_experiment,
)

REPO = Path(__file__).resolve().parents[2]


def _sh(cwd: Path, *cmd: str) -> str:
    if cmd[0] == "dvc":  # the test interpreter's dvc, whatever PATH says
        cmd = (str(Path(sys.executable).with_name("dvc")), *cmd[1:])
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC repository with one tracked output and an `origin` bare remote."""
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(tmp_path / "dvc-system"))
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "t")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "t@t")
    root, bare = tmp_path / "repo", tmp_path / "origin.git"
    root.mkdir()
    _sh(tmp_path, "git", "init", "-q", "--bare", str(bare))
    _sh(root, "git", "init", "-q")
    _sh(root, "git", "remote", "add", "origin", str(bare))
    _sh(root, "dvc", "init", "-q")
    (root / "data").mkdir()
    (root / "data" / "weights.bin").write_bytes(b"\x00" * 64)
    _sh(root, "dvc", "add", "-q", "data/weights.bin")
    _sh(root, "git", "add", "-A")
    _sh(root, "git", "commit", "-qm", "base")
    _sh(root, "git", "push", "-q", "origin", "HEAD:refs/heads/main")
    monkeypatch.chdir(root)
    return root


def _exp_refs(bare: Path) -> list[str]:
    return _sh(bare, "git", "for-each-ref", "--format=%(refname)", "refs/exps").split()


def test_a_worker_without_a_dvc_remote_is_refused_before_anything_runs(repo: Path) -> None:
    with pytest.raises(RemoteError, match="no DVC remote is configured on this worker") as err:
        check_remote("origin", None, repo)
    assert "\n" not in str(err.value) and "dvc remote add --global" in str(err.value)


def test_an_unknown_git_remote_is_refused_by_name(repo: Path) -> None:
    _sh(repo, "dvc", "remote", "add", "--local", "-d", "store", str(repo.parent / "store"))
    with pytest.raises(RemoteError, match="push_to='upstream': no such git remote"):
        check_remote("upstream", None, repo)
    assert check_remote("origin", None, repo) == "store"


def test_a_push_that_fails_leaves_no_ref_and_the_rerun_pushes(repo: Path) -> None:
    bare = repo.parent / "origin.git"
    broken = repo.parent / "store-is-a-file"
    broken.write_text("not a directory")
    _sh(repo, "dvc", "remote", "add", "--local", "-d", "store", str(broken))
    (repo / "data" / "weights.bin").write_bytes(b"\x01" * 64)  # what the worker "trained"
    _sh(repo, "dvc", "add", "-q", "data/weights.bin")
    with pytest.raises(RemoteError, match="nothing visible was published"):
        push_experiment.fn("origin", "trained-here", str(repo))
    assert _exp_refs(bare) == []

    store = repo.parent / "store"
    _sh(repo, "dvc", "remote", "modify", "--local", "store", "url", str(store))
    assert push_experiment.fn("origin", "trained-here-2", str(repo)) == "trained-here-2"
    assert [r.rsplit("/", 1)[-1] for r in _exp_refs(bare)] == ["trained-here-2"]
    assert any(p.is_file() for p in store.rglob("*"))  # the outputs went first

    with pytest.raises(RemoteError, match="'trained-here-2'.*already exists on git remote"):
        check_remote("origin", "trained-here-2", repo)


# --------------------------------------------------------------------------- a registered cycle


def _register(repo: Path, number: int) -> str:
    """A stand-in registered cycle (a folder of bytes), `dvc add`ed as tasks/cycle.py does."""
    cycle = repo / "data" / "registry" / "cycles" / f"cycle-{number:04d}"
    cycle.mkdir(parents=True)
    (cycle / "adapter.bin").write_bytes(bytes([number]) * 64)
    _sh(repo, "dvc", "add", "-q", str(cycle.relative_to(repo)))
    return f"data/registry/cycles/cycle-{number:04d}.dvc"


def _branch(bare: Path) -> str | None:
    out = _sh(bare, "git", "for-each-ref", "--format=%(objectname)", f"refs/heads/{CYCLE_BRANCH}")
    return out.strip() or None


def test_a_cycle_push_that_fails_leaves_no_branch_and_the_rerun_pushes(repo: Path) -> None:
    bare, head = repo.parent / "origin.git", _sh(repo, "git", "rev-parse", "HEAD").strip()
    broken = repo.parent / "store-is-a-file"
    broken.write_text("not a directory")
    _sh(repo, "dvc", "remote", "add", "--local", "-d", "store", str(broken))
    base = cycles_base("origin", CYCLE_BRANCH, repo)
    assert base == head  # no cycles branch yet: the cycle goes on the deployed commit
    dvc_file = _register(repo, 1)
    with pytest.raises(RemoteError, match="nothing visible was published") as err:
        push_cycle.fn("origin", CYCLE_BRANCH, base, "data/registry", str(repo))
    assert "\n" not in str(err.value) and "cycle-0001.dvc" in str(err.value)
    assert _branch(bare) is None  # the DVC remote refused: the branch was never pushed

    store = repo.parent / "store"
    _sh(repo, "dvc", "remote", "modify", "--local", "store", "url", str(store))
    commit = push_cycle.fn("origin", CYCLE_BRANCH, base, "data/registry", str(repo))
    assert _branch(bare) == commit
    assert _sh(bare, "git", "rev-parse", f"{commit}^").strip() == base  # on the deployed commit
    changed = _sh(bare, "git", "diff", "--name-only", base, commit).split()
    assert changed == [dvc_file]  # only the cycle's .dvc file: nothing else of the clone
    assert any(p.is_file() for p in store.rglob("*"))  # its objects went first
    assert _sh(repo, "git", "rev-parse", "HEAD").strip() == head  # the clone's HEAD: untouched
    assert _sh(repo, "git", "status", "--porcelain", "--untracked-files=no").strip() == ""


def test_a_cycle_branch_another_worker_moved_is_refused_and_left_as_it_was(repo: Path) -> None:
    bare = repo.parent / "origin.git"
    _sh(repo, "dvc", "remote", "add", "--local", "-d", "store", str(repo.parent / "store"))
    base = cycles_base("origin", CYCLE_BRANCH, repo)
    _register(repo, 1)
    theirs = push_cycle.fn("origin", CYCLE_BRANCH, base, "data/registry", str(repo))
    _register(repo, 2)  # a second cycle that started from the same base: not a fast-forward
    with pytest.raises(RemoteError, match=f"refused branch '{CYCLE_BRANCH}'.*rerun the cycle"):
        push_cycle.fn("origin", CYCLE_BRANCH, base, "data/registry", str(repo))
    assert _branch(bare) == theirs
    again = cycles_base("origin", CYCLE_BRANCH, repo)  # the rerun goes on the branch's tip
    assert again == theirs
    mine = push_cycle.fn("origin", CYCLE_BRANCH, again, "data/registry", str(repo))
    assert _branch(bare) == mine
    assert _sh(bare, "git", "diff", "--name-only", theirs, mine).split() == [
        "data/registry/cycles/cycle-0002.dvc"
    ]


def test_the_next_worker_pulls_the_branchs_cycles_before_its_own(repo: Path) -> None:
    store = repo.parent / "store"
    _sh(repo, "dvc", "remote", "add", "--local", "-d", "store", str(store))
    _register(repo, 1)
    pushed = push_cycle.fn("origin", CYCLE_BRANCH, cycles_base("origin", CYCLE_BRANCH, repo),
                           "data/registry", str(repo))  # fmt: skip
    other, bare = repo.parent / "other-worker", repo.parent / "origin.git"
    # another worker's fresh clone of the deployed commit
    _sh(repo.parent, "git", "clone", "-q", "-b", "main", str(bare), str(other))
    _sh(other, "dvc", "remote", "add", "--local", "-d", "store", str(store))
    cfg = load_params(REPO / "profiles" / "tiny.yaml")  # cycle.registry: data/registry
    assert fetch_cycle_inputs.fn(cfg, "origin", CYCLE_BRANCH, str(other)) == pushed
    cycle = other / "data/registry/cycles/cycle-0001"
    assert (cycle / "adapter.bin").read_bytes() == bytes([1]) * 64  # the .dvc file and its data
    assert _sh(other, "git", "rev-parse", "HEAD").strip() != pushed  # HEAD stays the deployed one


def test_a_bad_cycle_branch_or_a_registry_outside_the_clone_is_refused(repo: Path) -> None:
    cfg = load_params(REPO / "profiles" / "tiny.yaml")
    with pytest.raises(RemoteError, match="cycle_branch='no..dots': not a valid git branch"):
        check_cycle_branch("no..dots", cfg, repo)
    outside = cfg.model_copy(update={"cycle": cfg.cycle.model_copy(update={"registry": "/srv/r"})})
    with pytest.raises(RemoteError, match="cycle.registry: /srv/r lies outside the repository"):
        check_cycle_branch(CYCLE_BRANCH, outside, repo)
    check_cycle_branch(CYCLE_BRANCH, cfg, repo)


def test_a_cycle_pulls_only_the_pipeline_outputs_it_reads() -> None:
    cfg = load_params(REPO / "profiles" / "tiny.yaml")
    held = ["data/prepare/datasets", "data/convert/model", "data/opd/adapter"]
    manifests = [f"data/{stage}/manifest.json" for stage in ("prepare", "convert", "opd")]
    # not the source model, the teacher cache, distill's or static's outputs
    assert cycle_targets(cfg, REPO) == held + manifests


# --------------------------------------------------------------------------- schedule --remote


def test_schedule_remote_refuses_a_checkout_a_worker_could_not_clone(
    repo: Path, capsys: pytest.CaptureFixture
) -> None:
    _sh(repo, "git", "remote", "remove", "origin")
    args = ["schedule", "--remote", "--cron", "0 3 * * *"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: this checkout has no git remote 'origin'") and "\n" not in err

    bare = repo.parent / "origin.git"
    _sh(repo, "git", "remote", "add", "origin", str(bare))
    (repo / "new.txt").write_text("not pushed")
    _sh(repo, "git", "add", "new.txt")
    _sh(repo, "git", "commit", "-qm", "local only")
    head = _sh(repo, "git", "rev-parse", "HEAD").strip()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"commit {head[:12]} (HEAD) is not on git remote 'origin'" in err and "\n" not in err
    assert "git push origin HEAD" in err

    _sh(repo, "git", "push", "-q", "origin", "HEAD:refs/heads/main")
    assert deployable_commit("origin", repo) == (str(bare), head)
    _sh(repo, "git", "commit", "-q", "--allow-empty", "-m", "behind")
    _sh(repo, "git", "push", "-q", "origin", "HEAD:refs/heads/main")
    _sh(repo, "git", "checkout", "-q", "HEAD~1")  # behind a pushed tip: clonable too
    assert deployable_commit("origin", repo) == (str(bare), head)
