"""No command destroys or pollutes what it did not create (issue 19).

`retroloop export ADAPTER --out data` used to replace the whole `data/` directory; `--out .`
failed but left a `..tmp-PID` in the repository root; an adapter whose
`base_model_name_or_path` pointed outside the repository had that model loaded before any
check. Each case runs `retroloop export` in-process on a small repository built here (a
2-layer Llama as `data/convert`, a LoRA adapter on it as `data/opd`) and asserts one line
`error: …`, exit 2, and nothing written, next to the good case that exports.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from retroloop.artifacts import atomic_artifact, read_manifest
from retroloop.cli import main
from retroloop.errors import ArtifactError
from tests.unit.test_cli_errors import error_line, tiny_model_dir  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _publish(out: Path, stage: str, kind: str, fill) -> None:
    with atomic_artifact(out, stage=stage, kind=kind) as w:
        fill(w.dir)
        w.finish(params={}, params_sha256="", seed=0, device="cpu")


def _adapter(tiny_model_dir: Path, base_ref: str):  # noqa: F811
    """A writer's `fill` that saves a LoRA adapter on the tiny model, recording `base_ref`."""

    def fill(out: Path) -> None:
        from peft import LoraConfig, get_peft_model

        from retroloop.models.loading import load_model

        lora = LoraConfig(r=2, target_modules="all-linear")
        get_peft_model(load_model(tiny_model_dir), lora).save_pretrained(out / "adapter")
        config = out / "adapter" / "adapter_config.json"
        raw = json.loads(config.read_text())
        raw["base_model_name_or_path"] = base_ref
        config.write_text(json.dumps(raw))  # before finish(): the manifest is consistent

    return fill


@pytest.fixture
def repo(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    root = tmp_path / "repo"
    (root / "retroloop").mkdir(parents=True)
    (root / "retroloop" / "code.py").write_text("x = 1\n")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "notes.txt").write_text("a file\n")
    monkeypatch.chdir(root)
    _publish(Path("data/convert"), "convert", "model",
             lambda out: shutil.copytree(tiny_model_dir, out / "model"))  # fmt: skip
    _publish(Path("data/opd"), "opd", "adapter", _adapter(tiny_model_dir, "data/convert/model"))
    return root


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (temporary files and folders included) with its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("out", "what"),
    [
        ("data", "is the repository.s data/ folder"),
        (".", "is the working directory"),
        ("..", "is the working directory or a folder above it"),
        ("data/opd", "is the adapter artifact of stage 'opd'"),
        ("data/convert", "is the model artifact of stage 'convert'"),
        ("data/opd/adapter", "is inside the artifact data/opd"),
        ("data/convert/model/merged", "is inside the artifact data/convert"),
        ("retroloop", "is a folder with files and no manifest.json"),
        ("notes.txt", "is a file"),
    ],
)
def test_export_refuses_an_output_it_must_not_replace(
    out: str, what: str, repo: Path, capsys: pytest.CaptureFixture
) -> None:
    import re

    before = _tree(repo.parent)
    capsys.readouterr()
    assert main(["export", "data/opd/adapter", "--out", out]) == 2
    line = error_line(capsys.readouterr().err, f"{out}: ", "refusing to replace it", "new or empty")
    assert re.search(what, line), line
    assert _tree(repo.parent) == before  # nothing written, no temporary file anywhere
    assert sorted(p.name for p in repo.parent.iterdir()) == ["repo"]  # no ..tmp-PID


