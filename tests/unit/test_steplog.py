"""retroloop.steplog: per-step metrics through dvclive, split into hashed and run-dependent."""

from __future__ import annotations

import subprocess
import sys

import pytest

from retroloop.artifacts import hash_tree
from retroloop.config import ConfigError, LoggingParams, parse_params
from retroloop.errors import MissingExtraError
from retroloop.steplog import LIVE, RUN_LIVE, StepLog, read_steps


def _rows(losses, speeds):
    return [
        {"step": i + 1, "loss": loss, "recurrence": 2, "reward": float("nan"), "tokens_per_s": s}
        for i, (loss, s) in enumerate(zip(losses, speeds, strict=True))
    ]


def _write(out, rows, replayed: int = 0):
    log = StepLog(out, name="t", rows=rows[:replayed])
    for row in rows[replayed:]:
        log.log(row)
    log.close()
    return out


def test_steps_come_back_as_logged_with_timings_in_the_run_folder(tmp_path) -> None:
    out = _write(tmp_path / "a", _rows([0.5, 0.25, 0.125], [10.0, 11.0, 12.0]))
    steps = read_steps(out)
    assert steps.columns == ["step", "loss", "recurrence", "tokens_per_s"]  # NaN reward: skipped
    assert steps["step"].to_list() == [1, 2, 3]
    assert steps["loss"].to_list() == [0.5, 0.25, 0.125]
    assert steps["tokens_per_s"].to_list() == [10.0, 11.0, 12.0]
    assert (out / LIVE / "plots" / "metrics" / "loss.tsv").read_text().splitlines()[:2] == [
        "step\tloss",
        "1\t0.5",
    ]
    assert not list((out / LIVE).rglob("tokens_per_s*"))  # timings only in run_dvclive/
    assert (out / RUN_LIVE / "plots" / "metrics" / "tokens_per_s.tsv").is_file()
    summary = (out / LIVE / "metrics.json").read_text()
    assert '"step": 3' in summary and "tokens_per_s" not in summary


def test_content_hash_ignores_timings_and_sees_the_losses(tmp_path) -> None:
    """Same losses, other speeds → same hash; another loss → another hash."""
    a = _write(tmp_path / "a", _rows([0.5, 0.25], [10.0, 11.0]))
    b = _write(tmp_path / "b", _rows([0.5, 0.25], [99.0, 7.0]))
    c = _write(tmp_path / "c", _rows([0.5, 0.26], [10.0, 11.0]))
    assert hash_tree(a)[0] == hash_tree(b)[0]
    assert hash_tree(a)[0] != hash_tree(c)[0]
    assert not any(name.startswith(RUN_LIVE) for name in hash_tree(a)[1])


def test_a_resumed_log_replays_the_checkpoint_rows_and_matches_a_straight_run(tmp_path) -> None:
    rows = _rows([0.5, 0.25, 0.125, 0.0625], [1.0, 2.0, 3.0, 4.0])
    straight = _write(tmp_path / "straight", rows)
    resumed = tmp_path / "resumed"
    _write(resumed, rows[:3])  # a killed run logged 3 steps; its checkpoint holds only 2
    _write(resumed, rows, replayed=2)
    assert read_steps(resumed).equals(read_steps(straight))
    assert hash_tree(resumed)[0] == hash_tree(straight)[0]


def test_prefixed_views_share_one_folder(tmp_path) -> None:
    log = StepLog(tmp_path, name="cycle")
    log.log({"step": 1, "loss": 2.0}, prefix="midtrain/")
    log.prefixed("opd/").log({"step": 1, "reverse_kl": 0.5})
    log.close()
    assert read_steps(tmp_path, prefix="midtrain")["loss"].to_list() == [2.0]
    assert read_steps(tmp_path, prefix="opd")["reverse_kl"].to_list() == [0.5]


@pytest.mark.parametrize(
    ("sink", "blocked", "extra"),
    [("tensorboard", "torch.utils.tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")],
)
def test_a_sink_without_its_package_is_one_line_naming_the_extra(
    tmp_path, monkeypatch, sink, blocked, extra
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # import raises ImportError
    with pytest.raises(MissingExtraError) as err:
        StepLog(tmp_path, name="t", params=LoggingParams(sink=sink))
    assert f"logging.sink: {sink}" in str(err.value)
    assert f"retroloop[{extra}]" in str(err.value) and "\n" not in str(err.value)


def test_the_sink_is_validated_by_the_schema() -> None:
    assert parse_params({"logging": {"sink": "tensorboard"}}).logging.sink == "tensorboard"
    with pytest.raises(ConfigError, match=r"logging\.sink"):
        parse_params({"logging": {"sink": "wandb"}})


def test_logging_in_a_git_repo_without_dvc_leaves_it_alone(tmp_path, monkeypatch) -> None:
    """dvclive on its own would `dvc init` such a repository."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "out", _rows([1.0], [1.0]))
    assert not (tmp_path / ".dvc").exists()
