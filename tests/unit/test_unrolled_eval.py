"""One unrolled pass gives every R's logits bit for bit (retroloop.eval.unrolled), and the
held-out NLL / KL at several R built on it equal one forward per R exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from retroloop.eval.scaling import held_out, nll_and_kl
from retroloop.eval.unrolled import logits_at_recurrences, supports_unrolled
from retroloop.models.recurrent import convert_from_source

TINY = dict(
    vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2,
)  # fmt: skip


@pytest.fixture(scope="module")
def looped():
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model = convert_from_source(
        source, prelude=[0, 1], block=[2, 3], coda=[4, 5], recurrence=2, adapter_init="pass_input"
    ).eval()
    g = torch.Generator().manual_seed(2)
    eye = torch.eye(32)
    with torch.no_grad():  # a mixing adapter: every iteration changes the state
        model.model.adapter.weight.copy_(
            torch.cat([0.5 * eye, 0.5 * eye], 1) + 0.05 * torch.randn(32, 64, generator=g)
        )
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids_B_T = torch.randint(3, 256, (3, 9), generator=g)
    mask_B_T = torch.ones_like(ids_B_T)
    ids_B_T[1, 6:], mask_B_T[1, 6:] = 0, 0  # right padding, as the held-out batches
    return ids_B_T, mask_B_T


def test_each_recurrence_is_the_per_r_forward_to_the_bit(looped):
    ids_B_T, mask_B_T = _batch()
    got = dict(logits_at_recurrences(looped, ids_B_T, mask_B_T, [4, 1, 2]))
    assert list(got) == [1, 2, 4]
    for R, logits_B_T_V in got.items():
        with torch.inference_mode():
            want = looped(input_ids=ids_B_T, attention_mask=mask_B_T, use_cache=False,
                          num_recurrence=R).logits  # fmt: skip
        assert torch.equal(logits_B_T_V, want), R
    assert not torch.equal(got[1], got[4])  # the iterations matter: the check can fail


def test_nll_and_kl_at_several_r_equals_one_forward_per_r(looped):
    from retroloop.models.loading import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["the quick brown fox jumps over the lazy dog"] * 5, 256)
    docs = ["the quick brown fox", "jumps over the lazy dog and the fox", "dog"]
    torch.manual_seed(3)
    teacher = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tok)})).eval()
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": len(tok)})).eval()
    student = convert_from_source(source, prelude=[0, 1], block=[2, 3], coda=[4, 5],
                                  recurrence=2, adapter_init="repeat_block").eval()  # fmt: skip
    reference = held_out(teacher, tok, docs, max_seq_len=16, batch_size=2)
    both = nll_and_kl(student, reference, recurrences=[1, 3])
    for R in (1, 3):
        assert both[R] == nll_and_kl(student, reference, use_cache=False, num_recurrence=R)


def test_not_for_training_or_early_exit(looped):
    assert supports_unrolled(looped)
    looped.train()
    try:
        assert not supports_unrolled(looped)  # s_0 is a random draw in training
    finally:
        looped.eval()
    looped.config.early_exit_kl = 0.1
    try:
        assert not supports_unrolled(looped)
    finally:
        looped.config.early_exit_kl = None
    assert not supports_unrolled(LlamaForCausalLM(LlamaConfig(**TINY)))
