"""Built-in, local and hub datasets -> polars frames with one of two fixed schemas.

- `TEXT_SCHEMA` (`id`, `text`): domain documents, for mid-training and domain perplexity.
- `CHAT_SCHEMA` (`id`, `prompt`, `response`, `instruction_id_list`, `kwargs`, `answer`): prompts
  for distillation, OPD and evaluation. `kwargs` is the JSON of the list of IFEval checker kwargs
  (one dict per instruction id) so the same lm-eval checkers can grade a response; `answer` is
  the GSM8K final answer.

Record ids are content-derived (or the file's own `id`/`key`), never row numbers, and both the
order (`shuffle_head`) and the train/eval split (`split_train_eval`) are functions of
sha256(salt, seed, id): adding records to a source neither reshuffles nor moves existing ones
across the split, and identical records always land on the same side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import polars as pl

from retroloop.config import DatasetSource
from retroloop.errors import DataError

log = logging.getLogger(__name__)

Format = Literal["text", "chat", "ifeval", "gsm8k"]
TEXT_SCHEMA = pl.Schema({"id": pl.String, "text": pl.String})
CHAT_SCHEMA = pl.Schema(
    {
        "id": pl.String,
        "prompt": pl.String,
        "response": pl.String,
        "instruction_id_list": pl.List(pl.String),
        "kwargs": pl.String,
        "answer": pl.String,
    }
)
BUILTIN_FORMATS: dict[str, Format] = {"pydoc": "text", "ifeval_synthetic": "ifeval"}
MIN_DOC_CHARS = 300  # pydoc topics shorter than this are cross-reference stubs, not documents
DEFAULT_KEY = "prepare.<domain|instructions>"


def schema_for(fmt: Format) -> pl.Schema:
    return TEXT_SCHEMA if fmt == "text" else CHAT_SCHEMA


def chat_messages(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    """One user turn (+ the assistant's answer), as chat templates expect."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


# --------------------------------------------------------------------------- built-in


def builtin_dataset(
    name: str, *, max_records: int, seed: int, key: str = DEFAULT_KEY
) -> pl.DataFrame:
    """A built-in dataset that needs no download. Deterministic given `seed`."""
    match name:
        case "pydoc":
            df = _pydoc_frame()
        case "ifeval_synthetic":
            from retroloop.eval import ifeval

            df = ifeval.synthetic_frame(max_records, seed)
        case _:
            raise DataError(
                f"{key}.name: unknown built-in dataset {name!r}; valid names: {', '.join(BUILTIN_FORMATS)}"
            )
    return shuffle_head(df, seed=seed, max_records=max_records)


def _pydoc_frame() -> pl.DataFrame:
    """Python's own documentation topics (stdlib `pydoc_data.topics`), one record per topic."""
    from pydoc_data.topics import topics

    rows = [
        {"id": f"pydoc:{topic}", "text": text.strip()}
        for topic, text in sorted(topics.items())
        if len(text.strip()) >= MIN_DOC_CHARS
    ]
    return pl.DataFrame(rows, schema=TEXT_SCHEMA)


# --------------------------------------------------------------------------- local / hub


def load_local(path: str | Path, fmt: Format) -> pl.DataFrame:
    """A local `.jsonl` / `.json` / `.parquet` file in one of the named formats."""
    path = Path(path)
    return records_to_frame(_read_records(path, fmt), fmt, origin=str(path))


def load_hf(hf_id: str, split: str, fmt: Format) -> pl.DataFrame:
    """A Hugging Face dataset (`owner/name` or `owner/name:config`); needs network."""
    import datasets

    name, _, config = hf_id.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # hub/network failures come in many types; all mean the same here
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"hf_id {hf_id!r} (split {split!r}): the Hugging Face hub is unreachable or has no such "
            f"dataset ({first}); use source: local with a .jsonl/.parquet file instead"
        ) from None
    return records_to_frame(list(ds), fmt, origin=f"hf:{hf_id}[{split}]")


