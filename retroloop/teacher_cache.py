"""The teacher cache: top-k (+ tail) next-token distributions of the teacher, on disk.

DESIGN.md §5 "Distillation loss": keep the k largest teacher log-probs at temperature T and
their ids, plus enough to put the remaining mass in one tail bucket, and compare on k + 1
outcomes. Per stored position this module keeps

- `logprobs` fp16 `[N, K]`: log p_k = z_k/T − logsumexp_v(z_v/T), the k largest, descending;
- `ids` uint16 `[N, K]` (int32 when the vocabulary exceeds 65,536): their token ids;
- `lse` fp32 `[N]`: log Σ_k p_k, the log of the top-k mass, computed in fp32 before rounding,
  so the tail mass 1 − exp(lse) is exact to fp32 even though each log p_k is fp16.

That is 4·k + 4 bytes per position. `full_vocab: true` instead stores the exact fp32
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

from retroloop.artifacts import sha256_file
from retroloop.errors import ArtifactError, MismatchError
from retroloop.models.loading import tokenizer_fingerprint
from retroloop.sequences import IGNORE, Sequence

FORMAT = "retroloop.teacher_cache/1"
CACHE_JSON = "cache.json"
INDEX = "index.parquet"
SHARDS = "shards"
_UINT16_MAX_VOCAB = 65_536


@dataclass(frozen=True)
class TeacherRows:
    """Cached teacher rows for consecutive positions (one sequence or a whole shard).

    Top-k mode: `logprobs_N_K` fp16, `ids_N_K` uint16/int32, `lse_N` fp32.
    Full-vocabulary mode: `logprobs_N_K` fp32 with K = V, `ids_N_K` and `lse_N` None.
    """

    logprobs_N_K: torch.Tensor
    ids_N_K: torch.Tensor | None = None
    lse_N: torch.Tensor | None = None

    @property
    def full_vocab(self) -> bool:
        return self.ids_N_K is None

    def __len__(self) -> int:
        return self.logprobs_N_K.shape[0]

    def slice(self, start: int, stop: int) -> TeacherRows:
        cut = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return TeacherRows(self.logprobs_N_K[start:stop], cut(self.ids_N_K), cut(self.lse_N))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"logprobs": self.logprobs_N_K.contiguous()}
        if not self.full_vocab:
            out |= {"ids": self.ids_N_K.contiguous(), "lse": self.lse_N.contiguous()}
        return out

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


def bytes_per_position(k: int, vocab_size: int, full_vocab: bool) -> int:
    """Payload bytes per cached position: 2k (fp16) + 2k or 4k (ids) + 4 (fp32 lse), or 4V."""
    if full_vocab:
        return 4 * vocab_size
    return 2 * k + torch.empty((), dtype=ids_dtype(vocab_size)).element_size() * k + 4


def target_mask(labels_T: torch.Tensor | list[int]) -> torch.Tensor:
    """Bool `[T-1]`: position t is cached iff its next token `labels[t+1]` is trained on."""
    return torch.as_tensor(labels_T)[1:] != IGNORE


def encode(
    logits_N_V: torch.Tensor, *, temperature: float, k: int, full_vocab: bool
) -> TeacherRows:
    """Teacher logits (any device) → cached rows on the CPU (see the module docstring).

    The log-softmax, top-k and log-sum-exp run in fp32 where the logits are; only the k
    values are rounded to fp16, after the top-k mass has been taken from them in fp32.
    """
    logp_N_V = torch.log_softmax(logits_N_V.float() / temperature, dim=-1)
    if full_vocab:
        return TeacherRows(logp_N_V.cpu().contiguous())
    k = min(k, logp_N_V.shape[-1])
    top = logp_N_V.topk(k, dim=-1)  # sorted, descending
    lse_N = torch.logsumexp(top.values, dim=-1)
    ids_N_K = top.indices.cpu().to(ids_dtype(logp_N_V.shape[-1]))
    return TeacherRows(top.values.half().cpu(), ids_N_K, lse_N.cpu())


def concat(rows: list[TeacherRows]) -> TeacherRows:
    if rows[0].full_vocab:
        return TeacherRows(torch.cat([r.logprobs_N_K for r in rows]))
    return TeacherRows(
        torch.cat([r.logprobs_N_K for r in rows]),
        torch.cat([r.ids_N_K for r in rows]),
        torch.cat([r.lse_N for r in rows]),
    )


def batch_rows(
    rows: list[TeacherRows], mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's cached rows in the row-major order of the True entries of `mask_B_T`.

    `mask_B_T` is `labels[:, 1:] != -100` of the padded batch (pre-shifted convention), so row
    n here is the position `logits[:, :-1][mask_B_T][n]` predicts from. Returns fp32 log-probs
    `[N, K]` (`TeacherRows.teacher_logprobs`) and int64 ids `[N, K]` (None in full-vocabulary
    mode, where K = V and the ids are implicit).
    """
    assert len(rows) == mask_B_T.shape[0]
    for b, r in enumerate(rows):
        n = int(mask_B_T[b].sum())
        assert len(r) == n, f"sequence {b}: {len(r)} cached rows but {n} trainable positions"
    flat = concat(rows)
    return flat.teacher_logprobs(), None if flat.full_vocab else flat.ids_N_K.long()


