"""The teacher-cache format: round trip, dtypes, size, exactness of the tail, corruption, mismatch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retroloop import teacher_cache as tc
from retroloop.errors import ArtifactError, MismatchError
from retroloop.losses import distill_loss
from retroloop.sequences import IGNORE, Sequence


def _logits(n: int = 12, V: int = 50, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale


def test_a_bf16_teachers_rows_are_computed_in_fp32() -> None:
    """`dtype: bfloat16`: the log-softmax, top-k and log-sum-exp run on fp32 copies of the
    logits (a bf16 log-softmax keeps ~3 significant digits of each log p and of the top-k
    mass). Dropping the upcast moved the tiny bf16 lane's distilled KL by 0.004, inside the
    kernels' spread, so it is held here, bit for bit."""
    logits = _logits(V=512, scale=4.0).to(torch.bfloat16)
    kw = dict(temperature=1.0, k=16, full_vocab=False, tail_samples=2)
    got = tc.encode(logits, **kw, generator=torch.Generator().manual_seed(1)).tensors()
    want = tc.encode(logits.float(), **kw, generator=torch.Generator().manual_seed(1)).tensors()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_encode_keeps_topk_ids_as_uint16_and_the_exact_topk_mass() -> None:
    logits = _logits()
    rows = tc.encode(logits, temperature=2.0, k=8, full_vocab=False)
    assert rows.ids_N_K.dtype == torch.uint16 and rows.logprobs_N_K.dtype == torch.float16
    assert rows.lse_N.dtype == torch.float32
    logp = F.log_softmax(logits / 2.0, -1)
    top = logp.topk(8, -1)
    assert torch.equal(rows.ids_N_K.long(), top.indices)
    torch.testing.assert_close(rows.lse_N, torch.logsumexp(top.values, -1))
    # Renormalised fp32 log-probs carry exactly the top-k mass, within fp16 of the truth.
    fixed = rows.teacher_logprobs()
    torch.testing.assert_close(torch.logsumexp(fixed, -1), rows.lse_N, atol=1e-6, rtol=0)
    torch.testing.assert_close(fixed, top.values, atol=1e-2, rtol=0)


def test_ids_dtype_widens_past_65536() -> None:
    assert tc.ids_dtype(65_536) == torch.uint16
    assert tc.ids_dtype(65_537) == torch.int32
    assert tc.bytes_per_position(64, 49_152, False) == 4 * 64 + 4
    assert tc.bytes_per_position(64, 100_000, False) == 6 * 64 + 4
    assert tc.bytes_per_position(64, 512, True) == 4 * 512
    assert tc.bytes_per_position(64, 49_152, False, tail_samples=3) == 4 * 64 + 16  # the goal


