"""Manifests, atomic writes, verify, lineage and audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from retroloop.artifacts import atomic_artifact, hash_tree, read_manifest
from retroloop.errors import ArtifactError
from retroloop.provenance import audit, lineage, verify


def _write(out: Path, stage: str, kind: str, inputs: dict[str, Path], payload: str, outputs=None):
    with atomic_artifact(out, stage=stage, kind=kind) as w:
        for role, path in inputs.items():
            w.add_input(role, path)
        (w.dir / "payload.txt").write_text(payload)
        w.outputs.update(outputs or {})
        w.metrics = {"x": 1}
        return w.finish(params={"a": 1}, params_sha256="h", seed=0, device="cpu")


def test_manifest_has_the_contract_keys(tmp_path: Path) -> None:
    m = _write(tmp_path / "a", "prepare", "model", {}, "hello")
    raw = (tmp_path / "a" / "manifest.json").read_text()
    for key in ("kind", "stage", "content_sha256", "inputs", "params", "code_version", "metrics"):
        assert f'"{key}"' in raw
    assert m.content_sha256 == hash_tree(tmp_path / "a")[0]
    assert (tmp_path / "a" / "metrics.json").is_file()


def test_failed_stage_leaves_nothing_and_keeps_the_old_artifact(tmp_path: Path) -> None:
    _write(tmp_path / "a", "prepare", "model", {}, "old")
    with (
        pytest.raises(RuntimeError),
        atomic_artifact(tmp_path / "a", stage="prepare", kind="model") as w,
    ):
        (w.dir / "payload.txt").write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "a" / "payload.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_leftovers_of_killed_writers_are_removed_but_a_live_writers_are_kept(
    tmp_path: Path,
) -> None:
    import os
    import subprocess

    child = subprocess.Popen(["sleep", "0"])
    child.wait()
    (tmp_path / f".a.tmp-{child.pid}").mkdir()  # a SIGKILLed stage's half-written output
    (tmp_path / f".a.tmp-{os.getpid()}-x").mkdir()  # not ours to judge: name does not parse
    live = tmp_path / f".a.tmp-{os.getppid()}"  # a writer that is still running
    live.mkdir()
    _write(tmp_path / "a", "prepare", "model", {}, "new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert f".a.tmp-{child.pid}" not in names and live.name in names and "a" in names


def test_started_at_is_the_stage_runs_start_not_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retroloop import artifacts

    artifacts.mark_run_started()
    assert artifacts._run_started_at is not None
    monkeypatch.setattr(artifacts, "_run_started_at", "2026-01-01T00:00:00+00:00")  # long ago
    m = _write(tmp_path / "a", "prepare", "model", {}, "x")
    assert m.started_at == "2026-01-01T00:00:00+00:00" < m.ended_at


def test_verify_finds_tampering(tmp_path: Path) -> None:
    _write(tmp_path / "a", "prepare", "model", {}, "data")
    assert verify(tmp_path / "a") == []
    (tmp_path / "a" / "payload.txt").write_text("tampered")
    assert any("payload.txt" in p for p in verify(tmp_path / "a"))


def test_lineage_and_audit_follow_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = _write(Path("data/base"), "prepare", "model", {}, "weights")
    cache = _write(
        Path("data/cache"), "cache_teacher", "teacher_cache", {"teacher": Path("data/base")}, "c"
    )
    _write(
        Path("data/distill"),
        "distill",
        "adapter",
        {"student": Path("data/base"), "teacher_cache": Path("data/cache")},
        "lora",
        outputs={"payload.txt": "adapter"},
    )
    tree = lineage("data/distill/payload.txt")
    assert tree["stage"] == "distill"
    roles = {node["role"]: node for node in tree["inputs"]}
    assert roles["teacher_cache"]["content_sha256"] == cache.content_sha256
    assert roles["teacher_cache"]["inputs"][0]["content_sha256"] == base.content_sha256
    rows = audit("data")
    assert len(rows) == 1
    assert rows[0]["teacher"]["path"] == "data/base"
    assert rows[0]["teacher"]["content_sha256"] == base.content_sha256


def test_missing_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="run the upstream stage"):
        _write(tmp_path / "a", "analyze", "analysis", {"base_model": tmp_path / "nope"}, "x")
    with pytest.raises(ArtifactError, match="no manifest"):
        read_manifest(tmp_path)
