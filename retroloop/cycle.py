"""One continual-learning cycle, top to bottom: the recipe (torchtune keeps one the same way).

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

The steps (the same numbers in `tasks/cycle.py` and `flows/cycle.py`, which run each function
below as one Prefect task; this module never imports Prefect or DVC):

 1. `read_inputs(cfg, file, fmt) -> CycleInputs`         read + split the domain file; reads only
 2. (`registry.acquire` → `Claim`: the registry lock and the next number, held to the end)
    `load_models(inputs, claim) -> CycleRun`             resolve teacher and parent, check they
                                                          share a tokenizer, save the student's
                                                          starting adapter: `run.start`
 3. `evaluate_phase(run, "before", run.start) -> Evaluated`
    `midtrain(run) -> Trained`                           LoRA mid-training on the domain (CE)
    `evaluate_phase(run, "after_midtrain", …)`           forgetting
 4. `recover_with_opd(run, student) -> Trained`          OPD, the earlier model as teacher
    `evaluate_phase(run, "after_opd", …)`                recovery
    `sft_self_baseline(run, after_midtrain, after_opd) -> Evaluated`  (evaluate.baseline_sft)
 5. `register(run, claim, phases, midtrain, opd) -> Path` the whole cycle in one rename

Between steps only values travel: paths, metrics and small frozen dataclasses. A student is a
`Checkpoint`: its adapter folder and the random state the step left (restored by the next step
after it loads its models, so a cycle draws the same numbers as one that kept its models in
memory). What a step writes goes under `registry/.work/cycle-NNNN-run/` (removed by `register`;
the next claim clears it if this cycle dies); what the cycle publishes is one directory,
`registry/cycles/cycle-NNNN/` (adapter/, data/{train,eval}.parquet, report.md, phases.json
(its timings in run_phases.json, outside the content hash), metrics.json, manifest.json, and
the per-step `midtrain/*` and `opd/*` metrics in dvclive/ + run_dvclive/), in one rename by
`retroloop.registry`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from tqdm import tqdm

from retroloop import datasets, registry
from retroloop.artifacts import InputRef, input_ref, read_manifest
from retroloop.canonical import RUN_PREFIX, is_run_dependent
from retroloop.config import LoggingParams, Params
from retroloop.errors import (
    ArtifactError,
    DataError,
    MismatchError,
    ModelError,
    RetroloopError,
)
from retroloop.eval.report import markdown_table
from retroloop.eval.suite import build_eval_data, evaluate_model
from retroloop.models.loading import load_model, load_tokenizer, resolve_device
from retroloop.onpolicy import check_same_tokenizer
from retroloop.rngstate import restore_rng_state, save_rng_state
from retroloop.sequences import IGNORE, chat_sequence, pad_batch, text_sequence
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


@dataclass(frozen=True)
class ModelRef:
    """A model as the registry sees it: a base directory plus an optional adapter."""

    base: Path
    adapter: Path | None
    label: str

    @property
    def lineage_path(self) -> Path:
        return self.adapter if self.adapter is not None else self.base


@dataclass(frozen=True)
class CycleInputs:
    """Step 1's result: the params and the domain data, split (nothing is loaded or written)."""

    cfg: Params
    domain_file: Path
    fmt: str
    source: InputRef  # role train_data: the domain file's path and the sha256 of the bytes read
    train: pl.DataFrame  # id, text
    held_out: pl.DataFrame  # id, text (+ prompt, answer for GSM8K)


@dataclass(frozen=True)
class Checkpoint:
    """A student between two steps: its PEFT adapter folder (on `CycleRun.parent.base`) and the
    random state (torch / numpy / python) the step that wrote it left."""

    adapter: Path
    rng: Path


@dataclass(frozen=True)
class CycleRun:
    """Step 2's result: what every later step of cycle `number` reads."""

    inputs: CycleInputs
    number: int
    registry: Path
    teacher: ModelRef
    parent: ModelRef
    start: Checkpoint  # the parent as a trainable student, before any training

    @property
    def cfg(self) -> Params:
        return self.inputs.cfg

    @property
    def work(self) -> Path:
        """Where the steps write (under the registry's `.work/`, cleared by the next claim)."""
        return self.registry / registry.WORK / f"cycle-{self.number:04d}-run"


