"""The cycle's SFT loop (`retroloop.cycle._sft`, mid-training and the SFT-on-own-samples
baseline) skips sequences with no supervised token. A chat sequence whose prompt fills
cycle.max_seq_len has every label masked; a batch of only such sequences has a loss of 0/0 =
NaN, and `evaluate.baseline_sft: true` on the tiny profile stopped at its first step with a
DivergedError blaming the learning rate."""

from __future__ import annotations

import math

import pytest
import torch

from retroloop.errors import DataError
from retroloop.sequences import IGNORE, Sequence

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules="all-linear"))


def _masked(i: int) -> Sequence:  # a prompt that filled max_seq_len: nothing to learn
    return Sequence(f"m{i}", list(range(i, i + 8)), [IGNORE] * 8)


RUN = dict(steps=6, lr=1e-3, lr_key="opd.lr", batch_size=1, seed=0, pad_id=0, desc="sft-self")


def test_sequences_with_no_supervised_token_are_skipped() -> None:
    from retroloop.cycle import _sft

    seqs = [_masked(1), _masked(2), Sequence("ok", list(range(3, 11)), list(range(3, 11)))]
    losses = _sft(_model(), seqs, **RUN)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


def test_only_masked_sequences_is_one_line_naming_the_key() -> None:
    from retroloop.cycle import _sft

    with pytest.raises(DataError, match=r"^sft-self: no training sequences .*cycle\.max_seq_len"):
        _sft(_model(), [_masked(1), _masked(2)], **RUN)
