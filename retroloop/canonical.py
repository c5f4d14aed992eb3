"""Canonical bytes for what a stage writes, so the same params give the same `content_sha256`.

Two kinds of run-to-run noise used to reach hashed files (DESIGN.md §3):

- *order*: safetensors' Rust writer emits the header's `__metadata__` from a hash map (a new
  key order per process) and PEFT writes `target_modules` from a Python set;
- *run-dependent figures*: wall-clock seconds and throughput in `metrics.json` and in the
  per-step CSVs.

`canonicalize(dir)` fixes the first in place; `split_run_dependent` / `split_run_columns`
move the second into `run.json` / `run_<name>.csv`, which the content hash leaves out.

`json_sha256` is the one hash of parameters (a manifest's `params_sha256`) and of the keys
built from them (resume folders, generation caches); `hash_tree` is the content hash itself:
the sorted (relative path, file sha256) listing of an artifact, its manifest and run files left
out (`listing_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
RUN = "run.json"
RUN_PREFIX = "run_"
# A figure is run-dependent when it is a duration or a rate per second (`seconds`, `step_s`,
# `tokens_per_s`, ...) or a share of wall time. Name new timing metrics to match.
_RUN_KEY = re.compile(r"(^seconds$|_s$|_seconds$|^teacher_scoring_share$)")
# adapter_config.json keys that PEFT writes from Python sets (order carries no meaning).
_SET_KEYS = ("target_modules", "modules_to_save", "exclude_modules")


def json_sha256(obj: Any) -> str:
    """sha256 of `obj` as canonical JSON: sorted keys, json's default separators and ASCII
    escapes, values JSON cannot write (paths, enums) as `str`. Changing any of these changes
    every recorded `params_sha256`, so they are fixed here, once."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> tuple[str, dict[str, str]]:
    """(content_sha256, per-file hashes) of a file or directory; manifests and run files
    (`run.json`, `run_*.csv` at the top) are left out."""
    root = Path(root)
    if root.is_file():
        sha = sha256_file(root)
        return sha, {root.name: sha}
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and p.name != MANIFEST and not is_run_file(rel):
            files[rel] = sha256_file(p)
    return listing_sha256(files), files


def listing_sha256(files: Mapping[str, str]) -> str:
    """The content hash of a {relative path: sha256} listing (stable order)."""
    listing = "".join(f"{rel}\0{sha}\n" for rel, sha in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def is_run_dependent(key: str) -> bool:
    return bool(_RUN_KEY.search(key))


def is_run_file(rel: str) -> bool:
    """Files beside the manifest that hold run-dependent figures (outside the content hash):
    `run.json`, `run_<name>.csv` and everything in a top-level `run_<name>/` folder (the
    per-step timings dvclive writes, `retroloop.steplog`)."""
    top = rel.split("/", 1)[0]
    return top == RUN or top.startswith(RUN_PREFIX)


def split_run_dependent(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(deterministic, run-dependent) halves of a nested metrics dict, nesting kept."""
    keep: dict[str, Any] = {}
    run: dict[str, Any] = {}
    for key, value in metrics.items():
        if is_run_dependent(key):
            run[key] = value
        elif isinstance(value, dict):
            k, r = split_run_dependent(value)
            keep[key] = k
            if r:
                run[key] = r
        else:
            keep[key] = value
    return keep, run


def split_run_columns(csv: Path) -> Path | None:
    """Move run-dependent columns of `csv` into `run_<name>` (with the first column as key)."""
    import polars as pl

    frame = pl.read_csv(csv)
    timed = [c for c in frame.columns if is_run_dependent(c)]
    if not timed:
        return None
    key = [c for c in frame.columns[:1] if c not in timed]
    out = csv.with_name(RUN_PREFIX + csv.name)
    frame.select(*key, *timed).write_csv(out)
    frame.drop(timed).write_csv(csv)
    return out


def canonical_safetensors_bytes(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order (data untouched)."""
    n = int.from_bytes(blob[:8], "little")
    header = _sorted_header(blob[8 : 8 + n], n)
    return blob if header is None else blob[:8] + header + blob[8 + n :]


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite only the header bytes in place (same length: sorting keys adds no bytes)."""
    with open(path, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = _sorted_header(fh.read(n), n)
        if header is not None:
            fh.seek(8)
            fh.write(header)


def _sorted_header(raw: bytes, n: int) -> bytes | None:
    header = json.loads(raw)
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
    ordered.update(sorted(header.items()))
    new = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(new) > n:  # a writer with another JSON style; leave it as written
        return None
    new += b" " * (n - len(new))  # safetensors pads the header with spaces
    return None if new == raw else new


def canonicalize_adapter_config(path: Path) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in _SET_KEYS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def canonicalize(root: Path) -> None:
    """Canonical order for every safetensors header and PEFT adapter config under `root`."""
    for path in sorted(Path(root).rglob("*.safetensors")):
        canonicalize_safetensors(path)
    for path in sorted(Path(root).rglob("adapter_config.json")):
        canonicalize_adapter_config(path)
