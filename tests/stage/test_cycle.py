"""Continual-learning cycles on the tiny profile: exactly-once registration under concurrency,
chained lineage, retries of failed files by the watch flow, and bad input that registers nothing.

One Prefect test API serves the whole module (`api`); each test gets its own registry."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import polars as pl
import pytest
import yaml

from retroloop.artifacts import read_manifest, sha256_file
from retroloop.config import load_params
from retroloop.errors import ArtifactError, DataError, MismatchError, ModelError
from retroloop.provenance import audit, lineage
from retroloop.steplog import read_steps
from tests.conftest import TINY_PROFILE


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory):
    """A tmp dir with the tiny pipeline's prepare stage and a params file for cycles on the base model."""
    from retroloop.stages import prepare

    root = tmp_path_factory.mktemp("cycle")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        raw = yaml.safe_load(TINY_PROFILE.read_text())
        # A leaked slot fails the test in 5 minutes, not the profile's 10.
        raw["cycle"].update(base_model="data/prepare/model", base_adapter=None, slot_timeout_s=300)
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        prepare.run(load_params(root / "params.yaml"))
        texts = pl.read_parquet("data/prepare/datasets/domain_train.parquet")["text"].to_list()
        for i, chunk in enumerate((texts[:6], texts[6:12])):
            with open(root / f"domain{i + 1}.jsonl", "w", encoding="utf-8") as fh:
                for text in chunk:
                    fh.write(json.dumps({"text": text}) + "\n")
        with open(root / "gsm8k.jsonl", "w", encoding="utf-8") as fh:  # GSM8K's format
            for a in range(12):
                q = f"Sam has {a} apples and buys {a + 3} more. How many apples does Sam have?"
                fh.write(json.dumps({"question": q, "answer": f"{a}+{a + 3}={2 * a + 3}\n#### {2 * a + 3}"}) + "\n")  # fmt: skip
        yield root


@pytest.fixture(scope="module")
def api(workdir: Path):
    """A Prefect test API for the module (the flows' task runs, artifacts, concurrency slots)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def _taken_slots() -> dict[str, int]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {x.name: x.active_slots for x in client.read_global_concurrency_limits() if x.active_slots}  # fmt: skip


@pytest.fixture(autouse=True)
def no_slot_left_taken(request: pytest.FixtureRequest):
    """Every cycle test starts and ends with no concurrency slot taken on its server: a slot a
    test (or a file before this one) leaves taken fails here, at once, instead of making the
    next cycle wait up to cycle.slot_timeout_s for it (the hang that reverted e402870)."""
    if "api" not in request.fixturenames:
        yield
        return
    assert _taken_slots() == {}, "a slot was taken before this test (by another test file?)"
    yield
    assert _taken_slots() == {}, "this test left a concurrency slot taken"


def params_with(workdir: Path, name: str, **cycle: object) -> Path:
    """A params file like the module's, with `cycle.*` overrides (e.g. its own registry)."""
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["cycle"].update(cycle)
    path = workdir / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def registered(registry: Path) -> list[str]:
    cycles = registry / "cycles"
    return sorted(p.name for p in cycles.iterdir()) if cycles.is_dir() else []