@dataclass(frozen=True)
class Evaluated:
    """An evaluated phase: its metrics, and the student with the random state after it."""

    phase: str
    metrics: dict[str, Any]
    student: Checkpoint


@dataclass(frozen=True)
class Trained:
    """A training step's result: the student after it, its summary metrics (mid-training:
    `losses`), and every step's row as logged (`(prefix, row)`, replayed into dvclive/)."""

    student: Checkpoint
    metrics: dict[str, Any]
    losses: tuple[float, ...]
    steps: tuple[tuple[str, dict[str, Any]], ...]


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


def read_inputs(cfg: Params, domain_file: Path, fmt: str = "text") -> CycleInputs:
    """Step 1: read and split the domain data and check the pipeline's outputs are there.
    Reads only; the models are loaded under the registry lock (step 2, `load_models`)."""
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
    return CycleInputs(cfg, domain_file, fmt, source, train.select("id", "text"), held_out)


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


def _teacher_key(cfg: Params) -> str:
    return "cycle.teacher" if cfg.cycle.teacher not in ("previous", "base") else "cycle.base_model"


def load_models(inputs: CycleInputs, claim: registry.Claim) -> CycleRun:
    """Step 2: resolve the parent and the teacher of cycle `claim.number`, check they load and
    share a tokenizer, and save the parent as a trainable student (`run.start`)."""
    cfg = inputs.cfg
    device = setup_run(cfg)
    teacher_ref, parent_ref = resolve_models(cfg, claim.root)
    key = _teacher_key(cfg)
    student = _load(parent_ref, cfg, device, trainable=True, key="cycle.base_model")
    _load(teacher_ref, cfg, device, trainable=False, key=key)  # fails here, not mid-cycle
    tokenizer = load_tokenizer(parent_ref.base)
    try:
        teacher_tokenizer = load_tokenizer(teacher_ref.base)
    except Exception as err:
        raise ModelError(
            f"{key}: {teacher_ref.base} has no loadable tokenizer ({type(err).__name__}); "
            "the teacher must be a save_pretrained directory with its tokenizer"
        ) from None
    try:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    except MismatchError as err:  # the teacher scores the student's token ids: they must agree
        detail = str(err).removeprefix("opd: ")
        raise MismatchError(
            f"{key}: {teacher_ref.base} vs parent {parent_ref.base}: {detail}"
        ) from None
    log.info("cycle teacher %s, parent %s", teacher_ref.label, parent_ref.label)
    work = claim.root / registry.WORK / f"cycle-{claim.number:04d}-run"
    start = _save(student, work / "start")
    return CycleRun(inputs, claim.number, claim.root, teacher_ref, parent_ref, start)


# --------------------------------------------------------------------------- checkpoints


def _save(student, folder: Path, *, adapter: Path | None = None) -> Checkpoint:
    """The student's adapter (or `adapter`, when the step did not change it) and the process's
    random state, after a step."""
    folder.mkdir(parents=True, exist_ok=True)
    if adapter is None:
        student.save_pretrained(adapter := folder / "adapter")
    return Checkpoint(adapter, save_rng_state(folder / "rng.safetensors"))


def _student(run: CycleRun, ckpt: Checkpoint, *, teacher: bool = True):
    """(student, teacher model, tokenizer) for a step: the student trainable from `ckpt`, the
    teacher frozen; the random state restored after both are loaded."""
    cfg = run.cfg
    device = resolve_device(cfg.device)
    student_ref = ModelRef(run.parent.base, ckpt.adapter, run.parent.label)
    student = _load(student_ref, cfg, device, trainable=True, key="cycle.base_model")
    teacher_model = None
    if teacher:
        teacher_model = _load(run.teacher, cfg, device, trainable=False, key=_teacher_key(cfg))
        teacher_model = teacher_model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(run.parent.base)
    restore_rng_state(ckpt.rng)  # after loading: the initialisers draw from it too
    return student, teacher_model, tokenizer


