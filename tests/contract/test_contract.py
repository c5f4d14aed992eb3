"""dvc.yaml, the schema, tasks/ and flows/ agree on the stages, their order and their code."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
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


# Error-message text and the one-writer-per-folder lock (who may write, not what is written) do
# not change any output; everything else a stage imports can.
_NOT_OUTPUT_CODE = {"retroloop/errors.py", "retroloop/runlock.py"}


def _module_file(name: str) -> Path | None:
    for path in (
        REPO / (name.replace(".", "/") + ".py"),
        REPO / name.replace(".", "/") / "__init__.py",
    ):
        if path.is_file():
            return path
    return None


def _retroloop_imports(path: Path) -> set[str]:
    """`retroloop.*` modules imported anywhere in the file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("retroloop"):
            found.add(node.module)
            found |= {
                f"{node.module}.{a.name}"
                for a in node.names
                if _module_file(f"{node.module}.{a.name}")
            }
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("retroloop")}
    return found


def _stage_code(name: str) -> set[str]:
    """The files of every `retroloop` module the stage's code imports, transitively."""
    seen, todo = set(), [f"retroloop.stages.{name}"]
    while todo:
        module = todo.pop()
        if module not in seen and (path := _module_file(module)) is not None:
            seen.add(module)
            todo += _retroloop_imports(path)
    files = {_module_file(m).relative_to(REPO).as_posix() for m in seen}
    return {f for f in files if not f.endswith("__init__.py")}


def test_deps_list_every_module_the_stage_code_imports() -> None:
    """dvc reruns a stage when its code changes only if that code is in its deps."""
    for name, stage in DVC.items():
        files = _stage_code(name) - _NOT_OUTPUT_CODE
        deps = set(stage["deps"])
        missing = sorted(
            f for f in files if f not in deps and not any(f.startswith(d + "/") for d in deps)
        )
        assert not missing, f"dvc.yaml stage {name}: add {missing} to its deps"


def test_outputs_live_under_the_stage_folder_with_a_manifest() -> None:
    for name, stage in DVC.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
        assert f"data/{name}/manifest.json" in outs
        metrics = [m if isinstance(m, str) else next(iter(m)) for m in stage["metrics"]]
        # metrics.json: inside the content hash; run.json: timings, outside it (issue 11);
        # a stage that logs steps (its code opens a steplog.StepLog) adds dvclive's last step.
        logged = any(_opens_a_steplog(REPO / f) for f in _stage_code(name))
        live = [f"data/{name}/dvclive/metrics.json"] if logged else []
        assert metrics == [f"data/{name}/metrics.json", f"data/{name}/run.json", *live]
        if logged:  # the per-step files, cached so `dvc plots diff` finds them in any revision
            assert {f"data/{name}/dvclive/plots", f"data/{name}/run_dvclive"} <= set(outs)


def _opens_a_steplog(path: Path) -> bool:
    """The file calls `StepLog(...)` (importing steplog's helpers does not log steps)."""
    calls = (
        n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.Call)
    )
    return any(getattr(c.func, "id", getattr(c.func, "attr", None)) == "StepLog" for c in calls)


def _plot_files(plot: dict) -> dict[str, list[str]]:
    """{file: [y columns]} of a top-level plot definition."""
    return {f: cols if isinstance(cols, list) else [cols] for f, cols in plot["y"].items()}


def test_each_plot_is_drawn_once_with_labelled_axes_from_a_stage_output() -> None:
    """`dvc plots show` draws the top-level plots only (stage-level `plots:` would draw the same
    files again against a row index), each with a title and both axis labels, from files some
    stage writes (an out, so `dvc plots diff` finds them in other revisions) or a benchmark's
    committed result outside data/ (in git, so every revision has it)."""
    top = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert all("plots" not in stage for stage in DVC.values())
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in DVC.values() for o in s["outs"]}
    for entry in top:
        [(name, plot)] = entry.items()
        assert plot.get("title") and plot.get("x_label") and plot.get("y_label"), name
        assert plot["y_label"] not in ("y", plot["x"]), name
        for file in _plot_files(plot):
            committed = not file.startswith("data/") and (REPO / file).is_file()
            stage_out = any(file == o or file.startswith(o + "/") for o in outs)
            assert committed or stage_out, (name, file)


