"""Same params, same hashes; one changed param, exactly the downstream stages change — also
when the Prefect flow runs them with result persistence on (issue 11).

- Every stage run in-process (the stage tests' shared upstream, then distill → evaluate in a
  copy of it) gives the `content_sha256` of the session's `dvc repro` build: two independent
  builds, in another directory and another process, agree on every stage. The slow lane also
  compares a second complete `dvc repro` build (the same claim through DVC twice).
- In a copy of the build, one distill param changes and `retroloop run` (the Prefect flow,
  `PREFECT_RESULTS_PERSIST_BY_DEFAULT=true`) must run exactly distill, static (trained with
  distill's budget), opd and evaluate, leave `dvc status` clean and every recorded parent hash
  equal to the parent's current hash (`retroloop verify` checks that); a second `retroloop
  run` (against the session's Prefect server) then skips every stage and leaves `dvc.lock`
  and every hash as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from retroloop.config import STAGES, load_params
from retroloop.provenance import recorded_hash
from tests.conftest import PrefectServer
from tests.e2e.conftest import Built, build, clone_built, sh

pytestmark = pytest.mark.e2e


def _hashes(repo: Path) -> dict[str, str]:
    return {
        name: json.loads((repo / "data" / name / "manifest.json").read_text())["content_sha256"]
        for name in STAGES
    }


def _files(repo: Path, name: str) -> dict[str, str]:
    return json.loads((repo / "data" / name / "manifest.json").read_text())["files"]


def _differing(a: Path, b: Path) -> dict[str, list[str]]:
    """{stage: files whose hash differs} for every stage whose content hash differs."""
    first, again = _hashes(a), _hashes(b)
    return {
        name: sorted(rel for rel, sha in _files(b, name).items() if _files(a, name).get(rel) != sha)
        for name in STAGES
        if first[name] != again[name]
    }


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory, torch_threads_restored: None) -> Path:
    """All eight stages run in this process on the tiny profile: prepare → cache_teacher are
    the stage tests' shared upstream (built here if this is the first user), the rest run in a
    copy of it."""
    from retroloop.stages import distill, evaluate, opd, static
    from tests.stage.helpers_distill import TINY, build_upstream

    root = tmp_path_factory.mktemp("in_process")
    shutil.copytree(build_upstream(tmp_path_factory) / "data", root / "data")
    cfg = load_params(TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (distill, static, opd, evaluate):
            stage.run(cfg)
    return root


@pytest.fixture(scope="module")
def torch_threads_restored():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the stages set the profile's `threads`


def test_in_process_stages_give_the_dvc_builds_content_hash_for_every_stage(
    tiny_built: Built, in_process: Path
) -> None:
    differing = _differing(tiny_built.path, in_process)
    assert not differing, f"stages whose outputs differ between two clean builds: {differing}"


@pytest.mark.slow
def test_two_clean_dvc_builds_give_the_same_content_hash_for_every_stage(
    tiny_built: Built, tmp_path: Path
) -> None:
    second = build(tmp_path / "repo", same_code_as=tiny_built)
    differing = _differing(tiny_built.path, second.path)
    assert not differing, f"stages whose outputs differ between two clean builds: {differing}"


def test_prefect_run_after_a_param_change_reruns_exactly_downstream(
    tiny_built: Built, prefect_server: PrefectServer, tmp_path: Path
) -> None:
    repo = clone_built(tiny_built, tmp_path / "repo")
    before = _hashes(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill"]["lr"] = params["distill"]["lr"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {"PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "PREFECT_HOME": str(repo / ".prefect")}
    out = sh(["retroloop", "run"], repo, timeout=900, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert [r["stage"] for r in result] == list(STAGES)
    ran = [r["stage"] for r in result if r["status"] == "ran"]
    assert ran == ["distill", "static", "opd", "evaluate"], result

    after = _hashes(repo)
    changed = [name for name in STAGES if after[name] != before[name]]
    assert changed == ["distill", "static", "opd", "evaluate"]
    assert [r["content_sha256"] for r in result] == [after[name] for name in STAGES]
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    assert "BAD" not in sh(["retroloop", "verify"], repo).stdout  # parent hashes match
    opd = json.loads((repo / "data/opd/manifest.json").read_text())
    parent = next(r for r in opd["inputs"] if r["role"] == "parent_adapter")
    assert parent["content_sha256"] == recorded_hash(repo / parent["path"])  # distill's new one

    # Persisted results exist now; DVC calls every stage current, so the flow skips them all
    # and commits nothing: dvc.lock and the artifacts stay byte for byte. This run goes to the
    # session's running server (the README's `PREFECT_API_URL=… retroloop run`), the first to
    # the temporary local API.
    lock = (repo / "dvc.lock").read_bytes()
    env |= {"PREFECT_API_URL": prefect_server.api_url}
    again = json.loads(sh(["retroloop", "run"], repo, timeout=900, env=env).stdout.splitlines()[-1])
    assert [(r["stage"], r["status"]) for r in again] == [(name, "skipped") for name in STAGES]
    assert [r["content_sha256"] for r in again] == [after[name] for name in STAGES]
    assert (repo / "dvc.lock").read_bytes() == lock and _hashes(repo) == after
