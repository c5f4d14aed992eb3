"""The vLLM rollout path: output conversion without CUDA, one-line errors where vLLM cannot
run, the model directory reaching the engine from `train_opd`, and (gpu) the real engine."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import polars as pl
import pytest
import torch

from retroloop.config import OpdParams, RolloutParams, TinyModelSpec
from retroloop.errors import ConfigError, MissingExtraError
from retroloop.models.loading import build_tiny_model, build_tiny_tokenizer
from retroloop.rollout_vllm import VllmEngine, rollouts_from_vllm, vllm_lora_rank

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vLLM is not installed (a CUDA-only optional extra: pip install 'retroloop[vllm]')"


def _check_conversion(results, prompt_ids) -> None:
    batch = rollouts_from_vllm(results, prompt_ids)
    assert batch.prompt_index == [0, 0, 1] and batch.sample_index == [0, 1, 0]
    assert batch.prompt_ids == [[5, 6], [5, 6], [7]]
    assert batch.completion_ids == [[11, 12], [13], [14, 15, 16]]
    assert batch.sampler_logprobs == [[-0.5, -1.5], [-0.25], [-1.0, -2.0, -3.0]]
    assert batch.finished == [True, False, True]
    packed = batch.pack(pad_id=0)  # what opd_step consumes: positions line up with tokens
    assert packed.tokens_B_T.tolist() == [[5, 6, 11, 12], [5, 6, 13, 0], [7, 14, 15, 16]]
    assert packed.sampler_logp_B_T[1].tolist() == [0, 0, -0.25, 0]


# (token ids, their sampled log-probs, finish reason) per completion, per prompt
OUTPUTS = [
    [([11, 12], [-0.5, -1.5], "stop"), ([13], [-0.25], "length")],
    [([14, 15, 16], [-1.0, -2.0, -3.0], "stop")],
]
PROMPTS = [[5, 6], [7]]


def test_vllm_outputs_become_a_rollout_batch_shaped_like_vllm() -> None:
    """The fields vLLM's RequestOutput / CompletionOutput / Logprob carry, without vLLM."""
    results = [
        SimpleNamespace(
            prompt_token_ids=ids,
            outputs=[
                SimpleNamespace(
                    token_ids=toks,
                    # vLLM also returns the top alternatives at each step; only the sampled one counts
                    logprobs=[{t: SimpleNamespace(logprob=lp), 99: SimpleNamespace(logprob=-9.0)}
                              for t, lp in zip(toks, lps, strict=True)],
                    finish_reason=reason,
                )
                for toks, lps, reason in outs
            ],
        )
        for ids, outs in zip(PROMPTS, OUTPUTS, strict=True)
    ]  # fmt: skip
    _check_conversion(results, PROMPTS)


@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_vllm_outputs_become_a_rollout_batch_with_vllms_own_classes() -> None:
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.sequence import Logprob

    results = [
        RequestOutput(
            request_id=str(i),
            prompt=None,
            prompt_token_ids=ids,
            prompt_logprobs=None,
            outputs=[
                CompletionOutput(
                    index=j, text="", token_ids=toks, cumulative_logprob=sum(lps),
                    logprobs=[{t: Logprob(logprob=lp)} for t, lp in zip(toks, lps, strict=True)],
                    finish_reason=reason,
                )
                for j, (toks, lps, reason) in enumerate(outs)
            ],
            finished=True,
        )
        for i, (ids, outs) in enumerate(zip(PROMPTS, OUTPUTS, strict=True))
    ]  # fmt: skip
    _check_conversion(results, PROMPTS)


def test_vllm_lora_rank_rounds_up_to_what_vllm_accepts() -> None:
    ranks = {r: vllm_lora_rank(SimpleNamespace(peft_config={"default": SimpleNamespace(r=r)})) for r in (1, 8, 9, 16, 33)}  # fmt: skip
    assert ranks == {1: 8, 8: 8, 9: 16, 16: 16, 33: 64}


def test_vllm_engine_without_a_model_dir_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError, match="model directory") as err:
        VllmEngine(None)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(HAS_VLLM and torch.cuda.is_available(), reason="vLLM can run here")
def test_vllm_where_it_cannot_run_is_one_line_saying_why(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(MissingExtraError, match="not installed" if not HAS_VLLM else "CUDA") as err:
        VllmEngine(tmp_path)
    assert "\n" not in str(err.value)


def _tiny_peft(tmp_path):
    from peft import get_peft_model

    from retroloop.models.lora import lora_config_for

    corpus = [f"the quick brown fox {i} jumps over the lazy dog; write a poem" for i in range(64)]
    tokenizer = build_tiny_tokenizer(corpus, 256)
    spec = TinyModelSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=256)  # fmt: skip
    model = build_tiny_model(spec, tokenizer)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    config = lora_config_for(model, r=4, alpha=32, dropout=0.0)
    return get_peft_model(model, config), model, tokenizer


def test_train_opd_hands_the_model_dir_and_adapter_rank_to_the_engine(
    tmp_path, monkeypatch
) -> None:
    """The bug: `train_opd` built the vllm engine without `model_dir` (a bare AssertionError)."""
    from retroloop import opd_loop as opd

    student, teacher, tokenizer = _tiny_peft(tmp_path)
    seen = {}

    def make_engine(params, model, tok, **kwargs):
        seen.update(kwargs, backend=params.backend)
        raise MissingExtraError("stop here")

    monkeypatch.setattr(opd, "make_engine", make_engine)
    params = OpdParams(steps=1, rollout=RolloutParams(backend="vllm"))
    with pytest.raises(MissingExtraError, match="stop here"):
        opd.train_opd(
            student, teacher, tokenizer, pl.DataFrame({"prompt": ["write a poem"]}), params,
            seed=0, out_dir_tmp=tmp_path / "out", model_dir=tmp_path / "base",
        )  # fmt: skip
    assert seen["backend"] == "vllm" and seen["model_dir"] == tmp_path / "base"
    assert seen["max_lora_rank"] == 8


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)
def test_vllm_engine_samples_with_the_students_adapter(tmp_path) -> None:
    """The real engine on a CUDA worker: samples from base dir + adapter, one log-prob per token."""
    student, _, _ = _tiny_peft(tmp_path)
    student.save_pretrained(tmp_path / "adapter")
    engine = VllmEngine(tmp_path / "base", tmp_path / "adapter", max_lora_rank=8,
                        gpu_memory_utilization=0.3, enforce_eager=True)  # fmt: skip
    batch = engine.sample(["write a poem", "the quick"], n=2, max_new_tokens=8, seed=0)
    assert len(batch) == 4 and batch.prompt_index == [0, 0, 1, 1]
    for tokens, logprobs in zip(batch.completion_ids, batch.sampler_logprobs, strict=True):
        assert 0 < len(tokens) == len(logprobs) <= 8
        assert all(lp <= 0.0 and lp == lp for lp in logprobs)
