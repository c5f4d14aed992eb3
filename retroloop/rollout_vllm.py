"""The vLLM rollout engine (`opd.rollout.backend: vllm`, CUDA workers): the student's base model
directory served by `vllm.LLM`, sampled with its current LoRA adapter, reporting the sampler's
log-probs after temperature / top-p (what `rollout.RolloutBatch` carries). vLLM is an optional
extra (`pip install 'retroloop[vllm]'`), imported inside `VllmEngine`'s constructor; every
refusal (no model directory, the looped model, no vllm, no CUDA) is one line.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retroloop.errors import ConfigError, MissingExtraError
from retroloop.models.recurrent import RecurrentConfig
from retroloop.rollout import RolloutBatch, encode_prompts


class VllmEngine:
    """vLLM sampling with the student's LoRA adapter (CUDA workers; `pip install 'retroloop[vllm]'`).

    `logprobs_mode="processed_logprobs"` makes vLLM report log-probs after temperature / top-p,
    i.e. of the distribution it sampled from (its default reports the raw model distribution).
    Prompts are passed as token ids so the teacher scores exactly what the student saw. After each
    optimizer step, save the adapter and call `set_adapter(dir)`: a new `LoRARequest` id makes vLLM
    load the new weights instead of its cached copy.
    """

    def __init__(
        self,
        model_dir: str | Path | None,
        adapter_dir: str | Path | None = None,
        *,
        max_lora_rank: int = 16,
        dtype: str = "auto",
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        if model_dir is None:
            raise ConfigError(
                "opd.rollout.backend: vllm needs the student's model directory (vLLM loads weights "
                "from disk); pass model_dir, or use backend: transformers"
            )
        config = Path(model_dir) / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        if model_type == RecurrentConfig.model_type:
            raise ConfigError(
                f"opd.rollout.backend: vllm has no implementation of the looped model ({model_dir}, "
                f"model_type {model_type}); use backend: transformers for it (vllm serves plain "
                "Hugging Face architectures, e.g. a cycle on a non-looped base model)"
            )
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise MissingExtraError(
                "opd.rollout.backend: vllm is not installed; pip install 'retroloop[vllm]' on a CUDA worker"
            ) from None
        if not torch.cuda.is_available():
            raise MissingExtraError(
                "opd.rollout.backend: vllm needs a CUDA device and torch sees none; run on a GPU "
                "worker or use backend: transformers"
            )
        self._vllm, self._lora_cls = vllm, LoRARequest
        self.llm = vllm.LLM(
            model=str(model_dir),
            enable_lora=True,  # OPD trains a LoRA: every step samples with the current adapter
            max_lora_rank=max_lora_rank,
            dtype=dtype,
            seed=seed,
            logprobs_mode="processed_logprobs",
            trust_remote_code=False,  # never run code shipped in a model directory
            **llm_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self._lora_id = 0
        self.lora = None
        if adapter_dir is not None:
            self.set_adapter(adapter_dir)

    def set_adapter(self, adapter_dir: str | Path) -> None:
        self._lora_id += 1
        self.lora = self._lora_cls(f"student-{self._lora_id}", self._lora_id, str(adapter_dir))

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
        start = time.perf_counter()
        prompt_ids = encode_prompts(self.tokenizer, prompts)
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
        params = [  # one per prompt (a per-prompt seed, as the transformers engine)
            self._vllm.SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                logprobs=0,
                seed=s,
            )  # fmt: skip
            for s in seeds
        ]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        results = self.llm.generate(requests, params, lora_request=self.lora, use_tqdm=False)
        out = rollouts_from_vllm(results, prompt_ids)
        out.seconds = time.perf_counter() - start
        return out


def rollouts_from_vllm(results: Sequence[Any], prompt_ids: list[list[int]]) -> RolloutBatch:
    """vLLM `RequestOutput`s (one per prompt, in order) → `RolloutBatch`.

    Each `CompletionOutput` carries `token_ids` and, with `SamplingParams(logprobs=0)`,
    `logprobs[t]`: a dict {token id: `Logprob`} that always holds the sampled token. A
    completion stopped by EOS (or a stop string) has `finish_reason == "stop"`; one that ran
    out of tokens has "length". `prompt_ids` are the ids we sent (vLLM echoes them back).
    """
    out = RolloutBatch()
    for i, result in enumerate(results):
        echoed = getattr(result, "prompt_token_ids", None)
        assert echoed is None or list(echoed) == prompt_ids[i], "vLLM outputs out of order"
        for j, completion in enumerate(result.outputs):
            tokens = list(completion.token_ids)
            steps = completion.logprobs or []
            assert len(steps) == len(tokens), "vLLM returned no log-prob per token (logprobs=0?)"
            out.prompt_index.append(i)
            out.sample_index.append(j)
            out.prompt_ids.append(list(prompt_ids[i]))
            out.completion_ids.append(tokens)
            out.sampler_logprobs.append(
                [float(steps[t][tok].logprob) for t, tok in enumerate(tokens)]
            )
            out.finished.append(completion.finish_reason == "stop")
    return out


def vllm_lora_rank(model: torch.nn.Module) -> int:
    """`max_lora_rank` for vLLM from a PEFT model's rank: vLLM accepts 8, 16, 32, ... only."""
    config = getattr(model, "peft_config", {}).get("default")
    r = int(getattr(config, "r", 8))
    return max(8, 1 << (r - 1).bit_length())
