"""The steps of one continual-learning cycle (the recipe that runs them is `flows/cycle.py`).

new domain data → LoRA mid-training → measure forgetting → OPD against the earlier model →
measure recovery → register the adapter with its lineage.

Why OPD for recovery: SFT on new data drifts the model away from behaviour it had
(instruction following); on-policy distillation against a fixed earlier checkpoint pulls
the student back on its own samples, where the drift shows, while the new domain
knowledge stays (DESIGN.md §5 "Continual learning"). `evaluate.baseline_sft` adds the
contrast the literature draws: recovery by SFT on the model's own samples.

Every cycle adapter is a PEFT adapter on `cycle.base_model`. Cycle n continues cycle
n−1's adapter (its parent) and is taught back by cycle n−1's model (`cycle.teacher:
previous`); cycle 1's parent and teacher is `cycle.base_model` + `cycle.base_adapter`.

Not a DVC stage: it lives beside them because it reuses `opd.train_opd`. What it writes is
one directory, `registry/cycles/cycle-NNNN/` (adapter/, data/{train,eval}.parquet, report.md,
phases.json, metrics.json, manifest.json, and the per-step `midtrain/*` and `opd/*` metrics in
dvclive/ + run_dvclive/), published in one rename by `retroloop.registry`; until then every
step only reads, or works in memory and in temporary folders (the per-step logs in
`registry/.work/cycle-NNNN-steps/`, which the next claim clears if this cycle dies).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch
from tqdm import tqdm

from retroloop import datasets, registry
from retroloop.artifacts import InputRef, input_ref, read_manifest
from retroloop.config import Params
from retroloop.errors import (
    ArtifactError,
    DataError,
    MismatchError,
    ModelError,
    RetroloopError,
)
from retroloop.eval.report import markdown_table
from retroloop.eval.suite import build_eval_data, evaluate_model
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.onpolicy import check_same_tokenizer
from retroloop.sequences import chat_sequence, pad_batch, text_sequence
from retroloop.stages.common import dataset_path, setup_run
from retroloop.stages.opd import train_opd
from retroloop.steplog import StepLog, move_logs
from retroloop.training import make_optimizer, stop_if_not_finite

log = logging.getLogger(__name__)

PHASES = ("before", "after_midtrain", "after_opd")
PHASE_COLUMNS = [
    "domain_ppl",
    "domain_nll",
    "ifeval_prompt_strict",
    "ifeval_inst_loose",
    "kl_to_teacher",
    "instruct_nll",
    "gsm8k_accuracy",  # only when the domain data is GSM8K (question + worked answer)
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
    """Everything one cycle carries from step to step (in memory; nothing is written early)."""

    cfg: Params
    domain_file: Path
    fmt: str
    source: InputRef  # role train_data: the domain file's path and the sha256 of the bytes read
    train: pl.DataFrame  # id, text
    held_out: pl.DataFrame  # id, text (+ prompt, answer for GSM8K)
    number: int = 0
    teacher: ModelRef | None = None
    parent: ModelRef | None = None
    student: Any = None
    teacher_model: Any = None
    tokenizer: Any = None
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    opd_metrics: dict[str, Any] = field(default_factory=dict)
    midtrain_losses: list[float] = field(default_factory=list)
    steplog: StepLog | None = None  # per-step metrics of mid-training and OPD (`steplog_for`)


# --------------------------------------------------------------------------- step 1: read


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


def read_inputs(cfg: Params, domain_file: Path, fmt: str = "text") -> CycleState:
    """Step 1: read and split the domain data and check the pipeline's outputs are there.
    Reads only; the models are loaded under the registry lock (`load_models`)."""
    setup_run(cfg)
    domain_file = Path(domain_file)
    frame = load_domain_file(domain_file, fmt)
    source = input_ref(registry.TRAIN_DATA, domain_file)  # sha256 of the file's bytes
    if fmt in ("chat", "gsm8k"):  # a prompt/response pair is one domain document
        text = pl.concat_str([pl.col("prompt"), pl.col("response").fill_null("")], separator="\n")
        frame = frame.with_columns(text.alias("text"))
    keep = ["id", "text", "prompt", "answer"] if fmt == "gsm8k" else ["id", "text"]
    train, held_out = datasets.split_train_eval(
        frame.select(keep), cfg.prepare.eval_fraction, cfg.seed
    )
    for path in (_instruct_path("eval"), _instruct_path("train")):
        if not path.is_file():
            raise ArtifactError(
                f"{path}: the cycle evaluates and recovers instruction following on the "
                "pipeline's prompts; run `dvc repro prepare` first"
            )
    log.info(
        "cycle data %s: %d train / %d held-out records", domain_file, train.height, held_out.height
    )
    return CycleState(cfg, domain_file, fmt, source, train.select("id", "text"), held_out)


def _instruct_path(split: str) -> Path:
    return dataset_path("instruct", split)


# --------------------------------------------------------------------------- step 2: load


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


def _load(ref: ModelRef, cfg: Params, device: torch.device, *, trainable: bool, key: str):
    """Load base (+ adapter); any failure is one line naming the `cycle.*` key to fix."""
    from peft import PeftModel, get_peft_model

    from retroloop.models.lora import lora_config_for

    try:
        model = load_model(ref.base, cfg.dtype, device)
        if ref.adapter is not None:
            return PeftModel.from_pretrained(
                model, ref.adapter, is_trainable=trainable, trust_remote_code=False
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
    return get_peft_model(model, config)


def load_models(state: CycleState, registry_root: Path) -> CycleState:
    """Step 2: resolve and load the parent (trainable) and teacher; check they share a tokenizer."""
    cfg = state.cfg
    device = setup_run(cfg)
    state.teacher, state.parent = resolve_models(cfg, registry_root)
    teacher_key = (
        "cycle.teacher" if cfg.cycle.teacher not in ("previous", "base") else "cycle.base_model"
    )
    state.student = _load(state.parent, cfg, device, trainable=True, key="cycle.base_model")
    teacher = _load(state.teacher, cfg, device, trainable=False, key=teacher_key)
    state.teacher_model = teacher.eval().requires_grad_(False)
    state.tokenizer = load_tokenizer(state.parent.base)
    try:
        teacher_tokenizer = load_tokenizer(state.teacher.base)
    except Exception as err:
        raise ModelError(
            f"{teacher_key}: {state.teacher.base} has no loadable tokenizer ({type(err).__name__}); "
            "the teacher must be a save_pretrained directory with its tokenizer"
        ) from None
    try:
        check_same_tokenizer(state.tokenizer, teacher_tokenizer)
    except MismatchError as err:  # the teacher scores the student's token ids: they must agree
        detail = str(err).removeprefix("opd: ")
        raise MismatchError(
            f"{teacher_key}: {state.teacher.base} vs parent {state.parent.base}: {detail}"
        ) from None
    log.info("cycle teacher %s, parent %s", state.teacher.label, state.parent.label)
    return state


# --------------------------------------------------------------------------- steps 3-5


def evaluate_phase(state: CycleState, phase: str) -> dict[str, Any]:
    """Domain perplexity, IFEval, KL to the teacher, instruction NLL (and GSM8K accuracy on
    held-out GSM8K problems when the domain data is GSM8K) of the current student."""
    cfg, c = state.cfg, state.cfg.cycle
    n = c.eval_records
    params = cfg.evaluate.model_copy(
        update={"ifeval_prompts": n, "nll_records": n, "gsm8k_questions": n,
                "kl_prompts": min(n, cfg.evaluate.kl_prompts), "gsm8k_path": None}
    )  # fmt: skip
    gsm8k = state.held_out.select("prompt", "answer") if state.fmt == "gsm8k" else None
    data = build_eval_data(
        params, state.tokenizer, instruct_eval=pl.read_parquet(_instruct_path("eval")),
        domain_eval=state.held_out, max_seq_len=c.max_seq_len, gsm8k_frame=gsm8k,
    )  # fmt: skip
    state.student.eval()
    metrics = evaluate_model(
        phase, state.student, state.tokenizer, teacher=state.teacher_model, data=data,
        params=params, cache_dir=None, seed=cfg.seed,
    )  # fmt: skip
    state.phases[phase] = metrics
    return metrics


def steplog_for(state: CycleState) -> StepLog:
    """The cycle's per-step log, under the registry's `.work/` until `register` moves it."""
    if state.steplog is None:
        cfg = state.cfg
        state.steplog = StepLog(
            _steps_dir(state), name=f"cycle-{state.number:04d}", params=cfg.logging
        )
    return state.steplog


def _steps_dir(state: CycleState) -> Path:
    return Path(state.cfg.cycle.registry) / registry.WORK / f"cycle-{state.number:04d}-steps"


def _sft(model, seqs: list, *, steps: int, lr: float, lr_key: str, batch_size: int, seed: int,
         pad_id: int, desc: str, steplog: StepLog | None = None) -> list[float]:  # fmt: skip
    """Plain next-token CE on `seqs` (LoRA + recurrence adapter trainable), seeded batches;
    each step's loss also goes to `steplog` (under `desc/`). A non-finite step stops the
    cycle (`training.stop_if_not_finite`, naming `lr_key`) before anything is registered."""
    if not seqs:
        raise DataError(f"{desc}: no training sequences (documents too short?)")
    optimizer = make_optimizer(model, lr, 0.0)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    model.train()
    for step in tqdm(range(1, steps + 1), desc=desc, unit="step"):
        idx = torch.randint(len(seqs), (min(batch_size, len(seqs)),), generator=gen).tolist()
        ids_B_T, mask_B_T, labels_B_T = pad_batch([seqs[i] for i in idx], pad_id)
        out = model(
            input_ids=ids_B_T.to(device),
            attention_mask=mask_B_T.to(device),
            labels=labels_B_T.to(device),
        )
        out.loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        stop_if_not_finite(
            f"cycle {desc}", step, loss=losses[-1], grad_norm=grad_norm, params=trainable,
            lr=lr, lr_key=lr_key,
        )  # fmt: skip
        if steplog is not None:
            steplog.log({"step": step, "loss": losses[-1]}, prefix=f"{desc}/")
    model.eval()
    return losses


def midtrain(state: CycleState) -> list[float]:
    """Step 3: LoRA mid-training on the new domain documents (next-token CE)."""
    c = state.cfg.cycle
    seqs = [
        text_sequence(state.tokenizer, r["id"], r["text"], c.max_seq_len)
        for r in state.train.iter_rows(named=True)
    ]
    state.midtrain_losses = _sft(
        state.student, [s for s in seqs if len(s.input_ids) > 1], steps=c.midtrain_steps,
        lr=c.midtrain_lr, lr_key="cycle.midtrain_lr", batch_size=c.batch_size, seed=state.cfg.seed,
        pad_id=state.tokenizer.pad_token_id, desc="midtrain", steplog=steplog_for(state),
    )  # fmt: skip
    return state.midtrain_losses


def recover_with_opd(state: CycleState, work_dir: Path) -> dict[str, Any]:
    """Step 4: OPD on instruction prompts with the earlier model as teacher. With
    `opd.rollout.backend: vllm` (a plain, non-looped base only) vLLM samples from the base
    directory plus the student's current adapter."""
    cfg = state.cfg
    state.opd_metrics = train_opd(
        state.student, state.teacher_model, state.tokenizer, pl.read_parquet(_instruct_path("train")),
        cfg.opd.model_copy(update={"steps": cfg.cycle.opd_steps}), seed=cfg.seed,
        out_dir_tmp=work_dir, log_prefix=f"cycle-{state.number}-opd", model_dir=state.parent.base,
        steplog=steplog_for(state).prefixed("opd/"),
    )  # fmt: skip
    return state.opd_metrics


