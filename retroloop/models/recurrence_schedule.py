"""Training-time recurrence: R sampled per step (`sample_recurrence`, Huginn §3: rate ~
LogNormal, R = Poisson + 1) around a mean that ramps over training (`recurrence_mean_at`);
the model backpropagates through the last `bptt_k` iterations only (truncated BPTT,
`RecurrentForCausalLM.final_hidden_states`).
"""

from __future__ import annotations

import math

import torch

from retroloop.errors import ConfigError


def sample_recurrence(
    mean: float, sigma: float, generator: torch.Generator, max_recurrence: int
) -> int:
    """R for one training step: rate ~ LogNormal(log μ − σ²/2, σ), R = Poisson(rate) + 1, R ≤ cap.

    As in Huginn (Geiping et al. 2025, §3) and McLeish et al. 2025: E[rate] = μ, so before the
    cap E[R] = μ + 1 (the +1 guarantees at least one iteration). Pass μ − 1 for E[R] = μ.
    """
    if mean <= 0 or sigma < 0 or max_recurrence < 1:
        raise ConfigError(
            f"recurrence schedule: need mean > 0, sigma >= 0, max_recurrence >= 1 (got {mean}, {sigma}, {max_recurrence})"
        )
    log_rate = torch.normal(math.log(mean) - 0.5 * sigma**2, sigma, size=(1,), generator=generator)
    sampled = int(torch.poisson(log_rate.exp(), generator=generator).item()) + 1
    return min(sampled, max_recurrence)


def recurrence_mean_at(
    step: int, total_steps: int, mean_start: float, mean_end: float, ramp_fraction: float
) -> float:
    """μ at `step`: linear from `mean_start` to `mean_end` over the first `ramp_fraction` of the steps, then flat."""
    ramp_steps = ramp_fraction * total_steps
    if ramp_steps <= 0:
        return float(mean_end)
    frac = min(max(step / ramp_steps, 0.0), 1.0)
    return float(mean_start + frac * (mean_end - mean_start))
