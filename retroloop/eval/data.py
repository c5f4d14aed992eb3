"""What every model is evaluated on, selected once from the held-out frames so all models see
the same inputs: IFEval items, KL prompts, held-out instruct / domain texts, GSM8K questions
(split from `retroloop.eval.suite`, which re-exports these names)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from transformers import PreTrainedTokenizerBase

from retroloop.config import EvaluateParams
from retroloop.sequences import render_chat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IFEvalItem:
    id: str
    prompt: str
    instruction_id_list: list[str]
    kwargs_list: list[dict[str, Any]]


@dataclass(frozen=True)
class EvalData:
    """What every model is evaluated on; built once so all models see the same inputs."""

    ifeval: list[IFEvalItem]
    kl_prompts: list[str]
    instruct_texts: list[str]  # chat-templated held-out conversations (or prompts)
    domain_texts: list[str]
    max_seq_len: int
    gsm8k: list[tuple[str, str]] = field(default_factory=list)  # (question, gold answer)


def _kwargs_list(value: Any, n: int) -> list[dict[str, Any]]:
    """The CHAT_SCHEMA stores IFEval kwargs as a JSON list of dicts; accept a list as well."""
    if value is None or value == "":
        return [{} for _ in range(n)]
    parsed = json.loads(value) if isinstance(value, str) else list(value)
    parsed = [dict(kw or {}) for kw in parsed]
    assert len(parsed) == n, f"kwargs has {len(parsed)} entries for {n} instruction ids"
    return parsed


def ifeval_items(frame: pl.DataFrame, limit: int) -> list[IFEvalItem]:
    """The first `limit` rows that carry IFEval instructions, as `IFEvalItem`s."""
    items = []
    for row in frame.iter_rows(named=True):
        ids = list(row.get("instruction_id_list") or [])
        if not ids:
            continue
        items.append(
            IFEvalItem(
                str(row["id"]), row["prompt"], ids, _kwargs_list(row.get("kwargs"), len(ids))
            )
        )
        if len(items) == limit:
            break
    return items


def build_eval_data(
    params: EvaluateParams,
    tokenizer: PreTrainedTokenizerBase,
    *,
    instruct_eval: pl.DataFrame,
    domain_eval: pl.DataFrame,
    max_seq_len: int,
    ifeval_frame: pl.DataFrame | None = None,
    gsm8k_frame: pl.DataFrame | None = None,
) -> EvalData:
    """Select the evaluation inputs from the held-out frames (CHAT_SCHEMA / TEXT_SCHEMA).

    `ifeval_frame` defaults to the held-out instruction prompts (the built-in synthetic
    IFEval set); pass the real IFEval file loaded with `load_ifeval` to use that instead.
    """
    items = ifeval_items(
        ifeval_frame if ifeval_frame is not None else instruct_eval, params.ifeval_prompts
    )
    n = params.nll_records
    instruct_rows = list(instruct_eval.head(n).iter_rows(named=True))
    instruct_texts = [render_chat(tokenizer, r["prompt"], r.get("response")) for r in instruct_rows]
    gsm = []
    if gsm8k_frame is not None:
        gsm = [
            (r["prompt"], r["answer"])
            for r in gsm8k_frame.head(params.gsm8k_questions).iter_rows(named=True)
        ]
    data = EvalData(
        ifeval=items,
        kl_prompts=instruct_eval["prompt"].head(params.kl_prompts).to_list(),
        instruct_texts=instruct_texts,
        domain_texts=domain_eval["text"].head(n).to_list(),
        max_seq_len=max_seq_len,
        gsm8k=gsm,
    )
    log.info(
        "eval data: %d IFEval prompts, %d KL prompts, %d instruct / %d domain texts, %d GSM8K questions",
        len(data.ifeval),
        len(data.kl_prompts),
        len(data.instruct_texts),
        len(data.domain_texts),
        len(data.gsm8k),
    )
    return data
