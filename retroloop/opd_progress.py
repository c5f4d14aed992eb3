"""OPD's run state between steps, and how a checkpoint keeps it (`retroloop.opd_loop`).

A resumed OPD run must continue bit for bit: the adapter and AdamW go through
`training.save_checkpoint`; what is OPD's own rides along as the checkpoint's `extra` files and
trainer state: the prompt sampler (numpy PCG64 state and the rest of the epoch), the per-step
rows (the step log is replayed from them), the rollouts so far, the before-KL and guard figures,
the held-out evaluations and the best one's weights (the adapter the run publishes), the
geometry tracker's rows and subspaces, and the torch CPU RNG. The rollout seeds derive from
the step (`training.seed_for`), so nothing else is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from retroloop import training
from retroloop.geometry import GeometryTracker
from retroloop.rollout import RolloutBatch


@dataclass
class Progress:
    """What the loop carries from step to step; a checkpoint holds all of it, so a resumed
    run continues bit for bit (the rollout seeds derive from the step, `seed_for`)."""

    rng: np.random.Generator  # the seeded epochs over the prompts
    order: list[int] = field(default_factory=list)  # this epoch's prompts not yet used
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per step done
    rollouts: list[pl.DataFrame] = field(default_factory=list)  # one per step done
    kl_before: float | None = None
    guard: dict[str, Any] | None = None  # the first start's run-time guard figures
    heldout: list[dict[str, Any]] = field(default_factory=list)  # {step, value} per evaluation
    best_step: int | None = None  # the evaluated step with the lowest held-out value so far
    best_weights: list[torch.Tensor] | None = None  # its trainable tensors (in `trainable` order)

    @property
    def best_value(self) -> float | None:
        return next((h["value"] for h in self.heldout if h["step"] == self.best_step), None)

    def evaluated(self, step: int, value: float, trainable: list[torch.Tensor]) -> bool:
        """Record step `step`'s held-out value; keep its weights if it beats the best so far
        (strictly: on a tie the earlier step stays). True when it became the best."""
        self.heldout.append({"step": step, "value": value})
        best = self.best_value
        if best is not None and not value < best:
            return False
        self.best_step = step
        self.best_weights = [q.detach().clone() for q in trainable]
        return True

    @property
    def step(self) -> int:
        return len(self.rows)


def save_progress(
    ckpts: training.Checkpoints,
    step: int,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    tracker: GeometryTracker,
) -> None:
    """Checkpoint `step`: adapter + optimizer (`training.save_checkpoint`), the prompt sampler
    and the summary's inputs (trainer_state.json), the rollouts so far, the geometry tracker's
    subspaces and the torch RNG (safetensors)."""
    state = {
        "rows": progress.rows,
        "order": progress.order,
        "prompt_rng": progress.rng.bit_generator.state,
        "kl_before": progress.kl_before,
        "guard": progress.guard,
        "geometry_rows": tracker.rows,
        "heldout": progress.heldout,
        "best_step": progress.best_step,
    }

    def extra(directory: Path) -> None:
        pl.concat(progress.rollouts).write_parquet(directory / "rollouts.parquet")
        tensors = {f"prev.{k}": v for k, v in tracker._prev.items()}
        tensors |= {f"w_top.{k}": v for k, v in tracker._w_top.items()}
        save_file({k: v.contiguous() for k, v in tensors.items()}, directory / "geometry.safetensors")  # fmt: skip
        save_file({"torch_cpu": torch.random.get_rng_state()}, directory / "rng.safetensors")
        if progress.best_weights is not None:  # the best held-out step's trainable tensors
            best = {str(i): t.contiguous().cpu() for i, t in enumerate(progress.best_weights)}
            save_file(best, directory / "best.safetensors")

    ckpts.save(step, student, optimizer, state, extra)


def resume_progress(
    checkpoints: training.Checkpoints | None,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tracker: GeometryTracker,
    seed: int,
) -> tuple[Progress, Path | None]:
    """A fresh start, or the newest checkpoint's progress with the weights, AdamW and the
    tracker restored; the checkpoint resumed from (None: a fresh start)."""
    progress = Progress(np.random.default_rng(seed))
    if checkpoints is None or (found := checkpoints.resume(student, optimizer)) is None:
        return progress, None
    _restore(progress, tracker, *found)
    return progress, found[0]


def _restore(progress: Progress, tracker: GeometryTracker, path: Path, state: dict) -> None:
    """Undo `save_progress` into a fresh run (weights and optimizer are already restored)."""
    progress.rows, progress.order = state["rows"], state["order"]
    progress.rng.bit_generator.state = state["prompt_rng"]
    progress.kl_before, progress.guard = state["kl_before"], state["guard"]
    progress.rollouts = pl.read_parquet(path / "rollouts.parquet").partition_by(
        "step", maintain_order=True
    )
    tracker.rows = state["geometry_rows"]
    for key, value in load_file(path / "geometry.safetensors").items():
        kind, name = key.split(".", 1)
        (tracker._prev if kind == "prev" else tracker._w_top)[name] = value
    torch.random.set_rng_state(load_file(path / "rng.safetensors")["torch_cpu"])
    progress.heldout, progress.best_step = state.get("heldout", []), state.get("best_step")
    if (path / "best.safetensors").is_file():
        best = load_file(path / "best.safetensors")
        progress.best_weights = [best[str(i)] for i in range(len(best))]


def rollout_frame(
    step: int,
    batch: RolloutBatch,
    teacher_logprobs: list[list[float]],
    rewards: list[float] | None,
    prompts: list[dict],
    tokenizer: PreTrainedTokenizerBase,
) -> pl.DataFrame:
    """One row per sampled completion: ids, sampler and teacher log-probs per generated token."""
    return pl.DataFrame(
        {
            "step": [step] * len(batch),
            "prompt_id": [str(prompts[i].get("id", "")) for i in batch.prompt_index],
            "sample_id": batch.sample_index,
            "prompt_tokens": batch.prompt_ids,
            "completion_tokens": batch.completion_ids,
            "sampler_logprobs": batch.sampler_logprobs,
            "teacher_logprobs": teacher_logprobs,
            "reward": rewards if rewards is not None else [None] * len(batch),
            "finished": batch.finished,
            "completion": tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True),
        },
        schema_overrides={
            "prompt_tokens": pl.List(pl.Int32),
            "completion_tokens": pl.List(pl.Int32),
            "sampler_logprobs": pl.List(pl.Float32),
            "teacher_logprobs": pl.List(pl.Float32),
            "reward": pl.Float64,
        },
    )
