"""Upstream artifacts for the cache_teacher and distill stage tests, built once per session.

The real prepare → analyze → convert → cache_teacher stages run on the tiny profile in a
session temp dir (≈ 30 s once); each test gets its own copy of `data/` and runs there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from retroloop.config import Params, load_params

TINY = Path(__file__).resolve().parents[2] / "profiles" / "tiny.yaml"


def tiny(**overrides) -> Params:
    """The tiny profile with dotted-key overrides: tiny(**{"distill.steps": 2})."""
    return load_params(TINY, overrides)


def build_upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare, analyze, convert and cache_teacher on the tiny profile, once per session."""
    root = tmp_path_factory.getbasetemp() / "distill_upstream"
    if (root / "data" / "cache_teacher" / "manifest.json").is_file():
        return root
    from retroloop.stages import analyze, cache_teacher, convert, prepare

    root.mkdir(exist_ok=True)
    cfg = tiny()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in (prepare, analyze, convert, cache_teacher):
            stage.run(cfg)
    return root


@pytest.fixture
def workdir(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A fresh copy of the upstream `data/`; the test runs with it as the working directory."""
    shutil.copytree(build_upstream(tmp_path_factory) / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def held_out_kl(model_dir: Path, adapter: Path | None = None, Rs=(1,)) -> dict:
    """Exact held-out KL(teacher ‖ model) and NLL per R on the prepared eval documents (run in
    a workdir). R = None scores a plain model (no `num_recurrence`)."""
    from retroloop.eval.scaling import held_out_scores

    return held_out_scores(model_dir, adapter, Rs)
