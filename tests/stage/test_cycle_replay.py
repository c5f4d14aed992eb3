"""cycle.replay_fraction: the instruction sequences mid-training mixes in (`cycle_inputs.replay_sequences`), on
the tiny pipeline's prepare output: how many, what they hold, and what they never hold."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from helpers_distill import build_upstream, tiny

from retroloop.cycle_inputs import replay_sequences
from retroloop.errors import DataError
from retroloop.models.loading import load_tokenizer
from retroloop.sequences import IGNORE

TRAIN = Path("data/prepare/datasets/instruct_train.parquet")


@pytest.fixture
def upstream(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(build_upstream(tmp_path_factory))


def test_replay_mixes_in_f_of_the_expected_batch_and_never_opds_held_out_prompts(upstream):
    cfg = tiny(**{"cycle.replay_fraction": 0.4, "cycle.max_seq_len": 512})
    tok = load_tokenizer("data/prepare/model")
    seqs = replay_sequences(cfg, tok, TRAIN, n_domain=30)
    assert len(seqs) == 20  # 20 / (30 + 20) = 0.4
    train = pl.read_parquet(TRAIN)
    held_out = set(train["id"].tail(cfg.opd.heldout_prompts))
    replayed = [s.id.split(":", 2)[2] for s in seqs]
    assert not held_out & set(replayed) and set(replayed) <= set(train["id"])
    fits = len(set(replayed))  # rows whose prompt leaves a response token in max_seq_len
    assert 1 < fits <= train.height - len(held_out) and replayed[:fits] == replayed[fits : 2 * fits]
    for s in seqs:  # the response is trained, the prompt is not
        trained = [lab for lab in s.labels if lab != IGNORE]
        assert trained and len(trained) < len(s.input_ids)
    assert replay_sequences(tiny(), tok, TRAIN, n_domain=30) == []  # the default: none


def test_replay_with_no_prompt_that_fits_is_one_line(upstream):
    cfg = tiny(**{"cycle.replay_fraction": 0.4, "cycle.max_seq_len": 16})
    with pytest.raises(DataError, match=r"cycle.replay_fraction: 0.4 .* raise cycle.max_seq_len"):
        replay_sequences(cfg, load_tokenizer("data/prepare/model"), TRAIN, n_domain=30)
