"""One continual-learning cycle: new domain data → LoRA mid-training → measure forgetting →
OPD against the earlier model → measure recovery → register the adapter with its lineage.

Why OPD for recovery: SFT on new data drifts the model away from behaviour it had
(instruction following); on-policy distillation against a fixed earlier checkpoint pulls
the student back on its own samples, where the drift shows, while the new domain
knowledge stays (DESIGN.md §5 "Continual learning"). `evaluate.baseline_sft` adds the
contrast the literature draws: recovery by SFT on the model's own samples.

Every cycle adapter is a PEFT adapter on `cycle.base_model`. Cycle n continues cycle
n−1's adapter (its parent) and is taught back by cycle n−1's model (`cycle.teacher:
previous`); cycle 1's parent and teacher is `cycle.base_model` + `cycle.base_adapter`.

Registry layout (`cycle.registry`, default data/registry):
    datasets/<sha12>/    train.parquet, eval.parquet, manifest.json   (kind dataset)
    cycles/cycle-NNNN/   adapter/, report.md, phases.json, metrics.json, manifest.json (kind adapter)

The Prefect flow in flows/cycle.py calls these steps as tasks; `run_cycle` runs them in order.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch
from tqdm import tqdm

from retroloop import datasets
from retroloop.artifacts import atomic_artifact, read_manifest
from retroloop.config import Params
from retroloop.errors import ArtifactError, DataError, ModelError
from retroloop.eval.report import markdown_table
from retroloop.eval.suite import build_eval_data, evaluate_model
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.sequences import chat_sequence, pad_batch, text_sequence
from retroloop.stages.common import dataset_path, setup_run
from retroloop.training import make_optimizer

log = logging.getLogger(__name__)

PHASES = ("before", "after_midtrain", "after_opd")
PHASE_COLUMNS = [
    "domain_ppl",
    "domain_nll",
    "ifeval_prompt_strict",
    "ifeval_inst_loose",
    "kl_to_teacher",
    "instruct_nll",
]


@dataclass
class ModelRef:
    """A model as the registry sees it: a base directory plus an optional adapter."""

    base: Path
    adapter: Path | None
    label: str

    @property
    def lineage_path(self) -> Path:
        return self.adapter if self.adapter is not None else self.base


@dataclass
class CycleState:
    cfg: Params
    registry: Path
    number: int
    domain_file: Path
    teacher: ModelRef
    parent: ModelRef
    dataset_dir: Path | None = None
    student: Any = None
    teacher_model: Any = None
    tokenizer: Any = None
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    opd_metrics: dict[str, Any] = field(default_factory=dict)
    midtrain_losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- registry


def cycle_dirs(registry: Path) -> list[Path]:
    root = Path(registry) / "cycles"
    return sorted(p for p in root.glob("cycle-*") if (p / "manifest.json").is_file())


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def resolve_models(cfg: Params, registry: Path) -> tuple[ModelRef, ModelRef]:
    """(teacher, parent) of the next cycle, validated before anything is written."""
    c = cfg.cycle
    base = Path(c.base_model)
    if not _is_model_dir(base):
        raise ModelError(
            f"cycle.base_model: {base} is not a model directory (no config.json); run the pipeline first"
        )
    previous = cycle_dirs(registry)
    if previous:
        parent = ModelRef(base, previous[-1] / "adapter", previous[-1].name)
    elif c.base_adapter is not None:
        adapter = Path(c.base_adapter)
        if not _is_adapter_dir(adapter):
            raise ModelError(
                f"cycle.base_adapter: {adapter} is not a PEFT adapter (no adapter_config.json); set it to null or run the pipeline"
            )
        parent = ModelRef(base, adapter, f"base+{adapter}")
    else:
        parent = ModelRef(base, None, "base")
    match c.teacher:
        case "previous":
            teacher = parent
        case "base":
            teacher = ModelRef(base, None, "base")
        case path:
            path = Path(path)
            if _is_model_dir(path):
                teacher = ModelRef(path, None, str(path))
            elif _is_adapter_dir(path):
                teacher = ModelRef(base, path, str(path))
            else:
                raise ModelError(
                    f"cycle.teacher: {path} is neither a model (config.json) nor a PEFT adapter; use 'previous', 'base' or a model path"
                )
    return teacher, parent


def load_domain_file(path: Path, fmt: str) -> pl.DataFrame:
    """Read and validate the new domain documents (clear DataError on empty / non-UTF-8 / missing)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(
            f"--domain-data {path}: is a folder; pass a .jsonl/.json/.parquet/.txt file"
        )
    if path.suffix in (".txt", ".md"):
        if not path.is_file():
            raise DataError(f"--domain-data {path}: no such file")
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
        return datasets.records_to_frame([{"text": d} for d in docs], "text", origin=str(path))
    return datasets.load_local(path, fmt)


