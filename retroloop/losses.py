"""Distillation and on-policy-distillation losses as pure tensor functions (DESIGN.md §5).

Conventions shared by every function here:

- Tensor names carry their shape: `N` rows (flattened positions), `C` outcomes, `V` vocabulary,
  `K` top-k entries, `B` batch, `T` time.
- Everything is computed in float32 log-space whatever the input dtype (bf16 / fp16 caches).
- Log-probs of impossible outcomes (`-inf`) are clamped to the most negative finite float before
  they meet a product, so `0 · log 0` is 0 (never NaN) and the clamp passes a zero gradient.
  A truly infinite divergence (mass where the other side has exactly none) comes out as a huge
  finite number (~1e38), not inf/NaN.
- The tail bucket `log(1 − Σ_k p_k)` is computed with `log1mexp` and floored at
  `log(eps_fp32)`: below float32 epsilon the subtraction is rounding noise, and the floor keeps
  `log(0)` out while changing any divergence by at most O(eps · log(1/eps)).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]

IGNORE_INDEX = -100
_FLOOR = torch.finfo(torch.float32).min  # stand-in for log 0 inside products
_TAIL_MAX_LSE = math.log1p(-torch.finfo(torch.float32).eps)  # tail mass >= eps


def _kl_terms(logp_N_C: Tensor, logq_N_C: Tensor) -> Tensor:
    """p_c (log p_c − log q_c) per outcome, with both inputs already clamped to be finite."""
    return logp_N_C.exp() * (logp_N_C - logq_N_C)


def _kl(logp_N_C: Tensor, logq_N_C: Tensor) -> Tensor:
    """KL(P‖Q) = Σ_c p_c (log p_c − log q_c), with both inputs already clamped to be finite."""
    return _kl_terms(logp_N_C, logq_N_C).sum(-1)


def kl_terms(logp_N_C: Tensor, logq_N_C: Tensor) -> Tensor:
    """The per-outcome terms p_c (log p_c − log q_c) of KL(P‖Q) → `[N, C]` fp32.

    `kl_terms(p, q).sum(-1)` is `divergence_from_logprobs(p, q, "forward_kl")`; the terms are
    for a caller that reduces a whole batch at once (`eval.scaling`'s token-weighted mean KL).
    """
    return _kl_terms(logp_N_C.float().clamp_min(_FLOOR), logq_N_C.float().clamp_min(_FLOOR))


def divergence_from_logprobs(
    teacher_logp_N_C: Tensor, student_logp_N_C: Tensor, kind: Divergence, beta: float = 0.5
) -> Tensor:
    """Per-row divergence D(P_T, P_S) over C outcomes from normalised log-probs → `[N]`.

    - `forward_kl`: KL(P_T‖P_S) = Σ p_T (log p_T − log p_S)   (mode-covering, the default)
    - `reverse_kl`: KL(P_S‖P_T) = Σ p_S (log p_S − log p_T)   (mode-seeking)
    - `jsd`: generalised JSD(β) of GKD (Agarwal et al. 2024, arXiv:2306.13649), as in TRL's
      `generalized_jsd_loss`: M = β·P_T + (1−β)·P_S, JSD(β) = β·KL(P_T‖M) + (1−β)·KL(P_S‖M),
      M formed in log-space with logsumexp. The formula itself is 0 at β ∈ {0, 1}; to first order
      JSD(β) ≈ β·KL(P_T‖P_S) near 0 and ≈ (1−β)·KL(P_S‖P_T) near 1, so, like TRL, β = 0 returns
      forward KL and β = 1 returns reverse KL (the limits of JSD(β)/β and JSD(β)/(1−β)).
    - `tvd`: ½ Σ |p_T − p_S|.
    """
    t = teacher_logp_N_C.float().clamp_min(_FLOOR)
    s = student_logp_N_C.float().clamp_min(_FLOOR)
    match kind:
        case "forward_kl":
            return _kl(t, s)
        case "reverse_kl":
            return _kl(s, t)
        case "jsd":
            if not 0.0 <= beta <= 1.0:
                raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
            if beta == 0.0:
                return _kl(t, s)
            if beta == 1.0:
                return _kl(s, t)
            m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta)).clamp_min(_FLOOR)
            return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
        case "tvd":
            return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
        case _:
            raise ValueError(f"unknown divergence {kind!r}; use forward_kl, reverse_kl, jsd or tvd")


def _append_tail(logp_N_K: Tensor) -> Tensor:
    """[log p_1..log p_K, log(1 − Σ_k p_k)] with the tail via log1mexp(logsumexp), floored at eps."""
    lse_N_1 = torch.logsumexp(logp_N_K, dim=-1, keepdim=True).clamp_max(_TAIL_MAX_LSE)
    # log1mexp(x) = log(−expm1(x)) for x > −ln 2, log1p(−exp(x)) otherwise (Mächler 2012).
    tail_N_1 = torch.where(
        lse_N_1 > -math.log(2.0),
        torch.log(-torch.expm1(lse_N_1)),
        torch.log1p(-torch.exp(lse_N_1)),
    )
    return torch.cat([logp_N_K, tail_N_1], dim=-1)


def topk_tail_logprobs(
    logits_N_V: Tensor, topk_ids_N_K: Tensor, temperature: float = 1.0
) -> Tensor:
    """Log-probs of softmax(logits/T) on the K given ids plus one tail bucket → `[N, K+1]` fp32.

    log p_k = z_k/T − logsumexp(z/T); tail = log(1 − Σ_k p_k) = log1mexp(logsumexp_k log p_k).
    Only the log-normaliser touches all V logits, so no `[N, V]` log-softmax is kept.
    """
    return _append_tail(gather_logprobs(logits_N_V, topk_ids_N_K, temperature))


def gather_logprobs(logits_N_V: Tensor, ids_N_J: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits/T) at the given ids → `[N, J]` fp32, without an `[N, V]` log-softmax."""
    z_N_V = logits_N_V.float() / temperature
    return z_N_V.gather(-1, ids_N_J.long()) - torch.logsumexp(z_N_V, -1, keepdim=True)


class _LogitStats(torch.autograd.Function):
    """z `[N, V]` fp32 → (logsumexp z, z[targets], logsumexp(z/T), z[ids]), `[N]`, `[N]`, `[N]`, `[N, J]`.

    Everything the cached-teacher loss reads from the student's logits, in one node whose
    backward writes ∂L/∂z in one `[N, V]` buffer:
        ∂L/∂z = g₁·softmax(z) + (g_T/T)·softmax(z/T) + scatter(g_y at targets) + scatter(g_j at ids)
    (∂ logsumexp(z)/∂z = softmax(z), ∂ logsumexp(z/T)/∂z = softmax(z/T)/T). Autograd through
    `cross_entropy` + two `gather_logprobs` would keep a log-softmax and two copies of z/T for
    the backward and form a gradient buffer per gather; this keeps z alone.
    """

    @staticmethod
    def forward(ctx, z_N_V: Tensor, targets_N: Tensor, ids_N_J: Tensor, temperature: float):
        ctx.temperature = temperature
        lse_N = torch.logsumexp(z_N_V, -1)
        lse_T_N = torch.logsumexp(z_N_V / temperature, -1)
        ctx.save_for_backward(z_N_V, targets_N, ids_N_J, lse_N, lse_T_N)
        return lse_N, z_N_V.gather(-1, targets_N[:, None])[:, 0], lse_T_N, z_N_V.gather(-1, ids_N_J)

    @staticmethod
    def backward(ctx, g_lse_N, g_y_N, g_lse_T_N, g_ids_N_J):
        z_N_V, targets_N, ids_N_J, lse_N, lse_T_N = ctx.saved_tensors
        T = ctx.temperature
        grad_N_V = (z_N_V - lse_N[:, None]).exp_().mul_(g_lse_N[:, None])
        soft_N_V = (z_N_V / T).sub_(lse_T_N[:, None]).exp_()
        grad_N_V.add_(soft_N_V.mul_((g_lse_T_N / T)[:, None]))
        del soft_N_V
        grad_N_V.scatter_add_(-1, targets_N[:, None], g_y_N[:, None])
        grad_N_V.scatter_add_(-1, ids_N_J, g_ids_N_J)
        return grad_N_V, None, None, None


def cached_student_logprobs(
    student_N_V: Tensor, targets_N: Tensor, ids_N_J: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(Σ_n CE_n, log softmax(z/T) at `ids_N_J`) of fp32 student logits, through `_LogitStats`.

    CE_n = logsumexp(z_n) − z_n,y (= `F.cross_entropy`, T = 1); log p_j = z_j/T − logsumexp(z/T)
    (= `gather_logprobs`). Equal to those within fp32 rounding; only z is kept for the backward.
    `targets_N` must all be real token ids (rows already selected, no −100).
    """
    lse_N, z_y_N, lse_T_N, z_N_J = _LogitStats.apply(
        student_N_V, targets_N.long(), ids_N_J.long(), temperature
    )
    return (lse_N - z_y_N).sum(), z_N_J / temperature - lse_T_N[:, None]


def forward_kl_sampled_tail(
    teacher_N_C: Tensor,
    student_N_C: Tensor,
    teacher_tail_logp_N_S: Tensor,
    student_tail_logp_N_S: Tensor,
) -> Tensor:
    """KL(P_T‖P_S) with the top-k terms exact and the tail term estimated from S teacher samples.

    KL = Σ_{k ∈ top} p_T,k log(p_T,k / p_S,k) + m_T · E_{i ~ p_T(·|tail)}[log p_T,i − log p_S,i],
    m_T the teacher's tail mass; the expectation is the mean over the S cached draws, so the
    value and its gradient (−m_T · mean_j ∇log p_S,i_j) are unbiased, where the tail bucket
    m_T·log(m_T/m_S) is a lower bound (log-sum inequality) whose gradient keeps the student's
    own tail shape. `*_N_C`: top-k + bucket log-probs as from `teacher_topk_tail` /
    `topk_tail_logprobs` (the bucket column is read for m_T only).
    """
    t_top, s_top = teacher_N_C[:, :-1].clamp_min(_FLOOR), student_N_C[:, :-1].clamp_min(_FLOOR)
    top_N = _kl(t_top, s_top)
    m_T_N = teacher_N_C[:, -1].exp()
    diff_N_S = teacher_tail_logp_N_S.float().clamp_min(_FLOOR) - student_tail_logp_N_S.clamp_min(_FLOOR)  # fmt: skip
    return top_N + m_T_N * diff_N_S.mean(-1)


def teacher_topk_tail(topk_logprobs_N_K: Tensor) -> Tensor:
    """Cached teacher log-probs (normalised over V, possibly fp16) + tail bucket → `[N, K+1]` fp32.

    tail = log(1 − Σ_k exp(log p_k)). fp16 rounding can push Σ_k p_k to ≥ 1; the tail is then
    floored at eps rather than becoming log(0) or NaN.
    """
    return _append_tail(topk_logprobs_N_K.float())


def distill_loss_sums(
    student_logits_N_V: Tensor,
    targets_N: Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: Divergence,
    beta: float = 0.5,
    teacher_logits_N_V: Tensor | None = None,
    teacher_topk_logprobs_N_K: Tensor | None = None,
    teacher_topk_ids_N_K: Tensor | None = None,
    teacher_tail_logprobs_N_S: Tensor | None = None,
    teacher_tail_ids_N_S: Tensor | None = None,
    distillation: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Σ over N trained rows of (α·CE + (1−α)·T²·D, CE, D) → three scalars (sums, not means).

    The row-level core of `distill_loss`: every row is a trained position (already selected),
    so callers can compute it chunk by chunk and divide by the total count once. Teacher modes
    and conventions as in `distill_loss`. Cached mode with tail samples
    (`teacher_tail_logprobs_N_S` + `teacher_tail_ids_N_S`, see `teacher_cache`): `forward_kl`
    uses them (`forward_kl_sampled_tail`, unbiased); the other divergences have no unbiased
    estimate from teacher samples here and use the tail bucket.
    """
    student_N_V = student_logits_N_V.float()
    kl = student_N_V.new_zeros(())
    if not distillation:
        ce = F.cross_entropy(student_N_V, targets_N, reduction="sum")
        return ce, ce, kl
    if not 0.0 <= alpha <= 1.0 or temperature <= 0.0:
        raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got {alpha}, {temperature}")
    cached = teacher_topk_logprobs_N_K is not None or teacher_topk_ids_N_K is not None
    if cached == (teacher_logits_N_V is not None):
        raise ValueError(
            "distill_loss needs exactly one teacher: teacher logits (exact mode) or "
            "teacher top-k log-probs + ids (cached mode)"
        )
    if cached:
        if teacher_topk_logprobs_N_K is None or teacher_topk_ids_N_K is None:
            raise ValueError("cached mode needs both the teacher top-k log-probs and their ids")
        assert teacher_topk_ids_N_K.shape == teacher_topk_logprobs_N_K.shape
        teacher_N_C = teacher_topk_tail(teacher_topk_logprobs_N_K.detach())
        sampled = teacher_tail_ids_N_S is not None and kind == "forward_kl"
        ids = [teacher_topk_ids_N_K] + [teacher_tail_ids_N_S] * sampled
        ce, student_N_J = cached_student_logprobs(
            student_N_V, targets_N, torch.cat([i.long() for i in ids], -1), temperature
        )
        K = teacher_topk_ids_N_K.shape[-1]
        student_N_C = _append_tail(student_N_J[:, :K])
        if sampled:
            assert teacher_tail_logprobs_N_S is not None
            kl = forward_kl_sampled_tail(
                teacher_N_C, student_N_C, teacher_tail_logprobs_N_S.detach(), student_N_J[:, K:]
            ).sum()
            return alpha * ce + (1.0 - alpha) * temperature**2 * kl, ce, kl
    else:
        assert teacher_logits_N_V is not None
        ce = F.cross_entropy(student_N_V, targets_N, reduction="sum")
        teacher_N_C = F.log_softmax(teacher_logits_N_V.detach().float() / temperature, dim=-1)
        student_N_C = F.log_softmax(student_N_V / temperature, dim=-1)
    kl = divergence_from_logprobs(teacher_N_C, student_N_C, kind, beta).sum()
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl, ce, kl


def distill_loss(
    student_logits_B_T_V: Tensor,
    labels_B_T: Tensor,
    *,
    alpha: float,
    temperature: float,
    kind: Divergence,
    beta: float = 0.5,
    teacher_logits_B_T_V: Tensor | None = None,
    teacher_topk_logprobs_B_T_K: Tensor | None = None,
    teacher_topk_ids_B_T_K: Tensor | None = None,
    distillation: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """total = α·CE + (1−α)·T²·D(p_T^T, p_S^T), averaged over positions with labels != −100.

    Alignment: targets are pre-shifted. Logits at position t predict `labels_B_T[:, t]`; the
    caller shifts (HF-style `labels = input_ids` needs `logits[:, :-1]` with `labels[:, 1:]`).
    Teacher tensors are aligned with the student's logits positions.

    CE is the next-token cross-entropy at temperature 1. p^T = softmax(logits / T); the T² factor
    keeps the gradient scale of the soft term independent of T (Hinton et al. 2015).
    Teacher modes (exactly one when `distillation`):
    - exact: `teacher_logits_B_T_V`, D over the full vocabulary.
    - cached: `teacher_topk_logprobs_B_T_K` + `teacher_topk_ids_B_T_K`, D over K + 1 outcomes
      (the teacher's K ids and a tail bucket, the student bucketed the same way). The cached
      log-probs are used as-is, so they must have been computed at this `temperature`.
    The teacher is always detached. `distillation=False` → loss = CE only (teacher ignored).
    Returns `(loss, {"ce", "kl", "loss"})`; "kl" is the mean D of the chosen `kind` (without
    the (1−α)·T² factor). A fully masked batch gives loss 0 that still has a grad_fn.
    """
    assert labels_B_T.shape == student_logits_B_T_V.shape[:-1], "labels must be [B, T]"
    mask_B_T = labels_B_T != IGNORE_INDEX
    # Selecting rows first keeps masked positions (even inf/NaN logits) out of value and gradient.
    teacher = {
        "teacher_logits_N_V": teacher_logits_B_T_V,
        "teacher_topk_logprobs_N_K": teacher_topk_logprobs_B_T_K,
        "teacher_topk_ids_N_K": teacher_topk_ids_B_T_K,
    }
    rows = {k: None if v is None else v[mask_B_T] for k, v in teacher.items()}
    sums = distill_loss_sums(
        student_logits_B_T_V[mask_B_T], labels_B_T[mask_B_T], alpha=alpha,
        temperature=temperature, kind=kind, beta=beta, distillation=distillation, **rows,
    )  # fmt: skip
    n_tokens = max(int(mask_B_T.sum()), 1)
    loss, ce, kl = (x / n_tokens for x in sums)
    stats = {"ce": float(ce.detach()), "kl": float(kl.detach()), "loss": float(loss.detach())}
    return loss, stats


@torch.no_grad()
def opd_advantages(
    sampler_logp_B_T: Tensor,
    teacher_logp_B_T: Tensor,
    mask_B_T: Tensor,
    gamma: float = 0.0,
    kl_coef: float = 1.0,
    reward_B: Tensor | None = None,
    reward_weight: float = 0.0,
    baseline_B_T: Tensor | None = None,
) -> Tensor:
    """Detached per-token OPD advantages → `[B, T]` fp32, 0 where `mask_B_T` is 0.

    r_t = −kl_coef·(log π_sampler(y_t) − log π_teacher(y_t)) (the per-token reverse-KL reward).
    A_t = G_t + reward_weight·R_b + kl_coef·baseline_t, with G_t = r_t + γ·G_{t'} where t' is the
    next generated (mask 1) position: masked positions neither discount nor add (γ = 0 → r_t).
    The sequence reward R_b (e.g. IFEval pass/fail) is added to every generated token.

    vOPD (Oh et al. 2026, arXiv:2605.07865): `baseline_B_T` is the detached per-token exact
    reverse KL KL_t(π_S‖π_T) (≥ 0, e.g. `reverse_kl_topk_lower_bound`). E[r_t | prefix] = −kl_coef·KL_t
    is the value function, so subtracting it is A_t ← A_t + kl_coef·KL_t. It is added after
    discounting: a baseline must depend only on the prefix of step t, and discounting would
    fold later steps' baselines (which depend on y_t) into A_t and bias the gradient.
    With γ > 0 it is only the immediate term of the value function (still unbiased).
    """
    r_B_T = -kl_coef * (sampler_logp_B_T.float() - teacher_logp_B_T.float())
    r_B_T = torch.where(mask_B_T.bool(), r_B_T, 0.0)
    if gamma > 0.0:
        ret_B_T = torch.zeros_like(r_B_T)
        running_B = torch.zeros_like(r_B_T[:, 0])
        for t in reversed(range(r_B_T.shape[1])):
            gen_B = mask_B_T[:, t].bool()
            running_B = torch.where(gen_B, r_B_T[:, t] + gamma * running_B, running_B)
            ret_B_T[:, t] = running_B
        r_B_T = ret_B_T
    if reward_B is not None:
        r_B_T = r_B_T + reward_weight * reward_B.float()[:, None]
    if baseline_B_T is not None:
        r_B_T = r_B_T + kl_coef * baseline_B_T.float()
    return torch.where(mask_B_T.bool(), r_B_T, 0.0)


def opd_pg_loss(
    learner_logp_B_T: Tensor, sampler_logp_B_T: Tensor, advantages_B_T: Tensor, mask_B_T: Tensor
) -> Tensor:
    """OPD policy-gradient loss: −Σ_t ρ_t·A_t / Σ_t mask_t, ρ_t = exp(log π_θ(y_t) − log π_sampler(y_t)).

    ρ keeps its gradient (∇ρ = ρ·∇log π_θ, the importance-weighted REINFORCE estimator); the
    sampler log-probs and advantages are detached. The log-ratio is zeroed at masked positions
    *before* exp, so prompt/padding tokens get exactly zero gradient even if their log-probs are
    garbage. No tokens → 0 with a grad_fn.
    """
    mask = mask_B_T.bool()
    log_ratio_B_T = torch.where(
        mask, learner_logp_B_T.float() - sampler_logp_B_T.detach().float(), 0.0
    )
    adv_B_T = torch.where(mask, advantages_B_T.detach().float(), 0.0)
    return -(log_ratio_B_T.exp() * adv_B_T).sum() / mask.sum().clamp_min(1)


def reverse_kl_exact(student_logits_N_V: Tensor, teacher_logits_N_V: Tensor) -> Tensor:
    """KL(π_S‖π_T) = Σ_v π_S(v) (log π_S(v) − log π_T(v)) over the full vocabulary → `[N]` fp32,
    differentiable in the student's logits: OPD's `exact_reverse_kl` per-position loss and
    evaluation's reverse KL on the student's samples (0 · log 0 = 0 where π_S has no mass)."""
    return divergence_from_logprobs(
        F.log_softmax(teacher_logits_N_V.float(), dim=-1),
        F.log_softmax(student_logits_N_V.float(), dim=-1),
        "reverse_kl",
    )


def reverse_kl_topk_lower_bound(
    student_logits_N_V: Tensor, teacher_logits_N_V: Tensor, k: int
) -> Tensor:
    """KL(π_S‖π_T) on the student's top-k ids + one tail bucket (both bucketed alike) → `[N]`.

    By the data-processing inequality this is ≤ the full-vocabulary KL, equal when k = V.
    """
    ids_N_K = student_logits_N_V.topk(min(k, student_logits_N_V.shape[-1]), dim=-1).indices
    student_N_C = topk_tail_logprobs(student_logits_N_V, ids_N_K)
    teacher_N_C = topk_tail_logprobs(teacher_logits_N_V, ids_N_K)
    return divergence_from_logprobs(teacher_N_C, student_N_C, "reverse_kl")


def reverse_kl_single_sample(
    sampler_logp_B_T: Tensor, teacher_logp_B_T: Tensor, mask_B_T: Tensor
) -> Tensor:
    """Single-sample Monte-Carlo estimate of KL(π_S‖π_T) from the sampled tokens' log-probs only:
    mean over mask of log π_S(y_t) − log π_T(y_t), y_t ~ π_S (unbiased, can be negative).

    Not `eval.likelihood.reverse_kl_exact_on_samples`, which sums the exact full-vocabulary KL
    at each sampled position (≥ 0, needs both models' logits)."""
    mask = mask_B_T.bool()
    diff_B_T = torch.where(mask, sampler_logp_B_T.float() - teacher_logp_B_T.float(), 0.0)
    return diff_B_T.sum() / mask.sum().clamp_min(1)


def entropy_from_logits(logits_N_V: Tensor) -> Tensor:
    """Shannon entropy H = −Σ_v p_v log p_v of softmax(logits) → `[N]` (−inf logits allowed)."""
    logp_N_V = F.log_softmax(logits_N_V.float(), dim=-1).clamp_min(_FLOOR)
    return -(logp_N_V.exp() * logp_N_V).sum(-1)
