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


# --------------------------------------------------------------------------- issue 11: lineage that cannot lie


def _pipeline(root: Path) -> None:
    """base -> split (a file inside an artifact) -> downstream, as stages write them."""
    with atomic_artifact(root / "base", stage="prepare", kind="model") as w:
        (w.dir / "model").mkdir()
        (w.dir / "model" / "weights.bin").write_bytes(bytes(range(256)))
        (w.dir / "split.json").write_text('{"block": [2, 5]}\n')
        w.finish(params={}, params_sha256="h", seed=0, device="cpu")


def test_input_ref_rehashes_and_refuses_a_tampered_file_naming_both_hashes(tmp_path: Path) -> None:
    from retroloop.artifacts import input_ref, sha256_file

    _pipeline(tmp_path)
    split = tmp_path / "base" / "split.json"
    recorded = read_manifest(tmp_path / "base").files["split.json"]
    assert input_ref("split", split).content_sha256 == recorded == sha256_file(split)
    split.write_text('{"block": [3, 5]}\n')  # the 2 -> 3
    with pytest.raises(ArtifactError) as err:
        input_ref("split", split)
    msg = str(err.value)
    assert "split.json" in msg and recorded in msg and sha256_file(split) in msg
    assert "\n" not in msg
    # The whole artifact and a folder inside it are checked file by file too.
    weights = tmp_path / "base" / "model" / "weights.bin"
    split.write_text('{"block": [2, 5]}\n')
    input_ref("base_model", tmp_path / "base" / "model")
    weights.write_bytes(bytes(range(255)) + b"\x00")
    for target in (tmp_path / "base", tmp_path / "base" / "model"):
        with pytest.raises(ArtifactError, match=r"weights\.bin: input .* has sha256"):
            input_ref("base_model", target)


def test_an_extra_or_missing_file_and_an_edited_manifest_hash_are_refused(tmp_path: Path) -> None:
    import json

    from retroloop.artifacts import input_ref

    _pipeline(tmp_path)
    model = tmp_path / "base" / "model"
    (model / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"extra\.bin.*not recorded"):
        input_ref("base_model", model)
    (model / "extra.bin").unlink()
    manifest = tmp_path / "base" / "manifest.json"
    raw = json.loads(manifest.read_text())
    sha = raw["content_sha256"]
    raw["content_sha256"] = sha[:-1] + ("0" if sha[-1] != "0" else "1")  # one hash character
    manifest.write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"manifest\.json: content_sha256"):
        input_ref("base_model", tmp_path / "base")
    assert any("content_sha256" in line for line in verify(tmp_path / "base"))


def test_an_invalid_manifest_is_bad_in_verify_audit_and_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from retroloop import cli
    from retroloop.artifacts import input_ref

    monkeypatch.chdir(tmp_path)
    _write(Path("data/a"), "distill", "adapter", {}, "lora", outputs={"payload.txt": "adapter"})
    _write(Path("data/b"), "opd", "adapter", {}, "lora2", outputs={"payload.txt": "adapter"})
    assert cli.main(["verify"]) == 0
    Path("data/a/manifest.json").write_text('{"kind": "adapter", ')  # cut short
    capsys.readouterr()
    assert cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "BAD data/a" in out and "manifest.json" in out and "OK  data/b" in out
    rows = {row["adapter"]: row for row in audit("data")}
    assert rows["data/a"]["status"] == "BAD" and rows["data/b/payload.txt"]["status"] == "OK"
    assert cli.main(["audit"]) == 1
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        input_ref("parent_adapter", Path("data/a/payload.txt"))


def test_verify_reports_an_input_that_no_longer_holds_what_was_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write(Path("data/distill"), "distill", "adapter", {}, "v1")
    _write(Path("data/opd"), "opd", "adapter", {"parent_adapter": Path("data/distill")}, "o")
    assert verify(Path("data/opd")) == []
    _write(Path("data/distill"), "distill", "adapter", {}, "v2")  # distill reran, opd did not
    assert any("parent_adapter" in line and "stale" in line for line in verify(Path("data/opd")))


