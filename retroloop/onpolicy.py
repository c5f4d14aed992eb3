"""The pieces of one on-policy distillation step (DESIGN.md §5), used by `opd_loop.train_opd` and
the continual-learning cycle.

Thinking Machines, "On-Policy Distillation" (2025); Agarwal et al., GKD (arXiv:2306.13649).
The student samples y ~ π_sampler; the teacher scores the same ids in one forward pass; each
generated token gets A_t = −kl_coef·(log π_sampler(y_t) − log π_teacher(y_t)) (+ γ-discounted
future terms, a vOPD baseline, a verifiable reward: `losses.opd_advantages`); the update
minimises −Σ_t exp(log π_θ(y_t) − log π_sampler(y_t))·A_t / #generated tokens
(`losses.opd_pg_loss`), whose expected gradient is that of the per-token reverse KL
KL(π_θ‖π_teacher) on the student's own samples. Prompt and padding positions are masked.

`opd.objective: exact_reverse_kl` replaces that single-sample estimate by the exact per-position
reverse KL, L = kl_coef·Σ_n Σ_v π_θ(v|y_<n)(log π_θ(v|y_<n) − log π_T(v|y_<n)) / #generated
tokens, over the full vocabulary at each sampled prefix, differentiated directly (GKD with
λ = 1, β = 1; TRL's GKDTrainer lmbda=1, beta=1): no importance ratio and no advantage variance,
at the cost of the student's [N, V] logits in the graph. Like the sampled objective it treats the
sampled prefixes as data (no gradient through which prefixes were drawn).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from retroloop import tokenizer_match, training
from retroloop.config import OpdParams
from retroloop.errors import ConfigError, MismatchError
from retroloop.guards import GUARD_NEW_TOKENS, guard_error, tolerance_for
from retroloop.losses import (
    entropy_from_logits,
    gather_logprobs,
    opd_advantages,
    opd_pg_loss,
    reverse_kl_exact,
    reverse_kl_single_sample,
    reverse_kl_topk_lower_bound,
)
from retroloop.models.head import logits_at
from retroloop.models.recurrent import RecurrentConfig
from retroloop.rollout import (
    PackedRollouts,
    RolloutBatch,
    RolloutEngine,
    TransformersEngine,
    token_logprobs,
)

LOOPED_MODEL_TYPE = RecurrentConfig.model_type


def check_same_tokenizer(
    student_tok: PreTrainedTokenizerBase, teacher_tok: PreTrainedTokenizerBase, *, key: str = "opd"
) -> None:
    """Teacher and student must share vocabulary, special tokens and chat template (DESIGN.md
    §7): the teacher scores the student's token ids, and a template mismatch silently biases
    its log-probs. One home for the check: `tokenizer_match.check_same_tokenizer`."""
    tokenizer_match.check_same_tokenizer(
        student_tok, teacher_tok, key=key, student_name="the student"
    )


def student_forward_kwargs(model: torch.nn.Module, recurrence: int | None) -> dict[str, Any]:
    """`{"num_recurrence": R}` for the looped student; {} (its config default) when R is None."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if recurrence is not None and model_type != LOOPED_MODEL_TYPE:
        raise ConfigError(
            f"opd.recurrence: {recurrence} is set but the student is a plain {model_type}"
        )
    return {} if recurrence is None else {"num_recurrence": recurrence}


@contextlib.contextmanager
def fixed_initial_state(model: torch.nn.Module) -> Iterator[None]:
    """Fix the looped model's s_0 at its mean (σ = 0) while OPD runs.

    In eval mode the looped model already uses s_0 = 0 (see `RecurrentForCausalLM.initial_state`);
    this guard keeps OPD deterministic if the student is ever put in train mode (e.g. dropout),
    where s_0 ~ TruncNormal(0, σ) would be redrawn per forward and the sampler's and learner's
    log-probs would come from different draws, so the importance ratio would measure noise.
    """
    config = getattr(model, "config", None)
    std = getattr(config, "state_init_std", None)
    if std:
        config.state_init_std = 0.0
    try:
        yield
    finally:
        if std:
            config.state_init_std = std


