"""dvc.yaml, the schema, tasks/ and flows/ agree on the stages, their order and their code."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml

from retroloop.config import STAGES, Params
from retroloop.stages.common import PATHS

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_dvc_stages_are_the_pipeline_stages_in_order() -> None:
    assert list(DVC) == list(STAGES)


def test_every_stage_calls_the_cli_with_its_own_name() -> None:
    for name, stage in DVC.items():
        assert stage["cmd"] == f"retroloop stage {name}"


def test_every_stage_has_a_run_function_and_a_schema_section() -> None:
    for name in STAGES:
        module = importlib.import_module(f"retroloop.stages.{name}")
        sig = inspect.signature(module.run)
        assert list(sig.parameters)[:1] == ["cfg"] and {"inputs", "out_dir"} <= set(sig.parameters)
        assert sig.parameters["out_dir"].default == PATHS[name]
        assert name in Params.model_fields


def test_deps_include_the_stage_code_and_params_name_its_section() -> None:
    for name, stage in DVC.items():
        assert f"retroloop/stages/{name}.py" in stage["deps"]
        assert name in stage["params"]
        for dep in stage["deps"]:
            if not dep.startswith("data/"):
                assert (REPO / dep).exists(), f"{name}: dep {dep} does not exist"


def test_outputs_live_under_the_stage_folder_with_a_manifest() -> None:
    for name, stage in DVC.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        assert f"data/{name}/manifest.json" in outs
        metrics = [next(iter(m)) for m in stage["metrics"]]
        assert metrics == [f"data/{name}/metrics.json"]


def test_upstream_outputs_feed_downstream_deps() -> None:
    produced: set[str] = set()
    for name, stage in DVC.items():
        for dep in stage["deps"]:
            if dep.startswith("data/"):
                assert any(
                    dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")
                    for out in produced
                ), f"{name} depends on {dep}, which no earlier stage produces"
        for out in stage["outs"]:
            produced.add(next(iter(out)) if isinstance(out, dict) else out)


def test_tasks_and_flows_list_the_same_stages() -> None:
    from flows.pipeline import dvc_stage_names
    from tasks.stages import STAGE_TASKS

    assert list(STAGE_TASKS) == list(STAGES)
    assert dvc_stage_names(REPO / "dvc.yaml") == list(STAGES)


def test_core_never_imports_prefect_or_dvc() -> None:
    for path in (REPO / "retroloop").rglob("*.py"):
        text = path.read_text()
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and path.name != "cli.py":
                assert "prefect" not in stripped and not stripped.startswith(
                    ("import dvc", "from dvc")
                ), f"{path}: {stripped}"


def test_prefect_deployments_point_at_real_flows() -> None:
    import importlib

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert deployments
    for deployment in deployments:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(getattr(module, name), "fn"), (
            f"{deployment['entrypoint']} is not a Prefect flow"
        )
