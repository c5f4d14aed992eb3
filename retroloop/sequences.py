"""Token sequences from the prepared datasets, shared by analyze, cache_teacher and distill.

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


def pad_batch(seqs: list[Sequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids_B_T, attention_mask_B_T, labels_B_T)."""
    T = max(len(s.input_ids) for s in seqs)
    ids_B_T = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask_B_T = torch.zeros((len(seqs), T), dtype=torch.long)
    labels_B_T = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids_B_T[i, :n] = torch.tensor(s.input_ids)
        mask_B_T[i, :n] = 1
        labels_B_T[i, :n] = torch.tensor(s.labels)
    return ids_B_T, mask_B_T, labels_B_T
