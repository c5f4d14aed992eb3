"""Rollout engines: the student samples completions and reports the log-prob of every token.

One interface, two backends (DESIGN.md §2, §5):

- `TransformersEngine`: any HF causal LM (the looped `RecurrentForCausalLM`, a PEFT-wrapped
  student, a plain Llama) on CPU or GPU; a batched, left-padded sampling loop over the KV cache.
- `VllmEngine` (`rollout_vllm.py`): `vllm.LLM` + a `LoRARequest` for the student adapter, on
  CUDA workers only. vLLM is an optional extra, imported inside the constructor.

On-policy distillation needs the *sampler's* log-probs log π_sampler(y_t) of each sampled token,
under the distribution actually sampled from: softmax(z/T) restricted to the top-p nucleus and
renormalised. At T = 1, top-p = 1 (the OPD default) that is the student's own distribution;
any truncation makes the samples not the student's (Thinking Machines, "On-Policy
Distillation", 2025; Agarwal et al., GKD, arXiv:2306.13649). The learner recomputes
log π_θ with gradients, and the importance ratio exp(log π_θ − log π_sampler) corrects for
any sampler/learner mismatch (precision, kernels, a stale adapter).

The hand loop (rather than `model.generate(output_scores=True)`) is used because (1) it
samples from our own `torch.Generator`, so a seed reproduces the samples without touching the
global RNG; (2) nothing from a model's `generation_config` (HF's default top_k = 50, repetition
penalties) can silently truncate the distribution; (3) it keeps pace with `generate`:
`retroloop bench opd` times the two side by side (`engine_vs_generate_tokens_per_s_ratio`;
its last results are in the README). Prompts go
through the chat template with `add_generation_prompt=True` (`eval.generation.encode_chat_prompts`),
tokenised without extra specials: the same ids the teacher later scores.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from retroloop.config import RolloutParams
from retroloop.eval.generation import encode_chat_prompts, eos_token_ids
from retroloop.losses import gather_logprobs
from retroloop.models.recurrent import CACHE_KWARG

log = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """Ragged per-sample rollouts; row i is sample `sample_index[i]` of prompt `prompt_index[i]`."""

    prompt_index: list[int] = field(default_factory=list)
    sample_index: list[int] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    sampler_logprobs: list[list[float]] = field(default_factory=list)
    finished: list[bool] = field(
        default_factory=list
    )  # True = stopped on EOS, False = hit max tokens
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def select(self, rows: list[int]) -> RolloutBatch:
        """A sub-batch (e.g. one micro-batch) with the given rows."""
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return RolloutBatch(
            pick(self.prompt_index),
            pick(self.sample_index),
            pick(self.prompt_ids),
            pick(self.completion_ids),
            pick(self.sampler_logprobs),
            pick(self.finished),
        )

    def pack(self, pad_id: int, device: torch.device | str = "cpu") -> PackedRollouts:
        """Right-padded prompt+completion tensors for one teacher-forced forward pass."""
        T = max(len(p) + len(c) for p, c in zip(self.prompt_ids, self.completion_ids, strict=True))
        B = len(self)
        tokens_B_T = torch.full((B, T), pad_id, dtype=torch.long)
        attention_B_T = torch.zeros((B, T), dtype=torch.long)
        mask_B_T = torch.zeros((B, T), dtype=torch.bool)
        sampler_logp_B_T = torch.zeros((B, T), dtype=torch.float32)
        for i, (p, c, lp) in enumerate(
            zip(self.prompt_ids, self.completion_ids, self.sampler_logprobs, strict=True)
        ):
            n_p, n = len(p), len(p) + len(c)
            tokens_B_T[i, :n] = torch.tensor(p + c)
            attention_B_T[i, :n] = 1
            mask_B_T[i, n_p:n] = True
            sampler_logp_B_T[i, n_p:n] = torch.tensor(lp, dtype=torch.float32)
        return PackedRollouts(
            tokens_B_T.to(device),
            attention_B_T.to(device),
            mask_B_T.to(device),
            sampler_logp_B_T.to(device),
        )


@dataclass
class PackedRollouts:
    """Position-aligned tensors: column t holds token t and, where `mask_B_T[:, t]` (a generated
    token), log π_sampler(token_t | tokens_<t). Prompt and padding columns are 0 / False."""

    tokens_B_T: Tensor
    attention_mask_B_T: Tensor
    mask_B_T: Tensor
    sampler_logp_B_T: Tensor


def token_logprobs(logits_B_T_V: Tensor, tokens_B_T: Tensor) -> Tensor:
    """log p(token_t | tokens_<t) at column t (column 0, which nothing predicts, is 0) → `[B, T]` fp32.

    `losses.gather_logprobs` (z_y − logsumexp(z)): no `[B, T, V]` log-softmax is materialised.
    """
    logp_B_Tm1 = gather_logprobs(logits_B_T_V[:, :-1], tokens_B_T[:, 1:, None]).squeeze(-1)
    return F.pad(logp_B_Tm1, (1, 0))


def sampling_logprobs(logits_B_V: Tensor, temperature: float, top_p: float) -> Tensor:
    """Log-probs of the distribution actually sampled from: softmax(z/T) on the top-p nucleus,
    renormalised (tokens outside it get −inf). The most likely token is always kept."""
    logp_B_V = F.log_softmax(logits_B_V.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return logp_B_V
    sorted_B_V, order_B_V = logp_B_V.sort(dim=-1, descending=True)
    mass_before_B_V = (
        sorted_B_V.exp().cumsum(-1) - sorted_B_V.exp()
    )  # mass of strictly better tokens
    drop_sorted_B_V = mass_before_B_V >= top_p
    drop_B_V = torch.zeros_like(drop_sorted_B_V).scatter(-1, order_B_V, drop_sorted_B_V)
    return F.log_softmax(logp_B_V.masked_fill(drop_B_V, float("-inf")), dim=-1)


class RolloutEngine(Protocol):
    def sample(
        self,
        prompts: list[str],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] = 0,
    ) -> RolloutBatch: ...


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Chat-templated prompt ids (add_generation_prompt=True), the same ids evaluation uses."""
    return encode_chat_prompts(tokenizer, prompts)


