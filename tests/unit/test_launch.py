"""retroloop.launch: when a stage relaunches itself under torch's elastic launcher, with which
command line, and the refusals (one line each). The real two-rank run is
tests/stage/test_launch_two_ranks.py (slow: two fresh interpreters)."""

from __future__ import annotations

import logging
import subprocess
import types
from pathlib import Path

import pytest

from retroloop import launch
from retroloop.config import load_params
from retroloop.errors import ConfigError

TINY = Path(__file__).resolve().parents[2] / "profiles" / "tiny.yaml"


def cfg(**overrides):
    return load_params(TINY, overrides)


def test_one_machine_is_standalone_and_many_use_a_c10d_rendezvous() -> None:
    one = launch.torchrun_argv(cfg(**{"launch.nproc_per_node": 4}).launch)
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone"]
    many = cfg(**{"launch.nproc_per_node": 8, "launch.nnodes": 2,
                  "launch.rdzv_endpoint": "node0:29400"}).launch  # fmt: skip
    assert launch.torchrun_argv(many)[3:] == [
        "--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29400", "--rdzv_id=retroloop",
    ]  # fmt: skip


def test_many_machines_without_a_rendezvous_endpoint_is_one_line() -> None:
    with pytest.raises(ConfigError, match="launch.nnodes: 2 needs launch.rdzv_endpoint"):
        cfg(**{"launch.nnodes": 2})


def test_more_processes_than_gpus_is_refused_by_name(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"launch.nproc_per_node: 2, but this machine has 1 CUDA"):
        launch.check_devices(cfg(**{"launch.nproc_per_node": 2, "device": "auto"}))
    launch.check_devices(cfg(**{"launch.nproc_per_node": 2, "device": "cpu"}))  # gloo: any count


def _fake_stage(monkeypatch, name: str) -> list:
    ran: list = []
    module = types.SimpleNamespace(run=lambda c: ran.append(c) or "manifest")
    real = launch.importlib.import_module
    monkeypatch.setattr(
        launch.importlib, "import_module",
        lambda m: module if m == f"retroloop.stages.{name}" else real(m),
    )  # fmt: skip
    return ran


def test_a_stage_that_does_not_split_runs_once_with_a_warning(monkeypatch, caplog) -> None:
    ran = _fake_stage(monkeypatch, "evaluate")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("relaunched evaluate"))
    with caplog.at_level(logging.WARNING, logger="retroloop.launch"):
        assert launch.run_stage("evaluate", cfg(**{"launch.nproc_per_node": 2})) == "manifest"
    assert len(ran) == 1 and "evaluate does not split over processes yet" in caplog.text


def test_a_rank_never_relaunches(monkeypatch) -> None:
    ran = _fake_stage(monkeypatch, "distill")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a rank relaunched"))
    assert launch.run_stage("distill", cfg(**{"launch.nproc_per_node": 2})) == "manifest"
    assert len(ran) == 1


@pytest.mark.parametrize("stage", ["distill", "static", "opd"])
def test_a_training_stage_relaunches_with_the_same_params_and_a_failed_rank_is_one_line(
    monkeypatch, stage
) -> None:
    ran = _fake_stage(monkeypatch, stage)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    seen: list = []
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **k: seen.append(cmd) or subprocess.CompletedProcess(cmd, 1)
    )
    with pytest.raises(launch.LaunchError, match=f"{stage}: the 2-process run failed .* nothing was published"):  # fmt: skip
        launch.run_stage(stage, cfg(**{"launch.nproc_per_node": 2}), "p.yaml", ("opd.steps=3",))  # fmt: skip
    assert ran == []
    assert seen[0][-7:] == ["-m", "retroloop.cli", "stage", stage, "--params", "p.yaml", "--set=opd.steps=3"]  # fmt: skip
