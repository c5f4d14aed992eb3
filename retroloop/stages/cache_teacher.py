"""cache_teacher: run the teacher once and store its top-k next-token distributions.

Reads:  the teacher (role `teacher`: `common.teacher_dir()`, data/prepare/teacher when
        `prepare.teacher` is set, else data/prepare/model), checked against the source
        model's tokenizer (data/prepare/model) before anything is cached,
        data/prepare/datasets/{instruct,domain}_train.parquet (roles `train_instruct`, `train_domain`)
Writes: data/cache_teacher/shards/shard_NNNNN.safetensors, index.parquet, cache.json,
        metrics.json, manifest.json          (format: `retroloop.teacher_cache`)
Side:   data/checkpoints/cache_teacher/<run key>/  completed shards of an interrupted run;
        a rerun with the same teacher, data and parameters reuses them, and the directory
        is removed once the artifact is in place.
Run:    retroloop stage cache_teacher

Sequences come from `retroloop.sequences.training_sequences`, exactly as distill builds
them; only positions whose next token is trained on are stored (see `retroloop.teacher_cache`).
Batches never cross a shard boundary, so a recomputed shard is bit-identical to the lost one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F
from tqdm import tqdm

from retroloop import teacher_cache as tc
from retroloop.artifacts import Manifest, atomic_artifact, input_ref, sha256_file, write_json_atomic
from retroloop.canonical import json_sha256
from retroloop.config import Params
from retroloop.models.head import logits_at
from retroloop.models.loading import load_model, load_tokenizer, tokenizer_fingerprint
from retroloop.runlock import exclusive
from retroloop.sequences import IGNORE, pad_batch, pad_id, training_sequences
from retroloop.stages.common import (
    BASE_MODEL,
    DATA,
    PATHS,
    dataset_path,
    resolve_inputs,
    setup_run,
    teacher_dir,
)
from retroloop.tokenizer_match import check_same_tokenizer
from retroloop.training import seed_for

log = logging.getLogger(__name__)

CHECKPOINTS = DATA / "checkpoints" / "cache_teacher"


def _after_shard(index: int) -> None:
    """Called after each completed shard; tests replace it to simulate a kill."""


@exclusive("out_dir", "checkpoint_dir")
def run(
    cfg: Params,
    *,
    inputs: dict | None = None,
    out_dir: Path = PATHS["cache_teacher"],
    checkpoint_dir: Path = CHECKPOINTS,
) -> Manifest:
    device = setup_run(cfg)
    c = cfg.cache_teacher
    paths = resolve_inputs(
        inputs,
        {
            "teacher": teacher_dir(),
            "train_instruct": dataset_path("instruct", "train"),
            "train_domain": dataset_path("domain", "train"),
        },
    )
    refs = [input_ref(role, paths[role]) for role in ("teacher", "train_instruct", "train_domain")]
    tokenizer = load_tokenizer(paths["teacher"])
    student = Path((inputs or {}).get("student_tokenizer", BASE_MODEL))
    if (
        student.resolve() != Path(paths["teacher"]).resolve()
        and (student / "config.json").is_file()
    ):
        # The cache's ids are the student's ids (distill reads them against its own logits).
        check_same_tokenizer(
            load_tokenizer(student), tokenizer, key=f"cache_teacher: teacher {paths['teacher']}"
        )
    seqs = training_sequences(
        tokenizer,
        pl.read_parquet(paths["train_instruct"]),
        pl.read_parquet(paths["train_domain"]),
        cfg.prepare.max_seq_len,
    )
    model = load_model(paths["teacher"], cfg.dtype, device)
    vocab = model.get_output_embeddings().weight.shape[0]
    k = _stored_k(c, vocab)
    side = _side_dir(cfg, refs, checkpoint_dir)
    n_shards = -(-len(seqs) // c.shard_sequences)
    log.info(
        "teacher cache: %d sequences, %d shards of %d, k=%d, T=%g, %d B/position, side dir %s",
        len(seqs), n_shards, c.shard_sequences, k, c.temperature,
        tc.bytes_per_position(k, vocab, c.full_vocab, c.tail_samples), side,
    )  # fmt: skip

    index_rows: list[dict] = []
    shard_meta: list[dict] = []
    for s in tqdm(range(n_shards), desc="cache_teacher", unit="shard"):
        first = s * c.shard_sequences
        chunk = seqs[first : first + c.shard_sequences]
        done = _shard(model, tokenizer, chunk, side, s, device=device, cfg=cfg, k=k)
        shard_meta.append(done)
        index_rows += _index_rows(chunk, first, _shard_name(s), done)
        _after_shard(s)

    shape = {"k": k, "vocab": vocab, "n_sequences": len(seqs)}
    manifest = _publish(
        cfg,
        out_dir,
        side,
        refs,
        index_rows,
        shard_meta,
        shape,
        tokenizer_fingerprint(tokenizer),
        str(device),
    )
    shutil.rmtree(side, ignore_errors=True)
    log.info(
        "teacher cache: %d positions, %.1f B/position",
        manifest.metrics["tokens"], manifest.metrics["bytes_per_token"],
    )  # fmt: skip
    return manifest


def _stored_k(c, vocab: int) -> int:
    """How many log-probs per position the cache stores (`c`: the `cache_teacher` params)."""
    k = vocab if c.full_vocab else min(c.top_k, vocab)
    if c.top_k > vocab and not c.full_vocab:
        log.warning(
            "cache_teacher.top_k=%d exceeds the vocabulary (%d); storing k=%d", c.top_k, vocab, k
        )
    return k


def _side_dir(cfg: Params, refs: list, checkpoint_dir: Path) -> Path:
    """The folder of completed shards of an earlier, interrupted run with the same inputs and
    parameters (created if new)."""
    key = {
        "format": tc.FORMAT,
        "params": cfg.section("cache_teacher"),
        "max_seq_len": cfg.prepare.max_seq_len,
        "inputs": [r.content_sha256 for r in refs],
    }
    side = Path(checkpoint_dir) / json_sha256(key)[:16]
    side.mkdir(parents=True, exist_ok=True)
    return side


def _shard_name(s: int) -> str:
    return f"shard_{s:05d}.safetensors"


def _shard(model, tokenizer, chunk, side: Path, s: int, *, device, cfg: Params, k: int) -> dict:
    """Shard `s` in `side`: reused when an earlier run completed it (its hash checks out),
    else computed and written. Returns its record {sha256, lengths, payload_bytes}."""
    name = _shard_name(s)
    done_json = side / f"shard_{s:05d}.json"
    done = json.loads(done_json.read_text()) if done_json.is_file() else None
    if done is not None and (side / name).is_file() and sha256_file(side / name) == done["sha256"]:
        log.debug("reusing %s", side / name)
        return done
    first = s * cfg.cache_teacher.shard_sequences
    gen = torch.Generator(device).manual_seed(seed_for(cfg.seed, "tail-samples", s))
    rows = teacher_rows(model, tokenizer, chunk, device, cfg.cache_teacher, k, gen)
    sha = tc.write_shard(side / name, tc.concat(rows), {"first_sequence": str(first)})
    done = {
        "sha256": sha,
        "lengths": [len(r) for r in rows],
        "payload_bytes": sum(r.payload_bytes() for r in rows),
    }
    write_json_atomic(done_json, done)
    return done


def _index_rows(chunk, first: int, name: str, done: dict) -> list[dict]:
    """One index row per sequence of a shard: where its positions lie in the shard."""
    rows, offset = [], 0
    for j, (seq, length) in enumerate(zip(chunk, done["lengths"], strict=True)):
        rows.append(
            {
                "seq": first + j,
                "sequence_id": seq.id,
                "tokens_sha256": tc.sequence_sha256(seq),
                "shard": f"{tc.SHARDS}/{name}",
                "offset": offset,
                "length": length,
                "shard_sha256": done["sha256"],
            }
        )
        offset += length
    return rows


def _publish(
    cfg: Params,
    out_dir: Path,
    side: Path,
    refs: list,
    index_rows: list[dict],
    shard_meta: list[dict],
    shape: dict,
    fingerprint: dict,
    device: str,
) -> Manifest:
    """Copy the shards into the artifact (re-verifying each copy), write the index, cache.json,
    the metrics and the manifest. `shape`: k, vocab and the number of sequences."""
    c = cfg.cache_teacher
    k, vocab = shape["k"], shape["vocab"]
    positions = sum(r["length"] for r in index_rows)
    payload = sum(m["payload_bytes"] for m in shard_meta)
    with atomic_artifact(out_dir, stage="cache_teacher", kind="teacher_cache") as w:
        w.inputs.extend(refs)
        (w.dir / tc.SHARDS).mkdir()
        tail_sum, tail_max = 0.0, 0.0
        for s, meta in enumerate(shard_meta):
            name = _shard_name(s)
            shutil.copyfile(side / name, w.dir / tc.SHARDS / name)
            rows = tc.read_shard(w.dir / tc.SHARDS / name, meta["sha256"])  # verify the copy
            tail_N = tc.tail_mass(rows)
            tail_sum += float(tail_N.sum())
            tail_max = max(tail_max, float(tail_N.max()) if len(tail_N) else 0.0)
        pl.DataFrame(index_rows).write_parquet(w.dir / tc.INDEX)
        meta = {
            "format": tc.FORMAT,
            "k": k,
            "full_vocab": c.full_vocab,
            "tail_samples": 0 if c.full_vocab or k >= vocab else c.tail_samples,
            "temperature": c.temperature,
            "vocab_size": vocab,
            "ids_dtype": None if c.full_vocab else str(tc.ids_dtype(vocab)).removeprefix("torch."),
            "positions": "t where labels[t+1] != -100 (next token trained on)",
            "max_seq_len": cfg.prepare.max_seq_len,
            "tokenizer": fingerprint,
            "teacher_sha256": refs[0].content_sha256,
        }
        write_json_atomic(w.dir / tc.CACHE_JSON, meta)
        w.outputs = {
            tc.SHARDS: "teacher_cache",
            tc.INDEX: "teacher_cache",
            tc.CACHE_JSON: "teacher_cache",
        }
        file_bytes = (
            sum(p.stat().st_size for p in (w.dir / tc.SHARDS).iterdir())
            + (w.dir / tc.INDEX).stat().st_size
        )
        w.metrics = {
            "sequences": shape["n_sequences"],
            "tokens": positions,
            "shards": len(shard_meta),
            "k": k,
            "full_vocab": c.full_vocab,
            "tail_samples": meta["tail_samples"],
            "temperature": c.temperature,
            "bytes_per_token": payload / max(positions, 1),
            "file_bytes_per_token": file_bytes / max(positions, 1),
            "bytes_per_token_goal": 4 * k + 16,
            "tail_mass_mean": tail_sum / max(positions, 1),
            "tail_mass_max": tail_max,
            "teacher_sha256": refs[0].content_sha256,
            **fingerprint,
        }
        return w.finish(
            params=cfg.section("cache_teacher"),
            params_sha256=cfg.section_sha256("cache_teacher"),
            seed=cfg.seed,
            device=device,
        )


@torch.no_grad()
def teacher_rows(
    model, tokenizer, chunk, device, c, k: int, generator: torch.Generator | None = None
) -> list[tc.TeacherRows]:
    """One `TeacherRows` per sequence: the teacher's rows at the positions distill trains on
    (the LM head runs on those positions only). `c`: the `cache_teacher` params."""
    out: list[tc.TeacherRows] = []
    for start in range(0, len(chunk), c.batch_size):
        batch = chunk[start : start + c.batch_size]
        ids_B_T, mask_B_T, labels_B_T = pad_batch(batch, pad_id(tokenizer))
        keep_B_T = F.pad(labels_B_T[:, 1:] != IGNORE, (0, 1), value=False)  # t predicts t+1
        logits_N_V = logits_at(model, keep_B_T.to(device), ids_B_T.to(device), mask_B_T.to(device))
        counts = keep_B_T.sum(-1).tolist()
        for logits_n_V in logits_N_V.split(counts):
            out.append(
                tc.encode(logits_n_V, temperature=c.temperature, k=k, full_vocab=c.full_vocab,
                          tail_samples=c.tail_samples, generator=generator)
            )  # fmt: skip
    return out
