"""The tiny teacher's training reads its weight decay and gradient clip from the params
(`prepare.model.tiny.train_weight_decay`, `train_max_grad_norm`; issue 22: they were the
literals 0.0 and 1.0 in `retroloop/models/loading.py`), and at their defaults the spec's dump,
which prepare writes into the tiny model's provenance, is what it was before they existed."""

from __future__ import annotations

import pytest
import torch

from retroloop.config import TinyModelSpec
from retroloop.models.loading import build_tiny_model, build_tiny_tokenizer, train_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [f"the quick brown fox {i} jumps over the lazy dog; write a poem" for i in range(64)]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=256, train_steps=3, train_lr=1e-2, train_batch=2, train_seq_len=16)  # fmt: skip


def _trained(**keys) -> dict[str, torch.Tensor]:
    tokenizer = build_tiny_tokenizer(CORPUS, 256)
    spec = TinyModelSpec(**SMALL, **keys)
    model = build_tiny_model(spec, tokenizer)
    train_tiny_model(model, tokenizer, CORPUS, spec)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _moved_apart(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_weight_decay_and_clip_keys_reach_the_training() -> None:
    default = _trained()
    assert _moved_apart(default, _trained()) == 0.0  # seeded: the same keys, the same weights
    assert _moved_apart(default, _trained(train_weight_decay=0.5)) > 1e-6
    assert _moved_apart(default, _trained(train_max_grad_norm=1e-4)) > 1e-6


def test_the_spec_dump_is_unchanged_at_the_defaults() -> None:
    """prepare writes `spec.model_dump()` into data/prepare/model/retroloop_source.json (inside
    its content hash): the new keys appear there only when they are set to something else."""
    dump = TinyModelSpec().model_dump()
    assert "train_weight_decay" not in dump and "train_max_grad_norm" not in dump
    assert TinyModelSpec(train_weight_decay=0.1).model_dump()["train_weight_decay"] == 0.1
    assert TinyModelSpec(train_max_grad_norm=0.5).model_dump()["train_max_grad_norm"] == 0.5
