"""The report's arithmetic (recovery fraction, deltas) and its files."""

from __future__ import annotations

import json

import polars as pl
import pytest

from retroloop.eval.report import (
    delta_rows,
    markdown_table,
    recovery_fraction,
    recovery_table,
    render_markdown,
    scaling_frame,
    write_report,
)

MODELS = {
    # Conversion raised domain NLL 2.0 -> 3.0 and dropped IFEval 0.5 -> 0.1.
    "teacher": {
        "domain_nll": 2.0,
        "kl_to_teacher": 0.0,
        "ifeval_prompt_strict": 0.5,
        "ifeval_inst_loose": 0.6,
    },
    "converted": {
        "domain_nll": 3.0,
        "kl_to_teacher": 1.0,
        "ifeval_prompt_strict": 0.1,
        "ifeval_inst_loose": 0.2,
    },
    "distilled": {
        "domain_nll": 2.5,
        "kl_to_teacher": 0.25,
        "ifeval_prompt_strict": 0.3,
        "ifeval_inst_loose": 0.2,
    },
    "opd": {
        "domain_nll": 2.25,
        "kl_to_teacher": 0.1,
        "ifeval_prompt_strict": 0.6,
        "ifeval_inst_loose": 0.1,
    },
}


def test_recovery_fraction_hand_example():
    # NLL (lower is better): 3.0 -> 2.5 of a 3.0 -> 2.0 gap is half the loss recovered.
    assert recovery_fraction(2.5, 3.0, 2.0) == pytest.approx(0.5)
    # Accuracy (higher is better): 0.1 -> 0.3 of a 0.1 -> 0.5 gap is also half.
    assert recovery_fraction(0.3, 0.1, 0.5) == pytest.approx(0.5)
    # KL to teacher: the teacher's own is 0, so the fraction is 1 - kl_after / kl_converted.
    assert recovery_fraction(0.25, 1.0, 0.0) == pytest.approx(0.75)
    # Back at the teacher = 1, past it > 1, worse than converted < 0.
    assert recovery_fraction(2.0, 3.0, 2.0) == pytest.approx(1.0)
    assert recovery_fraction(0.6, 0.1, 0.5) == pytest.approx(1.25)
    assert recovery_fraction(3.5, 3.0, 2.0) == pytest.approx(-0.5)


def test_recovery_fraction_undefined():
    assert recovery_fraction(1.0, 2.0, 2.0) is None  # the conversion lost nothing
    assert recovery_fraction(None, 2.0, 1.0) is None
    assert recovery_fraction(1.0, float("nan"), 1.0) is None


def test_recovery_table():
    table = recovery_table(MODELS)
    assert set(table) == {"distilled", "opd"}
    assert table["distilled"]["domain_nll"] == pytest.approx(0.5)
    assert table["distilled"]["kl_to_teacher"] == pytest.approx(0.75)
    assert table["opd"]["domain_nll"] == pytest.approx(0.75)
    assert table["opd"]["ifeval_prompt_strict"] == pytest.approx(1.25)
    assert table["opd"]["ifeval_inst_loose"] == pytest.approx(-0.25)
    # The cycle's phase names work the same way.
    phases = {
        "before": MODELS["teacher"],
        "after_mid": MODELS["converted"],
        "after_opd": MODELS["opd"],
    }
    assert recovery_table(phases, teacher="before", converted="after_mid")["after_opd"][
        "domain_nll"
    ] == pytest.approx(0.75)


def test_delta_rows_and_markdown_table():
    rows = delta_rows(MODELS, metrics=["domain_nll"])
    assert rows[0] == {"model": "teacher", "domain_nll": 0.0}
    assert rows[1]["domain_nll"] == pytest.approx(1.0)
    text = markdown_table(rows, [("model", "model"), "domain_nll"], signed=True)
    lines = text.strip().splitlines()
    assert lines[0] == "| model | domain NLL |"
    assert lines[1] == "|---|---:|"
    assert lines[3] == "| converted | +1 |"
    assert (
        markdown_table([{"a": None, "b": 1.23456}], ["a", "b"]).strip().splitlines()[2]
        == "| – | 1.235 |"
    )


def _metrics():
    scaling = {
        m: {f"R{r}": {"domain_nll": 3.0 / r + (m == "converted")} for r in (1, 2, 4)}
        for m in ("converted", "distilled")
    }
    return {"models": MODELS, "recovery": recovery_table(MODELS), "recurrence_scaling": scaling}


def test_render_markdown_names_every_model():
    text = render_markdown(_metrics())
    for name in MODELS:
        assert f"| {name} |" in text
    assert "Fraction of the conversion's loss recovered" in text
    assert "| R=1 | R=2 | R=4 |" in text


def test_write_report(tmp_path):
    metrics = _metrics()
    json.dumps(metrics)  # what metrics.json will hold must be plain JSON
    paths = write_report(metrics, tmp_path)
    assert {p.name for p in paths} == {
        "report.md",
        "models.png",
        "recurrence_scaling.png",
        "recurrence_scaling.csv",
        "recurrence_nll.csv",  # the dvc plot: one column per model
    }
    for p in paths:
        assert p.stat().st_size > 0
    assert (tmp_path / "models.png").read_bytes()[:4] == b"\x89PNG"
    csv = pl.read_csv(tmp_path / "recurrence_scaling.csv")
    assert csv.columns == ["model", "R", "domain_nll"]
    assert csv.height == 6


def test_scaling_frame_empty():
    assert scaling_frame({}).columns == ["model", "R", "domain_nll"]