def test_export_writes_a_new_or_empty_folder_and_replaces_only_its_own(
    repo: Path, capsys: pytest.CaptureFixture
) -> None:
    """The good cases beside the refused ones: a new folder, an empty one, a rerun."""
    (repo / "empty").mkdir()
    for out in ("exported/merged", "exported/merged", "empty"):
        assert main(["export", "data/opd/adapter", "--out", out]) == 0, capsys.readouterr().err
        assert read_manifest(Path(out)).stage == "export"
        assert (Path(out) / "model.safetensors").is_file()
    assert not [p for p in repo.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def test_stages_get_the_same_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check lives in `atomic_artifact`: a stage cannot replace another stage's artifact
    either, and may replace its own (a rerun) or one whose manifest does not parse."""
    from retroloop.artifacts import check_output_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    _publish(Path("data/prepare"), "prepare", "model", lambda d: (d / "w").write_text("1"))
    with pytest.raises(ArtifactError, match="is the model artifact of stage 'prepare'"):
        _publish(Path("data/prepare"), "analyze", "analysis", lambda d: None)
    with pytest.raises(ArtifactError, match="repository's data/ folder"):
        check_output_dir("data", stage="prepare")
    _publish(Path("data/prepare"), "prepare", "model", lambda d: (d / "w").write_text("2"))
    assert (tmp_path / "data/prepare/w").read_text() == "2"
    Path("data/prepare/manifest.json").write_text("{")  # cut short: its stage repairs it
    _publish(Path("data/prepare"), "prepare", "model", lambda d: (d / "w").write_text("3"))
    assert read_manifest(Path("data/prepare")).stage == "prepare"
    # `dvc repro` deletes a stage's declared outs (the manifest among them) and leaves the rest:
    # the stage replaces that folder; export, given it by a user, does not.
    Path("data/prepare/manifest.json").unlink()
    with pytest.raises(ArtifactError, match="is a folder with files and no manifest.json"):
        check_output_dir("data/prepare", stage="export")
    _publish(Path("data/prepare"), "prepare", "model", lambda d: (d / "w").write_text("4"))
    assert read_manifest(Path("data/prepare")).stage == "prepare"


def test_a_failed_final_rename_removes_the_temporary_folder_and_keeps_the_old_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(tmp_path / "a", "prepare", "model", lambda d: (d / "w").write_text("old"))
    rename = Path.rename

    def failing(self: Path, target):
        if ".tmp-" in self.name:
            raise OSError(18, "Invalid cross-device link")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="cross-device"):
        _publish(tmp_path / "a", "prepare", "model", lambda d: (d / "w").write_text("new"))
    assert (tmp_path / "a" / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_export_refuses_a_base_model_outside_the_repository_before_loading_it(
    where: str,
    repo: Path,
    tiny_model_dir: Path,  # noqa: F811
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A consistent manifest (the adapter's config edited before it was hashed) does not help:
    the reference is contained before the model is loaded, and nothing is written."""
    import retroloop.models.loading as loading

    outside = repo.parent / "outside-model"
    shutil.copytree(tiny_model_dir, outside)
    ref = str(outside) if where == "absolute" else "../outside-model"
    _publish(Path("data/evil"), "opd", "adapter", _adapter(tiny_model_dir, ref))
    loaded: list[Path] = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda p, *a, **k: loaded.append(p) or real(p, *a, **k))  # fmt: skip
    capsys.readouterr()
    assert main(["export", "data/evil/adapter", "--out", "exported/evil"]) == 2
    error_line(
        capsys.readouterr().err, "base_model_name_or_path", "outside the adapter's repository"
    )
    assert loaded == [] and not Path("exported").exists()
    # The good case beside it: the adapter that points inside exports.
    assert main(["export", "data/opd/adapter", "--out", "exported/good"]) == 0
    assert [Path(p).resolve() for p in loaded] == [(repo / "data/convert/model").resolve()]


def test_export_verifies_the_adapter_before_loading_anything(
    repo: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import retroloop.models.loading as loading

    config = Path("data/opd/adapter/adapter_config.json")
    raw = json.loads(config.read_text())
    raw["lora_alpha"] += 1
    config.write_text(json.dumps(raw))  # tampered after its manifest was written
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    capsys.readouterr()
    assert main(["export", "data/opd/adapter", "--out", "exported/x"]) == 2
    error_line(capsys.readouterr().err, "adapter_config.json", "sha256")
