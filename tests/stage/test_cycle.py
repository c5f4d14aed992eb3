"""Continual-learning cycles on the tiny profile: two chained cycles under Prefect, lineage,
registry, schedule, and bad input that leaves the registry empty."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from retroloop.artifacts import read_manifest
from retroloop.config import load_params
from retroloop.errors import DataError, ModelError
from retroloop.provenance import audit, lineage
from tests.conftest import TINY_PROFILE


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory):
    """A tmp dir with the tiny pipeline's prepare stage and a params file for cycles on the base model."""
    from retroloop.stages import prepare

    root = tmp_path_factory.mktemp("cycle")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        raw = yaml.safe_load(TINY_PROFILE.read_text())
        raw["cycle"].update(base_model="data/prepare/model", base_adapter=None)
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        prepare.run(load_params(root / "params.yaml"))
        texts = pl.read_parquet("data/prepare/datasets/domain_train.parquet")["text"].to_list()
        for i, chunk in enumerate((texts[:6], texts[6:12])):
            with open(root / f"domain{i + 1}.jsonl", "w", encoding="utf-8") as fh:
                for text in chunk:
                    fh.write(json.dumps({"text": text}) + "\n")
        yield root


def test_two_chained_cycles_under_prefect(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.cycle import cycle_flow

    monkeypatch.chdir(workdir)
    with prefect_test_harness(server_startup_timeout=180):
        first = cycle_flow(domain_data="domain1.jsonl", params_path="params.yaml")
        second = cycle_flow(domain_data="domain2.jsonl", params_path="params.yaml")

    cycle1 = Path("data/registry/cycles/cycle-0001")
    cycle2 = Path("data/registry/cycles/cycle-0002")
    assert first["cycle"] == 1 and second["cycle"] == 2
    # Cycle 1 is taught back by the base model; cycle 2 by cycle 1's model.
    assert first["teacher"]["path"] == "data/prepare/model"
    assert second["teacher"]["path"] == str(cycle1 / "adapter")
    m2 = read_manifest(cycle2)
    assert m2.input("parent_adapter").path == str(cycle1 / "adapter")
    tree = lineage(cycle2 / "adapter")
    teacher = next(node for node in tree["inputs"] if node["role"] == "teacher")
    assert teacher["stage"] == "cycle" and teacher["path"] == str(cycle1 / "adapter")
    assert teacher["content_sha256"] == m2.input("parent_adapter").content_sha256

    rows = {row["adapter"]: row for row in audit("data")}
    assert set(rows) == {str(cycle1 / "adapter"), str(cycle2 / "adapter")}
    assert rows[str(cycle2 / "adapter")]["teacher"]["path"] == str(cycle1 / "adapter")

    report = (cycle2 / "report.md").read_text()
    for phase in ("before", "after_midtrain", "after_opd"):
        assert phase in report
        assert "domain_nll" in m2.metrics["phases"][phase]
    assert (cycle2 / "adapter" / "adapter_config.json").is_file()


def test_schedule_can_be_created_and_listed(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.cycle import build_deployment

    monkeypatch.chdir(workdir)
    with prefect_test_harness(server_startup_timeout=180):
        deployment_id = build_deployment("0 3 * * *", name="nightly").apply()

        async def read():
            async with get_client() as client:
                return await client.read_deployment(deployment_id)

        deployment = asyncio.run(read())
    assert deployment.name == "nightly"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]


@pytest.mark.parametrize(
    ("setup", "error", "match"),
    [
        (lambda d: (d / "empty.jsonl").write_text(""), DataError, "empty"),
        (
            lambda d: (d / "latin.txt").write_bytes("caf\xe9 na\xefve\n\nsecond".encode("latin-1")),
            DataError,
            "UTF-8",
        ),
        (lambda d: (d / "folder").mkdir(exist_ok=True), DataError, "folder"),
    ],
)
def test_bad_domain_data_is_refused_and_nothing_registered(
    workdir, monkeypatch, tmp_path, setup, error, match
) -> None:
    from retroloop.cycle import start

    monkeypatch.chdir(workdir)
    setup(tmp_path)
    target = next(p for p in tmp_path.iterdir())
    registry = tmp_path / "registry"
    with pytest.raises(error, match=match):
        start(load_params("params.yaml"), target, registry=registry)
    assert not registry.exists()


def test_teacher_that_is_not_a_model_is_refused(workdir, monkeypatch, tmp_path) -> None:
    from retroloop.cycle import start

    monkeypatch.chdir(workdir)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["cycle"]["teacher"] = str(tmp_path)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    registry = tmp_path / "registry"
    with pytest.raises(ModelError, match="cycle.teacher"):
        start(load_params(tmp_path / "p.yaml"), Path("domain1.jsonl"), registry=registry)
    assert not registry.exists()
