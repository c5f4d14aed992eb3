"""Per-step metrics of the training loops (distill, static, OPD, cycles) through dvclive.

Each loop hands `StepLog.log` one dict per optimizer step; the log writes two dvclive folders
beside the artifact's other outputs:

    dvclive/       the deterministic figures (loss, KL, lr, R, ...): `plots/metrics/<name>.tsv`
                   (step, value) and `metrics.json` (the last step's values), inside the
                   artifact's `content_sha256`
    run_dvclive/   the run-dependent ones (seconds, tokens/s; `retroloop.canonical`), outside it,
                   like `run.json`

`dvc.yaml` declares both `metrics.json` files as stage metrics (`dvc exp show`) and draws the
TSVs in its top-level plots (`dvc plots show`). dvclive is used as a file writer only:
`save_dvc_exp=False` (the stage runs inside `dvc repro` / `dvc exp run`, which record the
experiment), `dvcyaml=None` (the repository's dvc.yaml is written by hand), no report.

`logging.sink` (params) adds TensorBoard or MLflow beside dvclive, fed live at every step; their
packages are optional extras, imported only when chosen.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from retroloop.canonical import RUN_PREFIX, is_run_dependent
from retroloop.config import LoggingParams
from retroloop.errors import MissingExtraError

log = logging.getLogger(__name__)

LIVE = "dvclive"
RUN_LIVE = RUN_PREFIX + LIVE  # run_dvclive: outside the content hash (canonical.is_run_file)


def _live(directory: Path):
    """A dvclive `Live` that writes files and nothing else (see the module docstring)."""
    from dvclive import Live

    class _FilesOnly(Live):
        def _init_dvc(self) -> None:
            # Outside a DVC repository dvclive runs `dvc init` in the enclosing git repository
            # (dvclive.dvc.get_dvc_repo); a logger must not change the user's repository.
            if any((p / ".dvc").is_dir() for p in (Path.cwd(), *Path.cwd().parents)):
                try:
                    super()._init_dvc()
                except Exception as err:  # e.g. scmrepo's "Empty git repo" before a 1st commit
                    log.debug("dvclive: no experiment bookkeeping (%s); files only", err)

    if logging.getLogger("dvclive").level == logging.NOTSET:
        logging.getLogger("dvclive").setLevel(logging.WARNING)  # "Logging to experiment ..."
    return _FilesOnly(dir=str(directory), save_dvc_exp=False, dvcyaml=None, report=None)


class StepLog:
    """dvclive folders under `out_dir` (+ the optional sink), one `log(row)` per step.

    `rows` replays steps already taken (a resumed run), so the folders always hold exactly the
    run's steps. A prefix namespaces the metric names: a cycle logs `midtrain/loss` and, through
    `prefixed("opd/")`, `opd/reverse_kl_topk_lb` into one folder."""

    def __init__(
        self,
        out_dir: Path,
        *,
        name: str,
        params: LoggingParams | None = None,
        rows: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        self.out_dir = Path(out_dir)
        self.name = name
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.live = _live(self.out_dir / LIVE)
        self.run_live = _live(self.out_dir / RUN_LIVE)
        self.sink = _open_sink(params or LoggingParams(), name)
        self.prefix = ""
        for row in rows:
            self.log(row, sink=False)

    def prefixed(self, prefix: str) -> StepLog:
        """The same log (same folders and sink) with every name under `prefix`."""
        view = copy.copy(self)
        view.prefix = self.prefix + prefix
        return view

    def log(self, row: Mapping[str, Any], *, prefix: str = "", sink: bool = True) -> None:
        """Log one step: `row["step"]` (1-based) and its figures; NaN / None are skipped."""
        step, prefix = int(row["step"]), self.prefix + prefix
        values = {
            prefix + k: v
            for k, v in row.items()
            if k != "step" and v is not None and not (isinstance(v, float) and math.isnan(v))
        }
        for live, keep in ((self.live, False), (self.run_live, True)):
            picked = {k: v for k, v in values.items() if is_run_dependent(k) == keep}
            if picked:
                live.step = step  # our steps are 1-based and may be replayed
                for key, value in picked.items():
                    live.log_metric(key, value)
                live.next_step()  # summary (+ DVC Studio / VS Code step signal when set up)
        if sink and self.sink is not None:
            self.sink.log(step, values)

    def close(self) -> None:
        for live in (self.live, self.run_live):
            if not any((Path(live.dir) / "plots").glob("metrics/**/*.tsv")):
                shutil.rmtree(live.dir, ignore_errors=True)  # nothing of this kind was logged
            else:
                live.end()
                _sort_summary(Path(live.dir) / "metrics.json")
        if self.sink is not None:
            self.sink.close()
            self.sink = None


def _sort_summary(path: Path) -> None:
    """Rewrite dvclive's summary with sorted keys. dvclive keeps the order in which names were
    first logged, and a resumed run replays its rows from the checkpoint's JSON (sorted keys),
    so without this an interrupted run publishes other bytes than an uninterrupted one."""
    if path.is_file():
        summary = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(summary, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def edge_steps(n: int, fraction: float) -> int:
    """How many of `n` steps make a run's first / last window (`logging.summary_fraction`):
    `round(fraction · n)`, at least 1. The `*_start` / `*_end` summary metrics of distill,
    static, OPD and the tiny model's training are means over these windows."""
    return max(1, round(fraction * n))


