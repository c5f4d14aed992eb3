"""Every `retroloop bench NAME --quick --json` runs on the tiny profile and returns its ratios.

A smoke test, not a measurement: no timing is asserted (benchmarks print ratios measured side
by side; their results live in the README). It checks that each bench runs end to end, prints
one JSON object with its headline keys, and that every number in it is finite. The benches run
in a copy of the stage tests' shared upstream (`helpers_distill.build_upstream`), so they load
data/prepare/model, data/analyze/split.json and data/convert/model as after `dvc repro`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from helpers_distill import TINY, build_upstream

HEADLINES = {
    "recurrence": {"source_tokens_per_s", "speed_ratio_by_recurrence", "flop_ratio_by_recurrence"},
    "distill": {
        "cached_vs_online_tokens_per_s_ratio",
        "cached_vs_online_peak_mem_ratio",
        "cache_bytes_per_token",
        "cache_build_vs_forward_ratio",
        "topk_kl_rel_error",
    },
    "opd": {
        "engine_vs_generate_tokens_per_s_ratio",
        "teacher_scoring_share",
        "rl_to_opd_steps_ratio",
        "opd_kl_reduction",
    },
    "peer": {
        "distill_seconds_to_trl_kl_ratio",
        "distill_peak_mem_ratio",
        "onpolicy_seconds_to_trl_kl_ratio",
        "onpolicy_peak_mem_ratio",
        "distill",
        "onpolicy",
        "cache_build_seconds",
    },
}


def _numbers(value, path: str = ""):
    """(path, number) for every int/float nested in `value` (bools are not numbers here)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path, value


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    shutil.copytree(build_upstream(tmp_path_factory) / "data", root / "data")
    return root


@pytest.fixture
def torch_state():
    """The benches set torch's thread count and seed for their own process; give them back."""
    import torch

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


@pytest.mark.parametrize("name", list(HEADLINES))
def test_bench_runs_on_the_tiny_profile_and_reports_finite_ratios(
    name: str, bench_dir: Path, torch_state, monkeypatch, capsys
) -> None:
    from retroloop.cli import main

    monkeypatch.chdir(bench_dir)
    # In this process (the CLI's own `main`, as `retroloop bench` calls it): a subprocess per
    # bench would spend most of its time importing torch and transformers.
    code = main(["bench", name, "--quick", "--json", "--params", str(TINY)])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert HEADLINES[name] <= set(result), sorted(result)
    bad = [p for p, v in _numbers(result) if not math.isfinite(v)]
    assert not bad, f"non-finite numbers in bench {name}: {bad}"
    if name == "recurrence":
        assert result["model"] == "data/prepare/model"
        # flop_ratio(R) = (P·L + R·(B·L + A) + C·L + H) / (N·L + H): linear in R, < 1 at R = 1
        # (layers are dropped), and R = 1…8 each have a speed ratio.
        flops = [result["flop_ratio_by_recurrence"][str(r)] for r in range(1, 9)]
        steps = {round(b - a, 3) for a, b in zip(flops, flops[1:], strict=False)}
        assert flops[0] < 1.0 and len(steps) == 1 and steps.pop() > 0, flops
        assert set(result["speed_ratio_by_recurrence"]) == {str(r) for r in range(1, 9)}
    if name == "opd":
        assert 0.0 < result["teacher_scoring_share"] < 1.0
    if name == "peer":
        # Every arm trained and was evaluated at the same steps; TRL's target KL is set.
        for pair, arms in (("distill", ("retroloop_distill", "trl_gkd")),
                           ("onpolicy", ("retroloop_opd", "trl_gkd_onpolicy"))):  # fmt: skip
            got = result[pair]
            assert set(got["arms"]) == set(arms), got["arms"].keys()
            curves = [got["arms"][a]["heldout_kl"] for a in arms]
            assert len(curves[0]) >= 2 and curves[0].keys() == curves[1].keys(), curves
            assert all(got["arms"][a]["tokens"] > 0 for a in arms)
            assert got["seconds_to_kl"]["target_kl"] > 0
            assert got["seconds_to_kl"]["to_worse_final"]["ratio"]["once"] is not None
