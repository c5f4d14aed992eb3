"""Likelihood metrics: per-token NLL (perplexity = exp) and reverse KL to a teacher on samples.

`reverse_kl_exact_on_samples` is the on-policy forgetting measure of OPD (DESIGN.md §5): the student
samples at temperature 1 (top-k 0, top-p 1) from the chat-templated prompt, then student and
teacher each run one forward pass over the same token ids and the per-token reverse KL
KL(pi_student || pi_teacher) is computed exactly over the full vocabulary at every generated
position (the sampled eos included, what follows it excluded), averaged over generated tokens.
Not `losses.reverse_kl_single_sample`, the training loop's one-sample Monte-Carlo estimate
log π_S(y_t) − log π_T(y_t) from the sampled tokens' log-probs alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from retroloop.errors import MismatchError
from retroloop.eval.generation import encode_chat_prompts, eos_token_ids, sampling_kwargs
from retroloop.eval.unrolled import logits_per_key
from retroloop.losses import reverse_kl_exact
from retroloop.sequences import pad_id, pad_left, pad_right


@torch.inference_mode()
def nll_per_token(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    max_seq_len: int,
    batch_size: int,
    forward_kwargs: dict | None = None,
    recurrences: Sequence[int] | None = None,
) -> float | dict[int, float]:
    """Mean next-token negative log-likelihood (nats) over all non-pad target tokens.

    Each text is tokenized as the tokenizer does by default and truncated to `max_seq_len`;
    the mean is token-weighted over the whole set, so perplexity = exp(result). With
    `recurrences` (a looped model in eval mode): {R: nll} from one unrolled pass per batch
    (`eval.unrolled`), equal to the bit to one call per R with `num_recurrence=R`.
    """
    device = next(model.parameters()).device
    encoded = [tokenizer(t, truncation=True, max_length=max_seq_len)["input_ids"] for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]  # a single token has no next-token target
    if not encoded:
        raise ValueError("nll_per_token: no text has two or more tokens")
    keys = [None] if recurrences is None else sorted({int(R) for R in recurrences})
    totals, count = dict.fromkeys(keys, 0.0), 0
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    for batch in tqdm(batches, desc="nll", unit="batch", leave=False):
        ids_B_T, mask_B_T = pad_right(batch, pad_id(tokenizer))
        ids_B_T, mask_B_T = ids_B_T.to(device), mask_B_T.to(device)
        target_B_T = ids_B_T[:, 1:]
        keep_B_T = mask_B_T[:, 1:].bool()
        fk = forward_kwargs or {}
        for k, logits_B_T_V in logits_per_key(model, ids_B_T, mask_B_T, fk, keys):
            nll_N = F.cross_entropy(
                logits_B_T_V[:, :-1][keep_B_T].float(), target_B_T[keep_B_T], reduction="none"
            )
            totals[k] += nll_N.sum().item()
        count += int(keep_B_T.sum())
    out = {k: total / count for k, total in totals.items()}
    return out[None] if recurrences is None else out


def _fork_rng(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


@torch.inference_mode()
def reverse_kl_exact_on_samples(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    student_kwargs: dict | None = None,
) -> float:
    """Mean over the student's sampled tokens of the exact KL(student || teacher) (nats/token).

    Student and teacher must share the tokenizer (and so the chat template). `student_kwargs`
    (e.g. `num_recurrence`) go to the student's `generate` and forward; the global RNG is
    left untouched (sampling runs in a forked RNG seeded with `seed + batch index`).
    """
    student_kwargs = student_kwargs or {}
    device = next(student.parameters()).device
    encoded = encode_chat_prompts(tokenizer, prompts)
    eos = eos_token_ids(student, tokenizer)
    pad = pad_id(tokenizer)
    total, count = 0.0, 0
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    for b, batch in enumerate(tqdm(batches, desc="reverse KL", unit="batch", leave=False)):
        ids_B_P, mask_B_P = pad_left(batch, pad)
        with _fork_rng(device):
            torch.manual_seed(seed + b)
            out_B_T = student.generate(
                input_ids=ids_B_P.to(device),
                attention_mask=mask_B_P.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
                **sampling_kwargs(1.0),
                **student_kwargs,
            )
        generated = out_B_T[:, ids_B_P.shape[1] :].tolist()
        # Re-lay each row as prompt + sampled tokens (through the first eos), flush left, so
        # both models see the ids at the positions the student sampled them at.
        seqs, spans = [], []
        for prompt, tokens in zip(batch, generated, strict=True):
            kept = until_eos_inclusive(tokens, eos)
            seqs.append(prompt + kept)
            spans.append((len(prompt), len(kept)))
        ids_B_T, mask_B_T = pad_right(seqs, pad)
        ids_B_T, mask_B_T = ids_B_T.to(device), mask_B_T.to(device)
        # The logit at position t predicts token t + 1: targets are the sampled tokens.
        target_B_T = torch.zeros_like(mask_B_T, dtype=torch.bool)
        for row, (start, n) in enumerate(spans):
            target_B_T[row, start - 1 : start - 1 + n] = True
        student_N_V = student(input_ids=ids_B_T, attention_mask=mask_B_T, **student_kwargs).logits[
            target_B_T
        ]
        # The teacher may live on another device (e.g. CPU while the student trains on GPU).
        t_dev = next(teacher.parameters()).device
        teacher_B_T_V = teacher(
            input_ids=ids_B_T.to(t_dev), attention_mask=mask_B_T.to(t_dev)
        ).logits
        teacher_N_V = teacher_B_T_V[target_B_T.to(t_dev)].to(device)
        if student_N_V.shape[-1] != teacher_N_V.shape[-1]:
            raise MismatchError(
                f"student and teacher output {student_N_V.shape[-1]} vs {teacher_N_V.shape[-1]} logits; "
                "they must share one tokenizer and vocabulary"
            )
        kl_N = reverse_kl_exact(student_N_V, teacher_N_V)
        total += kl_N.sum().item()
        count += kl_N.numel()
    return total / count if count else 0.0


def until_eos_inclusive(tokens: list[int], eos: list[int]) -> list[int]:
    """The sampled tokens through the first eos (the eos is a sampled token too)."""
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[: i + 1]
    return tokens
