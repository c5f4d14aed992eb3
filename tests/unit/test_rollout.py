"""The rollout engine: sampler log-probs equal a teacher-forced forward's, seeds reproduce,
EOS / max-token stopping, chat template, top-p / temperature log-probs, the vLLM extra."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from retroloop.config import RolloutParams, TinyModelSpec
from retroloop.errors import MissingExtraError
from retroloop.models.loading import build_tiny_model, build_tiny_tokenizer
from retroloop.rollout import (
    RolloutBatch,
    TransformersEngine,
    make_engine,
    sampling_logprobs,
    token_logprobs,
)
from retroloop.sequences import render_chat

PROMPTS = ["hi", "write a short poem about the sea and the sky", "count to three"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    corpus = [f"the quick brown fox {i} jumps over the lazy dog; write a poem" for i in range(64)]
    tokenizer = build_tiny_tokenizer(corpus, 256)
    spec = TinyModelSpec(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=256,
    )
    return build_tiny_model(spec, tokenizer), tokenizer


def teacher_forced(
    model, batch: RolloutBatch, pad_id: int, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    pk = batch.pack(pad_id)
    with torch.no_grad():
        logits = model(
            input_ids=pk.tokens_B_T, attention_mask=pk.attention_mask_B_T, **kwargs
        ).logits
    return token_logprobs(logits, pk.tokens_B_T)[pk.mask_B_T], pk.sampler_logp_B_T[pk.mask_B_T]


def test_sampler_logprobs_equal_teacher_forced_logprobs(tiny):
    model, tok = tiny
    # batch_size 4 over 3 prompts x 2 samples: two chunks, ragged left padding in each.
    batch = TransformersEngine(model, tok, batch_size=4).sample(
        PROMPTS, n=2, max_new_tokens=10, seed=0
    )
    learner, sampler = teacher_forced(model, batch, tok.pad_token_id)
    assert learner.numel() == batch.num_completion_tokens > 0
    torch.testing.assert_close(sampler, learner, atol=1e-4, rtol=0)
    # OPD's scorer (LM head on the generated positions only) gives the same log-probs.
    from retroloop.onpolicy import score_rollouts

    pk = batch.pack(tok.pad_token_id)
    with torch.no_grad():
        logits_N_V, scored_B_T = score_rollouts(model, pk, None)
    assert logits_N_V.shape[0] == learner.numel()
    torch.testing.assert_close(scored_B_T[pk.mask_B_T], learner, atol=1e-5, rtol=0)
    assert not scored_B_T[~pk.mask_B_T].any()


def test_sampler_logprobs_under_temperature_and_top_p_are_the_processed_distribution(tiny):
    model, tok = tiny
    batch = TransformersEngine(model, tok, batch_size=8).sample(
        PROMPTS, n=2, max_new_tokens=6, temperature=0.7, top_p=0.5, seed=1
    )
    pk = batch.pack(tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=pk.tokens_B_T, attention_mask=pk.attention_mask_B_T).logits
    pred_N_V = logits[:, :-1][pk.mask_B_T[:, 1:]]
    expected = (
        sampling_logprobs(pred_N_V, 0.7, 0.5)
        .gather(-1, pk.tokens_B_T[pk.mask_B_T][:, None])
        .squeeze(-1)
    )
    assert torch.isfinite(expected).all(), "a sampled token fell outside the nucleus"
    torch.testing.assert_close(pk.sampler_logp_B_T[pk.mask_B_T], expected, atol=1e-4, rtol=0)


def test_samples_are_reproducible_with_a_seed(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=4)
    a = engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=7)
    b = engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=7)
    c = engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=8)
    assert a.completion_ids == b.completion_ids and a.sampler_logprobs == b.sampler_logprobs
    assert a.completion_ids != c.completion_ids


def test_layout_chat_template_and_max_tokens(tiny):
    model, tok = tiny
    batch = TransformersEngine(model, tok, batch_size=5).sample(
        PROMPTS, n=3, max_new_tokens=5, seed=0
    )
    assert batch.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert batch.sample_index == [0, 1, 2] * 3
    for i, ids in zip(batch.prompt_index, batch.prompt_ids, strict=True):
        assert ids == tok(render_chat(tok, PROMPTS[i]), add_special_tokens=False)["input_ids"]
        assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    for comp, lps, fin in zip(
        batch.completion_ids, batch.sampler_logprobs, batch.finished, strict=True
    ):
        assert len(comp) == len(lps) and 1 <= len(comp) <= 5
        assert fin == (comp[-1] == tok.eos_token_id) and (fin or len(comp) == 5)


def test_stops_at_the_first_eos(tiny):
    model, tok = tiny
    engine = TransformersEngine(model, tok, batch_size=8)
    engine.eos = set(range(len(tok) // 2))  # half the vocabulary ends a completion: most stop early
    batch = engine.sample(PROMPTS, n=4, max_new_tokens=12, seed=0)
    assert any(batch.finished) and any(len(c) < 12 for c in batch.completion_ids)
    for comp, fin in zip(batch.completion_ids, batch.finished, strict=True):
        stops = [t in engine.eos for t in comp]
        assert not any(stops[:-1]), "tokens were generated after an EOS"
        assert fin == stops[-1]


def test_looped_model_sampler_logprobs_with_fixed_initial_state(tiny):
    """The looped model with a non-pass-through input adapter and R = 3: consistent once its
    random s_0 is fixed (`onpolicy.fixed_initial_state`), as OPD does."""
    from retroloop.models.recurrent import convert_from_source
    from retroloop.onpolicy import fixed_initial_state

    model, tok = tiny
    looped = convert_from_source(model, prelude=[0], block=[1], coda=[], recurrence=2).eval()
    with torch.no_grad():
        looped.model.adapter.weight.add_(0.3 * torch.randn_like(looped.model.adapter.weight))
    engine = TransformersEngine(looped, tok, batch_size=4, generate_kwargs={"num_recurrence": 3})
    with fixed_initial_state(looped):
        batch = engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=0)
        learner, sampler = teacher_forced(looped, batch, tok.pad_token_id, num_recurrence=3)
    torch.testing.assert_close(sampler, learner, atol=1e-4, rtol=0)
    assert looped.config.state_init_std > 0  # restored


def test_sampling_logprobs_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    logp = sampling_logprobs(logits, 1.0, 0.8)
    assert torch.isinf(logp[0, 2:]).all() and torch.isfinite(logp[0, :2]).all()
    torch.testing.assert_close(logp.exp().sum(), torch.tensor(1.0))
    torch.testing.assert_close(logp[0, 0].exp(), torch.tensor(0.5 / 0.8))
    torch.testing.assert_close(
        sampling_logprobs(logits, 2.0, 1.0), torch.log_softmax(logits / 2.0, -1)
    )


def test_pack_aligns_tokens_and_sampler_logprobs():
    batch = RolloutBatch(
        [0, 0],
        [0, 1],
        [[5, 6], [5, 6]],
        [[7, 8, 9], [7]],
        [[-1.0, -2.0, -3.0], [-4.0]],
        [False, True],
    )
    pk = batch.pack(pad_id=0)
    assert pk.tokens_B_T.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]
    assert pk.attention_mask_B_T.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert pk.mask_B_T.tolist() == [
        [False, False, True, True, True],
        [False, False, True, False, False],
    ]
    assert pk.sampler_logp_B_T.tolist() == [[0, 0, -1, -2, -3], [0, 0, -4, 0, 0]]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_is_one_line_error_naming_the_extra():
    with pytest.raises(MissingExtraError) as err:
        make_engine(RolloutParams(backend="vllm"), None, None, model_dir="data/convert/model")
    msg = str(err.value)
    assert "\n" not in msg and "retroloop[vllm]" in msg and "opd.rollout.backend" in msg


def test_vllm_backend_refuses_the_looped_model_before_importing_vllm(tmp_path):
    from retroloop.errors import ConfigError

    (tmp_path / "config.json").write_text('{"model_type": "retroloop_recurrent"}')
    with pytest.raises(ConfigError, match="backend: transformers") as err:
        make_engine(RolloutParams(backend="vllm"), None, None, model_dir=tmp_path)
    assert "\n" not in str(err.value)