def test_lineage_of_a_missing_path_exits_nonzero_and_outside_paths_are_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import json

    from retroloop import cli

    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    assert cli.main(["lineage", "data/nope"]) == 2
    assert "data/nope: no such artifact" in capsys.readouterr().err
    elsewhere = _write(tmp_path / "elsewhere", "prepare", "model", {}, "x")
    _write(Path("data/a"), "analyze", "analysis", {"base_model": tmp_path / "elsewhere"}, "y")
    del elsewhere
    tree = lineage("data/a")
    assert tree["inputs"][0]["kind"].startswith("outside the repository")
    assert "inputs" not in tree["inputs"][0]
    assert cli.main(["lineage", "--json", "data/a"]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "analyze"


def test_a_cache_index_cannot_point_outside_the_cache(tmp_path: Path) -> None:
    import polars as pl

    from retroloop import teacher_cache as tc

    root = tmp_path / "cache"
    root.mkdir()
    (root / tc.CACHE_JSON).write_text(f'{{"format": "{tc.FORMAT}"}}')
    pl.DataFrame({"seq": [0], "shard": ["../../outside.safetensors"], "shard_sha256": ["0"]}).write_parquet(root / tc.INDEX)  # fmt: skip
    (tmp_path.parent / "outside.safetensors").write_bytes(b"")
    with pytest.raises(ArtifactError, match=r"outside\.safetensors: resolves to .* outside"):
        tc.TeacherCache(root).verify_all()


def test_run_dependent_figures_leave_the_content_hash(tmp_path: Path) -> None:
    import json

    def write(out: Path, seconds: float) -> str:
        with atomic_artifact(out, stage="distill", kind="adapter") as w:
            (w.dir / "steps.csv").write_text(f"step,loss,tokens_per_s\n1,0.5,{seconds}\n")
            w.metrics = {"loss": 0.5, "tokens_per_s": seconds, "models": {"a": {"seconds": seconds, "nll": 1.0}}}  # fmt: skip
            return w.finish(params={}, params_sha256="h", seed=0, device="cpu").content_sha256

    assert write(tmp_path / "a", 10.0) == write(tmp_path / "b", 99.0)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == {
        "loss": 0.5,
        "models": {"a": {"nll": 1.0}},
    }
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["tokens_per_s"] == 99.0 and run["models"] == {"a": {"seconds": 99.0}}
    assert (tmp_path / "a" / "steps.csv").read_text() == "step,loss\n1,0.5\n"
    assert (tmp_path / "b" / "run_steps.csv").read_text() == "step,tokens_per_s\n1,99.0\n"
    assert verify(tmp_path / "b") == []


def test_safetensors_headers_and_adapter_configs_are_written_in_canonical_order(
    tmp_path: Path,
) -> None:
    import json

    import torch
    from safetensors.torch import load_file, save

    from retroloop.canonical import canonical_safetensors_bytes, canonicalize

    tensors = {"b": torch.ones(2), "a": torch.zeros(3, dtype=torch.float16)}
    blobs = set()
    for meta in ({"x": "1", "format": "pt", "m": "2"}, {"m": "2", "format": "pt", "x": "1"}):
        blob = save(tensors, metadata=meta)
        blobs.add(canonical_safetensors_bytes(blob))
        (tmp_path / "t.safetensors").write_bytes(blob)
        canonicalize(tmp_path)
        assert (tmp_path / "t.safetensors").read_bytes() == canonical_safetensors_bytes(blob)
    assert len(blobs) == 1
    back = load_file(tmp_path / "t.safetensors")
    assert torch.equal(back["b"], tensors["b"]) and torch.equal(back["a"], tensors["a"])
    for order in (["q_proj", "v_proj", "down_proj"], ["down_proj", "q_proj", "v_proj"]):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": order, "r": 2}))
        canonicalize(tmp_path)
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]


def test_stage_tasks_never_serve_a_cached_result() -> None:
    """All seven stage tasks once shared one cache key; a persisted result then stood in for
    stages that never ran. The e2e test (tests/e2e/test_determinism.py) runs the flow."""
    from prefect.cache_policies import NO_CACHE

    from tasks.stages import STAGE_TASKS

    for name, stage_task in STAGE_TASKS.items():
        assert stage_task.cache_policy is NO_CACHE and stage_task.persist_result is False, name


