"""What `dvc plots show` reads and what the PNGs show: one series per model / variant, every
panel with labelled axes, every colour bar with a label."""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib
import polars as pl
import pytest

from retroloop.eval.report import plot_models, plot_recurrence, recurrence_plot_tables
from retroloop.geometry import plot_geometry
from retroloop.stages import analyze

matplotlib.use("Agg")

MODELS = {
    "teacher": {"domain_nll": 2.0, "kl_to_teacher": 0.0, "ifeval_prompt_strict": 0.5},
    "converted": {"domain_nll": 3.0, "kl_to_teacher": 1.0, "recurrence": 4},
    "distilled": {"domain_nll": 2.5, "kl_to_teacher": 0.3, "recurrence": 4},
    "static": {"domain_nll": 2.7, "kl_to_teacher": 0.4},
}
SCALING = {
    m: {f"R{r}": {"domain_nll": 3.0 / r + i, "domain_forward_kl": 1.0 / r} for r in (1, 2, 4)}
    for i, m in enumerate(("converted", "distilled"))
}


def test_recurrence_tables_have_one_column_per_model(tmp_path) -> None:
    paths = recurrence_plot_tables({"models": MODELS, "recurrence_scaling": SCALING}, tmp_path)
    assert [p.name for p in paths] == ["recurrence_nll.csv", "recurrence_kl.csv"]
    nll = pl.read_csv(tmp_path / "recurrence_nll.csv")
    assert nll.columns == ["R", "converted", "distilled", "teacher (no loop)", "static (no loop)"]
    assert nll["R"].to_list() == [1, 2, 4]
    assert nll["distilled"].to_list() == pytest.approx([4.0, 2.5, 1.75])
    assert nll["teacher (no loop)"].to_list() == [2.0, 2.0, 2.0]
    kl = pl.read_csv(tmp_path / "recurrence_kl.csv")
    assert kl.columns == ["R", "converted", "distilled"]  # no plain model has a domain KL


def _figures(monkeypatch, draw) -> list:
    """The matplotlib figures `draw()` saves."""
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    draw()
    assert saved
    return saved


def _unlabelled(fig) -> list[str]:
    """Visible panels without an x or y label, and colour bars without a label."""
    missing = []
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison:
            continue
        is_colorbar = ax.get_label() == "<colorbar>"
        if is_colorbar:
            if not (ax.get_ylabel() or ax.get_xlabel()):
                missing.append("colour bar")
        elif not (ax.get_xlabel() and ax.get_ylabel()):
            missing.append(ax.get_title() or "untitled panel")
    return missing


@pytest.mark.parametrize("which", ["models", "recurrence", "geometry", "redundancy"])
def test_every_panel_and_colour_bar_is_labelled(monkeypatch, tmp_path, which) -> None:
    table = pl.DataFrame(
        [
            {"variant": v, "layer": ell, "n": n, "block_influence": 0.1 * ell, "angular_distance": 0.2}
            for v in ("all_tokens", "last_token")
            for n in (1, 2)
            for ell in range(4)
        ]
    )  # fmt: skip
    geometry = pl.DataFrame(
        {"module": ["m.q_proj", "m.q_proj"], "step": [1, 2], "effective_rank": [1.0, 2.0],
         "overlap_top_r": [0.5, 0.6], "drift": [float("nan"), 0.1]}
    )  # fmt: skip
    draw = {
        "models": lambda: plot_models(MODELS, tmp_path / "m.png"),
        "recurrence": lambda: plot_recurrence(SCALING, tmp_path / "r.png", models=MODELS),
        "geometry": lambda: plot_geometry(geometry, tmp_path / "g.png"),
        "redundancy": lambda: analyze._plot(
            table, SimpleNamespace(dropped=[1]), 4, tmp_path / "a.png"
        ),
    }[which]
    for fig in _figures(monkeypatch, draw):
        assert not _unlabelled(fig), (which, _unlabelled(fig))
