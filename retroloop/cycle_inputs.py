"""What a continual-learning cycle reads before it trains (`retroloop.cycle`, steps 1-2): the
domain file, checked in one line per fault, and the models it resolves from the registry and
loads, each failure one line naming the `cycle.*` key to fix."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import torch

from retroloop import datasets, registry
from retroloop.config import Params
from retroloop.errors import DataError, ModelError, RetroloopError
from retroloop.models.loading import load_model
from retroloop.opd_io import validation_split
from retroloop.sequences import IGNORE, Sequence, chat_sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A model as the registry sees it: a base directory plus an optional adapter."""

    base: Path
    adapter: Path | None
    label: str

    @property
    def lineage_path(self) -> Path:
        return self.adapter if self.adapter is not None else self.base


def load_domain_file(path: Path, fmt: str) -> pl.DataFrame:
    """Read and validate the new domain documents (clear DataError on empty / non-UTF-8 / missing)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"--domain-data {path}: is a folder; pass a .jsonl/.json/.parquet/.txt file"
        )
    if not path.is_file():
        raise DataError(
            f"--domain-data {path}: no such file; pass an existing .jsonl/.json/.parquet/.txt "
            "file of domain documents"
        )
    if path.suffix in (".txt", ".md"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(
                f"--domain-data {path}: not UTF-8 text; re-encode it as UTF-8"
            ) from None
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        if not docs:
            raise DataError(
                f"--domain-data {path}: empty file; it needs at least 2 documents separated by blank lines"
            )
        frame = datasets.records_to_frame([{"text": d} for d in docs], "text", origin=str(path))
    else:
        frame = datasets.load_local(path, fmt)
    if frame.height < 2:  # here, not in the flow's split: one line before Prefect starts
        raise DataError(
            f"--domain-data {path}: {frame.height} record; a cycle holds some documents out to "
            "measure domain perplexity, so it needs at least 2; add records"
        )
    return frame


def resolve_models(cfg: Params, registry_root: Path) -> tuple[ModelRef, ModelRef]:
    """(teacher, parent) of the next cycle. Read under the registry lock, so "previous" is the
    cycle registered last and no other cycle can register in between."""
    c = cfg.cycle
    base = Path(c.base_model)
    if not (base / "config.json").is_file():
        raise ModelError(
            f"cycle.base_model: {base} is not a model directory (no config.json); run the pipeline first"
        )
    previous = registry.cycle_dirs(registry_root)
    if previous:
        parent = ModelRef(base, previous[-1] / "adapter", previous[-1].name)
    elif c.base_adapter is not None:
        adapter = Path(c.base_adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(
                f"cycle.base_adapter: {adapter} is not a PEFT adapter (no adapter_config.json); set it to null or run the pipeline"
            )
        parent = ModelRef(base, adapter, f"base+{adapter}")
    else:
        parent = ModelRef(base, None, "base")
    match c.teacher:
        case "previous":
            return parent, parent
        case "base":
            return ModelRef(base, None, "base"), parent
        case path if (Path(path) / "config.json").is_file():
            return ModelRef(Path(path), None, path), parent
        case path if (Path(path) / "adapter_config.json").is_file():
            return ModelRef(base, Path(path), path), parent
        case path:
            raise ModelError(
                f"cycle.teacher: {path} is neither a model (config.json) nor a PEFT adapter; use 'previous', 'base' or a model path"
            )


def load_ref(ref: ModelRef, cfg: Params, device: torch.device, *, trainable: bool, key: str):
    """Load base (+ adapter); any failure is one line naming the `cycle.*` key to fix."""
    from peft import PeftModel, get_peft_model

    from retroloop.models.lora import fp32_trainable, lora_config_for

    try:
        model = load_model(ref.base, cfg.dtype, device)
        if ref.adapter is not None:
            return fp32_trainable(
                PeftModel.from_pretrained(
                    model, ref.adapter, is_trainable=trainable, trust_remote_code=False
                )
            )
    except ModelError as err:  # load_model's one line, with the key to fix in front
        raise ModelError(f"{key}: {err}") from None
    except RetroloopError:
        raise
    except Exception as err:  # transformers/peft raise many types for a broken directory
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(
            f"{key}: {ref.lineage_path} does not load ({type(err).__name__}: {first}); "
            "point it at a save_pretrained model or PEFT adapter directory"
        ) from None
    if not trainable:
        return model
    lo = cfg.opd.lora
    config = lora_config_for(
        model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout,
        target_modules=lo.target_modules, train_adapter=lo.train_adapter,
    )  # fmt: skip
    return fp32_trainable(get_peft_model(model, config))


def teacher_key(cfg: Params) -> str:
    return "cycle.teacher" if cfg.cycle.teacher not in ("previous", "base") else "cycle.base_model"


def replay_sequences(cfg: Params, tokenizer, instruct_train: Path, n_domain: int) -> list[Sequence]:
    """Instruction sequences (prompt + the teacher's response from prepare, loss on the
    response) mixed into mid-training: n_r = round(f·n_domain / (1 − f)) of them, so a batch
    drawn uniformly from the n_domain + n_r sequences holds f = `cycle.replay_fraction` of
    replay in expectation (the chat-data mix of Thinking Machines' mid-training, which alone
    kept most of IFEval). Rows cycle in a seeded order; OPD's held-out tail is never replayed,
    nor a row whose prompt leaves no response token within `cycle.max_seq_len`."""
    c, f = cfg.cycle, cfg.cycle.replay_fraction
    if f == 0.0:
        return []
    rows, _ = validation_split(pl.read_parquet(instruct_train), cfg.opd)
    rows = rows.sample(fraction=1.0, shuffle=True, seed=cfg.seed).to_dicts()
    pool = [
        chat_sequence(tokenizer, r["id"], r["prompt"], r["response"], c.max_seq_len) for r in rows
    ]
    pool = [s for s in pool if any(label != IGNORE for label in s.labels)]
    if not pool:
        raise DataError(
            f"cycle.replay_fraction: {f} but no instruction prompt fits cycle.max_seq_len "
            f"({c.max_seq_len} tokens) with a response token; raise cycle.max_seq_len or set "
            "cycle.replay_fraction: 0"
        )
    n = round(f * n_domain / (1.0 - f))
    log.info(
        "midtrain: %d domain + %d replayed instruction sequences (%.0f%%)", n_domain, n, 100 * f
    )
    return [
        replace(pool[k % len(pool)], id=f"replay:{k}:{pool[k % len(pool)].id}") for k in range(n)
    ]
