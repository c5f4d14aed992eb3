"""A cycle's training phases resume (issue 22.3): kill -9 a tiny cycle mid-mid-training, rerun it
and kill it again mid-OPD, rerun it once more, and the registered cycle has the bytes of one
that was never killed (the same files and content_sha256: adapter, phases, steps, rollouts). A
changed parameter, or another domain file taking the same cycle number on the same registry,
never resumes the killed cycle's checkpoints. The recipe's functions run in order without
Prefect (`helpers_cycle.recipe`: what the flow's tasks call one to one).
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_cycle import cycle_params, domain_file, recipe
from helpers_distill import workdir  # noqa: F401  (fixture)

from retroloop.artifacts import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4  # each phase; checkpoints every 2 steps: at 2 and 4

# The recipe in its own process, killed (SIGKILL: no cleanup runs) after optimizer step K of
# mid-training or of OPD: argv = params, domain file, "midtrain:K" | "opd:K".
DRIVER = """
import logging, os, signal, sys
sys.path.insert(0, sys.argv[4])
from helpers_cycle import recipe
from retroloop import cycle_training
from retroloop import opd_loop

logging.basicConfig(level=logging.INFO)
phase, _, at = sys.argv[3].partition(":")
def die(step):
    if step == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
setattr(cycle_training if phase == "midtrain" else opd_loop, "_after_step", die)
recipe(sys.argv[1], sys.argv[2])
"""


def killed_at(params: Path, data: Path, point: str) -> str:
    """Run the cycle in a subprocess killed at `point`; its stderr (the log)."""
    here = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(params), str(data), point, here],
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture
def params(workdir: Path) -> Path:  # noqa: F811
    domain_file(workdir, "train", "domain1.jsonl", slice(0, 6))
    domain_file(workdir, "train", "domain2.jsonl", slice(6, 12))
    steps = {"cycle.midtrain_steps": STEPS, "cycle.opd_steps": STEPS, "cycle.checkpoint_every": 2}
    return cycle_params(workdir, "killed", **steps, **{"cycle.registry": "reg"})


def test_a_cycle_killed_mid_midtraining_and_mid_opd_registers_the_uninterrupted_bytes(
    params: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ref_params = Path("ref.yaml")
    ref_params.write_text(params.read_text().replace("registry: reg\n", "registry: reg-ref\n"))
    ref, _ = recipe(ref_params, "domain1.jsonl")
    assert ref == Path("reg-ref/cycles/cycle-0001")
    assert not any(Path("reg-ref/.resume").glob("*"))  # cleared once registered

    killed_at(params, Path("domain1.jsonl"), "midtrain:3")
    resume = Path("reg/.resume/cycle-0001")
    assert [p.name for p in (resume / "midtrain").glob("step_*")] == ["step_2"]

    err = killed_at(params, Path("domain1.jsonl"), "opd:3")  # resumes mid-training, dies in OPD
    assert f"cycle midtrain: resuming from {resume}/midtrain/step_2 (step 2 of 4)" in err
    assert [p.name for p in (resume / "opd").glob("step_*")] == ["step_2"]
    assert [p.name for p in (resume / "midtrain").glob("step_*")] == ["step_4"]

    with caplog.at_level(logging.INFO, logger="retroloop"):
        out, _ = recipe(params, "domain1.jsonl")
    assert f"resuming from {resume}/midtrain/step_4 (step 4 of 4)" in caplog.text  # not retrained
    assert f"resuming from {resume}/opd/step_2 (step 2 of 4)" in caplog.text
    a, b = read_manifest(ref), read_manifest(out)
    assert b.files == a.files, {k: (v, b.files.get(k)) for k, v in a.files.items() if b.files.get(k) != v}  # fmt: skip
    assert b.content_sha256 == a.content_sha256
    assert not any(Path("reg/.resume").glob("*"))


def test_a_changed_param_or_another_file_does_not_resume_the_killed_cycle(
    params: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The killed cycle's checkpoints (a copy of its registry each time) are ignored by a cycle
    with a changed `cycle.midtrain_lr`, and by a cycle on another file, which takes the same
    cycle number 1; the unchanged cycle resumes them."""
    killed_at(params, Path("domain1.jsonl"), "midtrain:3")
    text = params.read_text()
    cases = [
        ("same", "domain1.jsonl", text, True),
        (
            "changed-param",
            "domain1.jsonl",
            text.replace("midtrain_lr: 0.001", "midtrain_lr: 0.0005"),
            False,
        ),  # fmt: skip
        ("another-file", "domain2.jsonl", text, False),
    ]
    assert cases[1][2] != text
    for name, data, changed, resumes in cases:
        shutil.copytree("reg", name)
        (path := Path(f"{name}.yaml")).write_text(changed.replace("registry: reg\n", f"registry: {name}\n"))  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="retroloop"):
            recipe(path, data, midtrain_only=True)
        step_2 = f"{name}/.resume/cycle-0001/midtrain/step_2"
        assert (f"resuming from {step_2} (step 2 of 4)" in caplog.text) == resumes, name
        assert (f"ignoring checkpoint {step_2}" in caplog.text) != resumes, name
