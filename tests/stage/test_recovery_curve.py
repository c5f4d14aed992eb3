"""benchmarks.recovery_curve on the tiny profile: one long run stands for every shorter one.

The curve reads the adapter saved at step s of one `--max-steps` run as the adapter an s-step
run publishes (fixed R, constant LR: nothing depends on `distill.steps`). This checks it on
the tiny model, tensor for tensor, and that the outputs hold a row per point, model and R with
recovered 0 at step 0. A profile where it cannot hold (the R curriculum) is refused, exit 2.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch
from helpers_distill import TINY, build_upstream, tiny
from safetensors.torch import load_file

FIXED_R = {"distill.recurrence": 2}


@pytest.mark.slow  # ~35 s: a benchmark's invariant, not the product's (make test-slow)
def test_the_step_4_snapshot_of_an_8_step_run_is_the_4_step_run(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import recovery_curve
    from retroloop.stages import distill

    monkeypatch.chdir(tmp_path)  # main() changes into its workdir; this restores the cwd
    work = tmp_path / "curve"
    up = build_upstream(tmp_path_factory) / "data"
    recovery_curve.main(work, 8, 2, TINY, upstream_dir=up, overrides=FIXED_R)

    student = work / "variants" / "looped" / "convert" / "model"
    short = distill.run(tiny(**FIXED_R, **{"distill.steps": 4}),
                        inputs={"student": student, "teacher_cache": work / "data" / "cache_teacher"},
                        out_dir=tmp_path / "d4", checkpoint_dir=tmp_path / "c4")  # fmt: skip
    assert short.metrics["steps"] == 4
    snap = load_file(work / "variants" / "looped" / "snapshots" / "step_4" / "adapter_model.safetensors")  # fmt: skip
    ran = load_file(tmp_path / "d4" / "adapter" / "adapter_model.safetensors")
    assert snap.keys() == ran.keys() and snap
    assert all(torch.equal(snap[k], ran[k]) for k in snap)
    eight = load_file(work / "variants" / "looped" / "snapshots" / "step_8" / "adapter_model.safetensors")  # fmt: skip
    assert not all(torch.equal(eight[k], ran[k]) for k in ran)  # it kept training after step 4

    rows = pl.read_csv(work / "recovery_curve.csv")
    assert rows.columns[:3] == ["step", "epochs", "tokens"] and "recovered" in rows.columns
    assert rows.height == 3 * len(recovery_curve.RS) + 3  # points 0, 4, 8: looped per R, static
    assert (rows.filter(pl.col("step") == 0)["recovered"] == 0).all()
    assert rows.filter(pl.col("step") == 8)["tokens"].n_unique() == 1  # the same batches
    wide = pl.read_csv(work / "recovery_curve_plot.csv")
    assert wide["step"].to_list() == [0, 4, 8] and {"looped", "static"} <= set(wide.columns)


def test_a_curriculum_profile_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    from benchmarks import recovery_curve

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        recovery_curve.main(tmp_path / "curve", 8, 2, TINY)  # tiny: distill.recurrence null
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "distill.recurrence" in err
    assert not (tmp_path / "curve").exists()