def sft_self_baseline(state: CycleState, adapter_after_midtrain: dict[str, torch.Tensor]) -> dict:
    """The contrast: recovery by SFT on the model's own samples (same prompts and steps as OPD)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from retroloop.eval.generation import generate_responses

    cfg = state.cfg
    after_opd = copy.deepcopy(get_peft_model_state_dict(state.student))
    set_peft_model_state_dict(state.student, adapter_after_midtrain)
    n = cfg.opd.prompts_per_step * cfg.cycle.opd_steps
    prompts = pl.read_parquet(_instruct_path("train"))["prompt"].head(n).to_list()
    own = generate_responses(
        state.student, state.tokenizer, prompts, max_new_tokens=cfg.opd.rollout.max_new_tokens,
        batch_size=cfg.opd.rollout.batch_size, temperature=1.0, cache_dir=None,
        cache_key_parts={"seed": cfg.seed},
    )  # fmt: skip
    seqs = [
        chat_sequence(state.tokenizer, str(i), p, r, cfg.cycle.max_seq_len)
        for i, (p, r) in enumerate(zip(prompts, own, strict=True))
    ]
    _sft(
        state.student, seqs, steps=cfg.cycle.opd_steps, lr=cfg.opd.lr, lr_key="opd.lr",
        batch_size=cfg.opd.prompts_per_step, seed=cfg.seed,
        pad_id=state.tokenizer.pad_token_id, desc="sft-self",
    )  # fmt: skip
    metrics = evaluate_phase(state, "sft_self_baseline")
    set_peft_model_state_dict(state.student, after_opd)
    return metrics


# --------------------------------------------------------------------------- step 6: register


def phase_rows(state: CycleState) -> list[dict[str, Any]]:
    """The phase table: one row per evaluated phase, the columns that were measured."""
    columns = [k for k in PHASE_COLUMNS if any(k in m for m in state.phases.values())]
    return [{"phase": p, **{k: m.get(k) for k in columns}} for p, m in state.phases.items()]


def report_markdown(state: CycleState) -> str:
    rows = phase_rows(state)
    before, mid, after = (state.phases.get(p, {}) for p in PHASES)
    lines = [
        f"# continual-learning cycle {state.number}",
        "",
        f"- domain data: `{state.source.path}` (sha256 `{state.source.content_sha256[:16]}`, "
        f"{state.train.height} train / {state.held_out.height} held-out records)",
        f"- parent: `{state.parent.lineage_path}`; teacher: `{state.teacher.lineage_path}`",
        "",
        markdown_table(rows, list(rows[0]) if rows else ["phase"]),
        "",
    ]
    for key in ("domain_nll", "ifeval_prompt_strict", "gsm8k_accuracy"):
        if all(isinstance(d.get(key), int | float) for d in (before, mid, after)):
            lines.append(
                f"- {key}: before {before[key]:.4f} → after mid-training {mid[key]:.4f} → after OPD {after[key]:.4f}"
            )
    return "\n".join(lines) + "\n"


def register(state: CycleState, claim: registry.Claim, work_dir: Path) -> Path:
    """Step 6: write the cycle (adapter, data split, report, lineage) and publish it in one rename."""
    with registry.publish(claim, stage="cycle", kind="adapter") as w:
        w.add_input("base_model", state.parent.base)
        if state.parent.adapter is not None:
            w.add_input("parent_adapter", state.parent.adapter)
        w.add_input("teacher", state.teacher.lineage_path)
        if state.teacher.adapter is not None:
            w.add_input("teacher_base", state.teacher.base)
        w.inputs.append(state.source)  # the hash of the bytes this cycle read, not a re-read
        w.add_input("opd_prompts", _instruct_path("train"))
        state.student.save_pretrained(w.dir / "adapter")
        (w.dir / "data").mkdir()
        datasets.write_parquet_atomic(state.train, w.dir / "data" / "train.parquet")
        datasets.write_parquet_atomic(state.held_out, w.dir / "data" / "eval.parquet")
        (w.dir / "report.md").write_text(report_markdown(state), encoding="utf-8")
        (w.dir / "phases.json").write_text(json.dumps(state.phases, indent=2, default=str) + "\n")
        if (work_dir / "rollouts.parquet").is_file():
            shutil.copyfile(work_dir / "rollouts.parquet", w.dir / "opd_rollouts.parquet")
        w.outputs = {"adapter": "adapter", "data": "dataset", "report.md": "report"}
        if state.steplog is not None:
            state.steplog.close()
            move_logs(_steps_dir(state), w.dir)
            w.outputs["dvclive"] = "report"
        losses = state.midtrain_losses
        w.metrics = {
            "cycle": state.number,
            "phases": state.phases,
            "midtrain_loss_start": losses[0] if losses else None,
            "midtrain_loss_end": losses[-1] if losses else None,
            "opd": {k: v for k, v in state.opd_metrics.items() if isinstance(v, int | float)},
        }
        w.finish(
            params={"cycle": state.cfg.cycle.model_dump(), "opd": state.cfg.opd.model_dump(),
                    "format": state.fmt},
            params_sha256=state.cfg.section_sha256("cycle"), seed=state.cfg.seed,
            device=str(next(state.student.parameters()).device),
        )  # fmt: skip
    shutil.rmtree(_steps_dir(state), ignore_errors=True)
    log.info("registered %s (teacher %s)", claim.final_dir, state.teacher.lineage_path)
    return claim.final_dir


def summary(cycle_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(cycle_dir)
    return {
        "cycle": manifest.metrics.get("cycle"),
        "adapter": str(cycle_dir / "adapter"),
        "teacher": manifest.input("teacher").model_dump(),
        "phases": manifest.metrics.get("phases"),
    }
