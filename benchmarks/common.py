"""Small helpers every benchmark shares: interleaved timing and peak memory.

Benchmarks compare two or more things measured *side by side in one run*: every repeat
round times each candidate once, in a rotating order, so machine noise (other processes
on a shared 2-core box, thermal drift) lands on all of them instead of on whichever ran
last. Report ratios of medians, not absolute numbers from separate runs.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from retroloop import datasets
from retroloop.config import Params

log = logging.getLogger(__name__)


def load_base_model(cfg: Params, cache_dir: Path) -> tuple[torch.nn.Module, Any, dict]:
    """`prepare.model` in memory, as `retroloop stage prepare` loads it (for a bench run before
    the stage has): a `tiny_random` model trains its tokenizer on the prepare corpus and, with
    `tiny.train_steps > 0`, its weights on the train split. Returns (model, tokenizer, provenance)."""
    from retroloop.models.loading import load_source_model

    p, corpus, train_texts = cfg.prepare, None, None
    if p.model.source == "tiny_random":
        domain = datasets.load_source(p.domain, seed=cfg.seed, key="prepare.domain")
        instruct = datasets.load_source(p.instructions, seed=cfg.seed, key="prepare.instructions")
        corpus = domain["text"].to_list() + instruct["prompt"].to_list()
        train_texts = (
            datasets.split_train_eval(domain, p.eval_fraction, cfg.seed)[0]["text"].to_list()
            + datasets.split_train_eval(instruct, p.eval_fraction, cfg.seed)[0]["prompt"].to_list()
        )
    return load_source_model(p.model, cache_dir=cache_dir, corpus=corpus, train_texts=train_texts)


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 3
) -> dict[str, float]:
    """Median wall seconds per call of each candidate, measured in interleaved rounds."""
    times = interleaved_times(candidates, warmup=warmup, repeats=repeats)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_times(
    candidates: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 3
) -> dict[str, list[float]]:
    """Wall seconds of every timed call of each candidate, measured in interleaved rounds.

    Every candidate first runs `warmup` untimed calls (allocator, thread pool and kernel
    selection warm up), then `repeats` rounds each time every candidate once; the order
    rotates by one per round so no candidate always opens a round (or always closes one).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(candidates[name]))
        log.info("round %d/%d done", r + 1, repeats)
    return times


def relative_spread(seconds: list[float]) -> float:
    """(max − min) / median of repeated timings: a noise gauge to print beside a ratio."""
    return (max(seconds) - min(seconds)) / statistics.median(seconds)


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call (CUDA work, if any, is synchronised before reading the clock)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (monotone: it never goes down).

    `ru_maxrss` is KiB on Linux and bytes on macOS. For the peak of one phase, run the
    phase in a fresh process or compare against the value read before it.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
