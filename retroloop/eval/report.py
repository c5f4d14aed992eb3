"""The forgetting/recovery report: Markdown tables and PNG plots from evaluation metrics.

Input is the dict the evaluate stage writes to `metrics.json`:

    {"models": {name: {metric: value}},                      # teacher, converted, distilled, opd
     "recovery": {after: {metric: fraction | None}},          # see `recovery_fraction`
     "recurrence_scaling": {name: {"R<k>": {"domain_nll": ...}}}}

"Fraction of the conversion's loss recovered" (per metric m):

    recovered = (m_after − m_converted) / (m_teacher − m_converted)

so 0 means no better than the freshly converted model, 1 means back at the teacher,
above 1 means past the teacher and below 0 means worse than the conversion left it. The
sign convention makes the formula direction-free: it holds for lower-is-better metrics
(NLL, KL) and higher-is-better ones (IFEval accuracy) alike. When the conversion lost
nothing on a metric (|m_teacher − m_converted| below `eps`) the fraction is undefined
and reported as None.

The table helpers (`markdown_table`, `delta_rows`, `recovery_table`) are plain functions
over lists of dicts so the continual-learning cycle can render its phases
(before mid-training / after mid-training / after OPD) with the same code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

log = logging.getLogger(__name__)

# (metric key, header, True when higher is better). Order = column order in the tables.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("ifeval_prompt_strict", "IFEval prompt strict", True),
    ("ifeval_prompt_loose", "IFEval prompt loose", True),
    ("ifeval_inst_strict", "IFEval inst strict", True),
    ("ifeval_inst_loose", "IFEval inst loose", True),
    ("kl_to_teacher", "KL to teacher", False),
    ("domain_nll", "domain NLL", False),
    ("domain_forward_kl", "domain KL(teacher‖model)", False),
    ("domain_ppl", "domain PPL", False),
    ("instruct_nll", "instruct NLL", False),
    ("gsm8k_accuracy", "GSM8K acc", True),
)
# The metrics whose recovery fraction the report gives (DESIGN.md §1, evaluate).
RECOVERY_METRICS: tuple[str, ...] = (
    "domain_nll",
    "domain_forward_kl",
    "kl_to_teacher",
    "ifeval_prompt_strict",
    "ifeval_inst_loose",
)
HEADERS = {key: header for key, header, _ in METRICS}


# --------------------------------------------------------------------------- numbers


def recovery_fraction(
    after: float | None, converted: float | None, teacher: float | None, *, eps: float = 1e-9
) -> float | None:
    """(after − converted) / (teacher − converted); None when undefined (see module doc)."""
    if after is None or converted is None or teacher is None:
        return None
    gap = teacher - converted
    if not math.isfinite(gap) or abs(gap) < eps or not math.isfinite(after):
        return None
    return (after - converted) / gap


def recovery_table(
    models: Mapping[str, Mapping[str, Any]],
    *,
    teacher: str = "teacher",
    converted: str = "converted",
    after: Sequence[str] | None = None,
    metrics: Sequence[str] = RECOVERY_METRICS,
) -> dict[str, dict[str, float | None]]:
    """{after_name: {metric: recovery fraction}} for every model other than teacher/converted.

    The cycle passes its own names, e.g. teacher="before_midtrain", converted="after_midtrain",
    after=["after_opd"].
    """
    after = [n for n in models if n not in (teacher, converted)] if after is None else list(after)
    ref, conv = models[teacher], models[converted]
    return {
        name: {
            m: recovery_fraction(models[name].get(m), conv.get(m), ref.get(m))
            for m in metrics
            if m in ref
        }
        for name in after
    }


def delta_rows(
    models: Mapping[str, Mapping[str, Any]],
    *,
    reference: str = "teacher",
    metrics: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """One row per model: {"model": name, metric: value − reference's value}."""
    ref = models[reference]
    metrics = [m for m in _present(models) if m in ref] if metrics is None else metrics
    rows = []
    for name, values in models.items():
        row: dict[str, Any] = {"model": name}
        for m in metrics:
            a, b = values.get(m), ref.get(m)
            row[m] = None if a is None or b is None else a - b
        rows.append(row)
    return rows


def _present(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The known metrics that at least one model has, in `METRICS` order."""
    return [key for key, _, _ in METRICS if any(v.get(key) is not None for v in models.values())]


# --------------------------------------------------------------------------- markdown


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or isinstance(value, int):
        return f"{value:+d}" if signed and not isinstance(value, bool) else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    *,
    signed: bool = False,
) -> str:
    """A GitHub Markdown table. `columns` are keys or (key, header) pairs; floats get 4
    significant digits (`signed` adds a sign, for deltas); missing values print as "–"."""
    cols = [(c, HEADERS.get(c, c)) if isinstance(c, str) else c for c in columns]
    lines = [
        "| " + " | ".join(h for _, h in cols) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|",
    ]
    for row in rows:
        cells = [_fmt(row.get(k), signed=signed and i > 0) for i, (k, _) in enumerate(cols)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def teacher_line(teacher: Mapping[str, Any]) -> str:
    """One sentence naming the teacher the models were measured against: its path, content
    hash and where it came from (`retroloop_source.json`)."""
    source = teacher.get("source") or {}
    origin = ", ".join(
        f"{k} {source[k]}" for k in ("source", "hf_id", "path", "package", "file") if source.get(k)
    )
    sha = (teacher.get("content_sha256") or "")[:12]
    return (
        f"Teacher (KL reference, `teacher` row): `{teacher['path']}` (sha256 {sha}"
        + (f"; {origin}" if origin else "")
        + "), chosen with `prepare.teacher`, not the source model."
    )


def render_markdown(metrics: Mapping[str, Any], *, title: str = "retroloop evaluation") -> str:
    """The whole report.md text (tables only; the PNGs are linked by file name)."""
    models: Mapping[str, Mapping[str, Any]] = metrics["models"]
    present = _present(models)
    out = [f"# {title}\n\n"]
    direction = ", ".join(
        f"{HEADERS[k]} {'↑' if up else '↓'}" for k, _, up in METRICS if k in present
    )
    out.append(f"Models: {', '.join(f'`{n}`' for n in models)}. Better is {direction}.\n\n")
    if metrics.get("teacher"):  # a chosen teacher (`prepare.teacher`), not the source model
        out.append(teacher_line(metrics["teacher"]) + "\n\n")

    out.append("## Metrics\n\n")
    extra = [
        c
        for c in (
            "ifeval_prompts",
            "ifeval_instructions",
            "ifeval_skipped",
            "gsm8k_questions",
            "recurrence",
        )  # wall-clock seconds stay out of the report: it is hashed content (run.json has them)
        if any(c in v for v in models.values())
    ]
    rows = [{"model": name, **values} for name, values in models.items()]
    out.append(markdown_table(rows, [("model", "model"), *present, *extra]))

    if "teacher" in models:
        out.append("\n## Difference from the teacher (model − teacher)\n\n")
        out.append(
            markdown_table(
                delta_rows(models, metrics=present), [("model", "model"), *present], signed=True
            )
        )

    recovery = metrics.get("recovery") or {}
    if recovery:
        out.append("\n## Fraction of the conversion's loss recovered\n\n")
        out.append(
            "(m_after − m_converted) / (m_teacher − m_converted): 0 = no better than the converted "
            "model, 1 = back at the teacher; – = undefined (the conversion did not change the metric).\n\n"
        )
        rec_cols = sorted(
            {m for v in recovery.values() for m in v},
            key=lambda m: (list(HEADERS).index(m) if m in HEADERS else len(HEADERS), m),
        )
        out.append(
            markdown_table(
                [{"model": n, **v} for n, v in recovery.items()], [("model", "model"), *rec_cols]
            )
        )

    scaling = metrics.get("recurrence_scaling") or {}
    if scaling:
        rs = sorted({int(k.removeprefix("R")) for v in scaling.values() for k in v})
        models = metrics.get("models") or {}
        # The plain models (teacher, static: one pass, no loop) as reference rows beside the
        # looped models' curves: same held-out documents, same metrics.
        plain = [n for n in models if n not in scaling and models[n].get("recurrence") is None]
        for key, title in (
            ("domain_nll", "Held-out domain NLL"),
            ("domain_forward_kl", "Held-out domain KL(teacher ‖ model), full vocabulary"),
            ("gflops_per_token", "Forward GFLOP per token"),
        ):
            if not any(key in row for v in scaling.values() for row in v.values()):
                continue
            out.append(f"\n## {title} vs recurrence count R\n\n")
            rows = [
                {"model": n, **{f"R{r}": v.get(f"R{r}", {}).get(key) for r in rs}}
                for n, v in scaling.items()
            ]
            rows += [{"model": f"{n} (no loop)", "R1": models[n].get(key)} for n in plain]
            out.append(
                markdown_table(rows, [("model", "model"), *[(f"R{r}", f"R={r}") for r in rs]])
            )
        out.append("\n![recurrence scaling](recurrence_scaling.png)\n")
    out.append("\n![models](models.png)\n")
    return "".join(out)


# --------------------------------------------------------------------------- plots and files


def scaling_frame(scaling: Mapping[str, Mapping[str, Mapping[str, float]]]) -> pl.DataFrame:
    """Long table (model, R, metric columns…) from {model: {"R<k>": {metric: value}}}."""
    rows = [
        {"model": name, "R": int(key.removeprefix("R")), **vals}
        for name, by_r in scaling.items()
        for key, vals in by_r.items()
    ]
    if not rows:
        return pl.DataFrame(schema={"model": pl.Utf8, "R": pl.Int64, "domain_nll": pl.Float64})
    return pl.DataFrame(rows).sort(["model", "R"])


# What `dvc plots show` draws per R (dvc.yaml's top-level plots): one file per metric, one
# column per model, because DVC 3 colours series by file and column, not by a column's values.
RECURRENCE_PLOTS = {
    "domain_nll": "recurrence_nll.csv",
    "domain_forward_kl": "recurrence_kl.csv",
}


def recurrence_plot_tables(metrics: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """`RECURRENCE_PLOTS`: R, then one column per looped model and one per plain model
    (teacher, static: `<name> (no loop)`, the same value at every R, a horizontal line)."""
    scaling = metrics.get("recurrence_scaling") or {}
    models = metrics.get("models") or {}
    frame = scaling_frame(scaling)
    plain = [n for n in models if n not in scaling and models[n].get("recurrence") is None]
    paths = []
    for key, name in RECURRENCE_PLOTS.items():
        if key not in frame.columns or not frame.height:
            continue
        wide = frame.pivot(on="model", index="R", values=key, maintain_order=True).sort("R")
        for n in plain:
            if isinstance(models[n].get(key), int | float):
                wide = wide.with_columns(pl.lit(float(models[n][key])).alias(f"{n} (no loop)"))
        wide.write_csv(out_dir / name)
        paths.append(out_dir / name)
    return paths


# Units of the y axes of models.png (the header names the metric).
_UNITS = {
    "kl_to_teacher": "nats/token",
    "domain_nll": "nats/token",
    "domain_forward_kl": "nats/token",
    "instruct_nll": "nats/token",
    "domain_ppl": "perplexity",
    "gsm8k_accuracy": "fraction correct",
}


def plot_models(models: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Small multiples: one panel per metric, one bar per model."""
    plt = _pyplot()
    present = _present(models)
    cols = min(4, max(1, len(present)))
    nrows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    names = list(models)
    colors = [f"C{i}" for i in range(len(names))]
    for ax, key in zip(axes.flat, present, strict=False):
        values = [models[n].get(key) for n in names]
        bars = ax.bar(
            range(len(names)), [float("nan") if v is None else v for v in values], color=colors
        )
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7)
        ax.margins(y=0.15)  # room for the labels
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        up = next(u for k, _, u in METRICS if k == key)
        ax.set_title(f"{HEADERS[key]} {'↑' if up else '↓'}", fontsize=9)
        ax.set_xlabel("model", fontsize=8)
        unit = _UNITS.get(key, "fraction passed" if key.startswith("ifeval") else "")
        ax.set_ylabel(f"{HEADERS[key]} ({unit})" if unit else HEADERS[key], fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recurrence(
    scaling: Mapping[str, Mapping[str, Mapping[str, float]]],
    path: Path,
    *,
    models: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """Held-out NLL and KL(teacher ‖ model) vs R: one line per looped model, one dashed
    horizontal line per plain model (teacher, static) as the reference it is compared with."""
    plt = _pyplot()
    frame = scaling_frame(scaling)
    panels = [
        (key, label)
        for key, label in (
            ("domain_nll", "held-out domain NLL (nats/token)"),
            ("domain_forward_kl", "held-out KL(teacher ‖ model) (nats/token)"),
        )
        if key in frame.columns
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    plain = {
        n: m for n, m in (models or {}).items() if n not in scaling and m.get("recurrence") is None
    }
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for i, name in enumerate(frame["model"].unique(maintain_order=True).to_list()):
            sub = frame.filter(pl.col("model") == name)
            ax.plot(sub["R"].to_list(), sub[key].to_list(), marker="o", color=f"C{i}", label=name)
        for j, (name, m) in enumerate(plain.items()):
            if m.get(key) is not None:
                ax.axhline(
                    m[key], ls="--", lw=1, color=f"C{len(scaling) + j}", label=f"{name} (no loop)"
                )
        ax.set_xlabel("recurrence count R (test time)")
        ax.set_ylabel(label)
        if frame.height:
            ax.set_xscale("log", base=2)
            ax.set_xticks(
                sorted(set(frame["R"].to_list())),
                [str(r) for r in sorted(set(frame["R"].to_list()))],
            )
            ax.legend(fontsize=8)
    fig.suptitle("quality vs recurrence", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(metrics: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """report.md, models.png, recurrence_scaling.png and recurrence_scaling.csv (model, R,
    domain_nll, … — what `dvc plots show` reads) in `out_dir`. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    report = out_dir / "report.md"
    report.write_text(render_markdown(metrics), encoding="utf-8")
    paths.append(report)
    paths.append(plot_models(metrics["models"], out_dir / "models.png"))
    scaling = metrics.get("recurrence_scaling") or {}
    csv = out_dir / "recurrence_scaling.csv"
    scaling_frame(scaling).write_csv(csv)
    paths.append(csv)
    paths.append(
        plot_recurrence(scaling, out_dir / "recurrence_scaling.png", models=metrics["models"])
    )
    paths += recurrence_plot_tables(metrics, out_dir)
    log.info("report: wrote %s", ", ".join(p.name for p in paths))
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
