"""A cycle's training phases resume (issue 22.3): kill -9 a tiny cycle mid-mid-training, rerun it
and kill it again mid-OPD, rerun it once more, and the registered cycle has the bytes of one
that was never killed (the same content_sha256: adapter, phases, steps, rollouts). A changed
parameter or another domain file on the same registry and cycle number never resumes the killed
cycle's checkpoints. The recipe's functions run in order without Prefect (what the flow's tasks
call one to one), on the tiny upstream of `helpers_distill`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from helpers_distill import TINY, workdir  # noqa: F401  (fixture)

from retroloop.artifacts import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4  # each phase; checkpoints every 2 steps: at 2 and 4

# The recipe in order, as flows/cycle.py runs its tasks; killed (SIGKILL: no cleanup runs) after
# optimizer step K of mid-training or of OPD when the third argument is "midtrain:K" / "opd:K".
DRIVER = """
import logging, os, signal, sys
from pathlib import Path
from retroloop import cycle, cycle_training, registry
from retroloop.config import load_params
from retroloop.stages import opd

logging.basicConfig(level=logging.INFO)
params, data, kill = sys.argv[1], sys.argv[2], sys.argv[3]
phase, _, at = kill.partition(":")
def die(step):
    if step == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
if phase == "midtrain":
    cycle_training._after_step = die
elif phase == "opd":
    opd._after_step = die
cfg = load_params(params)
inputs = cycle.read_inputs(cfg, Path(data))
claim = registry.acquire(cfg.cycle.registry)
try:
    run = cycle.load_models(inputs, claim)
    if phase == "midtrain-only":
        cycle.midtrain(run)
        sys.exit(0)
    before = cycle.evaluate_phase(run, "before", run.start)
    mid = cycle.midtrain(run)
    after_mid = cycle.evaluate_phase(run, "after_midtrain", mid.student)
    rec = cycle.recover_with_opd(run, after_mid.student)
    after_opd = cycle.evaluate_phase(run, "after_opd", rec.student)
    print(cycle.register(run, claim, [before, after_mid, after_opd], mid, rec))
finally:
    registry.release(claim)
"""


@pytest.fixture
def cycle_dir(workdir: Path) -> Path:  # noqa: F811
    """The tiny upstream, two domain files and a params file for 4 + 4 step cycles on the
    prepared model (no base adapter), checkpointing every 2 steps."""
    raw = yaml.safe_load(TINY.read_text())
    raw["threads"] = 1
    raw["cycle"].update(base_model="data/prepare/model", base_adapter=None, midtrain_steps=STEPS,
                        opd_steps=STEPS, checkpoint_every=2)  # fmt: skip
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    texts = pl.read_parquet("data/prepare/datasets/domain_train.parquet")["text"].to_list()
    for i, chunk in enumerate((texts[:6], texts[6:12])):
        lines = [json.dumps({"text": t}) + "\n" for t in chunk]
        (workdir / f"domain{i + 1}.jsonl").write_text("".join(lines), encoding="utf-8")
    return workdir


def params(root: Path, name: str, **cycle: object) -> str:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["cycle"].update(cycle)
    (path := root / f"params-{name}.yaml").write_text(yaml.safe_dump(raw))
    return str(path)


def drive(params_path: str, data: str = "domain1.jsonl", kill: str = "none"):
    """The recipe in its own process; (returncode, stderr, registered cycle directory or None)."""
    proc = subprocess.run([sys.executable, "-c", DRIVER, params_path, data, kill],
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    out = proc.stdout.strip().splitlines()
    return proc.returncode, proc.stderr, Path(out[-1]) if proc.returncode == 0 and out else None


def test_a_cycle_killed_mid_midtraining_and_mid_opd_registers_the_uninterrupted_bytes(
    cycle_dir: Path,
) -> None:
    code, err, ref = drive(params(cycle_dir, "ref", registry="reg-ref"))
    assert code == 0 and ref is not None, err[-3000:]
    assert not any(Path("reg-ref/.resume").glob("*"))  # cleared once registered

    killed = params(cycle_dir, "killed", registry="reg")
    code, err, _ = drive(killed, kill="midtrain:3")
    assert code == -signal.SIGKILL, err[-3000:]
    resume = Path("reg/.resume/cycle-0001")
    assert [p.name for p in (resume / "midtrain").glob("step_*")] == ["step_2"]

    code, err, _ = drive(killed, kill="opd:3")  # resumes mid-training, dies in OPD
    assert code == -signal.SIGKILL, err[-3000:]
    assert "cycle midtrain: resuming from" in err and "(step 2 of 4)" in err
    assert [p.name for p in (resume / "opd").glob("step_*")] == ["step_2"]

    code, err, out = drive(killed)
    assert code == 0 and out is not None, err[-3000:]
    assert "(step 4 of 4)" in err  # mid-training's last checkpoint: not trained again
    assert "resuming from reg/.resume/cycle-0001/opd/step_2 (step 2 of 4)" in err
    a, b = read_manifest(ref), read_manifest(out)
    assert b.files == a.files, {k: (v, b.files.get(k)) for k, v in a.files.items() if b.files.get(k) != v}  # fmt: skip
    assert b.content_sha256 == a.content_sha256
    assert b.metrics["phases"]["after_opd"]["kl_to_teacher"] == a.metrics["phases"]["after_opd"]["kl_to_teacher"]  # fmt: skip
    assert not any(Path("reg/.resume").glob("*"))


@pytest.mark.parametrize(
    ("change", "data"),
    [({"midtrain_lr": 5e-4}, "domain1.jsonl"), ({}, "domain2.jsonl")],
    ids=["changed-param", "another-file"],
)
def test_a_changed_param_or_file_does_not_resume_the_killed_cycle(
    cycle_dir: Path, change: dict, data: str
) -> None:
    """The killed cycle's checkpoints, moved under a registry with a changed `cycle.*` key or
    taken over by a cycle on another domain file (the same cycle number), are ignored."""
    code, err, _ = drive(params(cycle_dir, "killed", registry="reg"), kill="midtrain:3")
    assert code == -signal.SIGKILL, err[-3000:]
    code, err, _ = drive(params(cycle_dir, "changed", registry="reg", **change), data, "midtrain-only")  # fmt: skip
    assert code == 0, err[-3000:]
    assert "ignoring checkpoint reg/.resume/cycle-0001/midtrain/step_2" in err
    assert "resuming" not in err
