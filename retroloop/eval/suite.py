"""Every evaluator on one model, as one flat dict of numbers (DESIGN.md §1, evaluate).

`evaluate_model` runs, on one (model, tokenizer) pair:

- IFEval (Zhou et al. 2023): greedy responses to the IFEval-style prompts, graded by
  lm-eval's checkers → prompt/instruction-level strict/loose accuracy;
- KL to the teacher: per-token reverse KL, KL(student ‖ teacher), on the model's own
  temperature-1 samples (seeded, the same prompts for every model) — the quantity on-policy
  distillation minimises;
- held-out NLL: per-token negative log-likelihood of held-out domain documents (and its
  perplexity) and of held-out instruction conversations (chat-templated prompt + response
  when the record has a response, the templated prompt alone when it does not);
- GSM8K accuracy (only when questions are given): greedy answer, final number compared.

Generation goes through `generate_responses`, which batches and caches on disk by
model identity + prompts + decoding, so re-running an unchanged model is free.
`recurrence_scaling` adds, for a looped model at several recurrence counts R, the held-out
NLLs, the exact full-vocabulary KL(teacher ‖ model) on the held-out domain documents
(`retroloop.eval.scaling.nll_and_kl`, teacher-forced) and the forward FLOPs per token.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from retroloop.config import EvaluateParams
from retroloop.eval import gsm8k as gsm8k_eval
from retroloop.eval import ifeval
from retroloop.eval.data import EvalData, IFEvalItem, build_eval_data, ifeval_items
from retroloop.eval.generation import generate_responses
from retroloop.eval.likelihood import nll_per_token, reverse_kl_exact_on_samples
from retroloop.eval.scaling import HeldOut, flops_per_token, nll_and_kl
from retroloop.eval.unrolled import supports_unrolled

log = logging.getLogger(__name__)

__all__ = [  # the evaluation inputs live in eval/data.py; imported from here too
    "EvalData", "IFEvalItem", "build_eval_data", "evaluate_model", "ifeval_items",
    "recurrence_scaling", "teacher_forced_rows",
]  # fmt: skip


# --------------------------------------------------------------------------- evaluators


def _ifeval_metrics(
    model, tokenizer, items: list[IFEvalItem], params: EvaluateParams, cache: dict[str, Any]
) -> dict[str, float | int | None]:
    if not items:
        return {}
    responses = generate_responses(
        model,
        tokenizer,
        [it.prompt for it in items],
        max_new_tokens=params.max_new_tokens,
        batch_size=params.batch_size,
        temperature=0.0,
        **cache,
    )
    scores = [
        ifeval.score_response(it.prompt, response, it.instruction_id_list, it.kwargs_list)
        for it, response in zip(items, responses, strict=True)
    ]
    # Instructions whose checker cannot run offline are skipped (and counted), not failed.
    agg = ifeval.aggregate(scores)
    out: dict[str, float | int | None] = {
        f"ifeval_{k}": agg[k]
        for k in ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")
    }
    out["ifeval_prompts"] = agg["prompts"]
    out["ifeval_instructions"] = agg["instructions"]
    out["ifeval_skipped"] = agg["skipped_instructions"]
    return out


def _gsm8k_accuracy(
    model, tokenizer, questions: list[tuple[str, str]], params: EvaluateParams, cache: dict
) -> float:
    responses = generate_responses(
        model,
        tokenizer,
        [q for q, _ in questions],
        max_new_tokens=params.max_new_tokens,
        batch_size=params.batch_size,
        temperature=0.0,
        **cache,
    )
    correct = sum(
        gsm8k_eval.is_correct(text, gold)
        for text, (_, gold) in zip(responses, questions, strict=True)
    )
    return correct / len(questions)


def _cache_args(
    cache_dir: Path | None, identity: dict[str, Any], purpose: str, forward_kwargs: dict
) -> dict[str, Any]:
    """The keyword arguments that make generation cached and recurrence-aware."""
    parts = {
        **identity,
        "purpose": purpose,
        **{f"forward.{k}": v for k, v in sorted(forward_kwargs.items())},
    }
    return {
        "cache_dir": cache_dir,
        "cache_key_parts": parts,
        "generate_kwargs": dict(forward_kwargs) or None,
    }


def evaluate_model(
    name: str,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    teacher: torch.nn.Module,
    data: EvalData,
    params: EvaluateParams,
    cache_dir: Path | None,
    forward_kwargs: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    seed: int = 0,
    reference: HeldOut | None = None,
    teacher_forced: dict[str, Any] | None = None,
) -> dict[str, float | int | None]:
    """All metrics of one model. `forward_kwargs` go to every forward/generate call (e.g.
    `{"num_recurrence": 4}` for a looped model); `identity` (model/adapter content hashes)
    keys the generation cache — without it the cache is keyed by `name` alone, which is
    only safe for throwaway cache dirs. Passing `model is teacher` gives KL = 0 without
    sampling. With `reference` (`scaling.held_out` of `teacher` on `data.domain_texts`) the
    result also holds "domain_forward_kl", from the same forward as "domain_nll".
    `teacher_forced`: this model's row of `teacher_forced_rows` (its held-out NLLs and KL at
    these `forward_kwargs`, already measured): taken instead of computed again."""
    fk = dict(forward_kwargs or {})
    identity = dict(identity or {"name": name})
    start = time.perf_counter()
    out: dict[str, float | int | None] = {}
    with torch.inference_mode():
        out.update(
            _ifeval_metrics(
                model,
                tokenizer,
                data.ifeval,
                params,
                _cache_args(cache_dir, identity, "ifeval", fk),
            )
        )
        if model is teacher:
            out["kl_to_teacher"] = 0.0
        elif data.kl_prompts:
            out["kl_to_teacher"] = float(
                reverse_kl_exact_on_samples(
                    model,
                    teacher,
                    tokenizer,
                    data.kl_prompts,
                    max_new_tokens=params.kl_max_new_tokens,
                    batch_size=params.batch_size,
                    seed=seed,
                    student_kwargs=fk or None,
                )
            )
        if teacher_forced is not None:
            nll = {k: teacher_forced[k] for k in TEACHER_FORCED[:3] if k in teacher_forced}
            kl = teacher_forced.get("domain_forward_kl")
        else:
            nll, kl = _nll_metrics(
                model, tokenizer, data, params.batch_size, fk, reference,
                is_reference=model is teacher,
            )  # fmt: skip
        out.update(nll)
        if data.gsm8k:
            cache = _cache_args(cache_dir, identity, "gsm8k", fk)
            out["gsm8k_accuracy"] = _gsm8k_accuracy(model, tokenizer, data.gsm8k, params, cache)
            out["gsm8k_questions"] = len(data.gsm8k)
    out["seconds"] = round(time.perf_counter() - start, 2)
    if kl is not None:
        out["domain_forward_kl"] = kl
    out = {k: _finite(v) for k, v in out.items()}
    log.info(
        "%s: %s",
        name,
        ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()),
    )
    return out


def _nll_metrics(
    model,
    tokenizer,
    data: EvalData,
    batch_size: int,
    fk: dict[str, Any],
    reference: HeldOut | None = None,
    *,
    is_reference: bool = False,
) -> tuple[dict[str, float], float | None]:
    """({"domain_nll", "domain_ppl", "instruct_nll"}, the domain KL(reference ‖ model) or None).

    With `reference` the domain documents take one forward for both figures
    (`scaling.nll_and_kl`: nll = mean_t −log p(x_{t+1} | x_≤t), the sums `nll_per_token` makes
    on the same tokens and batches); `is_reference` (the model is the reference) reads its NLL
    from `reference.teacher_nll` and KL = 0 without a forward at all."""
    out, kl = {}, None
    if data.domain_texts:
        if reference is not None and is_reference and reference.teacher_nll is not None:
            nll, kl = reference.teacher_nll, 0.0
        elif reference is not None:
            both = nll_and_kl(model, reference, use_cache=False, **fk)
            nll, kl = both["nll"], both["kl"]
        else:
            nll = nll_per_token(
                model,
                tokenizer,
                data.domain_texts,
                max_seq_len=data.max_seq_len,
                batch_size=batch_size,
                forward_kwargs=fk or None,
            )
        out["domain_nll"] = float(nll)
        out["domain_ppl"] = _ppl(nll)
    if data.instruct_texts:
        out["instruct_nll"] = float(
            nll_per_token(
                model,
                tokenizer,
                data.instruct_texts,
                max_seq_len=data.max_seq_len,
                batch_size=batch_size,
                forward_kwargs=fk or None,
            )
        )
    return out, kl


def recurrence_scaling(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalData,
    Rs: Sequence[int],
    *,
    batch_size: int = 8,
    reference: HeldOut | None = None,
    known: dict[int, dict[str, Any]] | None = None,
) -> list[dict[str, float | int | None]]:
    """Held-out quality of a looped model at each recurrence count R (test-time compute scaling).

    Returns one dict per R: {"R", "domain_nll", "domain_ppl", "instruct_nll", "gflops_per_token"}
    plus, when `reference` (the teacher's log-probs on the held-out domain documents) is given,
    "domain_forward_kl" = mean_t KL(p_teacher ‖ p_model,R) over the full vocabulary.
    `known`: {R: `evaluate_model`'s metrics at that R} (the model's default R, already measured
    on the same data and batches): its figures are taken, not computed a second time.
    """
    known = known or {}
    todo = [int(R) for R in Rs if int(R) not in known]
    measured = teacher_forced_rows(model, tokenizer, data, todo, batch_size, reference)
    rows = []
    for R in Rs:
        done = known.get(int(R), measured.get(int(R)))
        row = {"R": int(R), **{k: done[k] for k in TEACHER_FORCED if k in done}}
        row["gflops_per_token"] = flops_per_token(model, int(R)) / 1e9
        rows.append({k: _finite(v) for k, v in row.items()})
        log.info(
            "recurrence R=%d: domain_nll=%.4f domain_forward_kl=%s",
            R,
            row.get("domain_nll", float("nan")),
            row.get("domain_forward_kl"),
        )
    return rows


# The teacher-forced figures of one (model, R), in metrics.json's order.
TEACHER_FORCED = ("domain_nll", "domain_ppl", "instruct_nll", "domain_forward_kl")


def teacher_forced_rows(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    data: EvalData,
    Rs: Sequence[int],
    batch_size: int,
    reference: HeldOut | None,
) -> dict[int, dict[str, float]]:
    """{R: {"domain_nll", "domain_ppl", "instruct_nll", "domain_forward_kl"}} of a looped model.

    A looped model in eval mode without early exit runs each batch once, unrolled to max(Rs)
    (`eval.unrolled`: s_k does not depend on R, so every R's figures are those of one forward
    at that R to the bit); otherwise one `_nll_metrics` per R."""
    Rs = sorted({int(R) for R in Rs})
    if not Rs:
        return {}
    if not supports_unrolled(model):
        rows = {}
        for R in Rs:
            nll, kl = _nll_metrics(
                model, tokenizer, data, batch_size, {"num_recurrence": R}, reference
            )
            rows[R] = nll if kl is None else {**nll, "domain_forward_kl": kl}
        return rows
    rows = {R: {} for R in Rs}
    with torch.inference_mode():
        if data.domain_texts:
            if reference is not None:
                for R, both in nll_and_kl(model, reference, recurrences=Rs).items():
                    rows[R] |= {"domain_nll": float(both["nll"]), "domain_ppl": _ppl(both["nll"]),
                                "domain_forward_kl": both["kl"]}  # fmt: skip
            else:
                nlls = nll_per_token(model, tokenizer, data.domain_texts, recurrences=Rs,
                                     max_seq_len=data.max_seq_len, batch_size=batch_size)  # fmt: skip
                for R, nll in nlls.items():
                    rows[R] |= {"domain_nll": float(nll), "domain_ppl": _ppl(nll)}
        if data.instruct_texts:
            nlls = nll_per_token(model, tokenizer, data.instruct_texts, recurrences=Rs,
                                 max_seq_len=data.max_seq_len, batch_size=batch_size)  # fmt: skip
            for R, nll in nlls.items():
                rows[R]["instruct_nll"] = float(nll)
    return {R: {k: row[k] for k in TEACHER_FORCED if k in row} for R, row in rows.items()}


def _ppl(nll: float) -> float:
    return math.exp(min(float(nll), 50.0))  # guard overflow on a broken model


def _finite(value: Any) -> Any:
    """NaN/inf are not JSON (and break `dvc metrics show`): store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
