"""Unit tests for retroloop.losses: every formula against a float64 numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retroloop.losses import (
    distill_loss,
    divergence_from_logprobs,
    entropy_from_logits,
    kl_terms,
    opd_advantages,
    opd_pg_loss,
    reverse_kl_single_sample,
    reverse_kl_topk_lower_bound,
    teacher_topk_tail,
    topk_tail_logprobs,
)

KINDS = ["forward_kl", "reverse_kl", "jsd", "tvd"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)) * scale


def _ref_divergence(p_T: np.ndarray, p_S: np.ndarray, kind: str, beta: float = 0.5) -> np.ndarray:
    """Float64 reference written straight from DESIGN.md §5 (probability space, 0·log 0 = 0)."""

    def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return kl(p_T, p_S)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return kl(p_S, p_T)
    if kind == "jsd":
        m = beta * p_T + (1 - beta) * p_S
        return beta * kl(p_T, m) + (1 - beta) * kl(p_S, m)
    return 0.5 * np.abs(p_T - p_S).sum(-1)


def _probs64(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    z = logits.double().numpy() / temperature
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------- divergences


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_divergence_is_zero_on_identical_distributions(kind: str, beta: float) -> None:
    logp = _logits(8, 50).log_softmax(-1)
    d = divergence_from_logprobs(logp, logp.clone(), kind, beta)
    assert d.shape == (8,)
    torch.testing.assert_close(d, torch.zeros(8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_divergence_matches_float64_reference(kind: str, beta: float) -> None:
    t, s = _logits(16, 40, seed=1), _logits(16, 40, seed=2)
    got = divergence_from_logprobs(t.log_softmax(-1), s.log_softmax(-1), kind, beta)
    want = _ref_divergence(_probs64(t), _probs64(s), kind, beta)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-6)


def test_kl_terms_sum_to_forward_kl_and_keep_zero_mass_finite() -> None:
    """The per-outcome terms are the one KL formula: summed per row they are forward KL (the
    reference and `divergence_from_logprobs`), and 0 · log 0 terms are 0, not NaN."""
    t, s = _logits(6, 9, seed=7), _logits(6, 9, seed=8)
    t[0, :3] = float("-inf")  # the teacher puts no mass on three outcomes
    t_logp, s_logp = t.log_softmax(-1), s.log_softmax(-1)
    terms = kl_terms(t_logp, s_logp)
    assert terms.shape == (6, 9) and terms.dtype == torch.float32
    assert torch.isfinite(terms).all() and (terms[0, :3] == 0).all()
    torch.testing.assert_close(terms.sum(-1), divergence_from_logprobs(t_logp, s_logp, "forward_kl"))  # fmt: skip
    want = _ref_divergence(_probs64(t), _probs64(s), "forward_kl")
    np.testing.assert_allclose(terms.sum(-1).double().numpy(), want, rtol=1e-5, atol=1e-7)


def test_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    t, s = _logits(16, 40, seed=3).log_softmax(-1), _logits(16, 40, seed=4).log_softmax(-1)
    fwd = divergence_from_logprobs(t, s, "forward_kl")
    rev = divergence_from_logprobs(t, s, "reverse_kl")
    torch.testing.assert_close(divergence_from_logprobs(t, s, "jsd", 0.0), fwd)
    torch.testing.assert_close(divergence_from_logprobs(t, s, "jsd", 1.0), rev)
    # ...and they are the limits of the formula: JSD(β)/β → KL(T‖S), JSD(β)/(1−β) → KL(S‖T).
    eps = 1e-4  # the first-order error is O(β·χ²), so β must be small for a 2% match
    near0 = divergence_from_logprobs(t, s, "jsd", eps) / eps
    near1 = divergence_from_logprobs(t, s, "jsd", 1 - eps) / eps
    torch.testing.assert_close(near0, fwd, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(near1, rev, rtol=2e-2, atol=1e-3)


def test_divergence_rejects_bad_arguments() -> None:
    logp = _logits(2, 5).log_softmax(-1)
    with pytest.raises(ValueError, match="beta"):
        divergence_from_logprobs(logp, logp, "jsd", 1.5)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence_from_logprobs(logp, logp, "kl", 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_impossible_outcomes_and_fully_masked_rows_give_no_nan(kind: str) -> None:
    # row 0: both fully masked; row 1: teacher puts 0 on half the vocabulary; row 2: plain.
    t_logits = _logits(3, 10, seed=5)
    t_logits[1, :5] = -math.inf
    s_logits = _logits(3, 10, seed=6)
    t = t_logits.log_softmax(-1)
    s = s_logits.log_softmax(-1)
    t[0] = -math.inf
    s[0] = -math.inf
    t.requires_grad_(True)
    s.requires_grad_(True)
    d = divergence_from_logprobs(t, s, kind, 0.5)
    d.sum().backward()
    assert torch.isfinite(d).all() and d[0] == 0
    assert torch.isfinite(t.grad).all() and torch.isfinite(s.grad).all()
    got = d.detach().double().numpy()
    want = _ref_divergence(_probs64(t_logits), _probs64(s_logits), kind)
    if kind == "reverse_kl":  # the student has mass where the teacher has none: KL = ∞,
        assert np.isinf(want[1]) and got[1] > 1e37  # reported as a huge finite number
        got[1] = want[1]
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- top-k + tail


def test_topk_tail_logprobs_are_normalised_and_accept_uint16_ids() -> None:
    logits = _logits(6, 30, seed=7)
    ids = logits.topk(4, dim=-1).indices
    out = topk_tail_logprobs(logits, ids.to(torch.uint16), temperature=2.0)
    assert out.shape == (6, 5) and out.dtype == torch.float32
    want = (logits / 2.0).log_softmax(-1).gather(-1, ids)
    torch.testing.assert_close(out[:, :4], want)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(6), atol=1e-6, rtol=0)


def test_tail_bucket_never_takes_log_of_zero() -> None:
    # Peaked logits: the top-1 mass is 1 in fp32, the tail underflows; gradients stay finite.
    logits = torch.tensor([[60.0, 0.0, 0.0, 0.0]], requires_grad=True)
    out = topk_tail_logprobs(logits, torch.tensor([[0]]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    # fp16 rounding can make the stored top-k mass exceed 1: the tail is floored, not NaN.
    cached = torch.log(torch.tensor([[0.6, 0.41]])).half()
    tail = teacher_topk_tail(cached)
    assert tail.dtype == torch.float32 and torch.isfinite(tail).all()
    assert tail[0, -1] == pytest.approx(math.log(torch.finfo(torch.float32).eps), abs=1e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_tail_with_k_equal_vocab_matches_exact(kind: str, temperature: float) -> None:
    V = 48
    t, s = _logits(32, V, seed=8), _logits(32, V, seed=9)
    t_logp = (t / temperature).log_softmax(-1)
    ids = t_logp.topk(V, dim=-1).indices
    exact = divergence_from_logprobs(t_logp, (s / temperature).log_softmax(-1), kind)
    student = topk_tail_logprobs(s, ids, temperature)
    approx = divergence_from_logprobs(teacher_topk_tail(t_logp.gather(-1, ids)), student, kind)
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-5)
    # A teacher cache rounded to fp16 stays within a small relative error of the exact value.
    cached16 = teacher_topk_tail(t_logp.gather(-1, ids).half())
    approx16 = divergence_from_logprobs(cached16, student, kind)
    torch.testing.assert_close(approx16, exact, rtol=5e-3, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_tail_never_exceeds_exact_divergence(kind: str, k: int) -> None:
    """Data-processing inequality: merging outcomes into one bucket can only shrink an f-divergence."""
    t, s = _logits(64, 32, seed=10), _logits(64, 32, seed=11)
    t_logp = t.log_softmax(-1)
    ids = t_logp.topk(k, dim=-1).indices
    exact = divergence_from_logprobs(t_logp, s.log_softmax(-1), kind)
    approx = divergence_from_logprobs(
        teacher_topk_tail(t_logp.gather(-1, ids)), topk_tail_logprobs(s, ids), kind
    )
    assert (approx <= exact + 1e-6).all()
    assert (approx < exact - 1e-4).any()  # the bound is not trivially an equality


def test_reverse_kl_topk_lower_bound() -> None:
    s, t = _logits(16, 24, seed=12), _logits(16, 24, seed=13)
    full = _ref_divergence(_probs64(t), _probs64(s), "reverse_kl")
    np.testing.assert_allclose(
        reverse_kl_topk_lower_bound(s, t, k=24).double().numpy(), full, rtol=1e-4
    )
    np.testing.assert_allclose(
        reverse_kl_topk_lower_bound(s, t, k=100).double().numpy(), full, rtol=1e-4
    )
    assert (reverse_kl_topk_lower_bound(s, t, k=4) <= torch.from_numpy(full).float() + 1e-6).all()
    torch.testing.assert_close(reverse_kl_topk_lower_bound(s, s, k=4), torch.zeros(16))


# --------------------------------------------------------------------------- distill_loss


def _batch(seed: int = 0, B: int = 2, T: int = 6, V: int = 20):
    student = _logits(B, T, V, seed=seed)
    teacher = _logits(B, T, V, seed=seed + 100)
    labels = torch.randint(0, V, (B, T), generator=_gen(seed + 200))
    labels[0, :2] = -100  # prompt
    labels[1, -3:] = -100  # padding
    return student, teacher, labels


@pytest.mark.parametrize("kind", KINDS)
def test_distill_loss_matches_manual_formula(kind: str) -> None:
    student, teacher, labels = _batch()
    alpha, T, beta = 0.3, 2.0, 0.4
    loss, stats = distill_loss(
        student,
        labels,
        alpha=alpha,
        temperature=T,
        kind=kind,
        beta=beta,
        teacher_logits_B_T_V=teacher,
    )
    m = labels != -100
    ce = F.cross_entropy(student[m].double(), labels[m])
    d = _ref_divergence(_probs64(teacher[m], T), _probs64(student[m], T), kind, beta).mean()
    want = alpha * ce.item() + (1 - alpha) * T**2 * d
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats == pytest.approx({"ce": ce.item(), "kl": d, "loss": want}, rel=1e-5)


def test_distillation_off_is_plain_cross_entropy() -> None:
    student, teacher, labels = _batch(seed=1)
    loss, stats = distill_loss(
        student, labels, alpha=0.1, temperature=2.0, kind="forward_kl", distillation=False
    )
    want = F.cross_entropy(student.reshape(-1, 20), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want)
    assert stats["kl"] == 0.0 and stats["loss"] == pytest.approx(want.item())


@pytest.mark.parametrize("mode", ["exact", "cached"])
@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_contribute_nothing(mode: str, kind: str) -> None:
    student, teacher, labels = _batch(seed=2)
    masked = labels == -100

    def run(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        student = student.clone().requires_grad_(True)
        t_logp = teacher.log_softmax(-1)
        topk = t_logp.topk(5, dim=-1)
        teachers = (
            {"teacher_logits_B_T_V": teacher}
            if mode == "exact"
            else {
                "teacher_topk_logprobs_B_T_K": topk.values,
                "teacher_topk_ids_B_T_K": topk.indices,
            }
        )
        loss, _ = distill_loss(student, labels, alpha=0.5, temperature=1.5, kind=kind, **teachers)
        loss.backward()
        return loss.detach(), student.grad

    loss_a, grad_a = run(student, teacher)
    student_b, teacher_b = student.clone(), teacher.clone()
    student_b[masked] = torch.randn_like(student_b[masked]) * 50
    teacher_b[masked] = torch.randn_like(teacher_b[masked]) * 50
    loss_b, grad_b = run(student_b, teacher_b)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    assert (grad_a[masked] == 0).all() and torch.isfinite(grad_a).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_batch_gives_zero_loss_with_grad(kind: str) -> None:
    student, teacher, labels = _batch(seed=3)
    student.requires_grad_(True)
    loss, stats = distill_loss(
        student,
        torch.full_like(labels, -100),
        alpha=0.5,
        temperature=2.0,
        kind=kind,
        teacher_logits_B_T_V=teacher,
    )
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert stats == {"ce": 0.0, "kl": 0.0, "loss": 0.0}
    assert (student.grad == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_cached_mode_with_full_vocab_equals_exact_mode(kind: str) -> None:
    student, teacher, labels = _batch(seed=4)
    T = 2.0
    topk = (teacher / T).log_softmax(-1).topk(20, dim=-1)
    common = {"alpha": 0.2, "temperature": T, "kind": kind}
    exact, _ = distill_loss(student, labels, teacher_logits_B_T_V=teacher, **common)
    cached, _ = distill_loss(
        student,
        labels,
        teacher_topk_logprobs_B_T_K=topk.values.half(),
        teacher_topk_ids_B_T_K=topk.indices.to(torch.uint16),
        **common,
    )
    torch.testing.assert_close(cached, exact, rtol=5e-3, atol=1e-3)


def test_teacher_gets_no_gradient_and_student_gradients_are_finite() -> None:
    student, teacher, labels = _batch(seed=5)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    for kind in KINDS:
        loss, _ = distill_loss(
            student, labels, alpha=0.5, temperature=2.0, kind=kind, teacher_logits_B_T_V=teacher
        )
        loss.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_distill_loss_needs_exactly_one_teacher() -> None:
    student, teacher, labels = _batch(seed=6)
    kw = {"alpha": 0.5, "temperature": 1.0, "kind": "forward_kl"}
    with pytest.raises(ValueError, match="exactly one teacher"):
        distill_loss(student, labels, **kw)
    ids = torch.zeros(2, 6, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one teacher"):
        distill_loss(
            student, labels, teacher_logits_B_T_V=teacher, teacher_topk_ids_B_T_K=ids, **kw
        )
    with pytest.raises(ValueError, match="needs both"):
        distill_loss(student, labels, teacher_topk_ids_B_T_K=ids, **kw)


# --------------------------------------------------------------------------- on-policy distillation


def _rollout(seed: int = 0, B: int = 3, T: int = 7, V: int = 16):
    """Student/teacher logits, sampled tokens, and a mask with prompt (leading 0s) and padding."""
    student = _logits(B, T, V, seed=seed)
    teacher = _logits(B, T, V, seed=seed + 1)
    tokens = torch.randint(0, V, (B, T), generator=_gen(seed + 2))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, :2] = False  # prompt
    mask[1, -2:] = False  # padding
    return student, teacher, tokens, mask


def _token_logp(logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor) -> torch.Tensor:
    return logits_B_T_V.log_softmax(-1).gather(-1, tokens_B_T[..., None])[..., 0]


def test_student_equals_teacher_gives_exactly_zero_advantage_and_gradient() -> None:
    student, _, tokens, mask = _rollout()
    sampler = _token_logp(student, tokens)
    baseline = reverse_kl_topk_lower_bound(student.flatten(0, 1), student.flatten(0, 1), k=4)
    for gamma in [0.0, 0.9]:
        adv = opd_advantages(
            sampler, sampler.clone(), mask, gamma=gamma, baseline_B_T=baseline.view(3, 7)
        )
        assert (adv == 0).all()
        logits = student.clone().requires_grad_(True)
        opd_pg_loss(_token_logp(logits, tokens), sampler, adv, mask).backward()
        assert (logits.grad == 0).all()


def test_ratio_is_one_when_learner_equals_sampler() -> None:
    student, teacher, tokens, mask = _rollout(seed=1)
    sampler = _token_logp(student, tokens)
    adv = opd_advantages(sampler, _token_logp(teacher, tokens), mask)
    learner = sampler.clone().requires_grad_(True)
    loss = opd_pg_loss(learner, sampler, adv, mask)
    torch.testing.assert_close(loss, -adv[mask].mean())
    loss.backward()  # dρ/dlogπ = ρ = 1, so the gradient is −A/n on generated tokens
    torch.testing.assert_close(learner.grad, -adv * mask / mask.sum())


def test_prompt_and_padding_tokens_receive_zero_gradient() -> None:
    student, teacher, tokens, mask = _rollout(seed=2)
    sampler = _token_logp(student, tokens)
    adv = opd_advantages(sampler, _token_logp(teacher, tokens), mask)
    adv = adv + (~mask) * 123.0  # garbage advantages outside the mask must be ignored
    logits = (student + 0.1 * _logits(*student.shape, seed=9)).requires_grad_(True)
    learner = _token_logp(logits, tokens)
    learner = torch.where(mask, learner, math.nan)  # even NaN learner log-probs there
    loss = opd_pg_loss(learner, sampler, adv, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert (logits.grad[~mask] == 0).all()
    assert torch.isfinite(logits.grad).all() and logits.grad[mask].abs().sum() > 0


def test_no_generated_tokens_gives_zero_loss_with_grad() -> None:
    learner = torch.randn(2, 4, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    adv = opd_advantages(learner.detach(), torch.randn(2, 4), mask, gamma=0.5)
    loss = opd_pg_loss(learner, learner.detach(), adv, mask)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad and (learner.grad == 0).all()
    assert reverse_kl_single_sample(learner, torch.randn(2, 4), mask).item() == 0.0


def test_per_token_advantage_reward_and_baseline() -> None:
    sampler = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5, -0.1]])
    mask = torch.tensor([[0, 1, 1, 0]])
    adv = opd_advantages(sampler, teacher, mask, kl_coef=2.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))
    adv = opd_advantages(
        sampler,
        teacher,
        mask,
        kl_coef=2.0,
        reward_B=torch.tensor([1.0]),
        reward_weight=0.5,
        baseline_B_T=torch.tensor([[9.0, 0.25, 0.5, 9.0]]),
    )
    torch.testing.assert_close(adv, torch.tensor([[0.0, 2.0 + 0.5 + 0.5, 0.0 + 0.5 + 1.0, 0.0]]))


def test_discounted_advantage_matches_hand_computation() -> None:
    # per-token rewards r = teacher − sampler; mask: prompt, 3 generated tokens, a masked gap,
    # one more generated token, padding. γ = 0.5 discounts over generated tokens only.
    sampler = torch.zeros(1, 7)
    teacher = torch.tensor([[7.0, 1.0, 2.0, 4.0, 7.0, 8.0, 7.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 0]])
    adv = opd_advantages(
        sampler, teacher, mask, gamma=0.5, reward_B=torch.tensor([10.0]), reward_weight=0.1
    )
    g5 = 8.0
    g3 = 4.0 + 0.5 * g5  # 8
    g2 = 2.0 + 0.5 * g3  # 6
    g1 = 1.0 + 0.5 * g2  # 4
    want = torch.tensor([[0.0, g1 + 1, g2 + 1, g3 + 1, 0.0, g5 + 1, 0.0]])
    torch.testing.assert_close(adv, want)


def test_vopd_baseline_centres_the_advantage() -> None:
    """With the exact reverse KL as baseline, E_{y~π_S}[A(y)] = 0 at every position (γ = 0)."""
    s, t = _logits(5, 12, seed=20), _logits(5, 12, seed=21)
    baseline_N = reverse_kl_topk_lower_bound(s, t, k=12)
    s_logp, t_logp = s.log_softmax(-1), t.log_softmax(-1)  # every token y as one "sample" column
    adv = opd_advantages(
        s_logp,
        t_logp,
        torch.ones(5, 12),
        kl_coef=0.7,
        baseline_B_T=baseline_N[:, None].expand(5, 12),
    )
    torch.testing.assert_close((s_logp.exp() * adv).sum(-1), torch.zeros(5), atol=1e-5, rtol=0)


def test_advantages_are_detached() -> None:
    sampler = torch.randn(2, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    adv = opd_advantages(sampler, teacher, torch.ones(2, 3), gamma=0.9)
    assert not adv.requires_grad


def test_reverse_kl_single_sample_and_entropy() -> None:
    sampler, teacher = torch.randn(2, 5, generator=_gen(30)), torch.randn(2, 5, generator=_gen(31))
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    want = (sampler - teacher)[mask.bool()].mean()
    torch.testing.assert_close(reverse_kl_single_sample(sampler, teacher, mask), want)

    logits = _logits(4, 10, seed=32)
    p = _probs64(logits)
    np.testing.assert_allclose(
        entropy_from_logits(logits).double().numpy(), -(p * np.log(p)).sum(-1), rtol=1e-5
    )
    uniform = torch.zeros(1, 10)
    uniform_masked = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]], requires_grad=True)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(10))
    h = entropy_from_logits(uniform_masked)
    h.sum().backward()
    assert h.item() == pytest.approx(math.log(2)) and torch.isfinite(uniform_masked.grad).all()