# --------------------------------------------------------------------------- issue 19: every broken link is BAD


def _lineage_repo(root: Path) -> None:
    """base -> cache (teacher) -> distill (student, teacher_cache), as the stages record them."""
    _write(Path("data/base"), "prepare", "model", {}, "weights")
    _write(
        Path("data/cache"), "cache_teacher", "teacher_cache", {"teacher": Path("data/base")}, "c"
    )
    inputs = {"student": Path("data/base"), "teacher_cache": Path("data/cache")}
    _write(Path("data/distill"), "distill", "adapter", inputs, "lora", {"payload.txt": "adapter"})


def test_a_missing_upstream_artifact_is_bad_in_verify_audit_and_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`rm -rf data/cache_teacher && retroloop verify` said every artifact OK, exit 0."""
    import shutil

    from retroloop import cli

    monkeypatch.chdir(tmp_path)
    _lineage_repo(tmp_path)
    assert verify(Path("data/distill")) == [] and audit("data")[0]["status"] == "OK"
    shutil.rmtree("data/cache")
    (problem,) = verify(Path("data/distill"))
    assert problem.startswith("input 'teacher_cache' data/cache: no longer exists")
    assert "dvc checkout" in problem
    (row,) = audit("data")
    assert row["status"] == "BAD" and "teacher_cache" in row["error"]
    assert (
        row["teacher"]["content_sha256"] is None and "no longer exists" in row["teacher"]["error"]
    )
    capsys.readouterr()
    assert cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert "BAD data/distill" in out and "OK  data/base" in out
    assert cli.main(["audit"]) == 1


def test_an_input_outside_the_repository_is_bad_unless_it_is_a_source_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    _write(tmp_path / "elsewhere", "prepare", "model", {}, "x")
    (tmp_path / "notes.jsonl").write_text('{"text": "a"}\n')
    _write(Path("data/a"), "analyze", "analysis", {"base_model": tmp_path / "elsewhere"}, "y")
    (problem,) = verify(Path("data/a"))
    assert "input 'base_model'" in problem and "outside the repository" in problem
    # The good case beside it: a user's source file (a cycle's --domain-data) may be anywhere.
    _write(Path("data/b"), "cycle", "adapter", {"train_data": tmp_path / "notes.jsonl"}, "z")
    assert verify(Path("data/b")) == []


def test_an_input_that_is_not_an_artifact_is_compared_by_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("incoming").mkdir()
    Path("incoming/adapter.bin").write_bytes(b"v1")
    _write(Path("data/opd"), "opd", "adapter", {"parent_adapter": Path("incoming")}, "o")
    assert verify(Path("data/opd")) == []
    Path("incoming/adapter.bin").write_bytes(b"v2")
    (problem,) = verify(Path("data/opd"))
    assert "input 'parent_adapter' incoming" in problem and "stale" in problem
    Path("incoming/adapter.bin").unlink()
    Path("incoming").rmdir()
    assert "no longer exists" in verify(Path("data/opd"))[0]


def test_json_sha256_is_the_one_params_hash_and_its_value_is_pinned() -> None:
    """Every `params_sha256` (and each key built from params) is `canonical.json_sha256`: key
    order does not matter, non-JSON values hash as their `str`, and the digest is pinned, so a
    change of separators, escaping or sorting (which would move every recorded params hash
    and rerun the pipeline) fails here first."""
    from retroloop.canonical import json_sha256
    from retroloop.config import load_params

    obj = {"b": 1, "a": [1.5, "x", None], "p": Path("data/x"), "é": True}
    pinned = "11db2d553979a990df269db016962bca0d27cf383fad00ad6bba42d894f8ce50"
    assert json_sha256(obj) == pinned
    assert json_sha256(dict(reversed(obj.items()))) == pinned
    assert json_sha256({**obj, "p": "data/x"}) == pinned
    cfg = load_params(Path(__file__).resolve().parents[2] / "profiles" / "tiny.yaml")
    assert cfg.section_sha256("distill") == json_sha256(cfg.section("distill"))