def test_shard_round_trip_is_identical_and_bytes_per_token_is_4k_plus_4(tmp_path) -> None:
    rows = tc.concat(
        [tc.encode(_logits(seed=s), temperature=1.0, k=16, full_vocab=False) for s in range(3)]
    )
    sha = tc.write_shard(tmp_path / "s.safetensors", rows)
    back = tc.read_shard(tmp_path / "s.safetensors", sha)
    for a, b in zip(rows.tensors().values(), back.tensors().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert back.ids_N_K.dtype == torch.uint16
    assert rows.payload_bytes() / len(rows) == 4 * 16 + 4 == tc.bytes_per_position(16, 50, False)


def test_tail_samples_come_from_outside_the_topk_with_their_teacher_logprobs(tmp_path) -> None:
    logits = _logits(n=40, V=60, scale=1.0)
    gen = torch.Generator().manual_seed(7)
    rows = tc.encode(logits, temperature=1.0, k=8, full_vocab=False, tail_samples=5, generator=gen)
    assert rows.tail_ids_N_S.shape == (40, 5) and rows.tail_ids_N_S.dtype == torch.uint16
    assert rows.tail_logprobs_N_S.dtype == torch.float16
    tail_ids = rows.tail_ids_N_S.long()
    assert not (tail_ids[:, :, None] == rows.ids_N_K.long()[:, None, :]).any()  # never a top-k id
    logp = F.log_softmax(logits, -1)
    torch.testing.assert_close(rows.tail_logprobs_N_S.float(), logp.gather(-1, tail_ids), atol=1e-2, rtol=0)  # fmt: skip
    assert rows.payload_bytes() / len(rows) == tc.bytes_per_position(8, 60, False, 5)
    sha = tc.write_shard(tmp_path / "s.safetensors", rows)
    back = tc.read_shard(tmp_path / "s.safetensors", sha)
    assert torch.equal(back.tail_ids_N_S, rows.tail_ids_N_S)
    assert torch.equal(back.slice(3, 9).tail_logprobs_N_S, rows.tail_logprobs_N_S[3:9])
    # Same generator seed, same draws (a recomputed shard is bit-identical).
    again = tc.encode(logits, temperature=1.0, k=8, full_vocab=False, tail_samples=5,
                      generator=torch.Generator().manual_seed(7))  # fmt: skip
    assert torch.equal(again.tail_ids_N_S, rows.tail_ids_N_S)


def test_sampled_tail_forward_kl_is_unbiased_in_value_and_gradient() -> None:
    """Averaged over many independent draws, top-k + sampled-tail forward KL and its gradient
    match the exact ones, where the top-k + bucket value stays below (a lower bound)."""
    from retroloop.losses import distill_loss_sums

    N, V, k, S, draws = 6, 40, 4, 8, 400
    teacher = _logits(n=N, V=V, seed=1, scale=1.0)
    student = _logits(n=N, V=V, seed=2, scale=1.0).requires_grad_(True)
    targets = torch.zeros(N, dtype=torch.long)
    kw = dict(alpha=0.0, temperature=1.0, kind="forward_kl")

    def value_and_grad(**teacher_kw) -> tuple[float, torch.Tensor]:
        student.grad = None
        loss, _, kl = distill_loss_sums(student, targets, **kw, **teacher_kw)
        loss.backward()
        return float(kl.detach()), student.grad.clone()

    exact, g_exact = value_and_grad(teacher_logits_N_V=teacher)
    gen = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(draws):
        r = tc.encode(
            teacher, temperature=1.0, k=k, full_vocab=False, tail_samples=S, generator=gen
        )
        got = tc.batch_rows([r], torch.ones(1, N, dtype=torch.bool))
        v, g = value_and_grad(**got)
        values.append(v)
        grads.append(g)
    bucket, _ = value_and_grad(**{n: t for n, t in got.items() if "tail" not in n})
    mean_value, mean_grad = sum(values) / draws, torch.stack(grads).mean(0)
    assert bucket < 0.9 * exact  # the bucket alone is far below at k = 4
    assert mean_value == pytest.approx(exact, rel=0.02)
    torch.testing.assert_close(mean_grad, g_exact, atol=0.01, rtol=0)


def test_full_vocab_round_trip(tmp_path) -> None:
    rows = tc.encode(_logits(), temperature=1.0, k=8, full_vocab=True)
    assert (
        rows.full_vocab
        and rows.logprobs_N_K.dtype == torch.float32
        and rows.logprobs_N_K.shape == (12, 50)
    )
    sha = tc.write_shard(tmp_path / "s.safetensors", rows)
    back = tc.read_shard(tmp_path / "s.safetensors", sha)
    assert back.full_vocab and torch.equal(back.logprobs_N_K, rows.logprobs_N_K)


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_corrupted_shard_is_named(tmp_path, how: str) -> None:
    path = tmp_path / "shard_00000.safetensors"
    sha = tc.write_shard(path, tc.encode(_logits(), temperature=1.0, k=4, full_vocab=False))
    blob = bytearray(path.read_bytes())
    if how == "flip":
        blob[-3] ^= 0xFF
    else:
        blob = blob[: len(blob) // 2]
    path.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match=r"shard_00000\.safetensors.*corrupted or truncated"):
        tc.read_shard(path, sha)


def _kl_pair(k: int, full_vocab: bool, T: float = 1.5):
    """(KL from the cache path, exact KL) on random teacher/student logits with some masking."""
    B, Tn, V = 2, 7, 40
    g = torch.Generator().manual_seed(1)
    teacher_B_T_V = torch.randn(B, Tn, V, generator=g) * 3
    student_B_T_V = torch.randn(B, Tn, V, generator=g) * 3
    labels_B_T = torch.randint(0, V, (B, Tn), generator=g)
    labels_B_T[0, :3] = IGNORE
    labels_B_T[1, 5:] = IGNORE
    mask_B_T = labels_B_T != IGNORE
    rows = [
        tc.encode(teacher_B_T_V[b][mask_B_T[b]], temperature=T, k=k, full_vocab=full_vocab)
        for b in range(B)
    ]
    logp_B_T_K, ids_B_T_K = tc.scatter_rows(rows, mask_B_T)
    common = dict(alpha=0.0, temperature=T, kind="forward_kl")
    if ids_B_T_K is None:
        _, cached = distill_loss(
            student_B_T_V, labels_B_T, teacher_logits_B_T_V=logp_B_T_K * T, **common
        )
    else:
        _, cached = distill_loss(
            student_B_T_V,
            labels_B_T,
            teacher_topk_logprobs_B_T_K=logp_B_T_K,
            teacher_topk_ids_B_T_K=ids_B_T_K,
            **common,
        )
    _, exact = distill_loss(student_B_T_V, labels_B_T, teacher_logits_B_T_V=teacher_B_T_V, **common)
    return cached["kl"], exact["kl"]


def test_topk_tail_kl_equals_exact_kl_when_k_is_the_vocabulary() -> None:
    cached, exact = _kl_pair(k=40, full_vocab=False)
    assert cached == pytest.approx(exact, rel=2e-3)  # fp16 log-probs, exact fp32 mass


def test_full_vocab_cache_gives_the_exact_kl() -> None:
    cached, exact = _kl_pair(k=8, full_vocab=True)
    assert cached == pytest.approx(exact, rel=1e-5)


def test_topk_tail_kl_is_a_lower_bound_for_small_k() -> None:
    # Bucketing (data-processing inequality): the (k+1)-outcome KL never exceeds the exact one.
    cached, exact = _kl_pair(k=5, full_vocab=False)
    assert 0.0 < cached <= exact + 1e-3


def test_scatter_puts_rows_only_at_trained_positions_and_masked_positions_contribute_nothing() -> (
    None
):
    V = 30
    g = torch.Generator().manual_seed(2)
    labels_B_T = torch.randint(0, V, (1, 6), generator=g)
    labels_B_T[0, :2] = IGNORE
    mask_B_T = labels_B_T != IGNORE
    rows = [
        tc.encode(
            torch.randn(int(mask_B_T.sum()), V, generator=g), temperature=1.0, k=6, full_vocab=False
        )
    ]
    logp_B_T_K, ids_B_T_K = tc.scatter_rows(rows, mask_B_T)
    assert torch.all(logp_B_T_K[~mask_B_T] == 0) and torch.all(ids_B_T_K[~mask_B_T] == 0)
    student = torch.randn(1, 6, V, generator=g)
    _, base = distill_loss(student, labels_B_T, alpha=0.5, temperature=1.0, kind="forward_kl",
                           teacher_topk_logprobs_B_T_K=logp_B_T_K, teacher_topk_ids_B_T_K=ids_B_T_K)  # fmt: skip
    student[0, :2] = 1e4  # garbage at masked positions changes nothing
    _, same = distill_loss(student, labels_B_T, alpha=0.5, temperature=1.0, kind="forward_kl",
                           teacher_topk_logprobs_B_T_K=logp_B_T_K, teacher_topk_ids_B_T_K=ids_B_T_K)  # fmt: skip
    assert base == same


def test_target_mask_follows_the_next_label() -> None:
    assert tc.target_mask([IGNORE, IGNORE, 5, 6]).tolist() == [False, True, True]


class _Tok:
    """The three things `tokenizer_fingerprint` reads."""

    def __init__(self, vocab: dict[str, int], template: str) -> None:
        self._vocab, self.chat_template = vocab, template

    def get_vocab(self) -> dict[str, int]:
        return self._vocab

    def __len__(self) -> int:
        return len(self._vocab)


def test_a_student_with_another_chat_template_or_vocab_is_refused() -> None:
    from retroloop.models.loading import tokenizer_fingerprint

    teacher = _Tok({"a": 0, "b": 1}, "{{ messages }}")
    meta = {"tokenizer": tokenizer_fingerprint(teacher)}
    tc.check_compatible(meta, _Tok({"a": 0, "b": 1}, "{{ messages }}"), "cache")
    with pytest.raises(MismatchError, match="chat template"):
        tc.check_compatible(meta, _Tok({"a": 0, "b": 1}, "{{ other }}"), "cache")
    with pytest.raises(MismatchError, match="tokenizer vocabulary"):
        tc.check_compatible(meta, _Tok({"a": 0, "c": 1}, "{{ messages }}"), "cache")
    with pytest.raises(MismatchError, match="vocabulary size"):
        tc.check_compatible(meta, _Tok({"a": 0, "b": 1, "c": 2}, "{{ messages }}"), "cache")


def test_sequence_hash_sees_labels_and_tokens() -> None:
    a = Sequence("x", [1, 2, 3], [IGNORE, 2, 3])
    assert tc.sequence_sha256(a) != tc.sequence_sha256(Sequence("x", [1, 2, 3], [1, 2, 3]))
    assert tc.sequence_sha256(a) == tc.sequence_sha256(Sequence("y", [1, 2, 3], [IGNORE, 2, 3]))
