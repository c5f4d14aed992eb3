"""Batched chat generation with any HF causal LM (a PEFT model too), cached on disk.

Prompts go through the tokenizer's chat template with `add_generation_prompt=True` (the
same rendering for teacher and student: a template mismatch silently biases them), are
left-padded (decoder-only generation continues from the right edge), and are generated
greedily unless `temperature > 0`. Sampling uses top-k 0 / top-p 1 so the samples follow the
model's own distribution (DESIGN.md §5).

The cache file is `cache_dir/gen-<sha256>.json`, keyed by the caller's `cache_key_parts`
(model and adapter hashes, recurrence, ...), the prompts, the decoding settings, the extra
`generate_kwargs` and the chat template. `batch_size` is not part of the key. With
`temperature > 0` put the seed in `cache_key_parts` and seed torch before calling.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from retroloop.artifacts import write_json_atomic
from retroloop.canonical import json_sha256
from retroloop.datasets import chat_messages
from retroloop.errors import ModelError
from retroloop.sequences import pad_id, pad_left

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def encode_chat_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as a user turn, ending with the assistant header."""
    if not tokenizer.chat_template:
        raise ModelError(
            "the tokenizer has no chat template; use an instruct model or set tokenizer.chat_template"
        )
    texts = [
        tokenizer.apply_chat_template(chat_messages(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    # The template already writes any BOS it wants; do not add special tokens twice.
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-turn ids: the model's generation config and the tokenizer's eos."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def until_eos(tokens: list[int], eos: list[int]) -> tuple[list[int], bool]:
    """The tokens up to the first eos (excluded) and whether an eos was found."""
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:i], True
    return tokens, False


def sampling_kwargs(temperature: float) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def cache_key(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    cache_key_parts: dict,
    generate_kwargs: dict | None,
) -> tuple[str, dict]:
    payload = {
        "version": CACHE_VERSION,
        "parts": cache_key_parts,
        "prompts_sha256": hashlib.sha256(
            json.dumps(prompts, ensure_ascii=False).encode()
        ).hexdigest(),
        "n_prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "generate_kwargs": generate_kwargs or {},
        "chat_template_sha256": hashlib.sha256(
            (tokenizer.chat_template or "").encode()
        ).hexdigest(),
    }
    return json_sha256(payload), payload


@torch.inference_mode()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    cache_dir: Path | None,
    cache_key_parts: dict,
    generate_kwargs: dict | None = None,
) -> list[str]:
    """One response per prompt (special tokens removed, stripped), in the prompts' order."""
    path = None
    if cache_dir is not None:
        key, payload = cache_key(
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            cache_key_parts=cache_key_parts,
            generate_kwargs=generate_kwargs,
        )
        path = Path(cache_dir) / f"gen-{key}.json"
        if path.is_file():
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cached = {}  # unreadable: regenerate and overwrite
            if len(cached.get("responses", [])) == len(prompts):
                log.info("generation cache hit: %s", path.name)
                return cached["responses"]
    if not prompts:
        return []

    encoded = encode_chat_prompts(tokenizer, prompts)
    eos = eos_token_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    # Longest first: similar lengths share a batch (less padding), and OOM shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", unit="batch", leave=False):
        ids_B_P, mask_B_P = pad_left([encoded[i] for i in batch], pad)
        out_B_T = model.generate(
            input_ids=ids_B_P.to(device),
            attention_mask=mask_B_P.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            **sampling_kwargs(temperature),
            **(generate_kwargs or {}),
        )
        new_B_N = out_B_T[:, ids_B_P.shape[1] :].tolist()
        for i, tokens in zip(batch, new_B_N, strict=True):
            kept, _ = until_eos(tokens, eos)
            responses[i] = tokenizer.decode(kept, skip_special_tokens=True).strip()

    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": payload, "responses": responses})
    return responses
