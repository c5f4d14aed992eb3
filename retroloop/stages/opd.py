"""opd: on-policy distillation of the looped student against the original model.

Reads:  data/convert/model (role `student`), data/distill/adapter (role `parent_adapter`; if it
        does not exist a fresh LoRA from `opd.lora` is started), data/prepare/model (role
        `teacher`), data/prepare/datasets/instruct_{train,eval}.parquet (prompts; held-out prompts)
Writes: data/opd/adapter/            PEFT adapter (continues the distill LoRA)
        data/opd/dvclive/            per-step metrics (dvclive; the dvc plots)
        data/opd/run_dvclive/        per-step timings and throughput (outside content_sha256)
        data/opd/rollouts.parquet    every sampled completion with sampler / teacher log-probs
        data/opd/geometry.parquet    per-module ΔW diagnostics (retroloop.geometry)
        data/opd/geometry.png
        data/opd/metrics.json, manifest.json
Run:    retroloop stage opd

The method and the step live in `retroloop.onpolicy` (Thinking Machines, "On-Policy
Distillation", 2025; Agarwal et al., GKD, arXiv:2306.13649); this module is the loop:
sample → reward → score + update → log, with geometry snapshots every `opd.geometry_every` steps.
`train_opd` is the entry point the continual-learning cycle calls with its own teacher.

The student stays in eval mode while it learns (LoRA dropout is 0 by default; the looped model
must not sample its recurrence count, and its s_0 is fixed, see `onpolicy.fixed_initial_state`):
sampler and learner then compute the same function, so the importance ratio is 1 up to kernel
noise, which the per-step `sampler_learner_kl` (dvclive) measures.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from retroloop import training
from retroloop.artifacts import Manifest, atomic_artifact, verify_inputs
from retroloop.config import GuardParams, LoggingParams, OpdParams, Params
from retroloop.errors import ConfigError, DataError
from retroloop.geometry import GeometryTracker, plot_geometry
from retroloop.models.loading import load_model, load_tokenizer, tokenizer_fingerprint
from retroloop.onpolicy import (
    check_rollouts,
    check_same_tokenizer,
    fixed_initial_state,
    heldout_reverse_kl,
    ifeval_rewards,
    opd_step,
    student_forward_kwargs,
)
from retroloop.opd_progress import Progress, resume_progress, rollout_frame, save_progress
from retroloop.rollout import RolloutEngine, make_engine, vllm_lora_rank
from retroloop.runlock import exclusive
from retroloop.stages.common import (
    CONVERTED_MODEL,
    DATA,
    DISTILL_ADAPTER,
    PATHS,
    dataset_path,
    resolve_inputs,
    setup_run,
    teacher_dir,
)
from retroloop.steplog import StepLog, edge_steps
from retroloop.training import seed_for, stop_if_not_finite

log = logging.getLogger(__name__)

# What `train_opd` writes into its output directory (relative path -> artifact kind).
OUTPUTS = {
    "adapter": "adapter",
    "dvclive": "report",
    "rollouts.parquet": "rollouts",
    "geometry.parquet": "report",
    "geometry.png": "report",
}
OPD_CHECKPOINTS = DATA / "checkpoints" / "opd"  # resumable step_N (outside the artifact)


def _after_step(step: int) -> None:
    """Called after each OPD step (1-based, after its checkpoint); tests replace it to
    simulate a kill."""


def train_opd(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts_df: pl.DataFrame,
    opd_params: OpdParams,
    *,
    seed: int,
    out_dir_tmp: Path,
    log_prefix: str = "opd",
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
    teacher_kwargs: dict[str, Any] | None = None,
    heldout_prompts: list[str] | None = None,
    engine: RolloutEngine | None = None,
    model_dir: Path | None = None,
    logging_params: LoggingParams | None = None,
    steplog: StepLog | None = None,
    checkpoints: training.Checkpoints | None = None,
    guards: GuardParams | None = None,
) -> dict[str, Any]:
    """On-policy distillation of a PEFT `student` (trainable LoRA) against `teacher`.

    `prompts_df` needs a `prompt` column (plus `instruction_id_list`, `kwargs` when
    `reward_weight > 0`; `id` names rows in the rollouts). Writes `OUTPUTS` into `out_dir_tmp`
    (the caller's temporary artifact directory) and returns the summary metrics.
    `teacher_tokenizer` (checked against `tokenizer`) and `teacher_kwargs` (e.g. a looped
    teacher's recurrence) let the continual-learning cycle distil from an earlier checkpoint.
    `model_dir` is the student's base model directory: `backend: vllm` loads it and samples with
    the student's adapter, saved after every step (ignored by the transformers backend).
    Every step is logged through `steplog` (a caller's, e.g. the cycle's; else one of its own
    in `out_dir_tmp`, closed here, with `logging_params`' optional sink).
    `checkpoints` (steps = `opd_params.steps`, a key naming the student, teacher and prompts)
    saves a resumable checkpoint every `every` steps and resumes from the newest; the caller
    calls its `complete` once the artifact is published. None: no checkpoints.
    """
    p, out_dir = opd_params, Path(out_dir_tmp)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainable = _check_inputs(student, tokenizer, prompts_df, p, teacher_tokenizer, checkpoints)
    teacher.eval().requires_grad_(False)
    student.eval()  # see the module docstring: sampler and learner run the same function
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    s_kwargs = student_forward_kwargs(base, p.recurrence)
    engine = engine or make_engine(  # vllm samples from `model_dir` + the student's adapter
        p.rollout, student, tokenizer, generate_kwargs=s_kwargs, seed=seed,
        model_dir=model_dir, max_lora_rank=vllm_lora_rank(student),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=p.weight_decay)  # constant LR
    tracker = GeometryTracker(student, since_start=True)  # ΔW since these (resume: same) weights
    loop = _Loop(p, student, teacher, tokenizer, engine, optimizer, trainable, prompts_df.to_dicts(),
                 seed, s_kwargs, teacher_kwargs, log_prefix, out_dir, checkpoints,
                 guards or GuardParams())  # fmt: skip
    loop.log_plan()
    progress, resumed = resume_progress(checkpoints, student, optimizer, tracker, seed)
    if resumed is not None:
        log.info("resuming from %s (step %d of %d)", resumed, progress.step, p.steps)
    own_log = steplog is None
    if steplog is None:
        steplog = StepLog(out_dir, name=log_prefix, params=logging_params)
    for row in progress.rows:  # a resumed run replays the steps done (dvclive only)
        steplog.log(row, sink=False)
    teacher_base = teacher.get_base_model() if hasattr(teacher, "get_base_model") else teacher
    with fixed_initial_state(base), fixed_initial_state(teacher_base):  # a looped teacher too
        # Before any sampling counts (and again on resume, in this process): the sampler's
        # cached decoding and the teacher's scoring must agree with plain cache-free forwards.
        guard = loop.guard(heldout_prompts)
        if progress.guard is None:  # a first start; a resumed run keeps the first's figures
            progress.guard, progress.kl_before = guard, loop.heldout_kl(heldout_prompts)
            tracker.snapshot(0)
        loop.push_adapter(progress.step)
        bar = tqdm(range(progress.step + 1, p.steps + 1), desc=log_prefix, unit="step",
                   initial=progress.step, total=p.steps)  # fmt: skip
        for step in bar:
            row = loop.step(step, progress)
            steplog.log(row)
            if step % p.geometry_every == 0 or step == p.steps:
                tracker.snapshot(step)
            if checkpoints is not None and checkpoints.due(step):
                save_progress(checkpoints, step, student, optimizer, progress, tracker)
            bar.set_postfix(kl=f"{row['reverse_kl_topk_lb']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")  # fmt: skip
            _after_step(step)
        kl_after = loop.heldout_kl(heldout_prompts)
    if own_log:
        steplog.close()
    geometry = _write_outputs(out_dir, student, progress, tracker)
    fraction = (logging_params or LoggingParams()).summary_fraction
    return _summary(p, progress, geometry, kl_after, loop.n_trainable, fraction)


def _check_inputs(student, tokenizer, prompts_df, p: OpdParams, teacher_tokenizer, checkpoints):
    """Refuse what `train_opd` cannot run on (one line each); its trainable parameters."""
    if teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    need = ["prompt"] + (["instruction_id_list", "kwargs"] if p.reward_weight > 0 else [])
    if prompts_df.height == 0 or any(c not in prompts_df.columns for c in need):
        raise DataError(f"opd: prompts need columns {need} and >= 1 row; got {prompts_df.columns}")
    if p.rollout.temperature != 1.0 or p.rollout.top_p != 1.0:
        log.warning(
            "opd.rollout: temperature/top-p != 1 samples a distribution that is not the student's"
        )
    trainable = [q for q in student.parameters() if q.requires_grad]
    if not trainable:
        raise ConfigError(
            "opd: the student has no trainable parameters (load the adapter with is_trainable=True)"
        )
    if checkpoints is not None and checkpoints.steps != p.steps:
        raise ConfigError(f"opd: checkpoints for {checkpoints.steps} steps, the run has {p.steps}")
    return trainable


class _Loop:
    """One OPD run's pieces: sample → reward → score + update → log, one step at a time."""

    def __init__(self, p, student, teacher, tokenizer, engine, optimizer, trainable, rows, seed,
                 s_kwargs, teacher_kwargs, log_prefix, out_dir, checkpoints, guards) -> None:  # fmt: skip
        self.p, self.student, self.teacher, self.tokenizer = p, student, teacher, tokenizer
        self.engine, self.optimizer, self.trainable, self.rows = engine, optimizer, trainable, rows
        self.seed, self.s_kwargs, self.teacher_kwargs = seed, s_kwargs, teacher_kwargs
        self.log_prefix, self.out_dir, self.guards = log_prefix, out_dir, guards
        self.checkpoint_dir = checkpoints.root if checkpoints is not None else None
        self.n_trainable = sum(q.numel() for q in trainable)

    def log_plan(self) -> None:
        p, n_all = self.p, sum(q.numel() for q in self.student.parameters())
        log.info(
            "%s: %d steps x %d prompts x %d samples = %d rollouts/step (<= %d new tokens each); "
            "trainable %d of %d parameters (%.3f%%); recurrence %s; lr %g",
            self.log_prefix, p.steps, p.prompts_per_step, p.rollout.samples_per_prompt,
            p.prompts_per_step * p.rollout.samples_per_prompt, p.rollout.max_new_tokens,
            self.n_trainable, n_all, 100 * self.n_trainable / n_all, p.recurrence or "default", p.lr,
        )  # fmt: skip

    def guard(self, heldout_prompts: list[str] | None) -> dict[str, Any]:
        """`retroloop.guards`' run-time check of the sampler and the teacher's scoring."""
        prompts = (heldout_prompts or [r["prompt"] for r in self.rows])[: self.guards.prompts]
        return check_rollouts(
            self.engine, self.student, self.teacher, prompts, pad_id=self.tokenizer.pad_token_id,
            seed=seed_for(self.seed, "opd-guard", 0), student_kwargs=self.s_kwargs,
            teacher_kwargs=self.teacher_kwargs, max_new_tokens=self.guards.new_tokens,
        )  # fmt: skip

    def heldout_kl(self, prompts: list[str] | None) -> float | None:
        """The before/after measure on fixed prompts with a fixed seed (None: no prompts)."""
        if not prompts:
            return None
        p = self.p
        return heldout_reverse_kl(
            self.student, self.teacher, self.tokenizer, prompts, n=p.rollout.samples_per_prompt,
            max_new_tokens=p.rollout.max_new_tokens, top_k=p.vopd_top_k, seed=self.seed,
            student_kwargs=self.s_kwargs, teacher_kwargs=self.teacher_kwargs,
        )  # fmt: skip

    def push_adapter(self, step: int) -> None:
        """vLLM samples from adapter files: hand it the current adapter (no-op otherwise)."""
        if hasattr(self.engine, "set_adapter"):
            self.student.save_pretrained(self.out_dir / ".rollout_adapter" / f"step-{step}")
            self.engine.set_adapter(self.out_dir / ".rollout_adapter" / f"step-{step}")

    def step(self, step: int, progress: Progress) -> dict[str, Any]:
        """OPD step `step` (1-based): its metric row; its rollouts go to `progress`."""
        p, tokenizer = self.p, self.tokenizer
        while len(progress.order) < p.prompts_per_step:  # seeded epochs over the prompts
            progress.order += progress.rng.permutation(len(self.rows)).tolist()
        picked = [self.rows[i] for i in progress.order[: p.prompts_per_step]]
        progress.order = progress.order[p.prompts_per_step :]
        tic = time.perf_counter()
        batch = self.engine.sample(
            [r["prompt"] for r in picked], n=p.rollout.samples_per_prompt, max_new_tokens=p.rollout.max_new_tokens,
            temperature=p.rollout.temperature, top_p=p.rollout.top_p, seed=seed_for(self.seed, "opd-rollout", step),
        )  # fmt: skip
        rewards = ifeval_rewards(tokenizer, batch, picked) if p.reward_weight > 0 else None
        stats = opd_step(
            self.student, self.teacher, batch, self.optimizer, p, pad_id=tokenizer.pad_token_id,
            rewards=rewards, student_kwargs=self.s_kwargs, teacher_kwargs=self.teacher_kwargs,
        )  # fmt: skip
        stop_if_not_finite(
            self.log_prefix, step, loss=stats["loss"], grad_norm=stats["grad_norm"],
            params=self.trainable, lr=p.lr, lr_key="opd.lr", checkpoint_dir=self.checkpoint_dir,
        )  # fmt: skip
        self.push_adapter(step)
        step_s, n_tok = time.perf_counter() - tic, batch.num_completion_tokens
        teacher_lp = stats.pop("teacher_logprobs")
        progress.rollouts.append(rollout_frame(step, batch, teacher_lp, rewards, picked, tokenizer))  # fmt: skip
        row = {"step": step, **stats, "rollout_s": batch.seconds, "step_s": step_s}
        row["tokens"], row["tokens_per_s"] = n_tok, n_tok / step_s
        row["rollout_tokens_per_s"] = n_tok / max(batch.seconds, 1e-9)
        row["response_length"] = n_tok / len(batch)
        row["finished_fraction"] = float(np.mean(batch.finished))
        row["reward"] = float(np.mean(rewards)) if rewards is not None else math.nan
        progress.rows.append(row)
        return row


def _write_outputs(out_dir: Path, student, progress: Progress, tracker) -> pl.DataFrame:
    """The artifact's files (`OUTPUTS` but dvclive, which the step log wrote); the geometry."""
    geometry = tracker.frame()
    pl.concat(progress.rollouts).write_parquet(out_dir / "rollouts.parquet")
    geometry.write_parquet(out_dir / "geometry.parquet")
    plot_geometry(geometry, out_dir / "geometry.png")
    student.save_pretrained(out_dir / "adapter")
    shutil.rmtree(out_dir / ".rollout_adapter", ignore_errors=True)
    return geometry


def _summary(p, progress: Progress, geometry, kl_after, n_trainable, fraction) -> dict[str, Any]:
    """The run's metrics; `*_start` / `*_end` are means over the first / last `fraction`."""
    steps_df = pl.DataFrame(progress.rows)
    edge = edge_steps(p.steps, fraction)
    total_s, tokens = steps_df["step_s"].sum(), steps_df["tokens"].sum()
    final = geometry.filter(pl.col("step") == p.steps).fill_nan(None)
    return {
        "steps": p.steps,
        "reverse_kl_topk_lb_start": steps_df["reverse_kl_topk_lb"].head(edge).mean(),
        "reverse_kl_topk_lb_end": steps_df["reverse_kl_topk_lb"].tail(edge).mean(),
        "heldout_reverse_kl_topk_lb_before": progress.kl_before,
        "heldout_reverse_kl_topk_lb_after": kl_after,
        "sampled_reverse_kl_mean": steps_df["reverse_kl_sampled"].mean(),
        "sampler_learner_kl_mean": steps_df["sampler_learner_kl"].mean(),
        "mean_response_length": steps_df["response_length"].mean(),
        "generated_tokens": int(tokens),
        "tokens_per_s": tokens / total_s,
        "rollout_tokens_per_s": tokens / steps_df["rollout_s"].sum(),
        "teacher_scoring_share": steps_df["teacher_s"].sum() / total_s,
        "reward_mean": steps_df["reward"].mean() if p.reward_weight > 0 else None,
        "trainable_parameters": n_trainable,
        "geometry_effective_rank": final["effective_rank"].mean(),
        "geometry_overlap_top_r": final["overlap_top_r"].mean(),
        "guard_rollouts": progress.guard,
    }


def load_student(base: torch.nn.Module, parent_adapter: Path, p: OpdParams) -> torch.nn.Module:
    """Continue the distill LoRA (`is_trainable=True`), or start a fresh one from `opd.lora`."""
    from peft import PeftModel, get_peft_model

    from retroloop.models.lora import lora_config_for

    if (Path(parent_adapter) / "adapter_config.json").is_file():
        log.info(
            "continuing the adapter at %s (its own LoRA config holds, not opd.lora)", parent_adapter
        )
        return PeftModel.from_pretrained(
            base, parent_adapter, is_trainable=True, trust_remote_code=False
        )
    if not p.lora.enabled:
        raise ConfigError(
            "opd.lora.enabled: false needs a parent adapter; OPD trains LoRA adapters only"
        )
    log.warning("no parent adapter at %s: OPD starts a fresh LoRA (r=%d)", parent_adapter, p.lora.r)
    lo = p.lora
    config = lora_config_for(
        base,
        r=lo.r,
        alpha=lo.alpha,
        dropout=lo.dropout,
        target_modules=lo.target_modules,
        train_adapter=lo.train_adapter,
    )
    return get_peft_model(base, config)


@exclusive("out_dir", "checkpoint_dir")
def run(
    cfg: Params,
    *,
    inputs: dict | None = None,
    out_dir: Path = PATHS["opd"],
    checkpoint_dir: Path = OPD_CHECKPOINTS,
) -> Manifest:
    device = setup_run(cfg)
    p = cfg.opd
    defaults = {
        "student": CONVERTED_MODEL,
        "parent_adapter": DISTILL_ADAPTER,
        "teacher": teacher_dir(),  # prepare.teacher, else the source model
        "train_data": dataset_path("instruct", "train"),
        "heldout": dataset_path("instruct", "eval"),
    }
    paths = resolve_inputs(inputs, defaults)
    verify_inputs(paths, optional=("parent_adapter", "heldout"))  # refuse tampered inputs first
    tokenizer = load_tokenizer(paths["student"])
    teacher_tokenizer = load_tokenizer(paths["teacher"])
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    has_parent = (paths["parent_adapter"] / "adapter_config.json").is_file()
    student = load_student(
        load_model(paths["student"], cfg.dtype, device), paths["parent_adapter"], p
    )
    teacher = load_model(paths["teacher"], cfg.dtype, device)
    prompts = pl.read_parquet(paths["train_data"])
    heldout = None
    if paths["heldout"].is_file():
        heldout = pl.read_parquet(paths["heldout"])["prompt"].head(p.heldout_prompts).to_list()
    engine = None
    if p.rollout.backend == "vllm":  # the student's model dir; train_opd hands it each adapter
        engine = make_engine(
            p.rollout, None, None, model_dir=paths["student"],
            max_lora_rank=vllm_lora_rank(student), seed=cfg.seed,
        )  # fmt: skip

    with atomic_artifact(out_dir, stage="opd", kind="adapter") as w:
        roles = ["student", "teacher", "train_data"]
        roles += (["parent_adapter"] if has_parent else []) + (["heldout"] if heldout else [])
        refs = [w.add_input(role, paths[role]) for role in roles]
        section, sha = cfg.section("opd"), cfg.section_sha256("opd")
        key = training.run_key(sha, [(r.role, r.content_sha256) for r in refs])
        checkpoints = training.Checkpoints(checkpoint_dir, key, p.checkpoint_every, p.steps)
        metrics = train_opd(
            student, teacher, tokenizer, prompts, p, seed=cfg.seed, out_dir_tmp=w.dir,
            teacher_tokenizer=teacher_tokenizer, heldout_prompts=heldout, engine=engine,
            logging_params=cfg.logging, checkpoints=checkpoints, guards=cfg.guards,
        )  # fmt: skip
        w.outputs.update(OUTPUTS)
        w.metrics = {**metrics, **tokenizer_fingerprint(tokenizer)}
        manifest = w.finish(params=section, params_sha256=sha, seed=cfg.seed, device=str(device))
    checkpoints.complete({"artifact": str(out_dir), "content_sha256": manifest.content_sha256})
    return manifest
