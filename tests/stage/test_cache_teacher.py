"""cache_teacher on the tiny model: manifest, exact rows, resume after a kill, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from helpers_distill import tiny, workdir  # noqa: F401  (fixture)

from retroloop import teacher_cache as tc
from retroloop.artifacts import read_manifest
from retroloop.errors import ArtifactError
from retroloop.models.loading import load_model, load_tokenizer, tokenizer_fingerprint
from retroloop.provenance import verify
from retroloop.sequences import pad_batch, training_sequences
from retroloop.stages import cache_teacher

CACHE = Path("data/cache_teacher")


def test_manifest_records_teacher_tokenizer_k_and_size(workdir) -> None:  # noqa: F811
    manifest = read_manifest(CACHE)
    assert manifest.kind == "teacher_cache" and not verify(CACHE)
    assert {r.role for r in manifest.inputs} == {"teacher", "train_instruct", "train_domain"}
    m = manifest.metrics
    teacher = load_tokenizer("data/prepare/model")
    assert {
        k: m[k] for k in ("vocab_size", "tokenizer_sha256", "chat_template_sha256")
    } == tokenizer_fingerprint(teacher)
    assert m["teacher_sha256"] == manifest.input("teacher").content_sha256
    assert m["k"] == 16 and m["temperature"] == 1.0 and m["tail_samples"] == 2
    assert m["bytes_per_token"] == 4 * (16 + 2) + 4 <= m["bytes_per_token_goal"]
    index = pl.read_parquet(CACHE / tc.INDEX)
    assert set(index.columns) >= {"seq", "sequence_id", "shard", "offset", "length", "shard_sha256"}
    assert index["length"].sum() == m["tokens"]
    shard = tc.read_shard(CACHE / index["shard"][0], index["shard_sha256"][0])
    assert shard.ids_N_K.dtype == torch.uint16 and shard.logprobs_N_K.dtype == torch.float16


def test_cached_rows_are_the_teachers_topk_at_the_trained_positions(workdir) -> None:  # noqa: F811
    cfg = tiny()
    tok = load_tokenizer("data/prepare/model")
    seqs = training_sequences(
        tok,
        pl.read_parquet("data/prepare/datasets/instruct_train.parquet"),
        pl.read_parquet("data/prepare/datasets/domain_train.parquet"),
        cfg.prepare.max_seq_len,
    )
    cache = tc.TeacherCache(CACHE)
    cache.check_sequences(seqs)
    model = load_model("data/prepare/model")
    for i in (0, len(seqs) - 1):  # a chat sequence (prompt masked) and a text one
        ids_B_T, mask_B_T, labels_B_T = pad_batch([seqs[i]], tok.pad_token_id)
        with torch.no_grad():
            logp_T_V = torch.log_softmax(
                model(input_ids=ids_B_T, attention_mask=mask_B_T).logits[0, :-1], -1
            )
        keep_T = tc.target_mask(labels_B_T[0])
        rows = cache.rows(i)
        assert len(rows) == int(keep_T.sum())
        fresh_N_V = logp_T_V[keep_T]
        # The k largest values, and the cached ids carry them (robust to near-ties swapping order).
        top = fresh_N_V.topk(cache.k, -1)
        torch.testing.assert_close(rows.teacher_logprobs(), top.values, atol=5e-3, rtol=0)
        at_ids = fresh_N_V.gather(-1, rows.ids_N_K.long())
        torch.testing.assert_close(rows.teacher_logprobs(), at_ids, atol=5e-3, rtol=0)
        # Tail draws: outside the top k, with the teacher's own log-probs.
        tail_ids = rows.tail_ids_N_S.long()
        assert not (tail_ids[:, :, None] == rows.ids_N_K.long()[:, None, :]).any()
        at_tail = fresh_N_V.gather(-1, tail_ids)
        torch.testing.assert_close(rows.tail_logprobs_N_S.float(), at_tail, atol=2e-2, rtol=0)


def test_a_killed_run_resumes_from_the_last_complete_shard(workdir, monkeypatch) -> None:  # noqa: F811
    cfg = tiny()
    out = Path("data/cache_teacher_resumed")

    def die_after(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(cache_teacher, "_after_shard", die_after)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher.run(cfg, out_dir=out)
    assert not out.exists()  # nothing half-written that looks whole
    side = next(Path("data/checkpoints/cache_teacher").iterdir())
    assert sorted(p.name for p in side.glob("*.safetensors")) == [
        "shard_00000.safetensors",
        "shard_00001.safetensors",
    ]

    computed: list[int] = []
    real = cache_teacher.teacher_rows
    monkeypatch.setattr(cache_teacher, "_after_shard", lambda index: None)
    monkeypatch.setattr(
        cache_teacher, "teacher_rows", lambda *a, **k: computed.append(1) or real(*a, **k)
    )
    manifest = cache_teacher.run(cfg, out_dir=out)
    assert len(computed) == manifest.metrics["shards"] - 2  # only the missing shard ran
    assert not side.exists() and not verify(out)
    # Same rows as the uninterrupted cache. Not bit-identical: BLAS results can differ in the last
    # ulp between runs (buffer alignment), which may reorder near-tied top-k entries of this
    # near-uniform random model, so compare the sorted values and the exact top-k mass.
    ref, got = tc.TeacherCache(CACHE), tc.TeacherCache(out)
    assert ref.index["length"].to_list() == got.index["length"].to_list()
    for i in range(len(ref)):
        a, b = ref.rows(i), got.rows(i)
        torch.testing.assert_close(
            b.logprobs_N_K.float(), a.logprobs_N_K.float(), atol=2e-3, rtol=0
        )
        torch.testing.assert_close(b.lse_N, a.lse_N, atol=1e-5, rtol=0)


def test_a_corrupted_shard_is_named_at_read_time(workdir) -> None:  # noqa: F811
    index = pl.read_parquet(CACHE / tc.INDEX)
    victim = index.filter(pl.col("seq") == index["seq"].max())
    path = CACHE / victim["shard"][0]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    cache = tc.TeacherCache(CACHE)
    cache.rows(0)  # other shards still read fine
    with pytest.raises(ArtifactError, match=path.name):
        cache.rows(int(victim["seq"][0]))
    with pytest.raises(ArtifactError, match="corrupted or truncated"):
        cache.verify_all()


def test_full_vocab_stores_the_whole_distribution(workdir) -> None:  # noqa: F811
    cfg = tiny(**{"cache_teacher.full_vocab": True})
    manifest = cache_teacher.run(cfg, out_dir=Path("data/cache_full"))
    meta = json.loads(Path("data/cache_full/cache.json").read_text())
    V = meta["vocab_size"]
    assert meta["full_vocab"] and meta["k"] == V and manifest.metrics["bytes_per_token"] == 4 * V
    rows = tc.TeacherCache("data/cache_full").rows(0)
    assert rows.full_vocab and rows.logprobs_N_K.shape[1] == V
    torch.testing.assert_close(
        rows.logprobs_N_K.logsumexp(-1), torch.zeros(len(rows)), atol=1e-5, rtol=0
    )
