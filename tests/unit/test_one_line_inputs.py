"""Issue 19, item 7: every bad input is one line, exit 2, naming the file or key, including the
ones that used to fail inside a flow or deep in a stage:

- `retroloop cycle` on a one-record file failed inside the Prefect flow (tracebacks first) with
  a message that did not name the file; it is now refused before the flow starts;
- a `gsm8k` (or chat / ifeval) file as `prepare.domain` gave ColumnNotFoundError, exit 1: every
  documented format is accepted there (as prompt + response documents), and text instructions,
  which have no prompts, are refused by name;
- `prepare.max_seq_len: 1000000000` failed in an 8.6 GB allocation: every sequence-length key
  is bounded by the model's context (max_position_embeddings).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import polars as pl
import pytest

from retroloop.stages.common import check_context
from tests.unit.test_cli_errors import cli, error_line, tiny_params, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

GSM8K = [
    {"question": f"Tom has {n} apples and buys {n + 2} more. How many now?",
     "answer": f"He has {n} + {n + 2} = {2 * n + 2} apples.\n#### {2 * n + 2}"}
    for n in range(8)
]  # fmt: skip


def test_cycle_on_a_one_record_file_is_one_line_naming_it_before_the_flow(
    tmp_path, monkeypatch, capsys
) -> None:
    from tests.conftest import TINY_PROFILE

    monkeypatch.setitem(sys.modules, "flows.cycle", None)  # the flow must not start
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": "a single document " * 20}])
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "cycle", "--params", str(TINY_PROFILE), "--domain-data", str(data))
    assert code == 2
    error_line(err, f"--domain-data {data}", "1 record", "at least 2")


def test_a_gsm8k_file_as_the_domain_is_prepared_as_documents(tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    params = tiny_params(
        tmp_path / "p.yaml",
        prepare={
            "domain": {"source": "local", "path": str(data), "format": "gsm8k"},
            "model.tiny.train_steps": 1,
        },
    )
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(params))
    assert code == 0, err
    frames = [pl.read_parquet(f"data/prepare/datasets/domain_{s}.parquet") for s in ("train", "eval")]  # fmt: skip
    docs = pl.concat(frames)
    assert docs.columns == ["id", "text"] and docs.height == len(GSM8K)
    assert all("How many now?" in t and "####" in t for t in docs["text"])


def test_text_instructions_are_refused_by_name(tmp_path, monkeypatch, capsys) -> None:
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i} " * 30} for i in range(4)])
    params = tiny_params(
        tmp_path / "p.yaml",
        prepare={"instructions": {"source": "local", "path": str(data), "format": "text"}},
    )
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(params))
    assert code == 2
    error_line(err, "prepare.instructions.format", "'text'", "chat, ifeval or gsm8k")
    assert not Path("data/prepare").exists()


@pytest.mark.parametrize("key", ["prepare.max_seq_len", "analyze.max_seq_len", "cycle.max_seq_len"])
def test_a_sequence_length_past_the_models_context_is_one_line_naming_the_key(
    tmp_path, monkeypatch, capsys, key
) -> None:
    from tests.conftest import TINY_PROFILE

    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(TINY_PROFILE), "--set", f"{key}=1000000000")  # fmt: skip
    assert code == 2
    error_line(err, f"{key}: 1000000000", "context (512 tokens", f"set {key} to at most 512")
    assert not Path("data/prepare").exists()


def test_check_context_reads_max_position_embeddings() -> None:
    config = types.SimpleNamespace(max_position_embeddings=2048)
    check_context(config, 2048, "prepare.max_seq_len")  # at the bound: fine
    check_context(types.SimpleNamespace(), 10**9, "prepare.max_seq_len")  # unknown: not checked
    with pytest.raises(Exception, match=r"prepare.max_seq_len: 2049 .*\(2048 tokens"):
        check_context(config, 2049, "prepare.max_seq_len")
