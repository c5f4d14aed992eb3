"""The run-time guards (retroloop.guards): they pass on a correct model and refuse a model that
drops its KV cache (what transformers 5.24's rename did to the looped model) and a teacher whose
generated-positions scoring differs from a plain forward."""

from __future__ import annotations

import functools

import pytest
import torch

from retroloop import onpolicy
from retroloop.config import TinyModelSpec
from retroloop.errors import GuardError
from retroloop.guards import check_cached_generate
from retroloop.models.loading import build_tiny_model, build_tiny_tokenizer
from retroloop.models.recurrent import RecurrentForCausalLM, convert_from_source
from retroloop.onpolicy import check_rollouts
from retroloop.rollout import TransformersEngine
from tests.unit.test_recurrent import make_iterations_matter, tiny_source

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["write a poem", "count to three", "the quick brown fox"]


@pytest.fixture(scope="module")
def looped():
    model = convert_from_source(
        tiny_source(), prelude=[0], block=[2, 3], coda=[5], state_init_std=0.0
    )
    make_iterations_matter(model)
    return model.eval()


@pytest.fixture(scope="module")
def chat():
    """A tiny plain Llama (the teacher) and its tokenizer; the student is its looped conversion."""
    corpus = [f"the quick brown fox {i} jumps over the lazy dog; write a poem" for i in range(64)]
    tokenizer = build_tiny_tokenizer(corpus, 256)
    spec = TinyModelSpec(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=256,
    )
    teacher = build_tiny_model(spec, tokenizer).eval()
    with torch.no_grad():  # peaked logits: a dropped cache then moves log-probs by nats
        for weight in teacher.parameters():
            if weight.dim() == 2:
                weight.mul_(8)
    student = convert_from_source(teacher, prelude=[0], block=[1, 2], coda=[3]).eval()
    return teacher, student, tokenizer


@pytest.fixture
def dropped_cache(monkeypatch):
    """The looped model as transformers 5.24 ran it before the fix: generate's cache never
    reaches the model, so every decoding step sees only its new token."""
    forward = RecurrentForCausalLM.forward

    @functools.wraps(forward)  # the same signature, so generate passes it the same kwargs
    def forgetful(self, *args, cache=None, **kwargs):
        kwargs.pop("past_key_values", None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(RecurrentForCausalLM, "forward", forgetful)


PROMPT_IDS = [[5, 17, 99, 42, 7, 3], [8, 8, 200, 31], [61, 62, 63, 64, 65, 66, 67, 68]]


def test_cached_generate_agrees_on_a_correct_model(looped):
    result = check_cached_generate(
        looped, PROMPT_IDS, what="tiny", pad_id=0, forward_kwargs={"num_recurrence": 3}
    )
    assert result["steps"] == 3 * 8 and result["token_agreement"] == 1.0
    assert result["max_abs_logp_diff"] < 1e-4


def test_cached_generate_refuses_a_model_that_drops_its_cache(looped, dropped_cache):
    with pytest.raises(GuardError, match=r"guard cached_generate failed .*transformers \d"):
        check_cached_generate(
            looped, PROMPT_IDS, what="tiny", pad_id=0, forward_kwargs={"num_recurrence": 3}
        )


def guard_rollouts(chat) -> dict:
    """The OPD guard on the looped student (R = 2), sampled by the transformers engine."""
    teacher, student, tok = chat
    engine = TransformersEngine(student, tok, generate_kwargs={"num_recurrence": 2})
    return check_rollouts(
        engine, student, teacher, PROMPTS, pad_id=tok.pad_token_id, seed=0,
        student_kwargs={"num_recurrence": 2},
    )  # fmt: skip


def test_rollout_guard_agrees_on_a_correct_student_and_teacher(chat):
    result = guard_rollouts(chat)
    assert result["tokens"] > 0
    assert result["sampler_vs_learner_max_abs_logp_diff"] < 1e-4
    assert result["teacher_scoring_max_abs_logp_diff"] < 1e-4


def test_rollout_guard_refuses_a_sampler_that_drops_its_cache(chat, dropped_cache):
    with pytest.raises(GuardError, match="guard sampler_vs_learner failed"):
        guard_rollouts(chat)


def test_rollout_guard_refuses_teacher_scoring_that_differs_from_a_plain_forward(chat, monkeypatch):
    teacher, student, tok = chat
    scorer = onpolicy.logits_at

    def skewed(model, *args, **kwargs):  # e.g. a head applied to the wrong rows
        logits = scorer(model, *args, **kwargs)
        return logits + 0.5 * torch.randn_like(logits) if model is teacher else logits

    monkeypatch.setattr(onpolicy, "logits_at", skewed)
    with pytest.raises(GuardError, match="guard teacher_scoring failed"):
        guard_rollouts(chat)
