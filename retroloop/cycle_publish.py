"""What a registered cycle holds besides its adapter (`retroloop.cycle`, step 5): the phase table
and report, the phases' metrics (deterministic figures in phases.json, timings in
run_phases.json, outside the content hash), the OPD rollouts, and every training step's row
replayed into the cycle's one dvclive folder; and the summary a finished cycle returns."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retroloop import datasets
from retroloop.artifacts import ArtifactWriter, read_manifest
from retroloop.canonical import RUN_PREFIX, is_run_dependent
from retroloop.config import LoggingParams
from retroloop.eval.report import markdown_table
from retroloop.steplog import StepLog, move_logs

if TYPE_CHECKING:
    from retroloop.cycle import CycleRun

PHASES = ("before", "after_midtrain", "after_opd")
PHASE_COLUMNS = [
    "domain_ppl",
    "domain_nll",
    "ifeval_prompt_strict",
    "ifeval_inst_loose",
    "kl_to_teacher",
    "instruct_nll",
    "gsm8k_accuracy",  # only when the domain data is GSM8K (question + worked answer)
]

Rows = tuple[tuple[str, dict[str, Any]], ...]  # (prefix, row) of every step, in the order logged


class RecordingLog(StepLog):
    """A `StepLog` that also keeps every row it logs, for `register` to replay into the cycle's
    one dvclive folder (each training step writes its own, which `register` does not publish)."""

    def __init__(self, out_dir: Path, *, name: str, params: LoggingParams) -> None:
        super().__init__(out_dir, name=name, params=params)
        self.rows: list[tuple[str, dict[str, Any]]] = []

    def log(self, row, *, prefix: str = "", sink: bool = True) -> None:
        self.rows.append((self.prefix + prefix, dict(row)))
        super().log(row, prefix=prefix, sink=sink)


def phase_rows(phases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The phase table: one row per evaluated phase, the columns that were measured."""
    columns = [k for k in PHASE_COLUMNS if any(k in m for m in phases.values())]
    return [{"phase": p, **{k: m.get(k) for k in columns}} for p, m in phases.items()]


def report_markdown(run: CycleRun, phases: dict[str, dict[str, Any]]) -> str:
    rows, inputs = phase_rows(phases), run.inputs
    before, mid, after = (phases.get(p, {}) for p in PHASES)
    lines = [
        f"# continual-learning cycle {run.number}",
        "",
        f"- domain data: `{inputs.source.path}` (sha256 `{inputs.source.content_sha256[:16]}`, "
        f"{inputs.train.height} train / {inputs.held_out.height} held-out records)",
        f"- parent: `{run.parent.lineage_path}`; teacher: `{run.teacher.lineage_path}`",
        "",
        markdown_table(rows, list(rows[0]) if rows else ["phase"]),
        "",
    ]
    for key in ("domain_nll", "ifeval_prompt_strict", "gsm8k_accuracy"):
        if all(isinstance(d.get(key), int | float) for d in (before, mid, after)):
            lines.append(
                f"- {key}: before {before[key]:.4f} → after mid-training {mid[key]:.4f} → after OPD {after[key]:.4f}"
            )
    return "\n".join(lines) + "\n"


def write_cycle(
    w: ArtifactWriter, run: CycleRun, phases: dict[str, dict[str, Any]], adapter: Path,
    steps: Rows,
) -> None:  # fmt: skip
    """Write the cycle's files into the registry's writer `w`: `adapter`, the data split, the
    report, phases.json + run_phases.json, the OPD rollouts and the steps' dvclive folder."""
    inputs = run.inputs
    shutil.copytree(adapter, w.dir / "adapter")
    (w.dir / "data").mkdir()
    datasets.write_parquet_atomic(inputs.train, w.dir / "data" / "train.parquet")
    datasets.write_parquet_atomic(inputs.held_out, w.dir / "data" / "eval.parquet")
    (w.dir / "report.md").write_text(report_markdown(run, phases), encoding="utf-8")
    # Timings go to run_phases.json, outside the content hash: the same cycle run twice
    # publishes the same content_sha256 (phases.json held `seconds` and never did).
    for name, keep in (("phases.json", False), (RUN_PREFIX + "phases.json", True)):
        split = {p: {k: v for k, v in m.items() if is_run_dependent(k) == keep}
                 for p, m in phases.items()}  # fmt: skip
        (w.dir / name).write_text(json.dumps(split, indent=2, default=str) + "\n")
    if (rollouts := run.work / "opd" / "out" / "rollouts.parquet").is_file():
        shutil.copyfile(rollouts, w.dir / "opd_rollouts.parquet")
    w.outputs = {"adapter": "adapter", "data": "dataset", "report.md": "report"}
    if steps:  # one dvclive folder for the cycle: every step's row, in the order logged
        steplog = StepLog(run.work / "steps", name=f"cycle-{run.number:04d}")
        for prefix, row in steps:
            steplog.log(row, prefix=prefix, sink=False)
        steplog.close()
        move_logs(run.work / "steps", w.dir)
        w.outputs["dvclive"] = "report"


def summary(cycle_dir: Path) -> dict[str, Any]:
    """What a finished cycle returns (the flow's result): its number, adapter, teacher, phases."""
    manifest = read_manifest(cycle_dir)
    return {
        "cycle": manifest.metrics.get("cycle"),
        "adapter": str(cycle_dir / "adapter"),
        "teacher": manifest.input("teacher").model_dump(),
        "phases": manifest.metrics.get("phases"),
    }
