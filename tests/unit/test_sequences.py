"""retroloop.sequences' padding: the one pad-id rule and one padding function per side."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from retroloop.sequences import IGNORE, Sequence, pad_batch, pad_id, pad_left, pad_right

ROWS = [[5, 6, 7], [8], []]


@pytest.mark.parametrize(
    ("pad", "eos", "want"), [(3, 9, 3), (None, 9, 9), (None, None, 0), (0, 9, 0)]
)
def test_pad_id_is_the_pad_token_else_eos_else_zero(pad, eos, want):
    assert pad_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == want


def test_pad_right_keeps_rows_flush_left():
    ids, mask = pad_right(ROWS, 0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]


def test_pad_left_keeps_rows_flush_right():
    ids, mask = pad_left(ROWS, 0)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_pad_batch_pads_ids_right_and_labels_with_ignore():
    seqs = [Sequence("a", [5, 6, 7], [IGNORE, 6, 7]), Sequence("b", [8], [8])]
    ids, mask, labels = pad_batch(seqs, 2)
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
