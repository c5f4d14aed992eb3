"""Block Influence / angular distance on hand-built hidden states, and the split rule."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from retroloop.analysis import RedundancyAccumulator, choose_split
from retroloop.config import LayerRange, SplitSpec
from retroloop.errors import ConfigError


def test_identity_layers_have_zero_influence_and_distance() -> None:
    h = torch.randn(2, 5, 8)
    acc = RedundancyAccumulator(num_layers=3, max_n=2)
    acc.add([h, h.clone(), h.clone(), h.clone()], torch.ones(2, 5))
    table = acc.table()
    assert table["angular_distance"].abs().max() < 1e-6
    assert table.filter(pl.col("n") == 1)["block_influence"].abs().max() < 1e-6


def test_orthogonal_states_give_bi_one_and_half_angle() -> None:
    a = torch.zeros(1, 3, 4)
    a[..., 0] = 1
    b = torch.zeros(1, 3, 4)
    b[..., 1] = 1
    acc = RedundancyAccumulator(num_layers=1, max_n=1)
    acc.add([a, b], torch.ones(1, 3))
    row = acc.table().filter(pl.col("variant") == "all_tokens").row(0, named=True)
    assert row["block_influence"] == pytest.approx(1.0)
    assert row["angular_distance"] == pytest.approx(0.5)  # arccos(0)/π


def test_padding_is_ignored_and_last_token_is_the_last_real_one() -> None:
    h0 = torch.randn(1, 4, 6)
    h1 = h0.clone()
    h1[0, 3] = -h0[0, 3]  # the padded position disagrees completely
    mask = torch.tensor([[1, 1, 1, 0]])
    acc = RedundancyAccumulator(num_layers=1, max_n=1)
    acc.add([h0, h1], mask)
    table = acc.table()
    assert table["angular_distance"].abs().max() < 1e-6
    assert table.filter(pl.col("variant") == "last_token")["tokens"][0] == 1


def test_angular_distance_matches_formula() -> None:
    torch.manual_seed(0)
    h0, h1 = torch.randn(1, 7, 5), torch.randn(1, 7, 5)
    acc = RedundancyAccumulator(num_layers=1, max_n=1)
    acc.add([h0, h1], torch.ones(1, 7))
    cos = torch.nn.functional.cosine_similarity(h0[0].double(), h1[0].double(), dim=-1)
    expect = (torch.arccos(cos) / math.pi).mean().item()
    got = acc.table().filter(pl.col("variant") == "all_tokens")["angular_distance"][0]
    assert got == pytest.approx(expect, abs=1e-9)


def _table(N: int, best_start: int, n: int) -> pl.DataFrame:
    rows = [
        {
            "variant": "all_tokens",
            "layer": layer,
            "n": k,
            "block_influence": None,
            "angular_distance": 0.1 if (layer, k) == (best_start, n) else 0.5,
            "tokens": 1,
        }
        for k in range(1, N)
        for layer in range(0, N - k + 1)
    ]
    return pl.DataFrame(rows)


def _window_table(N: int, distances: dict[tuple[int, int], float]) -> pl.DataFrame:
    """Every (layer, n) at distance 0.5 except the ones given."""
    rows = [
        {"variant": "all_tokens", "layer": layer, "n": k, "block_influence": None,
         "angular_distance": distances.get((layer, k), 0.5), "tokens": 1}
        for k in range(1, N)
        for layer in range(0, N - k + 1)
    ]  # fmt: skip
    return pl.DataFrame(rows)


@pytest.mark.parametrize("best_start", [2, 4, 5])
def test_auto_split_keeps_the_block_contiguous(best_start: int) -> None:
    """N=10, P=2, B=3, C=2: the 3 dropped middle layers sit before and/or after the block.

    The old rule dropped the single most redundant window 4..6 and made the block 2, 3, 7."""
    spec = SplitSpec(prelude_layers=2, block_layers=3, coda_layers=2)
    split = choose_split(spec, 10, _table(10, best_start=best_start, n=3))
    assert split.prelude == [0, 1] and split.coda == [8, 9]
    b = split.block[0]
    assert split.block == list(range(b, b + 3))
    assert sorted(split.dropped + split.block) == list(range(2, 8))
    if best_start in (2, 5):  # a dropped window that is the whole gap: exactly that window
        assert split.dropped == list(range(best_start, best_start + 3))
    assert split.rule.startswith("contiguous_min_angular_distance") and "smallest" in split.rule


def test_auto_split_sums_the_two_dropped_windows_and_ties_go_next_to_the_coda() -> None:
    spec = SplitSpec(prelude_layers=2, block_layers=3, coda_layers=2)
    # Dropping 2 before the block (2..3) and 1 after (7) is cheapest: 0.1 + 0.1 < 0.5 + 0.
    split = choose_split(spec, 10, _window_table(10, {(2, 2): 0.1, (7, 1): 0.1}))
    assert split.block == [4, 5, 6] and split.dropped == [2, 3, 7]
    # All placements equal: the block sits just before the coda (the reference placement).
    tie = choose_split(spec, 10, _window_table(10, {(2, 3): 0.5, (5, 3): 0.5}))
    assert tie.block == [5, 6, 7] and tie.dropped == [2, 3, 4]


def test_auto_split_uses_the_chosen_variant() -> None:
    spec = SplitSpec(prelude_layers=2, block_layers=3, coda_layers=2, variant="last_token")
    table = _window_table(10, {(2, 3): 0.0}).with_columns(pl.lit("last_token").alias("variant"))
    other = _window_table(10, {(5, 3): 0.0})  # all_tokens would pick the block 2..4
    split = choose_split(spec, 10, pl.concat([table, other]))
    assert split.block == [5, 6, 7] and "last_token" in split.rule


def test_split_longer_than_model_is_an_error() -> None:
    with pytest.raises(ConfigError, match="longer than the model's 6 layers") as err:
        choose_split(SplitSpec(prelude_layers=2, block_layers=4, coda_layers=2), 6, None)
    assert str(err.value).startswith("analyze.split: prelude_layers + block_layers + coda_layers")
    assert "contiguous" in str(err.value) and "\n" not in str(err.value)


def test_manual_split_beyond_model_is_an_error() -> None:
    spec = SplitSpec(mode="manual", block=LayerRange(first=2, last=40))
    with pytest.raises(ConfigError, match="analyze.split.block.last"):
        choose_split(spec, 30, None)
    ok = choose_split(
        SplitSpec(
            mode="manual",
            prelude=LayerRange(first=0, last=3),
            block=LayerRange(first=10, last=13),
            coda=LayerRange(first=26, last=29),
        ),
        30,
        None,
    )
    assert ok.block == [10, 11, 12, 13] and len(ok.dropped) == 30 - 12
