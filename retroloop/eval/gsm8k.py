"""GSM8K final-answer extraction and exact-match grading (Cobbe et al. 2021).

The reference answers end with `#### N`; a model's text is read the same way when it has
that marker, else its last number counts (lm-eval's "flexible-extract" behaviour). Commas,
`$` and a trailing `.` are stripped; numbers compare as values, so "18.00" matches "18".
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from retroloop.datasets import load_local

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def _clean(number: str) -> str:
    return number.replace(",", "").replace("$", "").rstrip(".")


def extract_answer(text: str) -> str | None:
    """The number after the last `####`, else the last number in `text`; None if there is none."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return _clean(found[0])
    found = _NUMBER.findall(text)
    return _clean(found[-1]) if found else None


def is_correct(pred_text: str, gold: str) -> bool:
    """Exact match of the extracted answer with `gold` (a number, or a text with `####`)."""
    pred = extract_answer(pred_text)
    ref = extract_answer(gold)
    if pred is None or ref is None:
        return False
    try:
        return abs(float(pred) - float(ref)) < 1e-9
    except ValueError:
        return pred == ref


def load_gsm8k(path: str | Path) -> pl.DataFrame:
    """GSM8K jsonl (question, answer) as a CHAT frame: prompt, response (reasoning), answer."""
    return load_local(path, "gsm8k")
