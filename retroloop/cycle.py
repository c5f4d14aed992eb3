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
`retroloop.registry`. Mid-training and OPD checkpoint every `cycle.checkpoint_every` steps under
`registry/.resume/cycle-NNNN/` (kept when the cycle dies, removed once it registers): a killed
cycle run again on the same file, params and parent resumes there and registers the bytes an
uninterrupted run would (`cycle_training.phase_checkpoints`).

Beside the recipe: `cycle_inputs` (the domain file, resolving and loading models),
`cycle_training` (the SFT loop, the phases' checkpoints), `cycle_publish` (the files a
registered cycle holds, its report and summary).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from retroloop import datasets, registry
from retroloop.artifacts import InputRef, input_ref
from retroloop.canonical import canonicalize
from retroloop.config import Params
from retroloop.cycle_inputs import (
    ModelRef,
    load_domain_file,
    load_ref,
    replay_sequences,
    resolve_models,
    teacher_key,
)
from retroloop.cycle_publish import PHASES, RecordingLog, Rows, phase_rows, summary, write_cycle
from retroloop.cycle_training import RESUME, phase_checkpoints, resume_dir
from retroloop.cycle_training import sft as _sft
from retroloop.errors import ArtifactError, MismatchError, ModelError
from retroloop.eval.suite import build_eval_data, evaluate_model
from retroloop.models.loading import load_tokenizer, resolve_device
from retroloop.onpolicy import check_same_tokenizer
from retroloop.opd_io import validation_split
from retroloop.opd_loop import train_opd
from retroloop.rngstate import restore_rng_state, save_rng_state
from retroloop.sequences import chat_sequence, text_sequence
from retroloop.stages.common import dataset_path, setup_run

__all__ = ["PHASES", "load_domain_file", "phase_rows", "summary"]  # re-exported for callers

log = logging.getLogger(__name__)


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
    steps: Rows


# --------------------------------------------------------------------------- step 1: read


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


def load_models(inputs: CycleInputs, claim: registry.Claim) -> CycleRun:
    """Step 2: resolve the parent and the teacher of cycle `claim.number`, check they load and
    share a tokenizer, and save the parent as a trainable student (`run.start`)."""
    cfg = inputs.cfg
    device = setup_run(cfg)
    teacher_ref, parent_ref = resolve_models(cfg, claim.root)
    key = teacher_key(cfg)
    student = load_ref(parent_ref, cfg, device, trainable=True, key="cycle.base_model")
    load_ref(teacher_ref, cfg, device, trainable=False, key=key)  # fails here, not mid-cycle
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
    for old in (claim.root / RESUME).glob("cycle-*"):  # killed cycles' checkpoints (the lock's)
        if old.name != f"cycle-{claim.number:04d}":
            shutil.rmtree(old, ignore_errors=True)
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
        canonicalize(adapter)  # PEFT writes sets in hash order: the resume key hashes these bytes
    return Checkpoint(adapter, save_rng_state(folder / "rng.safetensors"))


def _student(run: CycleRun, ckpt: Checkpoint, *, teacher: bool = True):
    """(student, teacher model, tokenizer) for a step: the student trainable from `ckpt`, the
    teacher frozen; the random state restored after both are loaded."""
    cfg = run.cfg
    device = resolve_device(cfg.device)
    student_ref = ModelRef(run.parent.base, ckpt.adapter, run.parent.label)
    student = load_ref(student_ref, cfg, device, trainable=True, key="cycle.base_model")
    teacher_model = None
    if teacher:
        teacher_model = load_ref(run.teacher, cfg, device, trainable=False, key=teacher_key(cfg))
        teacher_model = teacher_model.eval().requires_grad_(False)
    tokenizer = load_tokenizer(run.parent.base)
    restore_rng_state(ckpt.rng)  # after loading: the initialisers draw from it too
    return student, teacher_model, tokenizer


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


def _steplog(run: CycleRun, step: str) -> RecordingLog:
    return RecordingLog(
        run.work / step / "steps", name=f"cycle-{run.number:04d}", params=run.cfg.logging
    )


def midtrain(run: CycleRun) -> Trained:
    """Step 3: LoRA mid-training of `run.start` on the new domain documents (next-token CE),
    with `cycle.replay_fraction` of the expected batch replayed instruction data
    (`cycle_inputs.replay_sequences`)."""
    c = run.cfg.cycle
    student, _, tokenizer = _student(run, run.start, teacher=False)
    seqs = [
        text_sequence(tokenizer, r["id"], r["text"], c.max_seq_len)
        for r in run.inputs.train.iter_rows(named=True)
    ]
    seqs = [s for s in seqs if len(s.input_ids) > 1]
    seqs += replay_sequences(run.cfg, tokenizer, _instruct_path("train"), len(seqs))
    replayed = (_instruct_path("train"),) if c.replay_fraction > 0 else ()
    steplog = _steplog(run, "midtrain")
    losses = _sft(
        student, seqs, steps=c.midtrain_steps,
        lr=c.midtrain_lr, lr_key="cycle.midtrain_lr", batch_size=c.batch_size, seed=run.cfg.seed,
        pad_id=tokenizer.pad_token_id, desc="midtrain", steplog=steplog,
        weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
        checkpoints=phase_checkpoints(run, "midtrain", c.midtrain_steps, run.start, run.parent.base, *replayed),
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
    teacher_dirs = [p for p in (run.teacher.base, run.teacher.adapter) if p is not None]
    ckpts = phase_checkpoints(run, "opd", cfg.cycle.opd_steps, student, run.parent.base,
                         *teacher_dirs, _instruct_path("train"))  # fmt: skip
    p = cfg.opd.model_copy(update={"steps": cfg.cycle.opd_steps})
    prompts, heldout = validation_split(pl.read_parquet(_instruct_path("train")), p)
    metrics = train_opd(
        model, teacher, tokenizer, prompts, p, seed=cfg.seed,
        out_dir_tmp=run.work / "opd" / "out", log_prefix=f"cycle-{run.number}-opd",
        model_dir=run.parent.base, steplog=steplog.prefixed("opd/"), guards=cfg.guards,
        checkpoints=ckpts, heldout_prompts=heldout,
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
        if cfg.cycle.replay_fraction > 0:  # the same file, read by mid-training too
            w.add_input("replay_data", _instruct_path("train"))
        write_cycle(w, run, metrics_by_phase, recovered.student.adapter,
                    midtrained.steps + recovered.steps)  # fmt: skip
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
    shutil.rmtree(resume_dir(run), ignore_errors=True)  # nothing left to resume
    log.info("registered %s (teacher %s)", claim.final_dir, run.teacher.lineage_path)
    return claim.final_dir