# --------------------------------------------------------------------------- steps


def start(
    cfg: Params, domain_file: Path, *, fmt: str = "text", registry: Path | None = None
) -> CycleState:
    """Validate everything, then ingest the domain data as a versioned dataset (step 1)."""
    setup_run(cfg)
    registry = Path(registry or cfg.cycle.registry)
    frame = load_domain_file(domain_file, fmt)
    if fmt in ("chat", "gsm8k"):  # a prompt/response pair is one domain document
        frame = frame.select(
            "id",
            pl.concat_str(
                [pl.col("prompt"), pl.col("response").fill_null("")], separator="\n"
            ).alias("text"),
        )
    train, held_out = datasets.split_train_eval(frame, cfg.prepare.eval_fraction, cfg.seed)
    teacher, parent = resolve_models(cfg, registry)
    state = CycleState(
        cfg, registry, len(cycle_dirs(registry)) + 1, Path(domain_file), teacher, parent
    )

    from retroloop.artifacts import sha256_file

    digest = sha256_file(Path(domain_file))[:12]
    out = registry / "datasets" / digest
    if not (out / "manifest.json").is_file():
        with atomic_artifact(out, stage="cycle_ingest", kind="dataset") as w:
            w.add_input("source_data", domain_file)
            datasets.write_parquet_atomic(train, w.dir / "train.parquet")
            datasets.write_parquet_atomic(held_out, w.dir / "eval.parquet")
            w.outputs = {"train.parquet": "dataset", "eval.parquet": "dataset"}
            w.metrics = {"train_records": train.height, "eval_records": held_out.height}
            w.finish(
                params={"format": fmt, "eval_fraction": cfg.prepare.eval_fraction},
                params_sha256="",
                seed=cfg.seed,
                device="cpu",
            )
    state.dataset_dir = out
    log.info(
        "cycle %d: data %s (%d train / %d eval), teacher %s, parent %s",
        state.number,
        out,
        train.height,
        held_out.height,
        teacher.label,
        parent.label,
    )
    return state


def _load(ref: ModelRef, cfg: Params, device: torch.device, trainable: bool) -> torch.nn.Module:
    from peft import PeftModel, get_peft_model

    from retroloop.models.lora import lora_config_for

    model = load_model(ref.base, cfg.dtype, device)
    if ref.adapter is not None:
        return PeftModel.from_pretrained(model, ref.adapter, is_trainable=trainable)
    if not trainable:
        return model
    lo = cfg.opd.lora
    return get_peft_model(
        model,
        lora_config_for(
            model,
            r=lo.r,
            alpha=lo.alpha,
            dropout=lo.dropout,
            target_modules=lo.target_modules,
            train_adapter=lo.train_adapter,
        ),
    )


def load_models(state: CycleState) -> None:
    device = setup_run(state.cfg)
    state.student = _load(state.parent, state.cfg, device, trainable=True)
    state.teacher_model = (
        _load(state.teacher, state.cfg, device, trainable=False).eval().requires_grad_(False)
    )
    state.tokenizer = load_tokenizer(state.parent.base)


def evaluate_phase(state: CycleState, phase: str) -> dict[str, Any]:
    """Domain perplexity, IFEval, KL to the teacher and instruction NLL of the current student."""
    cfg, c = state.cfg, state.cfg.cycle
    params = cfg.evaluate.model_copy(
        update={
            "ifeval_prompts": c.eval_records,
            "nll_records": c.eval_records,
            "kl_prompts": min(c.eval_records, cfg.evaluate.kl_prompts),
            "gsm8k_path": None,
        }
    )
    data = build_eval_data(
        params,
        state.tokenizer,
        instruct_eval=pl.read_parquet(_instruct_eval_path()),
        domain_eval=pl.read_parquet(state.dataset_dir / "eval.parquet"),
        max_seq_len=c.max_seq_len,
    )
    state.student.eval()
    metrics = evaluate_model(
        phase,
        state.student,
        state.tokenizer,
        teacher=state.teacher_model,
        data=data,
        params=params,
        cache_dir=None,
        seed=cfg.seed,
    )
    state.phases[phase] = metrics
    return metrics


