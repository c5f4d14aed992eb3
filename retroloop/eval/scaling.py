"""Held-out NLL and full-vocabulary KL to the teacher against R, and compute per token.

The comparison that matters (DESIGN.md §5; McLeish et al. 2025, "retrofitted recurrence"):
teacher, converted, static and looped models side by side, NLL and KL against the recurrence
count R, with compute per token. Everything here is teacher-forced on the same held-out
documents, so the numbers are deterministic and cheap (one forward per model and R):

    nll(R)  = mean_t −log p_θ,R(x_{t+1} | x_≤t)
    kl(R)   = mean_t Σ_v p_T(v | x_≤t) · (log p_T(v | x_≤t) − log p_θ,R(v | x_≤t))

`kl` is the exact forward KL(teacher ‖ model) over the full vocabulary (no top-k, no bound).
Compute per token counts the multiply-adds of the unrolled decoder (2 FLOPs each) plus the LM
head: a looped model with P + R·B + C layer calls costs (P + R·B + C)/N of its source's layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from retroloop.eval.unrolled import logits_per_key
from retroloop.losses import kl_terms
from retroloop.sequences import pad_id, pad_right


@dataclass
class HeldOut:
    """Tokenized held-out documents and the teacher's log-probs at every target position."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (ids_B_T, mask_B_T) per batch
    teacher_logp: list[torch.Tensor]  # [N_b, V] per batch, float16 (exact enough for a mean KL)
    # The teacher's own token-weighted NLL there, from its fp32 log-probs (before the fp16 cast):
    # the same sums `likelihood.nll_per_token` makes, so evaluate needs no second teacher forward.
    teacher_nll: float | None = None


@torch.inference_mode()
def held_out(
    teacher: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_seq_len: int,
    batch_size: int,
) -> HeldOut:
    """Encode `texts` (truncated to `max_seq_len`) and run the teacher over them once."""
    encoded = [tokenizer(t, truncation=True, max_length=max_seq_len)["input_ids"] for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]
    if not encoded:
        raise ValueError("held_out: no text has two or more tokens")
    pad = pad_id(tokenizer)
    batches, teacher_logp = [], []
    nll_sum, count = 0.0, 0
    device = next(teacher.parameters()).device
    for i in range(0, len(encoded), batch_size):
        ids_B_T, mask_B_T = pad_right(encoded[i : i + batch_size], pad)
        logits_B_T_V = teacher(
            input_ids=ids_B_T.to(device), attention_mask=mask_B_T.to(device)
        ).logits
        keep_B_T = mask_B_T[:, 1:].bool().to(device)
        logp_N_V = F.log_softmax(logits_B_T_V[:, :-1][keep_B_T].float(), dim=-1)
        targets_N = ids_B_T[:, 1:].to(device)[keep_B_T]
        nll_sum += float(-logp_N_V.gather(-1, targets_N[:, None]).sum())
        count += int(targets_N.numel())
        batches.append((ids_B_T, mask_B_T))
        teacher_logp.append(logp_N_V.half().cpu())
    return HeldOut(batches, teacher_logp, teacher_nll=nll_sum / count)


