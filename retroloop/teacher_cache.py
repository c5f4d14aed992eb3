"""The teacher cache: top-k (+ tail) next-token distributions of the teacher, on disk.

DESIGN.md §5 "Distillation loss": keep the k largest teacher log-probs at temperature T and
their ids, plus enough to put the remaining mass in one tail bucket, and compare on k + 1
outcomes. Per stored position this module keeps

- `logprobs` fp16 `[N, K]`: log p_k = z_k/T − logsumexp_v(z_v/T), the k largest, descending;
- `ids` uint16 `[N, K]` (int32 when the vocabulary exceeds 65,536): their token ids;
- `lse` fp32 `[N]`: log Σ_k p_k, the log of the top-k mass, computed in fp32 before rounding,
  so the tail mass 1 − exp(lse) is exact to fp32 even though each log p_k is fp16.

- optionally (`tail_samples` = S > 0) `tail_ids` `[N, S]` and `tail_logprobs` fp16 `[N, S]`:
  S ids drawn with replacement from the teacher's distribution restricted to its tail (every
  id outside the top k, probabilities renormalised by the tail mass m = 1 − Σ_k p_k), and
  their log p. They make the forward KL's tail term an unbiased estimate instead of the
  bucket's lower bound (`losses.distill_loss_sums`; the "sparse logit sampling" argument of
  Anshumann et al. 2025, arXiv:2503.16870: top-k alone biases both value and gradient).

That is 4·k + 4 (+ 4·S) bytes per position. `full_vocab: true` instead stores the exact fp32
log-softmax over the whole vocabulary (`logprobs` `[N, V]`, no ids / lse): 4·V bytes, for
small vocabularies and tests.

Which positions: only those whose next token is trained on, i.e. position t of a sequence
is stored iff `labels[t + 1] != -100` (HF labels, `retroloop.sequences`). In the pre-shifted
convention of `retroloop.losses.distill_loss` (logits[:, :-1] predict labels[:, 1:]) these are
exactly the rows selected by `labels[:, 1:] != -100`, in row-major order, so `scatter_rows`
puts a batch's cached rows back in place. Prompt positions cost nothing on disk.

Layout of the artifact directory:
    shards/shard_00000.safetensors   the rows of `shard_sequences` consecutive sequences
    index.parquet                    seq, sequence_id, tokens_sha256, shard, offset, length, shard_sha256
    cache.json                       format, k, temperature, vocab, ids dtype, tokenizer fingerprint
Every shard is hashed once, when first opened (memory-mapped); a corrupted or truncated one raises `ArtifactError`
naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import PreTrainedTokenizerBase

from retroloop.artifacts import contained, sha256_file
from retroloop.canonical import canonical_safetensors_bytes
from retroloop.errors import ArtifactError, MismatchError
from retroloop.models.loading import tokenizer_fingerprint
from retroloop.sequences import IGNORE, Sequence

FORMAT = "retroloop.teacher_cache/1"
CACHE_JSON = "cache.json"
INDEX = "index.parquet"
SHARDS = "shards"
_UINT16_MAX_VOCAB = 65_536


_FIELDS = {  # safetensors name → TeacherRows attribute
    "logprobs": "logprobs_N_K",
    "ids": "ids_N_K",
    "lse": "lse_N",
    "tail_ids": "tail_ids_N_S",
    "tail_logprobs": "tail_logprobs_N_S",
}


@dataclass(frozen=True)
class TeacherRows:
    """Cached teacher rows for consecutive positions (one sequence or a whole shard).

    Top-k mode: `logprobs_N_K` fp16, `ids_N_K` uint16/int32, `lse_N` fp32, and with tail
    samples `tail_ids_N_S` (ids dtype) + `tail_logprobs_N_S` fp16.
    Full-vocabulary mode: `logprobs_N_K` fp32 with K = V, every other field None.
    """

    logprobs_N_K: torch.Tensor
    ids_N_K: torch.Tensor | None = None
    lse_N: torch.Tensor | None = None
    tail_ids_N_S: torch.Tensor | None = None
    tail_logprobs_N_S: torch.Tensor | None = None

    @property
    def full_vocab(self) -> bool:
        return self.ids_N_K is None

    def __len__(self) -> int:
        return self.logprobs_N_K.shape[0]

    def slice(self, start: int, stop: int) -> TeacherRows:
        return TeacherRows(**{a: None if t is None else t[start:stop] for a, t in self._fields()})

    def _fields(self) -> list[tuple[str, torch.Tensor | None]]:
        return [(attr, getattr(self, attr)) for attr in _FIELDS.values()]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, a).contiguous() for n, a in _FIELDS.items() if getattr(self, a) is not None}  # fmt: skip

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> TeacherRows:
        return cls(**{a: tensors.get(n) for n, a in _FIELDS.items()})

    def payload_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def teacher_logprobs(self) -> torch.Tensor:
        """fp32 log-probs `[N, K]` whose top-k mass is exactly exp(lse).

        Each fp16 log p_k is off by up to ~|log p_k|·2⁻¹¹; shifting all k by the same
        δ = lse − logsumexp_k(log p_k) restores the exact top-k mass (so the tail bucket
        1 − Σ_k p_k that `losses.teacher_topk_tail` derives is exact) and keeps the ratios.
        """
        logp_N_K = self.logprobs_N_K.float()
        if self.full_vocab:
            return logp_N_K
        return logp_N_K + (self.lse_N[:, None] - torch.logsumexp(logp_N_K, -1, keepdim=True))


def ids_dtype(vocab_size: int) -> torch.dtype:
    """uint16 holds every id of a vocabulary up to 65,536 entries; int32 otherwise."""
    return torch.uint16 if vocab_size <= _UINT16_MAX_VOCAB else torch.int32


def bytes_per_position(k: int, vocab_size: int, full_vocab: bool, tail_samples: int = 0) -> int:
    """Payload bytes per cached position: (2 + id bytes)·(k + S) + 4 (fp32 lse), or 4V."""
    if full_vocab:
        return 4 * vocab_size
    id_bytes = torch.empty((), dtype=ids_dtype(vocab_size)).element_size()
    return (2 + id_bytes) * (k + tail_samples) + 4


def target_mask(labels_T: torch.Tensor | list[int]) -> torch.Tensor:
    """Bool `[T-1]`: position t is cached iff its next token `labels[t+1]` is trained on."""
    return torch.as_tensor(labels_T)[1:] != IGNORE


def encode(
    logits_N_V: torch.Tensor,
    *,
    temperature: float,
    k: int,
    full_vocab: bool,
    tail_samples: int = 0,
    generator: torch.Generator | None = None,
) -> TeacherRows:
    """Teacher logits (any device) → cached rows on the CPU (see the module docstring).

    The log-softmax, top-k and log-sum-exp run in fp32 where the logits are; only the k
    values are rounded to fp16, after the top-k mass has been taken from them in fp32.
    Tail samples are drawn with `generator` (on the logits' device) from p restricted to
    the ids outside the top k; a row whose tail mass is 0 in fp32 draws uniformly (its tail
    term is then multiplied by m = 0).
    """
    logp_N_V = torch.log_softmax(logits_N_V.float() / temperature, dim=-1)
    if full_vocab:
        return TeacherRows(logp_N_V.cpu().contiguous())
    V = logp_N_V.shape[-1]
    k = min(k, V)
    top = logp_N_V.topk(k, dim=-1)  # sorted, descending
    lse_N = torch.logsumexp(top.values, dim=-1)
    dtype = ids_dtype(V)
    rows = {"logprobs_N_K": top.values.half().cpu(), "ids_N_K": top.indices.cpu().to(dtype),
            "lse_N": lse_N.cpu()}  # fmt: skip
    if tail_samples > 0 and k < V and len(logp_N_V):
        weights_N_V = logp_N_V.exp().scatter(-1, top.indices, 0.0)
        empty_N = weights_N_V.sum(-1) <= 0
        if empty_N.any():
            weights_N_V[empty_N] = 1.0
            weights_N_V[empty_N] = weights_N_V[empty_N].scatter(-1, top.indices[empty_N], 0.0)
        tail_ids_N_S = torch.multinomial(weights_N_V, tail_samples, replacement=True, generator=generator)  # fmt: skip
        rows["tail_ids_N_S"] = tail_ids_N_S.cpu().to(dtype)
        rows["tail_logprobs_N_S"] = logp_N_V.gather(-1, tail_ids_N_S).half().cpu()
    return TeacherRows(**rows)


def concat(rows: list[TeacherRows]) -> TeacherRows:
    fields = [a for a, t in rows[0]._fields() if t is not None]
    return TeacherRows(**{a: torch.cat([getattr(r, a) for r in rows]) for a in fields})


def batch_rows(rows: list[TeacherRows], mask_B_T: torch.Tensor) -> dict[str, torch.Tensor]:
    """A batch's cached rows in the row-major order of the True entries of `mask_B_T`.

    `mask_B_T` is `labels[:, 1:] != -100` of the padded batch (pre-shifted convention), so row
    n here is the position `logits[:, :-1][mask_B_T][n]` predicts from. Returns the keyword
    arguments of `losses.distill_loss_sums`: `teacher_logits_N_V` (full-vocabulary cache: the
    exact log-probs, which log_softmax leaves unchanged at T = 1 — the caller scales by T), or
    `teacher_topk_logprobs_N_K` fp32 (`TeacherRows.teacher_logprobs`) + int64
    `teacher_topk_ids_N_K` [+ `teacher_tail_logprobs_N_S` fp32, `teacher_tail_ids_N_S` int64].
    """
    assert len(rows) == mask_B_T.shape[0]
    for b, r in enumerate(rows):
        n = int(mask_B_T[b].sum())
        assert len(r) == n, f"sequence {b}: {len(r)} cached rows but {n} trainable positions"
    flat = concat(rows)
    if flat.full_vocab:
        return {"teacher_logits_N_V": flat.teacher_logprobs()}
    out = {"teacher_topk_logprobs_N_K": flat.teacher_logprobs(), "teacher_topk_ids_N_K": flat.ids_N_K.long()}  # fmt: skip
    if flat.tail_ids_N_S is not None:
        out["teacher_tail_logprobs_N_S"] = flat.tail_logprobs_N_S.float()
        out["teacher_tail_ids_N_S"] = flat.tail_ids_N_S.long()
    return out


def scatter_rows(
    rows: list[TeacherRows], mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Top-k log-probs `[B, T, K]` and ids `[B, T, K]` (None for a full-vocabulary cache) at
    the True entries of `mask_B_T`, 0 elsewhere: `batch_rows` in `losses.distill_loss` layout."""
    got = batch_rows(rows, mask_B_T)
    logp_N_K = got.get("teacher_topk_logprobs_N_K", got.get("teacher_logits_N_V"))
    B, T = mask_B_T.shape
    logp_B_T_K = logp_N_K.new_zeros(B, T, logp_N_K.shape[-1])
    logp_B_T_K[mask_B_T] = logp_N_K
    if "teacher_topk_ids_N_K" not in got:
        return logp_B_T_K, None
    ids_B_T_K = torch.zeros(B, T, logp_N_K.shape[-1], dtype=torch.long)
    ids_B_T_K[mask_B_T] = got["teacher_topk_ids_N_K"]
    return logp_B_T_K, ids_B_T_K


def sequence_sha256(seq: Sequence) -> str:
    """Hash of a sequence's tokens and labels: the cache is only valid for identical sequences."""
    blob = json.dumps([seq.input_ids, seq.labels], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- shards


def write_shard(path: Path, rows: TeacherRows, meta: dict[str, str] | None = None) -> str:
    """Write one safetensors shard atomically (temp name, then rename); return its sha256.
    The header is in canonical order: safetensors writes metadata in a per-process order."""
    blob = st_save(rows.tensors(), metadata={"format": FORMAT, **(meta or {})})
    blob = canonical_safetensors_bytes(blob)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return hashlib.sha256(blob).hexdigest()


def read_shard(path: Path, expected_sha256: str) -> TeacherRows:
    """Read a whole shard, checking its sha256 first (a flipped byte or a truncation is named)."""
    _check_shard(Path(path), expected_sha256)
    return TeacherRows.from_tensors(st_load(Path(path).read_bytes()))


def _check_shard(path: Path, expected_sha256: str) -> None:
    """ArtifactError naming `path` when it is missing or its sha256 is not the index's."""
    if not path.is_file():
        raise ArtifactError(
            f"{path}: teacher-cache shard is missing; rerun `retroloop stage cache_teacher`"
        )
    if sha256_file(path) != expected_sha256:
        raise ArtifactError(
            f"{path}: teacher-cache shard is corrupted or truncated (sha256 differs from index.parquet); "
            "rerun `retroloop stage cache_teacher`"
        )


# --------------------------------------------------------------------------- reader


def check_compatible(
    cache_meta: dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str
) -> None:
    """Refuse a student whose tokenizer, vocabulary or chat template differs from the teacher's.

    A mismatch silently misaligns the cached ids (or biases chat-formatted log-probs), so it
    is an error, never a warning.
    """
    student = tokenizer_fingerprint(tokenizer)
    teacher = cache_meta["tokenizer"]
    for key, what in (
        ("vocab_size", "vocabulary size"),
        ("tokenizer_sha256", "tokenizer vocabulary"),
        ("chat_template_sha256", "chat template"),
    ):
        if student[key] != teacher[key]:
            t, s = str(teacher[key])[:12], str(student[key])[:12]
            raise MismatchError(
                f"{where}: {what} of the student ({s}) differs from the teacher's ({t}); "
                "distil only into a student with the teacher's tokenizer and chat template, "
                "or rebuild the cache with a matching teacher"
            )


class TeacherCache:
    """Read side of the cache: metadata, compatibility checks and rows per sequence number."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / CACHE_JSON
        if not meta_path.is_file() or not (self.root / INDEX).is_file():
            raise ArtifactError(
                f"{self.root}: not a teacher cache (no {CACHE_JSON} / {INDEX}); run cache_teacher"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT:
            raise ArtifactError(
                f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}; rebuild it"
            )
        self.index = pl.read_parquet(self.root / INDEX).sort("seq")
        self._by_seq = {row["seq"]: row for row in self.index.iter_rows(named=True)}
        # Shards are memory-mapped once they pass their hash check, and `rows` copies out only
        # the requested slice: distill reads sequences in a shuffled order, so keeping "the
        # current shard" in memory would re-read (and re-hash) a shard per sequence.
        self._open: dict[str, Any] = {}

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def full_vocab(self) -> bool:
        return bool(self.meta["full_vocab"])

    @property
    def tail_samples(self) -> int:
        return int(self.meta.get("tail_samples", 0))

    def __len__(self) -> int:
        return self.index.height

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        check_compatible(self.meta, tokenizer, str(self.root))

    def check_sequences(self, seqs: list[Sequence]) -> None:
        """The student's training sequences must be the ones the teacher saw, in the same order."""
        if len(seqs) != len(self):
            raise MismatchError(
                f"{self.root}: the cache holds {len(self)} sequences but the training data gives "
                f"{len(seqs)}; rebuild the cache from the same datasets and max_seq_len"
            )
        for i, seq in enumerate(seqs):
            row = self._by_seq[i]
            if row["tokens_sha256"] != sequence_sha256(seq):
                raise MismatchError(
                    f"{self.root}: sequence {i} ({seq.id!r}) differs from the cached one "
                    f"({row['sequence_id']!r}); rebuild the cache from the same datasets and tokenizer"
                )

    def rows(self, seq: int) -> TeacherRows:
        """The cached rows of training sequence `seq` (its trained positions, in order)."""
        row = self._by_seq[seq]
        shard = self._shard(row["shard"], row["shard_sha256"])
        start, stop = row["offset"], row["offset"] + row["length"]
        return TeacherRows.from_tensors({n: shard.get_slice(n)[start:stop] for n in shard.keys()})

    def verify_all(self) -> None:
        """Hash every shard up front (a long run should not die at its first bad shard)."""
        for shard, sha in (
            self.index.select("shard", "shard_sha256").unique().sort("shard").iter_rows()
        ):
            self._shard(shard, sha)

    def _shard(self, shard: str, sha256: str) -> Any:
        if shard not in self._open:
            # index.parquet is data: a shard name like ../../x must not open files elsewhere.
            path = contained(self.root / shard, self.root)
            _check_shard(path, sha256)
            self._open[shard] = safe_open(path, framework="pt")
        return self._open[shard]


def tail_mass(rows: TeacherRows) -> torch.Tensor:
    """Per-position tail mass 1 − Σ_k p_k `[N]` fp64 (0 in full-vocabulary mode): what k leaves out."""
    if rows.full_vocab:
        return torch.zeros(len(rows), dtype=torch.float64)
    return -torch.expm1(rows.lse_N.double().clamp_max(0.0))