class _RecordingLog(StepLog):
    """A `StepLog` that also keeps every row it logs, for `register` to replay into the cycle's
    one dvclive folder (each training step writes its own, which `register` does not publish)."""

    def __init__(self, out_dir: Path, *, name: str, params: LoggingParams) -> None:
        super().__init__(out_dir, name=name, params=params)
        self.rows: list[tuple[str, dict[str, Any]]] = []

    def log(self, row, *, prefix: str = "", sink: bool = True) -> None:
        self.rows.append((self.prefix + prefix, dict(row)))
        super().log(row, prefix=prefix, sink=sink)


# --------------------------------------------------------------------------- steps 3-4


def evaluate_phase(run: CycleRun, phase: str, student: Checkpoint) -> Evaluated:
    """Steps 3-4: domain perplexity, IFEval, KL to the teacher, instruction NLL (and GSM8K
    accuracy on held-out GSM8K problems when the domain data is GSM8K) of `student`."""
    model, teacher, tokenizer = _student(run, student)
    metrics = _evaluate(run, phase, model, teacher, tokenizer)
    return Evaluated(phase, metrics, _save(model, run.work / phase, adapter=student.adapter))


def _evaluate(run: CycleRun, phase: str, model, teacher, tokenizer) -> dict[str, Any]:
    cfg, c, inputs = run.cfg, run.cfg.cycle, run.inputs
    n = c.eval_records
    params = cfg.evaluate.model_copy(
        update={"ifeval_prompts": n, "nll_records": n, "gsm8k_questions": n,
                "kl_prompts": min(n, cfg.evaluate.kl_prompts), "gsm8k_path": None}
    )  # fmt: skip
    gsm8k = inputs.held_out.select("prompt", "answer") if inputs.fmt == "gsm8k" else None
    data = build_eval_data(
        params, tokenizer, instruct_eval=pl.read_parquet(_instruct_path("eval")),
        domain_eval=inputs.held_out, max_seq_len=c.max_seq_len, gsm8k_frame=gsm8k,
    )  # fmt: skip
    model.eval()
    return evaluate_model(
        phase, model, tokenizer, teacher=teacher, data=data,
        params=params, cache_dir=None, seed=cfg.seed,
    )  # fmt: skip


def _sft(model, seqs: list, *, steps: int, lr: float, lr_key: str, batch_size: int, seed: int,
         pad_id: int, desc: str, steplog: StepLog | None = None, weight_decay: float = 0.0,
         max_grad_norm: float = 1.0) -> list[float]:  # fmt: skip
    """Plain next-token CE on `seqs` (LoRA + recurrence adapter trainable), seeded batches,
    AdamW (`weight_decay`, constant `lr`) with the gradient's L2 norm clipped to `max_grad_norm`;
    each step's loss also goes to `steplog` (under `desc/`). A non-finite step stops the
    cycle (`training.stop_if_not_finite`, naming `lr_key`) before anything is registered."""
    # A sequence with no supervised token (a prompt longer than cycle.max_seq_len, a one-token
    # document) is skipped, as in `sequences.training_sequences`: a batch of only such
    # sequences has a loss of 0/0 = NaN (the SFT baseline on the tiny profile died of it).
    seqs = [s for s in seqs if any(label != IGNORE for label in s.labels[1:])]
    if not seqs:
        raise DataError(
            f"{desc}: no training sequences with a token to learn (documents shorter than two "
            "tokens, or prompts longer than cycle.max_seq_len); raise cycle.max_seq_len"
        )
    optimizer = make_optimizer(model, lr, weight_decay)
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
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm))
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


def _steplog(run: CycleRun, step: str) -> _RecordingLog:
    return _RecordingLog(
        run.work / step / "steps", name=f"cycle-{run.number:04d}", params=run.cfg.logging
    )