def test_per_step_plots_name_what_the_stages_log() -> None:
    """Each dvclive file a top-level plot reads is a metric the stage logs per step."""
    from retroloop.canonical import is_run_dependent

    top = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    logged = {
        "distill": {"loss", "ce", "kl", "lr", "recurrence", "mu"},
        "static": {"loss", "ce", "kl", "lr", "recurrence", "mu"},
        "opd": {
            "reverse_kl_exact",
            "reverse_kl_topk_lb",
            "reverse_kl_sampled",
            "sampler_learner_kl",
            "entropy",
        },
    }
    for entry in top:
        for file, cols in _plot_files(next(iter(entry.values()))).items():
            if "/dvclive/" not in file:
                continue
            stage, metric = file.split("/")[1], Path(file).stem
            assert metric in logged[stage] and cols == [metric], file
            assert not is_run_dependent(metric), f"{file}: timings live in run_dvclive/"


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


def _prefect_tasks() -> list:
    """The Prefect task objects tasks/stages.py defines (module globals and STAGE_TASKS)."""
    from prefect import Task

    import tasks.stages as module

    found = [v for v in vars(module).values() if isinstance(v, Task)]
    found += [v for v in module.STAGE_TASKS.values() if isinstance(v, Task)]
    return list({id(t): t for t in found}.values())


def test_each_prefect_task_runs_the_stage_it_is_named_after(monkeypatch, tmp_path) -> None:
    """Three sources that must agree: dvc.yaml's stages, the task names the UI shows, and the
    `retroloop.stages.<name>` module each task's body imports and runs (stubbed: no stage runs)."""
    import tasks.stages as module

    ran: list[str] = []

    def import_module(name: str) -> SimpleNamespace:
        def run(cfg):
            ran.append(name)
            return SimpleNamespace(content_sha256=f"sha-{name}")

        return SimpleNamespace(run=run)

    import retroloop.launch as launch
    from retroloop.config import LaunchParams

    # the task runs its stage through launch.run_stage (one process at launch's defaults)
    monkeypatch.setattr(launch, "importlib", SimpleNamespace(import_module=import_module))
    monkeypatch.setattr(module, "load_params", lambda path: SimpleNamespace(launch=LaunchParams()))
    monkeypatch.setattr(module, "publish_manifest", lambda manifest, key: None)
    monkeypatch.setenv("RETROLOOP_PREFECT_RUN_ID", "")
    monkeypatch.chdir(tmp_path)  # no data/<stage>/report.md here
    found = _prefect_tasks()
    assert sorted(t.name for t in found) == sorted(DVC)
    for task in found:
        ran.clear()
        result = task.fn(params_path="params.yaml", up_to_date=False)
        assert ran == [f"retroloop.stages.{task.name}"], (task.name, ran)
        sha = f"sha-retroloop.stages.{task.name}"  # the manifest that module's run returned
        assert result == {"stage": task.name, "status": "ran", "content_sha256": sha}
    for key, task in module.STAGE_TASKS.items():
        assert task.name == key


def test_the_pipeline_flow_asks_dvc_then_calls_each_task_in_dvc_yaml_order(monkeypatch) -> None:
    """Run the flow's body with the tasks replaced by recorders (each records its task's own
    name) and DVC calling every stage current: the calls must follow dvc.yaml, one per stage,
    and the flow must ask DVC about the stage it then calls."""
    import flows.pipeline as pipeline

    asked: list[str] = []
    called: list[tuple[str, bool]] = []

    def recorder(task):
        def call(params_path: str, up_to_date: bool) -> dict:
            called.append((task.name, up_to_date))
            return {"stage": task.name, "status": "skipped", "content_sha256": None}

        return call

    monkeypatch.setattr(
        pipeline, "STAGE_TASKS", {k: recorder(t) for k, t in pipeline.STAGE_TASKS.items()}
    )
    monkeypatch.setattr(pipeline, "stage_is_current", lambda name: asked.append(name) or True)
    monkeypatch.setattr(pipeline, "commit_stage", lambda name: pytest.fail(f"committed {name}"))
    monkeypatch.chdir(REPO)  # the flow reads ./dvc.yaml
    result = pipeline.pipeline_flow.fn(params_path="params.yaml")
    assert asked == list(DVC)
    assert called == [(name, True) for name in DVC]
    assert [r["stage"] for r in result] == list(DVC)


def test_core_never_imports_prefect_or_dvc() -> None:
    for path in (REPO / "retroloop").rglob("*.py"):
        text = path.read_text()
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and path.name != "cli.py":
                module = stripped.split()[1]  # dvclive (DVC's file logger) is allowed
                assert "prefect" not in stripped and module.split(".")[0] != "dvc", (
                    f"{path}: {stripped}"
                )


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