def eos_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> set[int]:
    return set(eos_token_ids(model, tokenizer))


class TransformersEngine:
    """Batched sampling with a KV cache on any HF causal LM.

    `generate_kwargs` are passed to every forward call (e.g. `{"num_recurrence": 2}` for the
    looped model). Rows (prompt, sample) are processed `batch_size` at a time, left-padded with
    position ids from the attention mask, so a row's logits do not depend on its padding.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 8,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.generate_kwargs = dict(generate_kwargs or {})
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.eos = eos_ids(tokenizer, model)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] = 0,
    ) -> RolloutBatch:
        """`n` samples of each prompt. `seed`: one generator for the whole batch, or one seed
        per prompt: sample j of prompt i then draws from its own generator (`row_seed`), so a
        row's tokens do not depend on which other rows share its batch (OPD over ranks)."""
        start = time.perf_counter()
        device = next(self.model.parameters()).device
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        gen: torch.Generator | dict[tuple[int, int], torch.Generator]
        if isinstance(seed, int):
            gen = torch.Generator(device=device).manual_seed(seed)
        else:
            if len(seed) != len(prompts):
                raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")
            gen = {
                (i, j): torch.Generator(device=device).manual_seed(row_seed(seed[i], j))
                for i, j in rows
            }
        was_training = self.model.training
        self.model.eval()
        out = RolloutBatch()
        try:
            for first in range(0, len(rows), self.batch_size):
                chunk = rows[first : first + self.batch_size]
                ids = [prompt_ids[i] for i, _ in chunk]
                gens = gen if isinstance(gen, torch.Generator) else [gen[r] for r in chunk]
                completions, logprobs, finished = self._sample_chunk(
                    ids, max_new_tokens, temperature, top_p, gens, device
                )
                out.prompt_index += [i for i, _ in chunk]
                out.sample_index += [j for _, j in chunk]
                out.prompt_ids += ids
                out.completion_ids += completions
                out.sampler_logprobs += logprobs
                out.finished += finished
        finally:
            self.model.train(was_training)
        out.seconds = time.perf_counter() - start
        return out

    def _sample_chunk(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        gen: torch.Generator | list[torch.Generator],
        device: torch.device,
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
        ids_B_P = torch.full((B, P), self.pad_id, dtype=torch.long)
        attn_B_P = torch.zeros((B, P), dtype=torch.long)
        for b, p in enumerate(prompt_ids):  # left padding: the next token is always column -1
            ids_B_P[b, P - len(p) :] = torch.tensor(p)
            attn_B_P[b, P - len(p) :] = 1
        ids_B_P, attn_B_T = ids_B_P.to(device), attn_B_P.to(device)
        pos_B_T = (attn_B_T.cumsum(-1) - 1).clamp_min(0)
        eos_V = torch.tensor(sorted(self.eos), dtype=torch.long, device=device)

        out = self.model(
            input_ids=ids_B_P,
            attention_mask=attn_B_T,
            position_ids=pos_B_T,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits are needed
            **self.generate_kwargs,
        )
        tokens_B_N = torch.empty((B, max_new_tokens), dtype=torch.long, device=device)
        logp_B_N = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        length_B = torch.zeros(B, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            logp_B_V = sampling_logprobs(out.logits[:, -1], temperature, top_p)
            next_B = _draw(logp_B_V.exp(), gen)
            next_B = torch.where(done_B, self.pad_id, next_B)
            tokens_B_N[:, t] = next_B
            logp_B_N[:, t] = logp_B_V.gather(-1, next_B[:, None]).squeeze(-1)
            length_B += (~done_B).long()
            done_B |= torch.isin(next_B, eos_V)
            if bool(done_B.all()) or t == max_new_tokens - 1:
                break
            attn_B_T = F.pad(attn_B_T, (0, 1), value=1)
            pos_B_T = pos_B_T[:, -1:] + 1
            out = self.model(
                input_ids=next_B[:, None],
                attention_mask=attn_B_T,
                position_ids=pos_B_T,
                use_cache=True,
                **{CACHE_KWARG: out[CACHE_KWARG]},
                logits_to_keep=1,
                **self.generate_kwargs,
            )
        lengths, tokens, logps = length_B.tolist(), tokens_B_N.tolist(), logp_B_N.tolist()
        completions = [tokens[b][: lengths[b]] for b in range(B)]
        finished = [bool(c) and c[-1] in self.eos for c in completions]
        return completions, [logps[b][: lengths[b]] for b in range(B)], finished


def row_seed(prompt_seed: int, sample: int) -> int:
    """The seed of sample `sample` of a prompt whose seed is `prompt_seed` (63 bits)."""
    digest = hashlib.sha256(repr((prompt_seed, sample)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _draw(probs_B_V: Tensor, gen: torch.Generator | list[torch.Generator]) -> Tensor:
    """One token per row: from one generator for the batch, or from each row's own."""
    if isinstance(gen, torch.Generator):
        return torch.multinomial(probs_B_V, 1, generator=gen).squeeze(-1)
    return torch.cat([torch.multinomial(p_V, 1, generator=g) for p_V, g in zip(probs_B_V, gen, strict=True)])  # fmt: skip


def make_engine(
    params: RolloutParams,
    model: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    generate_kwargs: dict[str, Any] | None = None,
    model_dir: str | Path | None = None,
    adapter_dir: str | Path | None = None,
    max_lora_rank: int = 16,
    seed: int = 0,
) -> RolloutEngine:
    """The engine named by `opd.rollout.backend`."""
    match params.backend:
        case "transformers":
            assert model is not None and tokenizer is not None, (
                "the transformers backend needs the model"
            )
            return TransformersEngine(model, tokenizer, params.batch_size, generate_kwargs)
        case "vllm":
            from retroloop.rollout_vllm import (
                VllmEngine,  # CUDA workers; vllm itself is lazier still
            )

            return VllmEngine(model_dir, adapter_dir, max_lora_rank=max_lora_rank, seed=seed)
        case _:
            raise AssertionError(f"unknown rollout backend {params.backend!r}")
