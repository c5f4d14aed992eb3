"""Issue 19 on a copy of the shared tiny build: `verify` and `audit` report every broken link,
and `export` cannot destroy or pollute what it did not create.

- `rm -rf data/cache_teacher && retroloop verify` said every artifact OK, exit 0, and `audit`
  showed the distilled adapter's teacher as None, OK.
- A manifest input edited to a path outside the repository was not followed and not reported.
- `retroloop export data/opd/adapter --out data` exited 0 and replaced all of `data/`;
  `--out .` failed but left a `..tmp-PID` in the repository root.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retroloop import cli
from retroloop.provenance import audit
from tests.e2e.conftest import Built, clone_built

pytestmark = pytest.mark.e2e


def _files(root: Path) -> dict[str, int]:
    return {
        p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()
    }


def test_a_missing_or_outside_upstream_is_bad_in_verify_and_audit(
    tiny_built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    repo = clone_built(tiny_built, tmp_path / "repo")
    monkeypatch.chdir(repo)
    assert cli.main(["verify"]) == 0 and cli.main(["audit"]) == 0  # the good build beside it
    capsys.readouterr()

    shutil.rmtree("data/cache_teacher")
    assert cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "BAD data/distill" in out, out
    assert "input 'teacher_cache' data/cache_teacher: no longer exists" in out, out
    (row,) = [r for r in audit("data") if r["stage"] == "distill"]
    assert row["status"] == "BAD" and "teacher_cache" in row["error"]
    assert row["teacher"]["content_sha256"] is None
    assert cli.main(["audit"]) == 1
    assert cli.main(["audit", "--json"]) == 1  # the machine-readable form says so too

    # A manifest whose input points outside the repository (its hash left as it was).
    outside = tmp_path / "elsewhere-model"
    shutil.copytree("data/convert/model", outside)
    manifest = Path("data/opd/manifest.json")
    raw = json.loads(manifest.read_text())
    (student,) = [ref for ref in raw["inputs"] if ref["role"] == "student"]
    student["path"] = str(outside)
    manifest.write_text(json.dumps(raw, indent=2))
    capsys.readouterr()
    assert cli.main(["verify", "data/opd"]) == 1
    out = capsys.readouterr().out
    assert f"input 'student' {outside}: outside the repository" in out, out


@pytest.mark.parametrize("out", ["data", "."])
def test_export_into_data_or_the_repository_root_is_refused_and_changes_nothing(
    out: str, tiny_built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    repo = clone_built(tiny_built, tmp_path / "repo")
    monkeypatch.chdir(repo)
    before = _files(repo)
    capsys.readouterr()
    assert cli.main(["export", "data/opd/adapter", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"error: {out}: "), err
    assert "refusing to replace it" in err and "Traceback" not in err
    assert _files(repo) == before  # data/ whole, no temporary folder in the repository root
    assert cli.main(["verify"]) == 0
