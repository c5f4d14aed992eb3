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
penalties) can silently truncate the distribution; (3) it outpaces `generate` (`retroloop bench
opd`, `engine_vs_generate_tokens_per_s_ratio`): the LoRA is merged into a copy of the weights
for sampling, a prompt's n samples share one prefill, the KV cache has room for the whole
rollout, and a token is drawn by inverting the CDF rather than an exponential race. Prompts go
through the chat template with `add_generation_prompt=True` (`eval.generation.encode_chat_prompts`),
tokenised without extra specials: the same ids the teacher later scores.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

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
        lists = (self.prompt_index, self.sample_index, self.prompt_ids, self.completion_ids,
                 self.sampler_logprobs, self.finished)  # fmt: skip
        return RolloutBatch(*([xs[i] for i in rows] for xs in lists))

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
        return PackedRollouts(*(x.to(device) for x in (tokens_B_T, attention_B_T, mask_B_T, sampler_logp_B_T)))  # fmt: skip


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
    mass_before_B_V = sorted_B_V.exp().cumsum(-1) - sorted_B_V.exp()  # of strictly better ones
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

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int = 8, generate_kwargs: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.generate_kwargs = dict(generate_kwargs or {})
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.eos = eos_ids(tokenizer, model)
        self._head_memo: dict[str, Any] = {}  # see `sampling_linears`

    @torch.inference_mode()
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
            with sampling_linears(self.model, self._head_memo):
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

    def _sample_chunk(self, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
                      top_p: float, gen: torch.Generator | list[torch.Generator], device: torch.device,
                      ) -> tuple[list[list[int]], list[list[float]], list[bool]]:  # fmt: skip
        B = len(prompt_ids)
        logits_B_V, cache, attn_B_T, pos_B_T = self._prefill(prompt_ids, max_new_tokens, device)
        eos_V = torch.tensor(sorted(self.eos), dtype=torch.long, device=device)
        out = {"logits": logits_B_V[:, None], CACHE_KWARG: cache}
        tokens_B_N = torch.empty((B, max_new_tokens), dtype=torch.long, device=device)
        logp_B_N = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        length_B = torch.zeros(B, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            logp_B_V = sampling_logprobs(out["logits"][:, -1], temperature, top_p)
            next_B = _draw(logp_B_V.exp(), gen)
            next_B = torch.where(done_B, self.pad_id, next_B)
            tokens_B_N[:, t] = next_B
            logp_B_N[:, t] = logp_B_V.gather(-1, next_B[:, None]).squeeze(-1)
            length_B += (~done_B).long()
            done_B |= torch.isin(next_B, eos_V)
            if bool(done_B.all()) or t == max_new_tokens - 1:
                break
            attn_B_T = F.pad(attn_B_T, (0, 1), value=1)
            pos_B_T = pos_B_T + 1
            kw = {CACHE_KWARG: out[CACHE_KWARG], **self.generate_kwargs}
            out = self.model(input_ids=next_B[:, None], attention_mask=attn_B_T,
                             position_ids=pos_B_T, use_cache=True, logits_to_keep=1, **kw)  # fmt: skip
        lengths, tokens, logps = length_B.tolist(), tokens_B_N.tolist(), logp_B_N.tolist()
        completions = [tokens[b][: lengths[b]] for b in range(B)]
        finished = [bool(c) and c[-1] in self.eos for c in completions]
        return completions, [logps[b][: lengths[b]] for b in range(B)], finished

    def _prefill(
        self, prompt_ids: list[list[int]], max_new_tokens: int, device: torch.device
    ) -> tuple[Tensor, Any, Tensor, Tensor]:
        """Next-token logits `[B, V]`, KV cache, attention mask and last position ids of the
        rows (left-padded: the next token is column −1). The distinct prompts run once, and each
        cache layer is copied to one row per sample with room for `max_new_tokens` more."""
        distinct = list(dict.fromkeys(map(tuple, prompt_ids)))
        row_src = torch.tensor([distinct.index(tuple(p)) for p in prompt_ids], device=device)
        U, P = len(distinct), max(map(len, distinct))
        ids_U_P = torch.tensor([[self.pad_id] * (P - len(p)) + list(p) for p in distinct])
        attn_U_P = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in distinct])
        ids_U_P, attn_U_P = ids_U_P.to(device), attn_U_P.to(device)
        pos_U_P = (attn_U_P.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids_U_P, attention_mask=attn_U_P, position_ids=pos_U_P,
                         use_cache=True, logits_to_keep=1, **self.generate_kwargs)  # fmt: skip
        cache = out[CACHE_KWARG]
        for i, layer in enumerate(cache.layers):
            if type(layer) is DynamicLayer and layer.get_seq_length():
                cache.layers[i] = _RoomyLayer(layer, row_src, max_new_tokens)
            elif U < len(prompt_ids):
                layer.reorder_cache(row_src)
        logits = out.logits[:, -1]
        return logits[row_src], cache, attn_U_P[row_src], pos_U_P[row_src, -1:]