def load_source(src: DatasetSource, *, seed: int, key: str = DEFAULT_KEY) -> pl.DataFrame:
    """Load `src`, then keep `max_records` records in a seeded, addition-stable order."""
    match src.source:
        case "builtin":
            native = BUILTIN_FORMATS.get(src.name or "")
            if native is not None and schema_for(native) != schema_for(src.format):
                raise DataError(
                    f"{key}.format: built-in '{src.name}' is {native!r} data, not {src.format!r}; "
                    f"set format: {native}"
                )
            df = builtin_dataset(src.name, max_records=src.max_records, seed=seed, key=key)
        case "local":
            df = load_local(src.path, src.format)
        case "hf":
            df = load_hf(src.hf_id, src.hf_split, src.format)
    df = shuffle_head(df, seed=seed, max_records=src.max_records)
    log.info("%s: %d records (%s)", key, len(df), src.source)
    return df


def _read_records(path: Path, fmt: str) -> list[dict[str, Any]]:
    where = f"{path} (format '{fmt}')"
    if not path.is_file():
        raise DataError(f"{where}: no such file; check the path, or use source: builtin")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: the file is empty; point to a file with at least one record")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            return pl.read_parquet(path).to_dicts()
        except Exception as err:
            raise DataError(
                f"{where}: not a readable Parquet file ({err}); rewrite it with polars/pandas"
            ) from None
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"{where}: unsupported extension {suffix!r}; use .jsonl, .json or .parquet")
    try:
        text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{where}: not UTF-8 text (bad byte at offset {err.start}); re-encode it as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{where}: the file has no records (only whitespace); add records")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON Lines saved as .json
        if data is not None:
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(
                    f"{where}: a .json file must hold a list of objects; or use JSON Lines"
                )
            return data
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: line {n} is not valid JSON ({err.msg}); fix or remove it"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: line {n} is not a JSON object")
        rows.append(row)
    return rows


_NEEDS: dict[str, str] = {
    "text": "'text'",
    "chat": "'prompt' (+ optional 'response') or 'messages'",
    "ifeval": "'key', 'prompt', 'instruction_id_list', 'kwargs'",
    "gsm8k": "'question', 'answer'",
}


def records_to_frame(rows: list[dict[str, Any]], fmt: Format, *, origin: str) -> pl.DataFrame:
    """Validate raw records of format `fmt` and build the fixed-schema frame."""
    if not rows:
        raise DataError(f"{origin} (format '{fmt}'): no records; point to a non-empty dataset")
    out = []
    for n, row in enumerate(rows, start=1):
        try:
            out.append(_normalise(row, fmt))
        except KeyError as err:  # a missing column: the file is in another format
            found = ", ".join(sorted(row)) or "nothing"
            raise DataError(
                f"{origin} (format '{fmt}'): record {n} is not valid (no {err}); the format needs "
                f"{_NEEDS[fmt]}, found: {found}; rename the columns or pick the matching format"
            ) from None
        except (TypeError, ValueError) as err:  # the right column with a bad value
            raise DataError(
                f"{origin} (format '{fmt}'): record {n}: {err}; fix that record "
                f"(the format needs {_NEEDS[fmt]})"
            ) from None
    df = pl.DataFrame(out, schema=schema_for(fmt))
    dupes = len(df) - df["id"].n_unique()
    if dupes:
        log.warning("%s: dropping %d duplicate records (same id)", origin, dupes)
        df = df.unique(subset="id", keep="first", maintain_order=True)
    return df


def as_documents(df: pl.DataFrame) -> pl.DataFrame:
    """Records of any format as domain documents (`TEXT_SCHEMA`): a text record is itself, a
    chat / ifeval / gsm8k record is its prompt and response (worked answer) as one document."""
    if "text" in df.columns:
        return df.select("id", "text")
    text = pl.concat_str([pl.col("prompt"), pl.col("response").fill_null("")], separator="\n")
    return df.select("id", text.str.strip_chars().alias("text"))


