"""convert: rebuild the base model as prelude → (adapter → block) × R → coda.

Reads:  data/prepare/model (the source, which stays the teacher), data/analyze/split.json,
        data/prepare/datasets/domain_eval.parquet (held-out tokens for the equivalence check)
Writes: data/convert/model/  (a RecurrentForCausalLM save_pretrained dir; loads with
        AutoModelForCausalLM once `retroloop.models.recurrent` is imported)
Run:    retroloop stage convert

The input adapter is initialised by `convert.init`: `pass_input` ([0 | I], s_0 ≈ 0) or
`repeat_block` ([I | 0], s_0 = e: R = k applies the block k times). Either way, at R = 1 the
converted model equals the source with the dropped layers removed; the manifest's
`equivalence_max_abs_diff` measures exactly that on held-out tokens, and a conversion that does
not reproduce its source (max |Δlogit| above `convert.equivalence_tolerance`, by default
`EQUIVALENCE_TOLERANCE[dtype]`) fails in one line with nothing written: the source family
has something the looped model does not carry over. The source loads on `device` in `dtype`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl

from retroloop.artifacts import Manifest, atomic_artifact, input_ref, verify_inputs
from retroloop.config import Params
from retroloop.errors import ModelError
from retroloop.guards import check_cached_generate
from retroloop.models.loading import load_model, load_tokenizer, tokenizer_fingerprint
from retroloop.models.recurrent import convert_from_source, drop_layers, equivalence_max_abs_diff
from retroloop.runlock import exclusive
from retroloop.sequences import Sequence, pad_batch, text_sequence
from retroloop.stages.common import BASE_MODEL, PATHS, dataset_path, resolve_inputs, setup_run

log = logging.getLogger(__name__)

# max |Δlogit| at R = 1 a faithful conversion stays under (`convert.equivalence_tolerance: null`).
# The looped model runs the source's own layers on the same inputs (the adapter copies e exactly),
# so it measures 0 to ~1e-5 in float32; half precision rounds logits of magnitude ~10-30 to
# ~0.01 (float16) / ~0.1 (bfloat16). A hook left out (Gemma's √h, a sliding window) moves
# logits by whole units.
EQUIVALENCE_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2.5e-1}


@exclusive("out_dir")
def run(cfg: Params, *, inputs: dict | None = None, out_dir: Path = PATHS["convert"]) -> Manifest:
    device = setup_run(cfg)
    c = cfg.convert
    paths = resolve_inputs(
        inputs,
        {
            "base_model": BASE_MODEL,
            "split": PATHS["analyze"] / "split.json",
            "heldout": dataset_path("domain", "eval"),
        },
    )
    verify_inputs(paths)  # before anything is read: a tampered input is refused, not consumed
    split = json.loads(Path(paths["split"]).read_text())
    source = load_model(paths["base_model"], cfg.dtype, device)
    tokenizer = load_tokenizer(paths["base_model"])
    base_ref = input_ref("base_model", paths["base_model"])
    looped = convert_from_source(
        source,
        prelude=split["prelude"],
        block=split["block"],
        coda=split["coda"],
        recurrence=c.recurrence,
        state_init_std=c.state_init_std,
        early_exit_kl=c.early_exit_kl,
        adapter_init=c.init,
        source_path=base_ref.path,
        source_sha256=base_ref.content_sha256,
    )

    seqs = _heldout_sequences(
        pl.read_parquet(paths["heldout"]), tokenizer, c.equivalence_tokens, cfg.prepare.max_seq_len
    )
    max_diff, n_tokens = _check_equivalence(
        cfg, source, looped, split, seqs, tokenizer.pad_token_id
    )
    # Generation with the KV cache must match cache-free decoding (retroloop.guards), before
    # anything is written: OPD and evaluate generate with this model.
    guard = check_cached_generate(
        looped.eval(),
        [seq.input_ids[: cfg.guards.prompt_tokens] for seq in seqs[: cfg.guards.prompts]],
        what=f"the converted model at R={c.recurrence}",
        pad_id=tokenizer.pad_token_id,
        forward_kwargs={"num_recurrence": c.recurrence},
        max_new_tokens=cfg.guards.new_tokens,
    )

    with atomic_artifact(out_dir, stage="convert", kind="model") as w:
        w.inputs.append(base_ref)
        w.add_input("split", paths["split"])
        w.add_input("heldout", paths["heldout"])
        model_dir = w.dir / "model"
        looped.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        w.outputs["model"] = "model"
        n_source = sum(t.numel() for t in source.parameters())
        n_looped = sum(t.numel() for t in looped.parameters())
        w.metrics = {
            "equivalence_max_abs_diff": max_diff,
            "equivalence_tokens": n_tokens,
            "source_parameters": n_source,
            "looped_parameters": n_looped,
            "prelude_layers": len(split["prelude"]),
            "block_layers": len(split["block"]),
            "coda_layers": len(split["coda"]),
            "recurrence": c.recurrence,
            "adapter_init": c.init,
            "guard_cached_generate": guard,
            **tokenizer_fingerprint(tokenizer),
        }
        return w.finish(
            params=cfg.section("convert"),
            params_sha256=cfg.section_sha256("convert"),
            seed=cfg.seed,
            device=str(device),
        )


def _heldout_sequences(
    heldout: pl.DataFrame, tokenizer, budget: int, max_seq_len: int
) -> list[Sequence]:
    """Held-out documents in order, each cut to the tokens left of `budget` (at most
    `max_seq_len`), until `budget` tokens are taken; one-token sequences are skipped."""
    seqs = []
    for row in heldout.iter_rows(named=True):
        if budget <= 0:
            break
        seq = text_sequence(tokenizer, row["id"], row["text"], min(budget, max_seq_len))
        if len(seq.input_ids) > 1:
            seqs.append(seq)
            budget -= len(seq.input_ids)
    return seqs


def _check_equivalence(
    cfg: Params, source, looped, split: dict, seqs: list[Sequence], pad_id: int
) -> tuple[float, int]:
    """max |Δlogit| at R = 1 against the source with the same layers dropped, on `seqs`, and the
    tokens it was measured on; above the tolerance the conversion fails in one line, before
    anything is written (the module docstring)."""
    ids_B_T, mask_B_T, _ = pad_batch(seqs, pad_id)
    reference = drop_layers(source, split["prelude"] + split["block"] + split["coda"])
    max_diff = equivalence_max_abs_diff(looped, reference, ids_B_T, mask_B_T)
    n_tokens = int(mask_B_T.sum())
    log.info("equivalence at R=1: max |Δlogit| = %.3g over %d tokens", max_diff, n_tokens)
    tolerance = cfg.convert.equivalence_tolerance or EQUIVALENCE_TOLERANCE[cfg.dtype]
    if not max_diff <= tolerance:  # NaN fails too
        raise ModelError(
            f"convert: the converted {source.config.model_type!r} model differs from its "
            f"layer-dropped source at R = 1 by max |Δlogit| = {max_diff:.3g} > "
            f"convert.equivalence_tolerance = {tolerance:g} ({cfg.dtype}); the looped model does "
            "not reproduce something this family keeps outside its decoder layers; nothing was "
            "written (raise the tolerance only for a known precision effect)"
        )
    return max_diff, n_tokens