def midtrain(run: CycleRun) -> Trained:
    """Step 3: LoRA mid-training of `run.start` on the new domain documents (next-token CE)."""
    c = run.cfg.cycle
    student, _, tokenizer = _student(run, run.start, teacher=False)
    seqs = [
        text_sequence(tokenizer, r["id"], r["text"], c.max_seq_len)
        for r in run.inputs.train.iter_rows(named=True)
    ]
    steplog = _steplog(run, "midtrain")
    losses = _sft(
        student, [s for s in seqs if len(s.input_ids) > 1], steps=c.midtrain_steps,
        lr=c.midtrain_lr, lr_key="cycle.midtrain_lr", batch_size=c.batch_size, seed=run.cfg.seed,
        pad_id=tokenizer.pad_token_id, desc="midtrain", steplog=steplog,
        weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
    )  # fmt: skip
    steplog.close()
    ckpt = _save(student, run.work / "midtrain")
    return Trained(ckpt, {}, tuple(losses), tuple(steplog.rows))


def recover_with_opd(run: CycleRun, student: Checkpoint) -> Trained:
    """Step 4: OPD of `student` on instruction prompts with the earlier model as teacher. With
    `opd.rollout.backend: vllm` (a plain, non-looped base only) vLLM samples from the base
    directory plus the student's current adapter."""
    cfg = run.cfg
    model, teacher, tokenizer = _student(run, student)
    steplog = _steplog(run, "opd")
    metrics = train_opd(
        model, teacher, tokenizer, pl.read_parquet(_instruct_path("train")),
        cfg.opd.model_copy(update={"steps": cfg.cycle.opd_steps}), seed=cfg.seed,
        out_dir_tmp=run.work / "opd" / "out", log_prefix=f"cycle-{run.number}-opd",
        model_dir=run.parent.base, steplog=steplog.prefixed("opd/"), guards=cfg.guards,
    )  # fmt: skip
    steplog.close()
    return Trained(_save(model, run.work / "opd"), metrics, (), tuple(steplog.rows))


def sft_self_baseline(
    run: CycleRun, after_midtrain: Checkpoint, after_opd: Checkpoint
) -> Evaluated:
    """Step 4 (with `evaluate.baseline_sft`), the contrast: recovery by SFT on the model's own
    samples (same prompts and steps as OPD), from the student after mid-training, the random
    stream continued from `after_opd` (the step it runs after)."""
    from retroloop.eval.generation import generate_responses

    cfg = run.cfg
    model, teacher, tokenizer = _student(run, Checkpoint(after_midtrain.adapter, after_opd.rng))
    n = cfg.opd.prompts_per_step * cfg.cycle.opd_steps
    prompts = pl.read_parquet(_instruct_path("train"))["prompt"].head(n).to_list()
    own = generate_responses(
        model, tokenizer, prompts, max_new_tokens=cfg.opd.rollout.max_new_tokens,
        batch_size=cfg.opd.rollout.batch_size, temperature=1.0, cache_dir=None,
        cache_key_parts={"seed": cfg.seed},
    )  # fmt: skip
    seqs = [
        chat_sequence(tokenizer, str(i), p, r, cfg.cycle.max_seq_len)
        for i, (p, r) in enumerate(zip(prompts, own, strict=True))
    ]
    _sft(
        model, seqs, steps=cfg.cycle.opd_steps, lr=cfg.opd.lr, lr_key="opd.lr",
        batch_size=cfg.opd.prompts_per_step, seed=cfg.seed,
        pad_id=tokenizer.pad_token_id, desc="sft-self",
        weight_decay=cfg.cycle.weight_decay, max_grad_norm=cfg.cycle.max_grad_norm,
    )  # fmt: skip
    phase = "sft_self_baseline"
    metrics = _evaluate(run, phase, model, teacher, tokenizer)
    return Evaluated(phase, metrics, _save(model, run.work / phase))


# --------------------------------------------------------------------------- step 5: register