def _instruct_eval_path() -> Path:
    path = dataset_path("instruct", "eval")
    if not path.is_file():
        raise ArtifactError(
            f"{path}: the cycle evaluates instruction following on the pipeline's held-out prompts; run `dvc repro prepare` first"
        )
    return path


def _instruct_train_path() -> Path:
    path = dataset_path("instruct", "train")
    if not path.is_file():
        raise ArtifactError(
            f"{path}: OPD recovery needs the pipeline's instruction prompts; run `dvc repro prepare` first"
        )
    return path


def _sft(
    model: torch.nn.Module,
    seqs: list,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    pad_id: int,
    desc: str,
) -> list[float]:
    """Plain next-token CE on `seqs` (LoRA + recurrence adapter trainable), seeded batches."""
    if not seqs:
        raise DataError(f"{desc}: no training sequences (documents too short?)")
    optimizer = make_optimizer(model, lr, 0.0)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        idx = torch.randint(len(seqs), (min(batch_size, len(seqs)),), generator=gen).tolist()
        ids_B_T, mask_B_T, labels_B_T = pad_batch([seqs[i] for i in idx], pad_id)
        out = model(
            input_ids=ids_B_T.to(device),
            attention_mask=mask_B_T.to(device),
            labels=labels_B_T.to(device),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    model.eval()
    return losses


def midtrain(state: CycleState) -> list[float]:
    """Step 2: LoRA mid-training on the new domain documents (next-token CE)."""
    c = state.cfg.cycle
    train = pl.read_parquet(state.dataset_dir / "train.parquet")
    seqs = [
        text_sequence(state.tokenizer, r["id"], r["text"], c.max_seq_len)
        for r in train.iter_rows(named=True)
    ]
    seqs = [s for s in seqs if len(s.input_ids) > 1]
    state.midtrain_losses = _sft(
        state.student,
        seqs,
        steps=c.midtrain_steps,
        lr=c.midtrain_lr,
        batch_size=c.batch_size,
        seed=state.cfg.seed,
        pad_id=state.tokenizer.pad_token_id,
        desc="midtrain",
    )
    return state.midtrain_losses


def recover_with_opd(state: CycleState, work_dir: Path) -> dict[str, Any]:
    """Step 4: OPD on instruction prompts with the earlier model as teacher."""
    from retroloop.stages.opd import train_opd

    cfg = state.cfg
    params = cfg.opd.model_copy(update={"steps": cfg.cycle.opd_steps})
    prompts = pl.read_parquet(_instruct_train_path())
    state.opd_metrics = train_opd(
        state.student,
        state.teacher_model,
        state.tokenizer,
        prompts,
        params,
        seed=cfg.seed,
        out_dir_tmp=work_dir,
        log_prefix=f"cycle-{state.number}-opd",
    )
    return state.opd_metrics


def sft_self_baseline(
    state: CycleState, adapter_after_midtrain: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The contrast: recovery by SFT on the model's own samples (same prompts and steps as OPD)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from retroloop.eval.generation import generate_responses

    cfg = state.cfg
    after_opd = copy.deepcopy(get_peft_model_state_dict(state.student))
    set_peft_model_state_dict(state.student, adapter_after_midtrain)
    prompts = (
        pl.read_parquet(_instruct_train_path())["prompt"]
        .head(cfg.opd.prompts_per_step * cfg.cycle.opd_steps)
        .to_list()
    )
    own = generate_responses(
        state.student,
        state.tokenizer,
        prompts,
        max_new_tokens=cfg.opd.rollout.max_new_tokens,
        batch_size=cfg.opd.rollout.batch_size,
        temperature=1.0,
        cache_dir=None,
        cache_key_parts={"seed": cfg.seed},
    )
    seqs = [
        chat_sequence(state.tokenizer, str(i), p, r, cfg.cycle.max_seq_len)
        for i, (p, r) in enumerate(zip(prompts, own, strict=True))
    ]
    _sft(
        state.student,
        seqs,
        steps=cfg.cycle.opd_steps,
        lr=cfg.opd.lr,
        batch_size=cfg.opd.prompts_per_step,
        seed=cfg.seed,
        pad_id=state.tokenizer.pad_token_id,
        desc="sft-self",
    )
    metrics = evaluate_phase(state, "sft_self_baseline")
    set_peft_model_state_dict(state.student, after_opd)
    return metrics


def report_markdown(state: CycleState) -> str:
    rows = [
        {"phase": phase, **{k: state.phases[phase].get(k) for k in PHASE_COLUMNS}}
        for phase in state.phases
    ]
    before, mid, after = (state.phases.get(p, {}) for p in PHASES)
    lines = [
        f"# continual-learning cycle {state.number}",
        "",
        f"- domain data: `{state.domain_file}` → `{state.dataset_dir}`",
        f"- parent: `{state.parent.lineage_path}`; teacher: `{state.teacher.lineage_path}`",
        "",
        markdown_table(rows, ["phase", *PHASE_COLUMNS]),
        "",
    ]
    for key in ("domain_nll", "ifeval_prompt_strict"):
        if all(isinstance(d.get(key), int | float) for d in (before, mid, after)):
            lines.append(
                f"- {key}: before {before[key]:.4f} → after mid-training {mid[key]:.4f} → after OPD {after[key]:.4f}"
            )
    return "\n".join(lines) + "\n"


def register(state: CycleState, work_dir: Path) -> Path:
    """Step 6: write registry/cycles/cycle-NNNN with the adapter, report and lineage."""
    out = state.registry / "cycles" / f"cycle-{state.number:04d}"
    with atomic_artifact(out, stage="cycle", kind="adapter") as w:
        w.add_input("base_model", state.parent.base)
        if state.parent.adapter is not None:
            w.add_input("parent_adapter", state.parent.adapter)
        w.add_input("teacher", state.teacher.lineage_path)
        if state.teacher.adapter is not None:
            w.add_input("teacher_base", state.teacher.base)
        w.add_input("train_data", state.dataset_dir)
        w.add_input("opd_prompts", _instruct_train_path())
        state.student.save_pretrained(w.dir / "adapter")
        (w.dir / "report.md").write_text(report_markdown(state))
        (w.dir / "phases.json").write_text(json.dumps(state.phases, indent=2, default=str) + "\n")
        for name in ("steps.csv", "rollouts.parquet"):
            if (work_dir / name).is_file():
                (w.dir / f"opd_{name}").write_bytes((work_dir / name).read_bytes())
        w.outputs = {"adapter": "adapter", "report.md": "report"}
        w.metrics = {
            "cycle": state.number,
            "phases": state.phases,
            "midtrain_loss_start": state.midtrain_losses[0] if state.midtrain_losses else None,
            "midtrain_loss_end": state.midtrain_losses[-1] if state.midtrain_losses else None,
            "opd": {k: v for k, v in state.opd_metrics.items() if isinstance(v, int | float)},
        }
        w.finish(
            params={"cycle": state.cfg.cycle.model_dump(), "opd": state.cfg.opd.model_dump()},
            params_sha256=state.cfg.section_sha256("cycle"),
            seed=state.cfg.seed,
            device=str(next(state.student.parameters()).device),
        )
    log.info("registered %s (teacher %s)", out, state.teacher.lineage_path)
    return out


def run_cycle(
    cfg: Params, domain_file: Path, *, fmt: str = "text", registry: Path | None = None
) -> dict[str, Any]:
    """All six steps in order, without Prefect (the flow wraps the same steps as tasks)."""
    import tempfile

    from peft import get_peft_model_state_dict

    state = start(cfg, domain_file, fmt=fmt, registry=registry)
    load_models(state)
    evaluate_phase(state, "before")
    midtrain(state)
    evaluate_phase(state, "after_midtrain")
    snapshot = copy.deepcopy(get_peft_model_state_dict(state.student))
    with tempfile.TemporaryDirectory(prefix="retroloop-cycle-") as tmp:
        recover_with_opd(state, Path(tmp))
        evaluate_phase(state, "after_opd")
        if cfg.evaluate.baseline_sft:
            sft_self_baseline(state, snapshot)
        out = register(state, Path(tmp))
    return summary(out)


def summary(cycle_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(cycle_dir)
    return {
        "cycle": manifest.metrics.get("cycle"),
        "adapter": str(cycle_dir / "adapter"),
        "teacher": manifest.input("teacher").model_dump(),
        "phases": manifest.metrics.get("phases"),
    }
