"""Issue 20, item 4: a teacher of your choice (`prepare.teacher`).

- a teacher whose tokenizer differs from the source model's is refused in prepare, one line
  naming what differs, exit 2, nothing written;
- a same-tokenizer teacher that is a different model (another seed) is written to
  data/prepare/teacher and flows through cache_teacher → distill → opd → audit → evaluate:
  every manifest that used it names it (role `teacher`, its hash), and the evaluation report
  says which teacher it measured against;
- with `prepare.teacher: null` the teacher is the source model (`teacher_dir`), and
  data/prepare/teacher is an empty folder (a valid DVC out that adds nothing to the hash).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers_distill import workdir  # noqa: F401  (fixture)

from retroloop.artifacts import read_manifest
from retroloop.models.loading import build_tiny_tokenizer
from retroloop.stages.common import teacher_dir
from retroloop.tokenizer_match import check_same_tokenizer, tokenizer_differences
from tests.unit.test_cli_errors import cli, error_line, tiny_params

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [f"def f{i}(x): return x * {i}  # the quick brown fox {i}" for i in range(40)]

# The tiny profile's source model, briefly trained (the full 800 steps are not needed here).
SOURCE_STEPS = 30
TEACHER = {  # same tokenizer (same vocab_size and corpus), different weights (seed, steps)
    "source": "tiny_random",
    "tiny": {"seed": 1, "train_steps": 60, "vocab_size": 512},
}


# --------------------------------------------------------------------------- the check itself


def test_the_same_tokenizer_passes_and_each_difference_is_named() -> None:
    a, b = build_tiny_tokenizer(CORPUS, 300), build_tiny_tokenizer(CORPUS, 300)
    assert tokenizer_differences(a, b) == []
    check_same_tokenizer(a, b)

    other = build_tiny_tokenizer(CORPUS, 330)
    (vocab,) = tokenizer_differences(a, other)
    assert vocab.startswith(f"vocabulary ({len(a)} vs {len(other)} tokens; first differing id ")

    b.chat_template = a.chat_template.replace("<|im_start|>", "<|im_begin|>")
    assert [d.split(" (")[0] for d in tokenizer_differences(a, b)] == ["chat template"]
    b.chat_template = a.chat_template
    b.pad_token = b.eos_token  # pad 0 -> the eos id
    (special,) = tokenizer_differences(a, b)
    assert special == f"special token ids (pad {a.pad_token_id} vs {b.pad_token_id})"
    assert tokenizer_differences(a, a, logit_rows=(300, 320)) == [
        "logit width (300 vs 320 output rows)"
    ]


def test_teacher_dir_is_the_chosen_teacher_only_when_prepare_wrote_one(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "teacher").mkdir()
    assert teacher_dir(tmp_path) == tmp_path / "model"  # empty folder: prepare.teacher null
    (tmp_path / "teacher" / "config.json").write_text("{}")
    assert teacher_dir(tmp_path) == tmp_path / "teacher"


# --------------------------------------------------------------------------- prepare


def test_a_null_teacher_is_the_source_model_and_an_empty_folder(workdir) -> None:  # noqa: F811
    """The session's tiny build (`prepare.teacher: null`): nothing new is hashed or named."""
    assert list(Path("data/prepare/teacher").iterdir()) == []  # there, for dvc.yaml's outs
    prepared = read_manifest(Path("data/prepare"))
    assert "teacher" not in prepared.outputs and "teacher" not in prepared.metrics
    assert not any(rel.startswith("teacher/") for rel in prepared.files)
    assert teacher_dir() == Path("data/prepare/model")
    assert read_manifest(Path("data/cache_teacher")).input("teacher").path == "data/prepare/model"


def test_a_teacher_with_another_tokenizer_is_one_line_exit_2_nothing_written(
    tmp_path, monkeypatch, capsys
) -> None:
    teacher = {**TEACHER, "tiny": {**TEACHER["tiny"], "vocab_size": 600}}
    params = tiny_params(
        tmp_path / "p.yaml", prepare={"model.tiny.train_steps": 0, "teacher": teacher}
    )
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(params))
    assert code == 2
    error_line(
        err,
        "prepare.teacher: its tokenizer differs from the source model's: vocabulary (512 vs 600",
        "first differing id",
        "pick a teacher of the same family",
    )
    assert not (tmp_path / "data" / "prepare").exists()


def test_a_teacher_with_a_shorter_context_is_refused_by_name(tmp_path, monkeypatch, capsys):
    teacher = {**TEACHER, "tiny": {**TEACHER["tiny"], "max_position_embeddings": 32}}
    params = tiny_params(
        tmp_path / "p.yaml", prepare={"model.tiny.train_steps": 0, "teacher": teacher}
    )
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(params))
    assert code == 2
    error_line(err, "prepare.teacher: prepare.max_seq_len: 64 is longer than the model's context")
    assert not (tmp_path / "data" / "prepare").exists()


def test_a_chosen_teacher_is_named_by_every_stage_that_used_it(tmp_path, monkeypatch) -> None:
    from retroloop.artifacts import input_ref
    from retroloop.config import load_params
    from retroloop.provenance import audit
    from retroloop.stages import analyze, cache_teacher, convert, distill, evaluate, opd, prepare

    params = tiny_params(
        tmp_path / "p.yaml",
        prepare={"model.tiny.train_steps": SOURCE_STEPS, "teacher": TEACHER},
    )
    cfg = load_params(params, {"distill.steps": 2, "opd.steps": 1, "static.enabled": False})
    monkeypatch.chdir(tmp_path)
    prepared = prepare.run(cfg)
    chosen = Path("data/prepare/teacher")
    assert (chosen / "config.json").is_file() and teacher_dir() == chosen
    assert prepared.outputs["teacher"] == "model"
    assert prepared.metrics["teacher"]["source"]["tiny"]["seed"] == 1
    teacher_sha = input_ref("teacher", chosen).content_sha256
    source_sha = input_ref("base_model", "data/prepare/model").content_sha256
    assert teacher_sha != source_sha  # a different model, not a copy of the source

    for stage in (analyze, convert, cache_teacher, distill, opd, evaluate):
        stage.run(cfg)

    cache = read_manifest(Path("data/cache_teacher")).input("teacher")
    assert (cache.path, cache.content_sha256) == ("data/prepare/teacher", teacher_sha)
    assert read_manifest(Path("data/opd")).input("teacher").content_sha256 == teacher_sha
    rows = {row["stage"]: row for row in audit("data")}
    for stage in ("distill", "opd"):  # distill: through its teacher cache; opd: directly
        assert rows[stage]["teacher"]["path"] == "data/prepare/teacher", rows[stage]
        assert rows[stage]["teacher"]["content_sha256"] == teacher_sha

    online = load_params(params, {"distill.steps": 1, "distill.teacher": "online"})
    distill.run(online, out_dir=Path("data/online"), checkpoint_dir=Path("data/checkpoints/on"))
    assert read_manifest(Path("data/online")).input("teacher").content_sha256 == teacher_sha

    metrics = json.loads(Path("data/evaluate/metrics.json").read_text())
    assert metrics["teacher"]["path"] == "data/prepare/teacher"
    assert metrics["teacher"]["content_sha256"] == teacher_sha
    assert metrics["teacher"]["source"] == {"source": "tiny_random"}
    report = Path("data/evaluate/report.md").read_text()
    assert f"`data/prepare/teacher` (sha256 {teacher_sha[:12]}; source tiny_random)" in report