# `logging.summary_fraction`'s default, for summaries outside a stage's parameters (prepare's
# tiny-model training, which does not declare the logging section).
DEFAULT_SUMMARY_FRACTION: float = LoggingParams.model_fields["summary_fraction"].default


def edge_means(
    values: Sequence[float], fraction: float = DEFAULT_SUMMARY_FRACTION
) -> tuple[float, float]:
    """(mean of the first, mean of the last) `edge_steps(len(values), fraction)` values;
    NaN for no values."""
    if not values:
        return math.nan, math.nan
    k = edge_steps(len(values), fraction)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def move_logs(src: Path, dst: Path) -> None:
    """Move the dvclive folders of a finished `StepLog` from `src` into `dst`."""
    for name in (LIVE, RUN_LIVE):
        if (Path(src) / name).is_dir():
            shutil.move(Path(src) / name, Path(dst) / name)


def read_steps(out_dir: Path, *, prefix: str = "") -> pl.DataFrame:
    """The per-step table back from `out_dir`'s dvclive folders: one row per step, one column
    per metric (under `prefix`, without it), run-dependent columns included."""
    frame: pl.DataFrame | None = None
    for name in (LIVE, RUN_LIVE):
        root = Path(out_dir) / name / "plots" / "metrics" / prefix
        for tsv in sorted(root.glob("*.tsv")):
            column = pl.read_csv(tsv, separator="\t")
            frame = column if frame is None else frame.join(column, on="step", how="full", coalesce=True)  # fmt: skip
    if frame is None:
        raise FileNotFoundError(f"{out_dir}: no dvclive metrics under {prefix or '.'}")
    return frame.sort("step")


# --------------------------------------------------------------------------- optional sinks


class _TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingExtraError(
                "logging.sink: tensorboard needs the tensorboard package: "
                "pip install 'retroloop[tensorboard]', or set logging.sink: none"
            ) from None
        self.writer = SummaryWriter(log_dir=str(log_dir))
        log.info("per-step metrics also go to TensorBoard: tensorboard --logdir %s", log_dir.parent)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, experiment: str, run_name: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise MissingExtraError(
                "logging.sink: mlflow needs the mlflow package: "
                "pip install 'retroloop[mlflow]', or set logging.sink: none"
            ) from None
        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default store
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        log.info("per-step metrics also go to MLflow run %s (%s)", self.run_id, run_name)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _open_sink(params: LoggingParams, name: str) -> _TensorBoard | _MLflow | None:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    match params.sink:
        case "none":
            return None
        case "tensorboard":
            return _TensorBoard(Path(params.dir) / f"{name}-{stamp}")
        case "mlflow":
            return _MLflow(params.experiment, f"{name}-{stamp}")
