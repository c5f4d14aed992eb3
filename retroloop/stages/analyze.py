"""analyze: which layers are near-identity maps, and the prelude/block/coda split.

Reads:  data/prepare/model, data/prepare/datasets/{instruct,domain}_train.parquet
Writes: data/analyze/layer_scores.parquet  (variant, layer, n, block_influence, angular_distance)
        data/analyze/block_influence.csv   (layer, BI per variant: one column each, so
                                            `dvc plots show` draws one line per variant)
        data/analyze/redundancy.png        (BI curve + angular-distance heatmap)
        data/analyze/split.json            (prelude / block / coda / dropped + the rule that chose it)
Run:    retroloop stage analyze

See `retroloop.analysis` for the formulas (ShortGPT Block Influence, Gromov et al. angular distance).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl
import torch
from tqdm import tqdm

from retroloop.analysis import RedundancyAccumulator, choose_split
from retroloop.artifacts import Manifest, atomic_artifact, verify_inputs
from retroloop.config import Params
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.runlock import exclusive
from retroloop.sequences import Sequence, pad_batch, pad_id, training_sequences
from retroloop.stages.common import BASE_MODEL, PATHS, dataset_path, resolve_inputs, setup_run

log = logging.getLogger(__name__)


@exclusive("out_dir")
def run(cfg: Params, *, inputs: dict | None = None, out_dir: Path = PATHS["analyze"]) -> Manifest:
    device = setup_run(cfg)
    paths = resolve_inputs(
        inputs,
        {
            "base_model": BASE_MODEL,
            "calibration_instruct": dataset_path("instruct", "train"),
            "calibration_domain": dataset_path("domain", "train"),
        },
    )
    verify_inputs(paths)  # before anything is read: a tampered input is refused, not consumed
    model = load_model(paths["base_model"], cfg.dtype, device)
    tokenizer = load_tokenizer(paths["base_model"])
    seqs = calibration_sequences(tokenizer, paths, cfg.analyze)
    table = layer_scores(model, tokenizer, seqs, batch_size=cfg.analyze.batch_size, device=device)
    N = len(model.model.layers)
    split = choose_split(cfg.analyze.split, N, table)
    log.info("split: %s", split.rule)
    return _publish(cfg, out_dir, paths, table, split, N, len(seqs), str(device))


def calibration_sequences(tokenizer, paths: dict[str, Path], a) -> list[Sequence]:
    """The first `a.calibration_records` training sequences, chat and domain interleaved so a
    small calibration budget sees both (`a`: the `analyze` params)."""
    seqs = training_sequences(
        tokenizer,
        pl.read_parquet(paths["calibration_instruct"]),
        pl.read_parquet(paths["calibration_domain"]),
        a.max_seq_len,
    )
    half = len(seqs) // 2
    mixed = [s for pair in zip(seqs[:half], seqs[half:], strict=False) for s in pair] + seqs[
        2 * half :
    ]
    return mixed[: a.calibration_records]


def layer_scores(
    model, tokenizer, seqs: list[Sequence], *, batch_size: int, device
) -> pl.DataFrame:
    """Block Influence and angular distance per layer (`RedundancyAccumulator.table`), from the
    decoder layers' own inputs and outputs (hooks; DESIGN.md §5: not `output_hidden_states`,
    whose last entry is after the final norm)."""
    layers = model.model.layers
    N = len(layers)
    acc = RedundancyAccumulator(num_layers=N, max_n=N - 1)
    captured: list[torch.Tensor] = []
    hooks = [
        layers[0].register_forward_pre_hook(
            lambda mod, args, kw: captured.append(_hidden(args, kw)), with_kwargs=True
        )
    ]
    hooks += [
        layer.register_forward_hook(lambda mod, args, out: captured.append(_first(out)))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(seqs), batch_size), desc="analyze", unit="batch"):
                ids_B_T, mask_B_T, _ = pad_batch(
                    seqs[start : start + batch_size], pad_id(tokenizer)
                )
                captured.clear()
                model(
                    input_ids=ids_B_T.to(device),
                    attention_mask=mask_B_T.to(device),
                    use_cache=False,
                )
                assert len(captured) == N + 1
                acc.add([h.float().cpu() for h in captured], mask_B_T)
    finally:
        for hook in hooks:
            hook.remove()
    return acc.table()


def _publish(
    cfg: Params,
    out_dir: Path,
    paths: dict[str, Path],
    table: pl.DataFrame,
    split,
    N: int,
    n_sequences: int,
    device: str,
) -> Manifest:
    """Write the scores, the per-layer BI plot data, split.json, the figure and the manifest."""
    with atomic_artifact(out_dir, stage="analyze", kind="analysis") as w:
        for role in ("base_model", "calibration_instruct", "calibration_domain"):
            w.add_input(role, paths[role])
        table.write_parquet(w.dir / "layer_scores.parquet")
        bi = table.filter(pl.col("n") == 1).select(
            "variant", "layer", "block_influence", "angular_distance"
        )
        wide = bi.pivot(on="variant", index="layer", values="block_influence").sort("layer")
        wide.select("layer", *sorted(c for c in wide.columns if c != "layer")).write_csv(
            w.dir / "block_influence.csv"
        )
        (w.dir / "split.json").write_text(
            json.dumps({**split.as_dict(), "num_layers": N}, indent=2) + "\n"
        )
        _plot(table, split, N, w.dir / "redundancy.png")
        w.outputs = {
            "layer_scores.parquet": "analysis",
            "split.json": "analysis",
            "redundancy.png": "report",
            "block_influence.csv": "analysis",
        }
        lowest = (
            bi.filter(pl.col("variant") == "all_tokens")
            .sort("block_influence")["layer"]
            .head(5)
            .to_list()
        )
        w.metrics = {
            "num_layers": N,
            "calibration_sequences": n_sequences,
            "calibration_tokens": int(
                table.filter((pl.col("variant") == "all_tokens") & (pl.col("n") == 1))["tokens"][0]
            ),
            "split": split.as_dict(),
            "lowest_block_influence_layers": lowest,
        }
        return w.finish(
            params=cfg.section("analyze"),
            params_sha256=cfg.section_sha256("analyze"),
            seed=cfg.seed,
            device=device,
        )


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _plot(table: pl.DataFrame, split, N: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in ("all_tokens", "last_token"):
        rows = table.filter((pl.col("variant") == variant) & (pl.col("n") == 1)).sort("layer")
        ax1.plot(rows["layer"], rows["block_influence"], marker="o", ms=3, label=f"BI ({variant})")
    for layer in split.dropped:
        ax1.axvspan(layer - 0.5, layer + 0.5, color="grey", alpha=0.2)
    ax1.set(
        xlabel="layer i",
        ylabel="Block Influence 1 − cos(h_i, h_i+1)",
        title="Block Influence (shaded: dropped)",
    )
    ax1.legend()
    grid = np.full((N, N), np.nan)
    for row in table.filter(pl.col("variant") == "all_tokens").iter_rows(named=True):
        grid[row["n"] - 1, row["layer"]] = row["angular_distance"]
    im = ax2.imshow(grid[: max(1, N // 2)], aspect="auto", origin="lower", cmap="viridis")
    ax2.set(
        xlabel="first layer ℓ",
        ylabel="block size n − 1",
        title="angular distance d(ℓ, ℓ+n) (all tokens)",
    )
    fig.colorbar(im, ax=ax2, label="angular distance d = arccos(cos) / π")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
