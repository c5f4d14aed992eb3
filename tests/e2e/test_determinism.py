"""Same params, same hashes; one changed param, exactly the downstream stages change — also
when the Prefect flow runs them with result persistence on (issue 11).

A second clean tiny build is compared with the session's shared build (every stage's
`content_sha256` must match). Then, in the second build, one distill param changes and
`retroloop run` (the Prefect flow, `PREFECT_RESULTS_PERSIST_BY_DEFAULT=true`) must run
exactly distill, static (trained with distill's budget), opd and evaluate, leave `dvc status`
clean and every recorded parent hash equal to the parent's current hash (`retroloop verify` checks that).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from retroloop.config import STAGES
from retroloop.provenance import recorded_hash
from tests.e2e.conftest import Built, build, sh

pytestmark = pytest.mark.e2e


def _hashes(repo: Path) -> dict[str, str]:
    return {
        name: json.loads((repo / "data" / name / "manifest.json").read_text())["content_sha256"]
        for name in STAGES
    }


def _files(repo: Path, name: str) -> dict[str, str]:
    return json.loads((repo / "data" / name / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def second(tiny_built: Built, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("second") / "repo", same_code_as=tiny_built)


def test_two_clean_builds_give_the_same_content_hash_for_every_stage(
    tiny_built: Built, second: Built
) -> None:
    first, again = _hashes(tiny_built.path), _hashes(second.path)
    differing = {
        name: sorted(
            rel
            for rel, sha in _files(second.path, name).items()
            if _files(tiny_built.path, name).get(rel) != sha
        )
        for name in STAGES
        if first[name] != again[name]
    }
    assert not differing, f"stages whose outputs differ between two clean builds: {differing}"


def test_prefect_run_after_a_param_change_reruns_exactly_downstream(second: Built) -> None:
    repo = second.path
    before = _hashes(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["distill"]["lr"] = params["distill"]["lr"] * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {"PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true", "PREFECT_HOME": str(repo / ".prefect")}
    out = sh(["retroloop", "run"], repo, timeout=900, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    ran = [r["stage"] for r in result if r["status"] == "ran"]
    assert ran == ["distill", "static", "opd", "evaluate"], result

    after = _hashes(repo)
    changed = [name for name in STAGES if after[name] != before[name]]
    assert changed == ["distill", "static", "opd", "evaluate"]
    assert "up to date" in sh(["dvc", "status"], repo).stdout
    assert "BAD" not in sh(["retroloop", "verify"], repo).stdout  # parent hashes match
    opd = json.loads((repo / "data/opd/manifest.json").read_text())
    parent = next(r for r in opd["inputs"] if r["role"] == "parent_adapter")
    assert parent["content_sha256"] == recorded_hash(repo / parent["path"])  # distill's new one

    again = sh(["retroloop", "run"], repo, timeout=900, env=env).stdout  # persisted results exist
    assert all(r["status"] == "skipped" for r in json.loads(again.strip().splitlines()[-1]))