def scatter_rows(
    rows: list[TeacherRows], mask_B_T: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`batch_rows` placed back at the True entries of `mask_B_T`: `[B, T, K]` (0 elsewhere)."""
    logp_N_K, ids_N_K = batch_rows(rows, mask_B_T)
    B, T = mask_B_T.shape
    logp_B_T_K = logp_N_K.new_zeros(B, T, logp_N_K.shape[-1])
    logp_B_T_K[mask_B_T] = logp_N_K
    if ids_N_K is None:
        return logp_B_T_K, None
    ids_B_T_K = torch.zeros(B, T, logp_N_K.shape[-1], dtype=torch.long)
    ids_B_T_K[mask_B_T] = ids_N_K
    return logp_B_T_K, ids_B_T_K


def sequence_sha256(seq: Sequence) -> str:
    """Hash of a sequence's tokens and labels: the cache is only valid for identical sequences."""
    blob = json.dumps([seq.input_ids, seq.labels], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- shards


def write_shard(path: Path, rows: TeacherRows, meta: dict[str, str] | None = None) -> str:
    """Write one safetensors shard atomically (temp name, then rename); return its sha256."""
    blob = st_save(rows.tensors(), metadata={"format": FORMAT, **(meta or {})})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return hashlib.sha256(blob).hexdigest()


def read_shard(path: Path, expected_sha256: str) -> TeacherRows:
    """Read a whole shard, checking its sha256 first (a flipped byte or a truncation is named)."""
    _check_shard(Path(path), expected_sha256)
    tensors = st_load(Path(path).read_bytes())
    return TeacherRows(tensors["logprobs"], tensors.get("ids"), tensors.get("lse"))


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
        part = {n: shard.get_slice(n)[start:stop] for n in ("logprobs", "ids", "lse") if n in shard.keys()}  # fmt: skip
        return TeacherRows(part["logprobs"], part.get("ids"), part.get("lse"))

    def verify_all(self) -> None:
        """Hash every shard up front (a long run should not die at its first bad shard)."""
        for shard, sha in (
            self.index.select("shard", "shard_sha256").unique().sort("shard").iter_rows()
        ):
            self._shard(shard, sha)

    def _shard(self, shard: str, sha256: str) -> Any:
        if shard not in self._open:
            path = self.root / shard
            _check_shard(path, sha256)
            self._open[shard] = safe_open(path, framework="pt")
        return self._open[shard]


def tail_mass(rows: TeacherRows) -> torch.Tensor:
    """Per-position tail mass 1 − Σ_k p_k `[N]` fp64 (0 in full-vocabulary mode): what k leaves out."""
    if rows.full_vocab:
        return torch.zeros(len(rows), dtype=torch.float64)
    return -torch.expm1(rows.lse_N.double().clamp_max(0.0))
