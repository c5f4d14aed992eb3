"""Resume is invisible (issue 19, item 3; issue 22 for OPD): a resumable stage killed after a
checkpoint and run again publishes the same bytes — the same `content_sha256` and per-file
hashes — as a run that was never interrupted (distill, static, OPD, and cache_teacher, which
already did). Kills are simulated at several points (as `test_distill`'s resume test does),
including before the first checkpoint and twice in one run.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_distill import TINY, tiny, workdir  # noqa: F401  (fixture)

from retroloop import opd_loop
from retroloop.stages import cache_teacher, distill, opd, static

STEPS = 4  # distill.checkpoint_every is 2 in the tiny profile: checkpoints at steps 2 and 4


def _kill_at(monkeypatch: pytest.MonkeyPatch, step: int, stage=distill) -> None:
    def die(done: int) -> None:
        if done == step:
            raise KeyboardInterrupt(f"simulated kill after step {step}")

    monkeypatch.setattr(stage, "_after_step", die)


def _diff(a, b) -> dict[str, tuple[str | None, str | None]]:
    return {
        k: (a.files.get(k), b.files.get(k))
        for k in sorted(set(a.files) | set(b.files))
        if a.files.get(k) != b.files.get(k)
    }


@pytest.mark.parametrize("kills", [(3,), (1, 3)], ids=["after-checkpoint", "before-and-after"])
def test_distill_killed_and_resumed_publishes_the_uninterrupted_bytes(
    workdir,  # noqa: F811
    monkeypatch,
    kills,
) -> None:
    cfg = tiny(**{"distill.steps": STEPS})
    ref = distill.run(cfg, out_dir=Path("data/ref"), checkpoint_dir=Path("data/ck_ref"))
    for step in kills:
        _kill_at(monkeypatch, step)
        with pytest.raises(KeyboardInterrupt):
            distill.run(cfg)
        assert not Path("data/distill").exists()
    monkeypatch.setattr(distill, "_after_step", lambda step: None)
    resumed = distill.run(cfg)
    assert resumed.content_sha256 == ref.content_sha256, _diff(ref, resumed)
    assert resumed.files == ref.files


def test_static_killed_and_resumed_publishes_the_uninterrupted_bytes(
    workdir,  # noqa: F811
    monkeypatch,
    caplog,
) -> None:
    cfg = tiny(**{"static.enabled": True, "distill.steps": STEPS})
    ref = static.run(cfg)  # at the default path: the adapter config names its scratch folder
    shutil.move("data/static", "data/ref_static")
    _kill_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        static.run(cfg)
    assert not Path("data/static").exists()
    assert list(Path("data/checkpoints/static/checkpoints").glob("step_*"))  # kept for resume
    monkeypatch.setattr(distill, "_after_step", lambda step: None)
    with caplog.at_level(logging.INFO, logger="retroloop.stages.distill"):
        resumed = static.run(cfg)
    assert "resuming from" in caplog.text and "(step 2 of 4)" in caplog.text  # not retrained
    assert resumed.metrics["steps"] == STEPS
    assert resumed.content_sha256 == ref.content_sha256, _diff(ref, resumed)


@pytest.mark.parametrize("kills", [(3,), (1, 5)], ids=["after-checkpoint", "before-and-after"])
def test_opd_killed_and_resumed_publishes_the_uninterrupted_bytes(
    workdir,  # noqa: F811
    monkeypatch,
    caplog,
    kills,
) -> None:
    """A fresh LoRA (no distill adapter upstream), 6 steps of 2 of the 11 tiny prompts (step 6
    opens the second epoch, after the resume), checkpoints at 2, 4 and 6: the resumed run
    restores the adapter, AdamW, the prompt sampler, the rollouts, the step log and the geometry
    tracker, and publishes the same adapter, rollouts and summary."""
    cfg = tiny(**{"threads": 1, "opd.steps": 6, "opd.checkpoint_every": 2})
    ref = opd.run(cfg, out_dir=Path("data/ref_opd"), checkpoint_dir=Path("data/ck_ref_opd"))
    assert not list(Path("data/ck_ref_opd").glob("step_*"))  # cleared once published
    for step in kills:
        _kill_at(monkeypatch, step, opd_loop)
        with pytest.raises(KeyboardInterrupt):
            opd.run(cfg)
        assert not Path("data/opd").exists()
    assert list(Path("data/checkpoints/opd").glob("step_*"))  # kept for resume
    monkeypatch.setattr(opd_loop, "_after_step", lambda step: None)
    with caplog.at_level(logging.INFO, logger="retroloop.opd_loop"):
        resumed = opd.run(cfg)
    last = max(k for k in kills) // 2 * 2
    assert f"(step {last} of 6)" in caplog.text  # resumed, not retrained
    assert resumed.files["adapter/adapter_model.safetensors"] == ref.files["adapter/adapter_model.safetensors"]  # fmt: skip
    assert resumed.content_sha256 == ref.content_sha256, _diff(ref, resumed)
    assert resumed.files == ref.files
    assert not list(Path("data/checkpoints/opd").glob("step_*"))


_SIGKILL_AFTER_STEP_3 = """
import os, signal, sys
from retroloop.config import load_params
from retroloop import opd_loop
from retroloop.stages import opd

def die(step):
    if step == 3:
        os.kill(os.getpid(), signal.SIGKILL)

opd_loop._after_step = die
opd.run(load_params(sys.argv[1], {"threads": 1, "opd.steps": 6, "opd.checkpoint_every": 2}))
"""


def test_opd_kill_9_mid_run_then_rerun_publishes_the_uninterrupted_bytes(workdir) -> None:  # noqa: F811
    """A real SIGKILL (no handler, no cleanup runs) after step 3 of 6, in its own process."""
    cfg = tiny(**{"threads": 1, "opd.steps": 6, "opd.checkpoint_every": 2})
    ref = opd.run(cfg, out_dir=Path("data/ref_opd"), checkpoint_dir=Path("data/ck_ref_opd"))
    killed = subprocess.run([sys.executable, "-c", _SIGKILL_AFTER_STEP_3, str(TINY)], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert not Path("data/opd").exists()
    assert [p.name for p in Path("data/checkpoints/opd").glob("step_*")] == ["step_2"]
    resumed = opd.run(cfg)
    assert resumed.content_sha256 == ref.content_sha256, _diff(ref, resumed)
    assert resumed.files == ref.files


def test_cache_teacher_killed_and_resumed_publishes_the_uninterrupted_bytes(
    workdir,  # noqa: F811
    monkeypatch,
) -> None:
    cfg = tiny()
    ref = cache_teacher.run(cfg, out_dir=Path("data/ref_cache"))

    def die_after(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(cache_teacher, "_after_shard", die_after)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.run(cfg, out_dir=Path("data/cache_resumed"))
    monkeypatch.setattr(cache_teacher, "_after_shard", lambda index: None)
    resumed = cache_teacher.run(cfg, out_dir=Path("data/cache_resumed"))
    assert resumed.metrics["shards"] > 2  # the kill left shards to compute
    assert resumed.content_sha256 == ref.content_sha256, _diff(ref, resumed)