@torch.inference_mode()
def nll_and_kl(
    model: torch.nn.Module,
    data: HeldOut,
    *,
    recurrences: Sequence[int] | None = None,
    **forward_kwargs,
) -> dict:
    """Token-weighted held-out NLL and exact KL(teacher ‖ model) over the full vocabulary:
    {"nll", "kl"}; with `recurrences` (a looped model in eval mode), {R: {"nll", "kl"}} for
    each R from one unrolled pass per batch (`eval.unrolled`: the same numbers to the bit as
    one call per R with `num_recurrence=R`, the block run max(R) times instead of sum(R))."""
    device = next(model.parameters()).device
    keys = [None] if recurrences is None else sorted({int(R) for R in recurrences})
    sums = {k: [0.0, 0.0] for k in keys}  # nll, kl
    count = 0
    for (ids_B_T, mask_B_T), t_logp_N_V in zip(data.batches, data.teacher_logp, strict=True):
        ids_B_T, mask_B_T = ids_B_T.to(device), mask_B_T.to(device)
        keep_B_T = mask_B_T[:, 1:].bool()
        targets_N = ids_B_T[:, 1:][keep_B_T]
        for k, logits_B_T_V in logits_per_key(model, ids_B_T, mask_B_T, forward_kwargs, keys):
            logp_N_V = F.log_softmax(logits_B_T_V[:, :-1][keep_B_T].float(), dim=-1)
            sums[k][0] += float(-logp_N_V.gather(-1, targets_N[:, None]).sum())
            sums[k][1] += float(kl_terms(t_logp_N_V.to(device), logp_N_V).sum())
        count += int(targets_N.numel())
    out = {k: {"nll": nll / count, "kl": kl / count} for k, (nll, kl) in sums.items()}
    return out[None] if recurrences is None else out


def flops_per_token(model: torch.nn.Module, recurrence: int | None = None) -> float:
    """Forward FLOPs per token: 2 × (multiply-adds of every linear layer call + the LM head).

    Attention's score/value products (which grow with context) are left out: at ≤ 256 tokens
    and these widths they are a few percent, and the same share for every model compared.
    """
    from retroloop.models.recurrent import RecurrentForCausalLM

    def linear_macs(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    head = model.get_output_embeddings().weight.numel()
    if isinstance(model, RecurrentForCausalLM):
        m = model.model
        R = model.config.recurrence if recurrence is None else recurrence
        macs = sum(linear_macs(layer) for layer in m.prelude) + sum(
            linear_macs(layer) for layer in m.coda
        )
        macs += R * (m.adapter.weight.numel() + sum(linear_macs(layer) for layer in m.block))
    else:
        macs = sum(linear_macs(layer) for layer in model.model.layers)
    return 2.0 * (macs + head)


def scaling_rows(
    model: torch.nn.Module, data: HeldOut, Rs: Sequence[int] | None
) -> list[dict[str, float | int | None]]:
    """One row per R (a looped model) or a single row with R = None (a plain model)."""
    from retroloop.models.recurrent import RecurrentForCausalLM

    rows = []
    if isinstance(model, RecurrentForCausalLM):
        for R in Rs or [model.config.recurrence]:
            row = nll_and_kl(model, data, num_recurrence=int(R), use_cache=False)
            rows.append({"R": int(R), **row, "flops_per_token": flops_per_token(model, int(R))})
    else:
        row = nll_and_kl(model, data, use_cache=False)
        rows.append({"R": None, **row, "flops_per_token": flops_per_token(model)})
    return rows


def held_out_scores(
    model_dir: str | Path,
    adapter: str | Path | None = None,
    Rs: Sequence[int | None] = (1,),
    *,
    teacher_dir: str | Path = "data/prepare/model",
    eval_docs: str | Path = "data/prepare/datasets/domain_eval.parquet",
    max_seq_len: int = 64,
    batch_size: int = 4,
) -> dict[int | None, dict[str, float]]:
    """`nll_and_kl` per R for a saved model (+ a PEFT adapter, merged) against a saved teacher
    on a Parquet file of held-out documents (its `text` column); R = None scores a plain model
    (no `num_recurrence`). What the learning tests and `benchmarks/tiny_margins.py` measure."""
    import polars as pl
    from peft import PeftModel

    from retroloop.models.loading import load_model, load_tokenizer

    docs = pl.read_parquet(eval_docs)["text"].to_list()
    teacher = load_model(teacher_dir)
    data = held_out(
        teacher, load_tokenizer(teacher_dir), docs, max_seq_len=max_seq_len, batch_size=batch_size
    )
    model = load_model(model_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    return {
        R: nll_and_kl(model, data, use_cache=False, **({} if R is None else {"num_recurrence": R}))
        for R in Rs
    }
