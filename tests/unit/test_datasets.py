"""retroloop.datasets: fixed schemas, determinism, addition-stable splits, errors that name the file."""

from __future__ import annotations

import json

import polars as pl
import pytest

from retroloop import datasets as D
from retroloop.config import DatasetSource
from retroloop.errors import DataError

# --------------------------------------------------------------------------- built-in


def test_pydoc_is_deterministic_with_text_schema():
    a = D.builtin_dataset("pydoc", max_records=50, seed=0)
    b = D.builtin_dataset("pydoc", max_records=50, seed=0)
    c = D.builtin_dataset("pydoc", max_records=50, seed=1)
    assert a.schema == D.TEXT_SCHEMA
    assert a.equals(b)
    assert len(a) == 50 and a["id"].n_unique() == 50
    assert a["id"].to_list() != c["id"].to_list()  # another seed, another order
    assert all(len(t) >= D.MIN_DOC_CHARS and t == t.strip() for t in a["text"])


def test_ifeval_synthetic_is_deterministic_with_chat_schema():
    a = D.builtin_dataset("ifeval_synthetic", max_records=40, seed=0)
    b = D.builtin_dataset("ifeval_synthetic", max_records=40, seed=0)
    c = D.builtin_dataset("ifeval_synthetic", max_records=40, seed=1)
    assert a.schema == D.CHAT_SCHEMA
    assert a.equals(b)
    assert a["prompt"].to_list() != c["prompt"].to_list()
    assert a["response"].is_null().all() and a["answer"].is_null().all()
    for ids, kwargs in zip(a["instruction_id_list"], a["kwargs"], strict=True):
        assert 1 <= len(ids) <= 2
        assert len(json.loads(kwargs)) == len(ids)


def test_ifeval_synthetic_more_records_only_appends():
    small = D.builtin_dataset("ifeval_synthetic", max_records=10, seed=3)
    big = D.builtin_dataset("ifeval_synthetic", max_records=30, seed=3)
    shared = big.filter(pl.col("id").is_in(small["id"].to_list()))
    assert len(shared) == 10
    assert shared.sort("id").equals(small.sort("id"))


def test_unknown_builtin_names_the_key_and_valid_names():
    with pytest.raises(DataError, match=r"prepare\.domain\.name.*pydoc, ifeval_synthetic"):
        D.builtin_dataset("wikipedia", max_records=5, seed=0, key="prepare.domain")


def test_load_source_rejects_builtin_with_wrong_format():
    src = DatasetSource(source="builtin", name="pydoc", format="chat")
    with pytest.raises(DataError, match=r"prepare\.instructions\.format.*format: text"):
        D.load_source(src, seed=0, key="prepare.instructions")


def test_load_source_builtin_caps_records():
    src = DatasetSource(source="builtin", name="ifeval_synthetic", format="ifeval", max_records=7)
    df = D.load_source(src, seed=0)
    assert len(df) == 7 and df.schema == D.CHAT_SCHEMA


# --------------------------------------------------------------------------- split


def _texts(n: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"doc{i}" for i in range(n)], "text": [f"t{i}" for i in range(n)]})


def test_split_is_deterministic_disjoint_and_complete():
    df = _texts(200)
    train, held = D.split_train_eval(df, 0.25, seed=0)
    again = D.split_train_eval(df, 0.25, seed=0)
    assert train.equals(again[0]) and held.equals(again[1])
    assert set(train["id"]).isdisjoint(held["id"])
    assert set(train["id"]) | set(held["id"]) == set(df["id"])
    assert 25 <= len(held) <= 75
    other = D.split_train_eval(df, 0.25, seed=1)[1]
    assert set(other["id"]) != set(held["id"])


def test_split_is_stable_when_records_are_added():
    _, held_small = D.split_train_eval(_texts(100), 0.3, seed=5)
    _, held_big = D.split_train_eval(_texts(300), 0.3, seed=5)
    big_ids = set(held_big["id"])
    assert set(held_small["id"]) <= big_ids
    assert {i for i in big_ids if int(i[3:]) < 100} == set(held_small["id"])


@pytest.mark.parametrize("fraction", [0.01, 0.99])
def test_split_of_two_records_has_both_sides(fraction):
    train, held = D.split_train_eval(_texts(2), fraction, seed=0)
    assert len(train) == 1 and len(held) == 1


def test_split_of_one_record_is_an_error():
    with pytest.raises(DataError, match="at least 2 records"):
        D.split_train_eval(_texts(1), 0.5, seed=0)