def score_rollouts(
    model: torch.nn.Module, pk: PackedRollouts, kwargs: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits `[N, V]` at the N positions that predict a generated token, and
    log p(y_t | y_<t) placed at the generated columns `[B, T]` (0 elsewhere).

    The LM head runs on those N positions only (`models.head.logits_at`): prompt positions
    (most of a short rollout) never reach the `[·, V]` head. Row n of the logits predicts the
    n-th True entry of `pk.mask_B_T` in row-major order (position t predicts token t + 1).
    """
    predicts_B_T = F.pad(pk.mask_B_T[:, 1:], (0, 1), value=False)
    logits_N_V = logits_at(model, predicts_B_T, pk.tokens_B_T, pk.attention_mask_B_T, **(kwargs or {}))  # fmt: skip
    logp_N = gather_logprobs(logits_N_V, pk.tokens_B_T[pk.mask_B_T][:, None]).squeeze(-1)
    logp_B_T = logp_N.new_zeros(pk.mask_B_T.shape)
    logp_B_T[pk.mask_B_T] = logp_N
    return logits_N_V, logp_B_T


def opd_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: RolloutBatch,
    optimizer: torch.optim.Optimizer | None,
    p: OpdParams,
    *,
    pad_id: int,
    rewards: list[float] | None = None,
    student_kwargs: dict[str, Any] | None = None,
    teacher_kwargs: dict[str, Any] | None = None,
    dist_env: training.DistEnv | None = None,
) -> dict[str, Any]:
    """Score `batch` with the teacher, take one policy-gradient step on the student.

    Micro-batches of `p.rollout.batch_size` rows; each micro-batch loss is weighted by its share
    n_mb / N of the step's N generated tokens, so the accumulated gradient is that of the loss
    over the whole batch. Under torchrun (`dist_env`) `batch` is this rank's share of the step's
    rollouts: N counts every rank's tokens and the gradients are summed over ranks before the
    clip and the step, so every rank takes the one-process update of the global batch,
    ∇ Σ_ranks Σ_mb (n_mb / N)·L_mb. With `optimizer=None` the gradients stay in `.grad` (tests).
    Returns the step's metrics (per generated token, over all ranks), `advantage_max_abs`, and
    `teacher_logprobs` (one list per row of this rank's `batch`).
    """
    env = dist_env or training.DistEnv()
    device = next(student.parameters()).device
    n_tokens = torch.tensor([float(batch.num_completion_tokens)], dtype=torch.float64)
    training.all_reduce_sum_([n_tokens], env)
    n_total = max(int(n_tokens.item()), 1)
    sums: dict[str, float] = defaultdict(float)
    teacher_rows: list[list[float]] = []
    for first in range(0, len(batch), p.rollout.batch_size):
        rows = list(range(first, min(first + p.rollout.batch_size, len(batch))))
        pk = batch.select(rows).pack(pad_id, device)
        reward_B = (
            None if rewards is None else torch.tensor([rewards[i] for i in rows], device=device)
        )
        teacher_rows += _micro_batch(
            student, teacher, pk, reward_B, p, n_total, sums, student_kwargs, teacher_kwargs
        )

    params = [q for q in student.parameters() if q.requires_grad]
    if env.world_size > 1:
        training.all_reduce_grads_(params, env)
        _reduce_sums_(sums, env)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm))
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    per_token = (
        "reverse_kl_sampled",
        "reverse_kl_topk_lb",
        "reverse_kl_exact",
        "entropy",
        "sampler_learner_kl",
        "advantage_abs",
    )
    stats: dict[str, Any] = {k: sums[k] / n_total for k in per_token}
    stats |= {k: sums[k] for k in ("loss", "teacher_s", "advantage_max_abs", "log_ratio_max_abs")}
    return stats | {"grad_norm": grad_norm, "teacher_logprobs": teacher_rows}


_SUMMED = ("loss", "teacher_s", "reverse_kl_sampled", "reverse_kl_topk_lb", "reverse_kl_exact",
           "entropy", "sampler_learner_kl", "advantage_abs")  # fmt: skip
_MAXED = ("advantage_max_abs", "log_ratio_max_abs")


def _reduce_sums_(sums: dict[str, float], env: training.DistEnv) -> None:
    """Every rank's `_micro_batch` figures combined: sums summed, maxima maxed (in place)."""
    import torch.distributed as dist

    summed = torch.tensor([sums[k] for k in _SUMMED], dtype=torch.float64)
    maxed = torch.tensor([sums[k] for k in _MAXED], dtype=torch.float64)
    training.all_reduce_sum_([summed], env)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    sums.update(zip(_SUMMED, summed.tolist(), strict=True))
    sums.update(zip(_MAXED, maxed.tolist(), strict=True))


def _micro_batch(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    pk: PackedRollouts,
    reward_B: torch.Tensor | None,
    p: OpdParams,
    n_total: int,
    sums: dict[str, float],
    student_kwargs: dict[str, Any] | None,
    teacher_kwargs: dict[str, Any] | None,
) -> list[list[float]]:
    """Score one micro-batch, backpropagate its share (`n_mb / n_total`) of the step's loss,
    add its figures to `sums`; its teacher log-probs, one list per row."""
    mask_B_T, n_mb = pk.mask_B_T, int(pk.mask_B_T.sum())
    tic = time.perf_counter()
    with torch.no_grad():  # the teacher scores the student's ids in one forward pass
        t_N_V, teacher_logp_B_T = score_rollouts(teacher, pk, teacher_kwargs)
    sums["teacher_s"] += time.perf_counter() - tic
    s_N_V, learner_logp_B_T = score_rollouts(student, pk, student_kwargs)
    if s_N_V.shape[-1] != t_N_V.shape[-1]:
        raise MismatchError(
            f"opd: student vocabulary {s_N_V.shape[-1]} != teacher {t_N_V.shape[-1]}"
        )
    exact = p.objective == "exact_reverse_kl"  # only its loss keeps s_N_V's graph (an [N, V] one)
    exact_kl_N = reverse_kl_exact(s_N_V if exact else s_N_V.detach(), t_N_V)
    s_N_V = s_N_V.detach()
    kl_N = reverse_kl_topk_lower_bound(s_N_V, t_N_V, p.vopd_top_k)
    if exact:
        # Σ_n kl_coef·KL_n(π_θ‖π_T) / N: the gradient flows through the student's whole
        # distribution at each sampled prefix; a sequence reward, if any, is a REINFORCE term.
        loss = p.kl_coef * exact_kl_N.sum() / n_total
        adv_B_T = torch.zeros_like(teacher_logp_B_T)
        if reward_B is not None:
            adv_B_T = torch.where(mask_B_T, p.reward_weight * reward_B.float()[:, None], 0.0)
            loss = loss + opd_pg_loss(learner_logp_B_T, pk.sampler_logp_B_T, adv_B_T, mask_B_T) * (n_mb / n_total)  # fmt: skip
    else:  # the gradient flows through learner_logp_B_T only
        baseline_B_T = None
        if p.vopd_baseline:  # same row-major order as mask_B_T (column 0 is never generated)
            baseline_B_T = torch.zeros_like(teacher_logp_B_T)
            baseline_B_T[mask_B_T] = kl_N
        adv_B_T = opd_advantages(
            pk.sampler_logp_B_T, teacher_logp_B_T, mask_B_T, gamma=p.gamma, kl_coef=p.kl_coef,
            reward_B=reward_B, reward_weight=p.reward_weight, baseline_B_T=baseline_B_T,
        )  # fmt: skip
        loss = opd_pg_loss(learner_logp_B_T, pk.sampler_logp_B_T, adv_B_T, mask_B_T) * (n_mb / n_total)  # fmt: skip
    loss.backward()

    log_ratio_N = (learner_logp_B_T.detach() - pk.sampler_logp_B_T)[mask_B_T]
    sums["loss"] += float(loss.detach())
    sums["reverse_kl_exact"] += float(exact_kl_N.detach().sum())
    sums["reverse_kl_sampled"] += (
        float(reverse_kl_single_sample(pk.sampler_logp_B_T, teacher_logp_B_T, mask_B_T)) * n_mb
    )
    sums["reverse_kl_topk_lb"] += float(kl_N.sum())
    sums["entropy"] += float(entropy_from_logits(s_N_V).sum())
    sums["sampler_learner_kl"] += float(-log_ratio_N.sum())  # log π_sampler − log π_learner
    sums["advantage_abs"] += float(adv_B_T.abs().sum())
    sums["advantage_max_abs"] = max(sums["advantage_max_abs"], float(adv_B_T.abs().max()))
    if n_mb:
        sums["log_ratio_max_abs"] = max(sums["log_ratio_max_abs"], float(log_ratio_N.abs().max()))
    return [teacher_logp_B_T[b][mask_B_T[b]].tolist() for b in range(mask_B_T.shape[0])]


@torch.no_grad()
def heldout_reverse_kl(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    n: int,
    max_new_tokens: int,
    seed: int,
    top_k: int | None = None,
    student_kwargs: dict[str, Any] | None = None,
    teacher_kwargs: dict[str, Any] | None = None,
    batch_size: int = 8,
) -> float:
    """Reverse KL(π_S‖π_T) per generated token on the student's samples of fixed prompts with a
    fixed seed: the before/after measure (per-step values are noisy: fresh prompts, fresh samples).
    `top_k=None`: exact over the full vocabulary (`reverse_kl_exact`); an int: the top-k +
    tail-bucket lower bound (`reverse_kl_topk_lower_bound`), which a student can lower by
    concentrating its mass while the full KL rises, so OPD keeps its best step by the exact one."""
    batch = TransformersEngine(student, tokenizer, batch_size, student_kwargs).sample(
        prompts, n=n, max_new_tokens=max_new_tokens, seed=seed
    )
    total, count = 0.0, 0
    for first in range(0, len(batch), batch_size):
        rows = list(range(first, min(first + batch_size, len(batch))))
        pk = batch.select(rows).pack(tokenizer.pad_token_id, next(student.parameters()).device)
        s_N_V, _ = score_rollouts(student, pk, student_kwargs)
        t_N_V = score_rollouts(teacher, pk, teacher_kwargs)[0]
        kl_N = (
            reverse_kl_exact(s_N_V, t_N_V)
            if top_k is None
            else reverse_kl_topk_lower_bound(s_N_V, t_N_V, top_k)
        )
        total, count = total + float(kl_N.sum()), count + kl_N.numel()
    return total / max(count, 1)


def ifeval_rewards(
    tokenizer: PreTrainedTokenizerBase, batch: RolloutBatch, rows: list[dict]
) -> list[float]:
    """1.0 when every gradable IFEval instruction of the prompt is followed (strict), else 0.0
    (also 0.0 when none is gradable here: no signal rather than a free reward)."""
    from retroloop.eval.ifeval import score_response

    out = []
    for i, completion in zip(batch.prompt_index, batch.completion_ids, strict=True):
        row, text = rows[i], tokenizer.decode(completion, skip_special_tokens=True)
        strict = score_response(
            row["prompt"], text, list(row["instruction_id_list"]), row["kwargs"]
        )["strict"]
        out.append(1.0 if strict and all(strict) else 0.0)
    return out


@torch.inference_mode()
def check_rollouts(
    engine: RolloutEngine,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: list[str],
    *,
    pad_id: int,
    seed: int,
    student_kwargs: dict[str, Any] | None = None,
    teacher_kwargs: dict[str, Any] | None = None,
    max_new_tokens: int = GUARD_NEW_TOKENS,
) -> dict[str, Any]:
    """Run-time guard (`retroloop.guards`): the sampler's cached log-probs vs the learner's
    cache-free scoring of the same tokens, and the teacher's generated-positions scoring
    (`score_rollouts`) vs a plain teacher-forced forward. Raises `GuardError`."""
    batch = engine.sample(
        prompts, n=1, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=seed
    )
    device = next(student.parameters()).device
    pk = batch.pack(pad_id, device)
    if not bool(pk.mask_B_T.any()):
        return {"sampler_vs_learner_max_abs_logp_diff": 0.0, "tokens": 0}
    _, learner_B_T = score_rollouts(student, pk, student_kwargs)
    sampler_diff = float((learner_B_T - pk.sampler_logp_B_T)[pk.mask_B_T].abs().max())
    tol = tolerance_for(student)
    if sampler_diff > tol:
        raise guard_error(
            "sampler_vs_learner",
            "the student",
            f"the sampler's cached log-probs differ from a cache-free forward by up to "
            f"{sampler_diff:.3g} (tolerance {tol:g})",
        )
    _, scored_B_T = score_rollouts(teacher, pk, teacher_kwargs)
    full = teacher(
        input_ids=pk.tokens_B_T,
        attention_mask=pk.attention_mask_B_T,
        use_cache=False,
        **(teacher_kwargs or {}),
    )
    plain_B_T = token_logprobs(full.logits, pk.tokens_B_T)
    teacher_diff = float((scored_B_T - plain_B_T)[pk.mask_B_T].abs().max())
    t_tol = tolerance_for(teacher)
    if teacher_diff > t_tol:
        raise guard_error(
            "teacher_scoring",
            "the teacher",
            f"its scoring of the student's tokens differs from a teacher-forced forward by up to "
            f"{teacher_diff:.3g} (tolerance {t_tol:g})",
        )
    return {
        "sampler_vs_learner_max_abs_logp_diff": sampler_diff,
        "teacher_scoring_max_abs_logp_diff": teacher_diff,
        "tokens": int(pk.mask_B_T.sum()),
        "tolerance": max(tol, t_tol),
    }