def test_two_concurrent_cycles_register_two_distinct_chained_cycles(
    workdir: Path, api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2026-11-29 report: two cycles at once both said `cycle: 1` and one adapter was lost.
    Now the second waits for the "gpu" slot (created on demand, strict) and becomes cycle 2,
    taught by cycle 1."""
    from flows.cycle import cycle_flow

    monkeypatch.chdir(workdir)
    params = str(params_with(workdir, "concurrent", registry="reg-concurrent"))
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(name: str, fmt: str) -> None:
        try:
            results[name] = cycle_flow(domain_data=f"{name}.jsonl", params_path=params, fmt=fmt)
        except BaseException as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=a) for a in (("domain1", "text"), ("gsm8k", "gsm8k"))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r["cycle"] for r in results.values()) == [1, 2]
    assert registered(Path("reg-concurrent")) == ["cycle-0001", "cycle-0002"]

    cycle1, cycle2 = (Path("reg-concurrent/cycles") / f"cycle-000{n}" for n in (1, 2))
    m1, m2 = read_manifest(cycle1), read_manifest(cycle2)
    # Each cycle trained on its own file, and both files are in the registry: nothing lost.
    assert {m1.input("train_data").path, m2.input("train_data").path} == {
        "domain1.jsonl",
        "gsm8k.jsonl",
    }
    # GSM8K domain data: GSM8K accuracy on its held-out problems before and after each phase.
    gsm, text = (m1, m2) if m1.input("train_data").path == "gsm8k.jsonl" else (m2, m1)
    for phase in ("before", "after_midtrain", "after_opd"):
        scored = gsm.metrics["phases"][phase]
        # A share of whole problems: correct answers / problems scored (k of n, n > 0).
        n = scored["gsm8k_questions"]
        assert n > 0 and scored["gsm8k_accuracy"] * n == pytest.approx(
            round(scored["gsm8k_accuracy"] * n), abs=1e-9
        )
        assert "gsm8k_accuracy" not in text.metrics["phases"][phase]
    # Cycle 1 is taught back by the base model; cycle 2 by cycle 1's model.
    assert m1.input("teacher").path == "data/prepare/model"
    assert m2.input("teacher").path == str(cycle1 / "adapter")
    assert m2.input("parent_adapter").path == str(cycle1 / "adapter")
    tree = lineage(cycle2 / "adapter")
    teacher = next(node for node in tree["inputs"] if node["role"] == "teacher")
    assert teacher["stage"] == "cycle" and teacher["path"] == str(cycle1 / "adapter")

    rows = {row["adapter"]: row for row in audit("reg-concurrent")}
    assert set(rows) == {str(cycle1 / "adapter"), str(cycle2 / "adapter")}
    assert rows[str(cycle2 / "adapter")]["teacher"]["path"] == str(cycle1 / "adapter")

    report = (cycle2 / "report.md").read_text()
    for phase in ("before", "after_midtrain", "after_opd"):
        assert phase in report
        assert "domain_nll" in m2.metrics["phases"][phase]
    assert (cycle2 / "adapter" / "adapter_config.json").is_file()
    assert pl.read_parquet(cycle2 / "data" / "train.parquet").height > 0
    # Every step of both phases, through dvclive, inside the registered cycle (nothing left
    # behind in the registry's work folder).
    assert read_steps(cycle2, prefix="midtrain")["step"].to_list() == [1, 2]
    opd_steps = read_steps(cycle2, prefix="opd")
    assert opd_steps["step"].to_list() == [1, 2] and "reverse_kl_topk_lb" in opd_steps.columns
    assert not list(Path("reg-concurrent/.work").glob("*"))


def test_a_cycle_on_a_held_registry_refuses_in_one_line(
    workdir: Path, api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cycle import cycle_flow
    from retroloop.registry import RegistryBusyError, claim_next_cycle

    monkeypatch.chdir(workdir)
    params = str(params_with(workdir, "held", registry="reg-held"))
    with claim_next_cycle("reg-held") as claim:
        assert claim.number == 1
        with pytest.raises(RegistryBusyError, match="busy with cycle 1") as err:
            cycle_flow(domain_data="domain1.jsonl", params_path=params)
    assert "\n" not in str(err.value)
    assert registered(Path("reg-held")) == []
    with claim_next_cycle("reg-held") as claim:  # released: the next cycle gets the number
        assert claim.number == 1


def test_failed_cycle_leaves_its_file_for_the_next_watch_tick(
    workdir: Path, api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cycle import watch_flow
    from retroloop import cycle, registry

    monkeypatch.chdir(workdir)
    params = str(params_with(workdir, "watch", registry="reg-watch", watch_dir="incoming"))
    Path("incoming").mkdir()
    Path("incoming/domain1.jsonl").write_bytes(Path("domain1.jsonl").read_bytes())

    def crash(state):  # after ingest and the "before" evaluation, mid-cycle
        raise RuntimeError("simulated crash in mid-training")

    with monkeypatch.context() as m:
        m.setattr(cycle, "midtrain", crash)
        state = watch_flow(params_path=params, return_state=True)
    assert state.is_failed() and "domain1.jsonl" in state.message
    assert registered(Path("reg-watch")) == []
    sha = sha256_file(Path("incoming/domain1.jsonl"))
    [attempt] = registry.failed_attempts("reg-watch", sha)
    assert attempt["status"] == "failed" and "simulated crash" in attempt["error"]

    rows = watch_flow(params_path=params)  # the next tick retries the file, and it registers
    assert [r["status"] for r in rows] == ["registered (cycle 1)"]
    assert registered(Path("reg-watch")) == ["cycle-0001"]
    rows = watch_flow(params_path=params)  # done: not run again
    assert [r["status"] for r in rows] == ["done (cycle-0001)"]


def test_watch_gives_up_after_max_attempts(
    workdir: Path, api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cycle import watch_flow
    from retroloop import registry

    monkeypatch.chdir(workdir)
    params = str(params_with(workdir, "giveup", registry="reg-giveup", watch_dir="incoming2"))
    Path("incoming2").mkdir()
    path = Path("incoming2/domain2.jsonl")
    path.write_bytes(Path("domain2.jsonl").read_bytes())
    sha = sha256_file(path)
    for _ in range(2):  # one killed (still "started"), one failed
        registry.record_attempt("reg-giveup", path, sha, "started")
    registry.record_attempt("reg-giveup", path, sha, "failed", "RuntimeError: boom")
    rows = watch_flow(params_path=params, max_attempts=2)
    assert rows[0]["status"] == "given up" and rows[0]["error"] == "RuntimeError: boom"
    assert registered(Path("reg-giveup")) == []


def test_the_same_cycle_twice_publishes_the_same_content_sha256(
    workdir: Path, api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same params, file and parent give the same bytes: the phases' timings live in
    run_phases.json, outside the content hash (phases.json held `seconds`, so no two runs of
    a cycle ever published the same content_sha256)."""
    from flows.cycle import cycle_flow
    from retroloop.provenance import verify

    monkeypatch.chdir(workdir)
    dirs = []
    for name in ("same-a", "same-b"):
        params = str(params_with(workdir, name, registry=f"reg-{name}"))
        dirs.append(Path(cycle_flow(domain_data="domain1.jsonl", params_path=params)["adapter"]).parent)  # fmt: skip
    a, b = (read_manifest(d) for d in dirs)
    assert a.content_sha256 == b.content_sha256, {
        k: (v, b.files.get(k)) for k, v in a.files.items() if b.files.get(k) != v
    }
    timings = json.loads((dirs[0] / "run_phases.json").read_text())
    assert set(timings) == {"before", "after_midtrain", "after_opd"}
    assert all("seconds" in t for t in timings.values())
    assert "seconds" not in json.loads((dirs[0] / "phases.json").read_text())["before"]
    assert a.metrics["phases"]["before"]["seconds"] == timings["before"]["seconds"]
    assert verify(dirs[0]) == []


def _tokenizer_differs(workdir: Path, tmp_path: Path) -> Path:
    import shutil

    from retroloop.models.loading import load_tokenizer

    teacher = tmp_path / "other-tokenizer"
    shutil.copytree(workdir / "data/prepare/model", teacher)
    tok = load_tokenizer(teacher)
    tok.add_tokens(["<a-token-the-student-lacks>"])
    tok.save_pretrained(teacher)
    return teacher


def _bogus_config(workdir: Path, tmp_path: Path) -> Path:
    teacher = tmp_path / "bogus"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    return teacher


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("bogus_config", ModelError, "cycle.teacher: .*bogus does not load"),
        ("other_tokenizer", MismatchError, "cycle.teacher: .*differ"),
        ("unwritable_registry", ArtifactError, "cycle.registry: .*a-file is a file, not a folder"),
        ("teacher_not_a_model", ModelError, "cycle.teacher: .* is neither a model"),
    ],
)
def test_bad_input_is_one_line_and_registers_nothing(
    workdir, api, monkeypatch, tmp_path, case, error, match
) -> None:
    from flows.cycle import cycle_flow

    monkeypatch.chdir(workdir)
    registry = tmp_path / "registry"
    overrides: dict[str, object] = {"registry": str(registry)}
    match case:
        case "bogus_config":
            overrides["teacher"] = str(_bogus_config(workdir, tmp_path))
        case "other_tokenizer":
            overrides["teacher"] = str(_tokenizer_differs(workdir, tmp_path))
        case "unwritable_registry":  # a folder under a file: no user, root included, can write it
            (tmp_path / "a-file").write_text("")
            overrides["registry"] = str(registry := tmp_path / "a-file" / "registry")
        case "teacher_not_a_model":
            overrides["teacher"] = str(tmp_path)
    params = str(params_with(workdir, case, **overrides))
    with pytest.raises(error, match=match) as err:
        cycle_flow(domain_data="domain1.jsonl", params_path=params)
    assert "\n" not in str(err.value)
    assert not (registry / "cycles").exists() and not (registry / "attempts").exists()


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda d: (d / "empty.jsonl").write_text(""), "empty"),
        (
            lambda d: (d / "latin.txt").write_bytes("caf\xe9 na\xefve\n\nx".encode("latin-1")),
            "UTF-8",
        ),
        (lambda d: (d / "folder").mkdir(exist_ok=True), "folder"),
    ],
)
def test_bad_domain_data_is_refused_before_anything_is_written(
    workdir, monkeypatch, tmp_path, setup, match
) -> None:
    from retroloop.cycle import read_inputs

    monkeypatch.chdir(workdir)
    setup(tmp_path)
    target = next(p for p in tmp_path.iterdir())
    with pytest.raises(DataError, match=match):
        read_inputs(load_params("params.yaml"), target)