# --------------------------------------------------------------------------- local files


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_local_text_jsonl_json_and_parquet(tmp_path):
    rows = [{"text": "alpha beta"}, {"text": "gamma"}, {"text": "alpha beta"}]  # one duplicate
    a = D.load_local(_jsonl(tmp_path / "d.jsonl", rows), "text")
    assert a.schema == D.TEXT_SCHEMA and a["text"].to_list() == ["alpha beta", "gamma"]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    assert D.load_local(tmp_path / "d.json", "text").equals(a)
    D.write_parquet_atomic(a, tmp_path / "sub" / "d.parquet")
    assert D.load_local(tmp_path / "sub" / "d.parquet", "text").equals(a)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["d.parquet"]  # no temp left behind


def test_local_chat_prompt_response_and_messages(tmp_path):
    rows = [
        {"prompt": "Hi?", "response": "Hello."},
        {"prompt": "Only a prompt"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    ]  # fmt: skip
    df = D.load_local(_jsonl(tmp_path / "c.jsonl", rows), "chat")
    assert df.schema == D.CHAT_SCHEMA
    assert df["prompt"].to_list() == ["Hi?", "Only a prompt", "Q"]
    assert df["response"].to_list() == ["Hello.", None, "A"]
    assert df["kwargs"].to_list() == ["[]"] * 3


def test_local_ifeval_drops_null_kwargs(tmp_path):
    # The hub copy of IFEval stores every checker's keys, unused ones as null.
    row = {
        "key": 7,
        "prompt": "Write without commas.",
        "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_bullet_lists"],
        "kwargs": [{"num_bullets": None}, {"num_bullets": 3, "keywords": None}],
    }
    df = D.load_local(_jsonl(tmp_path / "i.jsonl", [row]), "ifeval")
    assert df["id"].to_list() == ["7"]
    assert json.loads(df["kwargs"][0]) == [{}, {"num_bullets": 3}]


def test_local_gsm8k(tmp_path):
    rows = [{"question": "How many?", "answer": "2 + 2 = 4\n#### 1,004"}]
    df = D.load_local(_jsonl(tmp_path / "g.jsonl", rows), "gsm8k")
    assert df.row(0, named=True) | {"id": "x"} == {
        "id": "x",
        "prompt": "How many?",
        "response": "2 + 2 = 4\n#### 1,004",
        "instruction_id_list": [],
        "kwargs": "[]",
        "answer": "1004",
    }


def test_bad_local_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl.*no such file"):
        D.load_local(tmp_path / "missing.jsonl", "text")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl.*empty"):
        D.load_local(tmp_path / "empty.jsonl", "text")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl.*not UTF-8.*re-encode"):
        D.load_local(tmp_path / "latin1.jsonl", "text")
    _jsonl(tmp_path / "cols.jsonl", [{"body": "x"}])
    with pytest.raises(
        DataError, match=r"cols\.jsonl \(format 'text'\).*needs 'text', found: body"
    ):
        D.load_local(tmp_path / "cols.jsonl", "text")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl.*line 2"):
        D.load_local(tmp_path / "broken.jsonl", "text")
    (tmp_path / "d.csv").write_text("text\na\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv.*unsupported extension"):
        D.load_local(tmp_path / "d.csv", "text")
    _jsonl(tmp_path / "nohash.jsonl", [{"question": "q", "answer": "4"}])
    with pytest.raises(DataError, match=r"nohash\.jsonl.*####"):
        D.load_local(tmp_path / "nohash.jsonl", "gsm8k")


def test_load_source_local_shuffles_and_caps(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"id": i, "text": f"doc {i}"} for i in range(20)])
    src = DatasetSource(source="local", path=str(path), format="text", max_records=5)
    a, b = D.load_source(src, seed=0), D.load_source(src, seed=0)
    assert a.equals(b) and len(a) == 5
    assert a["id"].to_list() != [str(i) for i in range(5)]


# --------------------------------------------------------------------------- hub


def test_load_hf_unreachable_says_use_a_local_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x/y' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'x/y'.*unreachable.*source: local"):
        D.load_hf("x/y", "train", "text")


def test_load_hf_normalises_records_and_passes_config(monkeypatch):
    import datasets

    seen = {}

    def fake(name, config, split):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_list([{"question": "q?", "answer": "so\n#### 5"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    df = D.load_hf("openai/gsm8k:main", "test", "gsm8k")
    assert seen == {"name": "openai/gsm8k", "config": "main", "split": "test"}
    assert df["answer"].to_list() == ["5"] and df.schema == D.CHAT_SCHEMA


def test_chat_messages():
    assert D.chat_messages("p") == [{"role": "user", "content": "p"}]
    assert D.chat_messages("p", "r")[1] == {"role": "assistant", "content": "r"}
