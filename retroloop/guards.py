"""Run-time self-checks that the installed libraries compute what the method needs.

Why: transformers 5.24 renamed the KV-cache argument (`past_key_values` → `cache`); the looped
model then decoded every new token without its cache (no context after the first token), and
every rollout, IFEval score and KL of a run was wrong while each stage exited 0. These checks
run on a few held-out prompts before a stage generates anything and before it writes, fail the
stage with one line (`GuardError`) that names the check and the library versions, and their
measured agreement goes into the manifest.

- `check_cached_generate`: greedy `model.generate` with the KV cache (the evaluation path), and
  for every generated step the next-token log-probs of one cache-free forward over prompt +
  generated tokens. Equal argmax at every step means cache-free greedy decoding would produce
  the same tokens; `max_abs_logp_diff` is the largest |Δ log p(y_t)| of the generated tokens.
- `onpolicy.check_rollouts`: the same for a `RolloutEngine` (OPD's sampler, its own cached
  loop): the sampler's log-probs against the learner's cache-free scoring; and the teacher's
  scoring of those tokens (LM head on generated positions only) against a plain teacher-forced
  forward over the whole sequence.

Tolerances are on log-probs and depend on the dtype: fp32 kernels with and without a cache
agree to ~1e-5 here, bf16/fp16 to ~1e-2; a dropped cache moves them by nats.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from retroloop.config import GuardParams
from retroloop.errors import GuardError

TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 0.1, torch.float16: 0.05}
# The checks' sizes are params (`guards.*`); the functions' defaults are the schema's.
GUARD_NEW_TOKENS = GuardParams().new_tokens


def library_line() -> str:
    """`transformers X, torch Y, peft Z` for error messages."""
    parts = []
    for name in ("transformers", "torch", "peft"):
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def tolerance_for(model: torch.nn.Module) -> float:
    return TOLERANCE.get(next(model.parameters()).dtype, 0.1)


def guard_error(check: str, what: str, detail: str) -> GuardError:
    return GuardError(
        f"guard {check} failed for {what}: {detail} ({library_line()}); this environment "
        "computes something other than the tested one: reinstall the locked versions (make setup)"
    )


@torch.inference_mode()
def check_cached_generate(
    model: torch.nn.Module,
    prompts_ids: list[list[int]],
    *,
    what: str,
    pad_id: int,
    forward_kwargs: dict[str, Any] | None = None,
    max_new_tokens: int = GUARD_NEW_TOKENS,
) -> dict[str, Any]:
    """Greedy `generate` (KV cache) vs one cache-free forward, prompt by prompt (no padding:
    the padded path has its own unit test). Raises `GuardError`; returns the measurements."""
    fk = dict(forward_kwargs or {})
    device = next(model.parameters()).device
    tol = tolerance_for(model)
    worst, steps, agree = 0.0, 0, 0
    for ids in prompts_ids:
        ids_1_P = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(
            input_ids=ids_1_P,
            attention_mask=torch.ones_like(ids_1_P),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=pad_id,
            **fk,
        )
        P, N = ids_1_P.shape[1], len(out.logits)
        new_N = out.sequences[0, P : P + N]
        cached_N_V = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
        full = out.sequences[:, : P + N]
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False, **fk)
        fresh_N_V = torch.log_softmax(logits.logits[0, P - 1 : P - 1 + N].float(), dim=-1)
        picked = new_N[:, None]
        cached_logp_N = cached_N_V.gather(-1, picked).squeeze(-1)
        fresh_logp_N = fresh_N_V.gather(-1, picked).squeeze(-1)
        worst = max(worst, float((cached_logp_N - fresh_logp_N).abs().max()))
        # A different argmax counts only when it is ahead by more than the tolerance (a near-tie
        # may flip between kernels without anything being wrong).
        margin_N = fresh_N_V.max(-1).values - fresh_logp_N
        agree += int((margin_N <= tol).sum())
        steps += N
    result = {"max_abs_logp_diff": worst, "token_agreement": agree / max(steps, 1)}
    result |= {"steps": steps, "prompts": len(prompts_ids), "tolerance": tol}
    if worst > tol or agree < steps:
        raise guard_error(
            "cached_generate",
            what,
            f"cached vs cache-free greedy log-probs differ by up to {worst:.3g} (tolerance {tol:g}), "
            f"{steps - agree} of {steps} greedy tokens differ",
        )
    return result