# A cycle in its own process, SIGKILLed (kill -9: no cleanup runs) at one named point.
KILL_DRIVER = """
import os, signal, sys
point, params, data = sys.argv[1:4]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
from retroloop.artifacts import ArtifactWriter
from retroloop import cycle_training
from retroloop import opd_loop
if point == "midtrain":  # after the first mid-training step
    make = cycle_training.make_optimizer
    def make_dying(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (step(*a, **k), die())
        return optimizer
    cycle_training.make_optimizer = make_dying
elif point == "opd":  # at the first OPD update
    opd_loop.opd_step = die
elif point == "publish":  # the whole cycle written under .work/, before the rename
    finish = ArtifactWriter.finish
    ArtifactWriter.finish = lambda self, **kw: (finish(self, **kw), die())
from flows.cycle import cycle_flow
cycle_flow(domain_data=data, params_path=params)
"""


def test_kill_9_at_any_point_leaves_the_registry_as_before_or_complete(
    workdir: Path, api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal
    import subprocess
    import sys

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.cycle import cycle_flow
    from retroloop.provenance import verify

    monkeypatch.chdir(workdir)
    params = str(params_with(workdir, "kill", registry="reg-kill"))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}

    def killed_at(point: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-c", KILL_DRIVER, point, params, "domain1.jsonl"],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert proc.returncode == -signal.SIGKILL, f"{point}: {proc.stderr[-3000:]}"
        # A killed holder's "gpu" slot comes back when its lease expires (minutes); the test
        # does not wait: it drops the limit, and the next cycle creates it afresh.
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name("gpu")

    for point in ("midtrain", "opd", "publish"):
        killed_at(point)
        assert registered(Path("reg-kill")) == [], point
        assert audit("reg-kill") == [], point

    assert any(Path("reg-kill/.work").glob("*"))  # the killed publish left its work behind

    result = cycle_flow(domain_data="domain1.jsonl", params_path=params)  # the rerun
    assert result["cycle"] == 1
    assert registered(Path("reg-kill")) == ["cycle-0001"]
    assert verify(Path("reg-kill/cycles/cycle-0001")) == []
    assert not any(Path("reg-kill/.work").glob("*"))  # leftovers of the killed runs are gone
    assert [r["adapter"] for r in audit("reg-kill")] == ["reg-kill/cycles/cycle-0001/adapter"]