class _RoomyLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values are views of a buffer with room for `extra` more
    positions, written in place (not the whole cache copied per token). Replaced views (a
    reorder) make it a plain `DynamicLayer` again; `crop`ped ones keep their place."""

    def __init__(self, layer: DynamicLayer, rows: Tensor, extra: int) -> None:
        super().__init__()
        keys, values = layer.keys[rows], layer.values[rows]
        B, H, T, D = keys.shape
        self._keys, self._values = (x.new_empty(B, H, T + extra, x.shape[-1]) for x in (keys, values))  # fmt: skip
        self._keys[:, :, :T], self._values[:, :, :T] = keys, values
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = self._keys[:, :, :T], self._values[:, :, :T]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        n, T = self.keys.shape[-2], key_states.shape[-2]
        own = self.keys.data_ptr() == self._keys.data_ptr() and self.keys.shape[0] == self._keys.shape[0]  # fmt: skip
        if not own or n + T > self._keys.shape[-2]:
            return super().update(key_states, value_states, *args, **kwargs)
        self._keys[:, :, n : n + T], self._values[:, :, n : n + T] = key_states, value_states
        self.keys, self.values = self._keys[:, :, : n + T], self._values[:, :, : n + T]
        return self.keys, self.values


class _MergedLinear(nn.Module):
    """y = x·W_mᵀ (+ b) with W_m = W + Σ_a s_a·B_a·A_a, the LoRA merged (Hu et al. 2021, eq. 3),
    kept transposed and contiguous: one `[in, out]` product per call instead of PEFT's three."""

    def __init__(self, weight_t: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight_t, self.bias = weight_t, bias

    def forward(self, x: Tensor) -> Tensor:
        x_N_I = x.reshape(-1, x.shape[-1])
        y_N_O = x_N_I @ self.weight_t if self.bias is None else torch.addmm(self.bias, x_N_I, self.weight_t)  # fmt: skip
        return y_N_O.view(*x.shape[:-1], y_N_O.shape[-1])


def _merged(module: nn.Module) -> _MergedLinear | None:
    """A PEFT LoRA `Linear`'s merged twin, or None where merging is not plain W + s·B·A (DoRA
    and other variants, a LoRA bias, fan-in-fan-out, a non-`nn.Linear` base) or would round the
    sum to a half-precision weight (a bf16 base with fp32 factors: the learner adds in fp32)."""
    base, lora_a = getattr(module, "base_layer", None), getattr(module, "lora_A", None)
    if not isinstance(base, nn.Linear) or not isinstance(lora_a, nn.ModuleDict):
        return None
    if module.disable_adapters or module.fan_in_fan_out:
        return None
    names = [] if module.merged else [a for a in module.active_adapters if a in lora_a]
    dtypes = {base.weight.dtype} | {module.lora_B[a].weight.dtype for a in names}
    plain = not any(a in module.lora_variant or module.lora_bias[a] for a in names)
    if not plain or dtypes - {torch.float32} and dtypes != {torch.float64}:
        return None
    weight_t = base.weight.t()  # W_mᵀ = Wᵀ + Σ_a s_a·A_aᵀ·B_aᵀ, written transposed at once
    for a in names:
        A, B = module.lora_A[a].weight, module.lora_B[a].weight
        weight_t = torch.addmm(weight_t, A.t(), B.t(), alpha=module.scaling[a])
    return _MergedLinear(weight_t if names else weight_t.contiguous(), base.bias)


def _head_twin(head: nn.Module, memo: dict[str, Any]) -> _MergedLinear:
    """The frozen LM head transposed, kept in `memo` while its weight is unchanged."""
    w = head.weight
    key = (w.data_ptr(), w._version, tuple(w.shape))
    if memo.get("key") != key:
        memo.clear()  # the old copy goes before the new one is made
        memo.update(key=key, weight_t=w.detach().t().contiguous())
    return _MergedLinear(memo["weight_t"], head.bias)


@contextlib.contextmanager
def sampling_linears(model: nn.Module, head_memo: dict[str, Any] | None = None) -> Iterator[None]:
    """Sample with every PEFT LoRA linear merged into a copy of its weight (`_MergedLinear`)
    and, given `head_memo`, the frozen LM head transposed (`_head_twin`): modules are swapped
    for the duration, no parameter is written, so the learner keeps computing W·x + s·B·(A·x).
    The two differ by rounding (~1e-6 in log-probs at fp32): the importance ratio absorbs it,
    the rollout guard (`onpolicy.check_rollouts`) bounds it. Without LoRA the model runs as is."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) and head_memo is not None else None
    if not (isinstance(head, nn.Linear) and not head.weight.requires_grad):
        head = None

    def swap(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            twin = _head_twin(child, head_memo) if child is head else _merged(child)
            if twin is None:
                swap(child)
            else:
                parent._modules[name] = twin
                swapped.append((parent, name, child))

    try:
        with torch.no_grad():
            swap(model)
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def row_seed(prompt_seed: int, sample: int) -> int:
    """The seed of sample `sample` of a prompt whose seed is `prompt_seed` (63 bits)."""
    digest = hashlib.sha256(repr((prompt_seed, sample)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _draw(probs_B_V: Tensor, gen: torch.Generator | list[torch.Generator]) -> Tensor:
    """One token per row by inversion: y = min{i : F(i) > u·F(V)} with F the float64 cumulative
    sum of the row's probabilities and u ~ U[0, 1) one draw of the batch's generator or of the
    row's own (so a row's tokens do not depend on its batch-mates). P(y = i) = p_i / Σp; a token
    of probability 0 (outside the top-p nucleus) has an empty interval and is never drawn."""
    B, device = probs_B_V.shape[0], probs_B_V.device
    if isinstance(gen, torch.Generator):
        u_B = torch.rand(B, generator=gen, dtype=torch.float64, device=device)
    else:
        u_B = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=device) for g in gen])  # fmt: skip
    cdf_B_V = probs_B_V.double().cumsum(-1)
    y_B = torch.searchsorted(cdf_B_V, (u_B * cdf_B_V[:, -1])[:, None], right=True).squeeze(-1)
    y_B = y_B.clamp_max(probs_B_V.shape[1] - 1)  # u·F(V) rounded up to F(V): the last token
    return torch.where(probs_B_V.gather(-1, y_B[:, None]).squeeze(-1) > 0, y_B, probs_B_V.argmax(-1))  # fmt: skip


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
