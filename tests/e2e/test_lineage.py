"""Lineage that cannot lie (issue 11), on copies of the shared tiny build.

- Tamper cases: each flips bytes in one artifact file (or breaks a manifest); `retroloop
  verify` must name the file and exit non-zero, and the downstream stage must refuse before
  it writes anything.
- Remote round trip: `dvc push` to a local-directory remote, a fresh `git clone` + `dvc pull`,
  then `dvc status` clean, `dvc repro` a no-op, `dvc metrics diff` and `retroloop verify` work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from retroloop import cli
from tests.e2e.conftest import Built, clone_built, git_commit, sh

pytestmark = pytest.mark.e2e


def _flip_last_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))


def _flip_middle_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def _shift_block(path: Path) -> None:  # the "2 -> 3" in split.json
    split = json.loads(path.read_text())
    split["block"] = [i + 1 for i in split["block"]]
    path.write_text(json.dumps(split, indent=2) + "\n")


def _bump_alpha(path: Path) -> None:
    config = json.loads(path.read_text())
    config["lora_alpha"] = config["lora_alpha"] + 1
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _cut_short(path: Path) -> None:
    path.write_text(path.read_text()[:100])


def _one_hash_char(path: Path) -> None:
    raw = json.loads(path.read_text())
    sha = raw["files"]["model/model.safetensors"]
    raw["files"]["model/model.safetensors"] = sha[:-1] + ("0" if sha[-1] != "0" else "1")
    path.write_text(json.dumps(raw, indent=2))


# case -> (file to tamper with, how, the file verify and the stage must name, downstream stage)
CASES: dict[str, tuple[str, Callable[[Path], None], str, str]] = {
    "model_weight": ("data/prepare/model/model.safetensors", _flip_last_byte, "data/prepare/model/model.safetensors", "analyze"),
    "parquet": ("data/prepare/datasets/instruct_train.parquet", _flip_middle_byte, "data/prepare/datasets/instruct_train.parquet", "analyze"),
    "cache_shard": ("data/cache_teacher/shards/shard_00000.safetensors", _flip_last_byte, "data/cache_teacher/shards/shard_00000.safetensors", "distill"),
    "adapter": ("data/distill/adapter/adapter_model.safetensors", _flip_last_byte, "data/distill/adapter/adapter_model.safetensors", "opd"),
    "split_json": ("data/analyze/split.json", _shift_block, "data/analyze/split.json", "convert"),
    "adapter_config": ("data/distill/adapter/adapter_config.json", _bump_alpha, "data/distill/adapter/adapter_config.json", "opd"),
    "manifest_invalid_json": ("data/distill/manifest.json", _cut_short, "data/distill/manifest.json", "opd"),
    "manifest_hash_char": ("data/convert/manifest.json", _one_hash_char, "data/convert/model/model.safetensors", "distill"),
}  # fmt: skip


def _snapshot(stage_dir: Path) -> dict[str, bytes]:
    """Every file of a stage's output folder and its siblings' names (temporary dirs show)."""
    files = {p.relative_to(stage_dir).as_posix(): p.read_bytes() for p in stage_dir.rglob("*") if p.is_file()}  # fmt: skip
    files["<siblings>"] = "\n".join(sorted(p.name for p in stage_dir.parent.iterdir())).encode()
    return files


@pytest.mark.parametrize("case", list(CASES))
def test_tampering_is_named_by_verify_and_refused_downstream(
    case: str,
    tiny_built: Built,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    target, tamper, named, downstream = CASES[case]
    repo = clone_built(tiny_built, tmp_path / "repo")
    monkeypatch.chdir(repo)
    assert cli.main(["verify"]) == 0
    capsys.readouterr()

    tamper(Path(target))
    assert cli.main(["verify"]) == 1
    out = capsys.readouterr().out
    assert named in out, out

    before = _snapshot(Path("data") / downstream)
    assert cli.main(["stage", downstream]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1, err
    if "hash_char" not in case and "invalid" not in case:
        assert re.search(r"sha256 [0-9a-f]{64} but .* records [0-9a-f]{64}", err), err
    assert _snapshot(Path("data") / downstream) == before  # refused before writing


def test_remote_round_trip(
    tiny_built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    repo = clone_built(tiny_built, tmp_path / "repo")
    sh(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], repo)
    git_commit(repo, "remote")
    sh(["dvc", "push"], repo)

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    sh(["dvc", "pull"], clone)
    status = sh(["dvc", "status"], clone).stdout
    assert "up to date" in status, status
    repro = sh(["dvc", "repro"], clone).stdout
    assert "Running stage" not in repro, repro
    diff = json.loads(sh(["dvc", "metrics", "diff", "--all", "--json"], clone).stdout)
    kl_end = json.loads((clone / "data/distill/metrics.json").read_text())["kl_end"]
    assert diff["data/distill/metrics.json"]["kl_end"]["old"] == kl_end  # the pulled metrics
    assert diff["data/distill/metrics.json"]["kl_end"]["new"] == kl_end  # are the committed ones
    assert "data/distill/run.json" in diff
    monkeypatch.chdir(clone)  # the CLI in this process: no torch import per command
    capsys.readouterr()
    assert cli.main(["verify"]) == 0 and "OK " in capsys.readouterr().out
    assert cli.main(["lineage", "--json", "data/opd/adapter"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["stage"] == "opd"


def test_loadable_from_any_directory_and_export(
    tiny_built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tiny_built.path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = f"""
import json, sys, torch, transformers
import retroloop  # a bare import registers the looped architecture
from retroloop.export import load_adapted
model = transformers.AutoModelForCausalLM.from_pretrained({str(repo / "data/convert/model")!r})
adapted = load_adapted({str(repo / "data/opd/adapter")!r})
merged = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[1, 2, 3, 4, 5]])
with torch.no_grad():
    diff = (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
print(json.dumps({{"type": type(model).__name__, "diff": diff}}))
"""
    out = tmp_path / "merged"
    monkeypatch.chdir(elsewhere)  # export in this process; loading in a fresh one (below)
    assert cli.main(["export", str(repo / "data/opd/adapter"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "manifest.json").is_file()
    proc = sh(["python", "-c", script, str(out)], elsewhere)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["type"] == "RecurrentForCausalLM" and got["diff"] < 1e-4