def _normalise(row: dict[str, Any], fmt: Format) -> dict[str, Any]:
    match fmt:
        case "text":
            text = _string(row, "text")
            return {"id": _row_id(row, text), "text": text}
        case "chat":
            if "messages" in row and "prompt" not in row:
                prompt, response = _from_messages(row["messages"])
            else:
                prompt, response = _string(row, "prompt"), row.get("response")
                if response is not None and not isinstance(response, str):
                    raise TypeError("'response' must be a string or null")
            return chat_row(_row_id(row, prompt, response), prompt, response)
        case "ifeval":
            prompt, ids, kwargs = _string(row, "prompt"), row["instruction_id_list"], row["kwargs"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise TypeError("'instruction_id_list' must be a list of strings")
            if isinstance(kwargs, str):
                kwargs = json.loads(kwargs)
            if not isinstance(kwargs, list) or len(kwargs) != len(ids):
                raise ValueError("'kwargs' must be a list with one dict per instruction id")
            for i, kw in enumerate(kwargs):
                if kw is not None and not isinstance(kw, dict):
                    raise TypeError(
                        f"'kwargs'[{i}] is {kw!r}; each entry must be an object of checker "
                        "arguments (or {} / null for none)"
                    )
            # The hub copy of IFEval stores every checker's keys with nulls; keep only the set ones.
            kwargs = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
            return chat_row(str(row["key"]), prompt, row.get("response"), ids, kwargs)
        case "gsm8k":
            question, answer = _string(row, "question"), _string(row, "answer")
            if "####" not in answer:
                raise ValueError("'answer' has no '#### <final answer>' line")
            final = answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")
            return chat_row(_row_id(row, question), question, answer, answer=final)


def _string(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string")
    return value


def _from_messages(messages: Any) -> tuple[str, str | None]:
    """(last user turn, final assistant turn or None); system turns and history are dropped."""
    if not isinstance(messages, list) or not messages:
        raise TypeError("'messages' must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise TypeError(
                f"'messages'[{i}] is {m!r}; each message must be an object "
                '{"role": "user"|"assistant"|"system", "content": "<text>"}'
            )
    response = None
    if messages[-1].get("role") == "assistant":
        response = messages[-1]["content"]
        messages = messages[:-1]
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise ValueError("'messages' has no user turn")
    return users[-1], response


def _row_id(row: dict[str, Any], *content: str | None) -> str:
    if row.get("id") is not None:
        return str(row["id"])
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]


def chat_row(
    id_: str,
    prompt: str,
    response: str | None = None,
    instruction_id_list: list[str] | None = None,
    kwargs: list[dict[str, Any]] | None = None,
    answer: str | None = None,
) -> dict[str, Any]:
    return {
        "id": id_,
        "prompt": prompt,
        "response": response,
        "instruction_id_list": list(instruction_id_list or []),
        "kwargs": json.dumps(kwargs or [], sort_keys=True),
        "answer": answer,
    }


# --------------------------------------------------------------------------- order / split / write


def _hash_unit(salt: str, seed: int, id_: str) -> float:
    """A uniform number in [0, 1) from sha256(salt, seed, id): stable across runs and machines."""
    digest = hashlib.sha256(f"{salt}\x00{seed}\x00{id_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def shuffle_head(df: pl.DataFrame, *, seed: int, max_records: int) -> pl.DataFrame:
    """Order by hash(seed, id) and keep `max_records` (idempotent; adding records only inserts)."""
    order = pl.Series("__order", [_hash_unit("order", seed, i) for i in df["id"]], dtype=pl.Float64)
    return df.with_columns(order).sort("__order").drop("__order").head(max_records)


def split_train_eval(
    df: pl.DataFrame, eval_fraction: float, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(train, eval): a record is held out iff hash(seed, id) < eval_fraction.

    Thresholding a per-record hash (not ranking) keeps every record's side fixed when
    records are added. Tiny sets that end up one-sided move the single nearest record over.
    """
    if len(df) < 2:
        raise DataError(
            f"need at least 2 records to split into train and eval, got {len(df)}; add records"
        )
    assert 0.0 < eval_fraction < 1.0, eval_fraction
    u = pl.Series("__u", [_hash_unit("split", seed, i) for i in df["id"]], dtype=pl.Float64)
    held = u < eval_fraction
    if not held.any():
        held = u == u.min()
    elif held.all():
        held = u != u.max()
    return df.filter(~held), df.filter(held)


def write_parquet_atomic(df: pl.DataFrame, path: str | Path) -> None:
    """Write to a temporary sibling and `os.replace` it, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        df.write_parquet(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
