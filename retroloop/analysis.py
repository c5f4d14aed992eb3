"""Layer redundancy: Block Influence (ShortGPT) and angular distance (Gromov et al.).

Hidden states are taken at each decoder layer's own output with forward hooks: the last
entry of HF `output_hidden_states` is after the final norm, so reading it would make the
last layer's scores wrong (DESIGN.md §5).

    BI_i        = 1 − mean_t cos(h_i,t, h_{i+1},t)                 (Men et al. 2024, ShortGPT)
    d(ℓ, ℓ + n) = mean arccos(cos(h_ℓ, h_{ℓ+n})) / π               (Gromov et al. 2024)

`h_0` is the input of layer 0 (the embeddings) and `h_{i+1}` the output of layer i. Both
statistics are computed over every non-padding token ("all_tokens") and over the last
non-padding token of each sequence ("last_token", Gromov et al.'s choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl
import torch

from retroloop.config import SplitSpec
from retroloop.errors import ConfigError

VARIANTS = ("all_tokens", "last_token")


@dataclass
class RedundancyAccumulator:
    """Running sums of cos and arccos/π for every (ℓ, n) pair, per variant."""

    num_layers: int
    max_n: int
    sums: dict[tuple[str, int, int], list[float]] = field(default_factory=dict)

    def add(self, states_L1_B_T_H: list[torch.Tensor], mask_B_T: torch.Tensor) -> None:
        """`states` holds N + 1 tensors: the embeddings and each layer's output."""
        mask = mask_B_T.bool()
        last_idx_B = (
            mask.long().cumsum(1).argmax(1)
        )  # last non-pad position (right or left padding)
        rows_B = torch.arange(mask.shape[0])
        for variant in VARIANTS:
            if variant == "all_tokens":
                flat = [s[mask].double() for s in states_L1_B_T_H]  # each [tokens, H]
            else:
                flat = [s[rows_B, last_idx_B].double() for s in states_L1_B_T_H]  # each [B, H]
            for n in range(1, self.max_n + 1):
                for layer in range(0, self.num_layers - n + 1):
                    cos = torch.nn.functional.cosine_similarity(
                        flat[layer], flat[layer + n], dim=-1
                    )
                    ang = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
                    acc = self.sums.setdefault((variant, layer, n), [0.0, 0.0, 0])
                    acc[0] += cos.sum().item()
                    acc[1] += ang.sum().item()
                    acc[2] += cos.numel()

    def table(self) -> pl.DataFrame:
        """One row per (variant, layer ℓ, n): BI (n = 1 only) and angular distance d(ℓ, ℓ+n)."""
        rows = []
        for (variant, layer, n), (cos_sum, ang_sum, count) in sorted(self.sums.items()):
            rows.append(
                {
                    "variant": variant,
                    "layer": layer,
                    "n": n,
                    "block_influence": 1.0 - cos_sum / count if n == 1 else None,
                    "angular_distance": ang_sum / count,
                    "tokens": count,
                }
            )
        return pl.DataFrame(
            rows,
            schema={
                "variant": pl.Utf8,
                "layer": pl.Int64,
                "n": pl.Int64,
                "block_influence": pl.Float64,
                "angular_distance": pl.Float64,
                "tokens": pl.Int64,
            },
        )


@dataclass(frozen=True)
class Split:
    prelude: list[int]
    block: list[int]
    coda: list[int]
    dropped: list[int]
    rule: str

    def as_dict(self) -> dict:
        return {
            "prelude": self.prelude,
            "block": self.block,
            "coda": self.coda,
            "dropped": self.dropped,
            "rule": self.rule,
        }


def choose_split(spec: SplitSpec, num_layers: int, table: pl.DataFrame | None) -> Split:
    """Resolve the prelude/block/coda split for a model with `num_layers` decoder layers.

    auto (contiguous, DESIGN.md §5): keep the first P and last C layers and a contiguous block
    of B layers starting at b ∈ [P, N − C − B] inside the middle; the n = N − P − B − C dropped
    layers are the window before the block, [P, b), and the one after it, [b + B, N − C). Each
    dropped window [ℓ, ℓ + m) is scored by Gromov et al.'s angular distance d(ℓ, ℓ + m) (how far
    the layers it removes move the hidden state); the block start with the smallest sum of its
    windows' distances wins, ties going to the block nearest the coda (the reference conversions'
    placement). A block is never split around a dropped window: a non-contiguous block feeds a
    late layer's output into an early layer on every iteration, so only a manual split makes one.
    manual: the ranges pinned in params.yaml, validated against the model.
    """
    N = num_layers
    if spec.mode == "manual":
        ranges = {"prelude": spec.prelude, "block": spec.block, "coda": spec.coda}
        for name, rng in ranges.items():
            if rng is not None and rng.last >= N:
                raise ConfigError(
                    f"analyze.split.{name}.last: layer {rng.last} is beyond the model's {N} layers (0..{N - 1})"
                )
        prelude = spec.prelude.indices if spec.prelude else []
        block = spec.block.indices
        coda = spec.coda.indices if spec.coda else []
        kept = set(prelude + block + coda)
        return Split(
            prelude, block, coda, [i for i in range(N) if i not in kept], "manual (params.yaml)"
        )

    P, B, C = spec.prelude_layers, spec.block_layers, spec.coda_layers
    n_drop = N - P - B - C
    if n_drop < 0:
        raise ConfigError(
            f"analyze.split: prelude_layers + block_layers + coda_layers = {P + B + C} is longer than "
            f"the model's {N} layers, so no contiguous P/B/C split fits; lower one of them"
        )
    prelude, coda = list(range(P)), list(range(N - C, N))
    if n_drop == 0:
        return Split(
            prelude, list(range(P, N - C)), coda, [], f"P={P}, B={B}, C={C}: all layers kept"
        )
    assert table is not None, "auto split needs the redundancy table"
    rows = table.filter(pl.col("variant") == spec.variant)
    distance = {
        (int(layer), int(n)): float(d)
        for layer, n, d in rows.select("layer", "n", "angular_distance").iter_rows()
    }

    def window(first: int, stop: int) -> float:
        if stop <= first:
            return 0.0
        if (first, stop - first) not in distance:
            raise ConfigError(
                f"analyze.split.variant: the redundancy table has no {spec.variant} distance "
                f"d({first}, {stop}); rerun analyze"
            )
        return distance[(first, stop - first)]

    scored = [
        (window(P, b) + window(b + B, N - C), -b) for b in range(P, N - C - B + 1)
    ]  # (score, -start): ties go to the later block
    score, neg_b = min(scored)
    b = -neg_b
    block = list(range(b, b + B))
    dropped = list(range(P, b)) + list(range(b + B, N - C))
    parts = [f"{lo}..{hi - 1}" for lo, hi in ((P, b), (b + B, N - C)) if hi > lo]
    rule = (
        f"contiguous_min_angular_distance: keep first P={P} and last C={C}; contiguous block "
        f"{b}..{b + B - 1} (B={B}); drop {' and '.join(parts)} ({n_drop} layers), the placement "
        f"whose dropped windows have the smallest summed {spec.variant} angular distance "
        f"d(ℓ, ℓ+m) = {score:.4f} of {len(scored)} placements"
    )
    return Split(prelude, block, coda, dropped, rule)
