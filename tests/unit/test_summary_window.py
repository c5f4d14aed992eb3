"""One home for the first / last window of a training run's summary (issue 22): distill,
static, OPD and the tiny model's training average their `*_start` / `*_end` metrics over
`steplog.edge_steps(n, logging.summary_fraction)` steps (at least one)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from retroloop.config import LoggingParams, OpdParams
from retroloop.opd_io import summary
from retroloop.opd_progress import Progress
from retroloop.steplog import DEFAULT_SUMMARY_FRACTION, edge_means, edge_steps


@pytest.mark.parametrize(("n", "want"), [(1, 1), (3, 1), (10, 1), (20, 2), (800, 80)])
def test_the_window_is_a_tenth_of_the_steps_by_default_and_never_empty(n, want) -> None:
    assert DEFAULT_SUMMARY_FRACTION == LoggingParams().summary_fraction == 0.1
    assert edge_steps(n, DEFAULT_SUMMARY_FRACTION) == want


def test_edge_means_average_the_first_and_last_windows() -> None:
    assert edge_means([1.0, 2.0, 3.0, 4.0], 0.5) == (1.5, 3.5)
    assert edge_means(list(range(20))) == (0.5, 18.5)  # 2 of 20 steps at the default
    assert all(math.isnan(x) for x in edge_means([]))


def test_logging_summary_fraction_sets_opds_start_and_end_metrics() -> None:
    rows = [
        {"step": s, "reverse_kl_topk_lb": kl, "reverse_kl_sampled": 0.0, "sampler_learner_kl": 0.0,
         "response_length": 1.0, "tokens": 1, "step_s": 1.0, "rollout_s": 1.0, "teacher_s": 0.5,
         "reward": math.nan}
        for s, kl in enumerate([4.0, 3.0, 2.0, 1.0], 1)
    ]  # fmt: skip
    progress = Progress(np.random.default_rng(0), rows=rows)
    geometry = pl.DataFrame({"step": [4], "effective_rank": [1.0], "overlap_top_r": [0.5]})
    p = OpdParams(steps=4)
    tenth = summary(p, progress, geometry, 0, 0.1)
    half = summary(p, progress, geometry, 0, 0.5)
    assert (tenth["reverse_kl_topk_lb_start"], tenth["reverse_kl_topk_lb_end"]) == (4.0, 1.0)
    assert (half["reverse_kl_topk_lb_start"], half["reverse_kl_topk_lb_end"]) == (3.5, 1.5)
