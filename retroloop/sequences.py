"""Token sequences from the prepared datasets, shared by analyze, cache_teacher and distill,
and the one home of padding (`pad_id`, `pad_right`, `pad_left`, `pad_batch`).

cache_teacher and distill must see byte-identical sequences in the same order (the cache
is indexed by sequence number), so both build them here and nowhere else.

Labels follow the Hugging Face convention: `labels_T[t]` is the token at position t (the
model shifts), with −100 on prompt tokens and padding so only the response (chat) or
every token (plain text) is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass(frozen=True)
class Sequence:
    id: str
    input_ids: list[int]
    labels: list[int]


def render_chat(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str | None = None
) -> str:
    """The chat-templated text: the prompt with a generation prompt, plus the response if given."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if response is not None:
        text += response + _end_of_turn(tokenizer)
    return text


def _end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    # What the template appends after an assistant message (e.g. "<|im_end|>\n"), found by
    # rendering a one-turn conversation, so any chat template works.
    marker = "\x00RESPONSE\x00"
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    return full.split(marker, 1)[1] if marker in full else (tokenizer.eos_token or "")


def chat_sequence(
    tokenizer: PreTrainedTokenizerBase, id_: str, prompt: str, response: str, max_len: int
) -> Sequence:
    prompt_ids = tokenizer(render_chat(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(render_chat(tokenizer, prompt, response), add_special_tokens=False)[
        "input_ids"
    ]
    full_ids = full_ids[:max_len]
    n_prompt = min(len(prompt_ids), len(full_ids))
    labels = [IGNORE] * n_prompt + full_ids[n_prompt:]
    return Sequence(id_, full_ids, labels)


def text_sequence(
    tokenizer: PreTrainedTokenizerBase, id_: str, text: str, max_len: int
) -> Sequence:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
    return Sequence(id_, ids, list(ids))


def training_sequences(
    tokenizer: PreTrainedTokenizerBase,
    instruct: pl.DataFrame,
    domain: pl.DataFrame | None,
    max_len: int,
) -> list[Sequence]:
    """Chat sequences (prompt masked) then domain text sequences, in dataset order.

    Sequences with no trainable token are skipped (a prompt longer than `max_len`).
    """
    seqs = [
        chat_sequence(tokenizer, row["id"], row["prompt"], row["response"] or "", max_len)
        for row in instruct.iter_rows(named=True)
    ]
    if domain is not None:
        seqs += [
            text_sequence(tokenizer, row["id"], row["text"], max_len)
            for row in domain.iter_rows(named=True)
        ]
    return [s for s in seqs if any(label != IGNORE for label in s.labels[1:])]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The one pad-id rule: the tokenizer's pad token, else its eos (what `load_tokenizer` sets
    when a tokenizer has no pad token), else 0. Padding sits under a zero attention mask, so the
    id never changes an output; pad = eos keeps `generate`'s `pad_token_id` a real token."""
    for tok in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tok is not None:
            return tok
    return 0


def pad_right(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_B_T, mask_B_T) with the sequences flush left: default position ids count from 0,
    for teacher-forced scoring and training."""
    return _pad(seqs, pad, left=False)


def pad_left(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_B_T, mask_B_T) with the sequences flush right: a decoder-only `generate` continues
    every row from the right edge."""
    return _pad(seqs, pad, left=True)


def _pad(seqs: list[list[int]], pad: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids_B_T = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask_B_T = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids_B_T[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask_B_T[row, cols] = 1
    return ids_B_T, mask_B_T


def pad_batch(seqs: list[Sequence], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids_B_T, attention_mask_B_T, labels_B_T); labels padded with −100."""
    ids_B_T, mask_B_T = pad_right([s.input_ids for s in seqs], pad)
    labels_B_T, _ = pad_right([s.labels for s in seqs], IGNORE)
    return ids_B_T, mask_B_T, labels_B_T
