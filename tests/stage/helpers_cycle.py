"""A continual-learning cycle on the tiny upstream of `helpers_distill`, through the recipe's
functions in the order `flows/cycle.py` runs its tasks (no Prefect: the tasks wrap these one to
one), for the resume and learning tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from helpers_distill import TINY

from retroloop import cycle, registry
from retroloop.config import load_params


def cycle_params(root: Path, name: str = "params", **cycle_keys: Any) -> Path:
    """The tiny profile for cycles on the prepared model (no base adapter), one thread, with
    dotted overrides (`cycle_params(root, "x", **{"cycle.midtrain_steps": 4})`)."""
    raw = yaml.safe_load(TINY.read_text())
    raw["threads"] = 1
    raw["cycle"].update(base_model="data/prepare/model", base_adapter=None)
    for key, value in cycle_keys.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    (path := root / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return path


def domain_file(root: Path, split: str, name: str, rows: slice = slice(None)) -> Path:
    """Domain documents from the prepared `domain_<split>` parquet, as a .jsonl of {"text"}."""
    texts = pl.read_parquet(f"data/prepare/datasets/domain_{split}.parquet")["text"].to_list()
    lines = [json.dumps({"text": t}) + "\n" for t in texts[rows]]
    (path := root / name).write_text("".join(lines), encoding="utf-8")
    return path


def recipe(params: str | Path, data: str | Path, *, midtrain_only: bool = False):
    """Run one cycle; the registered cycle directory (None with `midtrain_only`, which stops
    after mid-training and registers nothing) and the phases' metrics by name."""
    cfg = load_params(params)
    inputs = cycle.read_inputs(cfg, Path(data))
    claim = registry.acquire(cfg.cycle.registry)
    try:
        run = cycle.load_models(inputs, claim)
        if midtrain_only:
            cycle.midtrain(run)
            return None, {}
        before = cycle.evaluate_phase(run, "before", run.start)
        mid = cycle.midtrain(run)
        after_mid = cycle.evaluate_phase(run, "after_midtrain", mid.student)
        rec = cycle.recover_with_opd(run, after_mid.student)
        after_opd = cycle.evaluate_phase(run, "after_opd", rec.student)
        phases = [before, after_mid, after_opd]
        return cycle.register(run, claim, phases, mid, rec), {e.phase: e.metrics for e in phases}
    finally:
        registry.release(claim)