def phase_rows(phases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The phase table: one row per evaluated phase, the columns that were measured."""
    columns = [k for k in PHASE_COLUMNS if any(k in m for m in phases.values())]
    return [{"phase": p, **{k: m.get(k) for k in columns}} for p, m in phases.items()]


def report_markdown(run: CycleRun, phases: dict[str, dict[str, Any]]) -> str:
    rows, inputs = phase_rows(phases), run.inputs
    before, mid, after = (phases.get(p, {}) for p in PHASES)
    lines = [
        f"# continual-learning cycle {run.number}",
        "",
        f"- domain data: `{inputs.source.path}` (sha256 `{inputs.source.content_sha256[:16]}`, "
        f"{inputs.train.height} train / {inputs.held_out.height} held-out records)",
        f"- parent: `{run.parent.lineage_path}`; teacher: `{run.teacher.lineage_path}`",
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


def register(
    run: CycleRun, claim: registry.Claim, phases: list[Evaluated], midtrained: Trained,
    recovered: Trained,
) -> Path:  # fmt: skip
    """Step 5: write the cycle (the recovered adapter, data split, report, per-step metrics,
    lineage) and publish it in one rename."""
    assert claim.number == run.number, "register(): the claim of another cycle"
    metrics_by_phase = {e.phase: e.metrics for e in phases}
    inputs, cfg = run.inputs, run.cfg
    with registry.publish(claim, stage="cycle", kind="adapter") as w:
        w.add_input("base_model", run.parent.base)
        if run.parent.adapter is not None:
            w.add_input("parent_adapter", run.parent.adapter)
        w.add_input("teacher", run.teacher.lineage_path)
        if run.teacher.adapter is not None:
            w.add_input("teacher_base", run.teacher.base)
        w.inputs.append(inputs.source)  # the hash of the bytes this cycle read, not a re-read
        w.add_input("opd_prompts", _instruct_path("train"))
        shutil.copytree(recovered.student.adapter, w.dir / "adapter")
        (w.dir / "data").mkdir()
        datasets.write_parquet_atomic(inputs.train, w.dir / "data" / "train.parquet")
        datasets.write_parquet_atomic(inputs.held_out, w.dir / "data" / "eval.parquet")
        (w.dir / "report.md").write_text(report_markdown(run, metrics_by_phase), encoding="utf-8")
        # Timings go to run_phases.json, outside the content hash: the same cycle run twice
        # publishes the same content_sha256 (phases.json held `seconds` and never did).
        for name, keep in (("phases.json", False), (RUN_PREFIX + "phases.json", True)):
            split = {p: {k: v for k, v in m.items() if is_run_dependent(k) == keep}
                     for p, m in metrics_by_phase.items()}  # fmt: skip
            (w.dir / name).write_text(json.dumps(split, indent=2, default=str) + "\n")
        if (rollouts := run.work / "opd" / "out" / "rollouts.parquet").is_file():
            shutil.copyfile(rollouts, w.dir / "opd_rollouts.parquet")
        w.outputs = {"adapter": "adapter", "data": "dataset", "report.md": "report"}
        steps = midtrained.steps + recovered.steps
        if steps:  # one dvclive folder for the cycle: every step's row, in the order logged
            steplog = StepLog(run.work / "steps", name=f"cycle-{run.number:04d}")
            for prefix, row in steps:
                steplog.log(row, prefix=prefix, sink=False)
            steplog.close()
            move_logs(run.work / "steps", w.dir)
            w.outputs["dvclive"] = "report"
        losses = midtrained.losses
        w.metrics = {
            "cycle": run.number,
            "phases": metrics_by_phase,
            "midtrain_loss_start": losses[0] if losses else None,
            "midtrain_loss_end": losses[-1] if losses else None,
            "opd": {k: v for k, v in recovered.metrics.items() if isinstance(v, int | float)},
        }
        w.finish(
            params={"cycle": cfg.cycle.model_dump(), "opd": cfg.opd.model_dump(),
                    "format": inputs.fmt},
            params_sha256=cfg.section_sha256("cycle"), seed=cfg.seed,
            device=str(resolve_device(cfg.device)),
        )  # fmt: skip
    shutil.rmtree(run.work, ignore_errors=True)
    log.info("registered %s (teacher %s)", claim.final_dir, run.teacher.lineage_path)
    return claim.final_dir


def summary(cycle_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(cycle_dir)
    return {
        "cycle": manifest.metrics.get("cycle"),
        "adapter": str(cycle_dir / "adapter"),
        "teacher": manifest.input("teacher").model_dump(),
        "phases": manifest.metrics.get("phases"),
    }
