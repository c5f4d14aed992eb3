"""Forward throughput of the looped model at R = 1…8 against its source, side by side.

    retroloop bench recurrence [--json] [--quick]

What it measures: tokens/s of one no-grad fp32 forward pass (batch 4 × 128 tokens, no KV
cache, 2 torch threads) of the source model and of the converted model at every R, timed
in interleaved rounds (`benchmarks.common.interleaved_times`: warm-up, then the median
of 5 rounds, each timing every candidate once in a rotating order), so machine noise
hits all of them alike. `--quick` uses batch 2 × 32, 3 rounds and 1 thread (a smoke run).

Model: `data/prepare/model` if `retroloop stage prepare` has run, else the base model
named by `prepare.model`, loaded in memory (for the default profile: the SmolLM2 GGUF in
the cached wheel, ~1–2 min of dequantisation). Split: `data/analyze/split.json` if present
(and made for this model), else the params' P / B / C with the dropped window in the
middle of the layers between prelude and coda.

FLOP ratio (analytic, matmul FLOPs per token, in layer-equivalents L):

    flop_ratio(R) = (P·L + R·(B·L + A) + C·L + H) / (N·L + H)

    L = 2·h·(q + 2·kv) + 2·q·h      attention projections  (q = heads·d, kv = kv_heads·d)
      + 2·2·q·(T + 1)/2             QKᵀ and A·V over the mean causal context
      + 3·2·h·I                     gate, up, down (SwiGLU MLP)
    H = 2·h·V                       LM head (tied or not, it is a matmul)
    A = 2·(2h)·h                    recurrence adapter, once per iteration

Norms, RoPE, softmax, activations and the embedding lookup are left out (O(h) per token).
The head is not small: for SmolLM2-135M, H ≈ 8 L, so dropping layers saves less than
the layer count suggests. A speed ratio near 1 / flop_ratio means the loop costs nothing
beyond its FLOPs.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import torch

from benchmarks.common import interleaved_times, load_base_model, peak_rss_mib, relative_spread
from retroloop.analysis import Split, choose_split
from retroloop.config import Params, SplitSpec, load_params
from retroloop.errors import ConfigError
from retroloop.models.loading import load_model
from retroloop.models.recurrent import convert_from_source

log = logging.getLogger(__name__)

PREPARED_MODEL = Path("data/prepare/model")
SPLIT_JSON = Path("data/analyze/split.json")
MODEL_CACHE = Path("data/cache")
RECURRENCES = range(1, 9)
# --quick runs on one thread: a second one spins against other jobs on a shared 2-core box.
FULL = {"batch": 4, "seq_len": 128, "warmup": 1, "repeats": 5, "threads": 2}
QUICK = {"batch": 2, "seq_len": 32, "warmup": 1, "repeats": 3, "threads": 1}


def main(params_path: str | Path = "params.yaml", quick: bool = False) -> dict:
    cfg = load_params(params_path)
    sizes = QUICK if quick else FULL
    torch.set_num_threads(sizes["threads"])
    torch.manual_seed(cfg.seed)

    source, model_name = _load_source(cfg)
    N = int(source.config.num_hidden_layers)
    split = _resolve_split(cfg.analyze.split, N)
    log.info("split: %s", split.rule)
    looped = convert_from_source(
        source,
        prelude=split.prelude,
        block=split.block,
        coda=split.coda,
        state_init_std=cfg.convert.state_init_std,
    )

    B, T = sizes["batch"], sizes["seq_len"]
    gen = torch.Generator().manual_seed(cfg.seed)
    ids_B_T = torch.randint(0, source.config.vocab_size, (B, T), generator=gen)

    def forward_source() -> None:
        with torch.no_grad():
            source(input_ids=ids_B_T, use_cache=False)

    def forward_looped(r: int):
        def call() -> None:
            with torch.no_grad():
                looped(input_ids=ids_B_T, num_recurrence=r, use_cache=False)

        return call

    candidates = {"source": forward_source} | {str(r): forward_looped(r) for r in RECURRENCES}
    log.info(
        "timing %d candidates: batch %d × %d tokens, %d warm-up + %d interleaved rounds, %d threads",
        len(candidates), B, T, sizes["warmup"], sizes["repeats"], sizes["threads"],
    )  # fmt: skip
    times = interleaved_times(candidates, warmup=sizes["warmup"], repeats=sizes["repeats"])
    seconds = {name: statistics.median(ts) for name, ts in times.items()}

    tokens = B * T
    src_tps = tokens / seconds["source"]
    tps = {str(r): tokens / seconds[str(r)] for r in RECURRENCES}
    flops = matmul_flops_per_token(source.config, T)
    return {
        "source_tokens_per_s": round(src_tps, 2),
        "tokens_per_s_by_recurrence": {r: round(v, 2) for r, v in tps.items()},
        "speed_ratio_by_recurrence": {r: round(v / src_tps, 4) for r, v in tps.items()},
        "flop_ratio_by_recurrence": {
            str(r): round(flop_ratio(split, N, r, **flops), 4) for r in RECURRENCES
        },
        "model": model_name,
        "split": split.as_dict(),
        "batch": B,
        "seq_len": T,
        "repeats": sizes["repeats"],
        "threads": sizes["threads"],
        # Noise gauge: median over candidates of (max − min) / median of their timings.
        "timing_relative_spread": round(statistics.median(map(relative_spread, times.values())), 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def matmul_flops_per_token(config, seq_len: int) -> dict[str, float]:
    """Matmul FLOPs per token of one decoder layer, the LM head and the recurrence adapter."""
    h, inter, V = config.hidden_size, config.intermediate_size, config.vocab_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    context = (seq_len + 1) / 2  # mean number of keys a query attends to under a causal mask
    layer = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 2 * q * context + 3 * 2 * h * inter
    return {"layer": float(layer), "head": float(2 * h * V), "adapter": float(2 * 2 * h * h)}


def flop_ratio(split: Split, N: int, R: int, *, layer: float, head: float, adapter: float) -> float:
    """(P·L + R·(B·L + A) + C·L + H) / (N·L + H): looped over source matmul FLOPs."""
    P, B, C = len(split.prelude), len(split.block), len(split.coda)
    looped = (P + C) * layer + R * (B * layer + adapter) + head
    return looped / (N * layer + head)


def _load_source(cfg: Params) -> tuple[torch.nn.Module, str]:
    if (PREPARED_MODEL / "config.json").is_file():
        log.info("source: %s", PREPARED_MODEL)
        return load_model(PREPARED_MODEL, "float32", "cpu"), PREPARED_MODEL.as_posix()
    src = cfg.prepare.model
    log.info(
        "source: %s not found; loading prepare.model (%s) in memory", PREPARED_MODEL, src.source
    )
    model, _, _ = load_base_model(cfg, MODEL_CACHE)
    name = {
        "pypi_wheel": f"pypi_wheel:{src.package}/{src.file}",
        "gguf": f"gguf:{src.path}",
        "local": f"local:{src.path}",
        "hf": f"hf:{src.hf_id}",
        "tiny_random": "tiny_random",
    }[src.source]
    # GGUF sources come dequantised to fp32 (transformers refuses `.float()` on them).
    assert next(model.parameters()).dtype == torch.float32
    return model.eval(), name


def _resolve_split(spec: SplitSpec, N: int) -> Split:
    """split.json of the last analyze run if it fits this model, else the params' split."""
    if SPLIT_JSON.is_file():
        saved = json.loads(SPLIT_JSON.read_text())
        if saved.get("num_layers") == N:
            return Split(
                saved["prelude"], saved["block"], saved["coda"], saved["dropped"],
                f"{SPLIT_JSON}: {saved['rule']}",
            )  # fmt: skip
        log.warning(
            "%s is for %s layers, the model has %d; using params",
            SPLIT_JSON,
            saved.get("num_layers"),
            N,
        )
    if spec.mode == "manual":
        return choose_split(spec, N, None)
    return middle_split(spec.prelude_layers, spec.block_layers, spec.coda_layers, N)


def middle_split(P: int, B: int, C: int, N: int) -> Split:
    """First P and last C layers kept; the N − P − B − C dropped layers centred between them."""
    n_drop = N - P - B - C
    if n_drop < 0:
        raise ConfigError(
            f"analyze.split: P + B + C = {P + B + C} is more than the model's {N} layers"
        )
    start = P + B // 2
    dropped = list(range(start, start + n_drop))
    middle = [i for i in range(P, N - C) if i not in dropped]
    window = f"layers {start}..{start + n_drop - 1}" if n_drop else "none"
    rule = f"params P={P}, B={B}, C={C}; dropped: {window} (the middle window; no analysis)"
    return Split(list(range(P)), middle, list(range(N - C, N)), dropped, rule)
