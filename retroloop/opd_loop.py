"""The OPD loop (`train_opd`): sample → reward → score + update → log, one step at a time,
with geometry snapshots every `opd.geometry_every` steps, checkpoints, and the held-out
evaluation that keeps the best step. Called by the opd stage (`stages/opd.py`) and the
continual-learning cycle (`retroloop.cycle`) with its own teacher; the step itself is
`onpolicy.opd_step`.

The student stays in eval mode while it learns (LoRA dropout is 0 by default; the looped model
must not sample its recurrence count, and its s_0 is fixed, see `onpolicy.fixed_initial_state`):
sampler and learner then compute the same function, so the importance ratio is 1 up to kernel
noise, which the per-step `sampler_learner_kl` (dvclive) measures.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from retroloop import training
from retroloop.config import GuardParams, LoggingParams, OpdParams
from retroloop.geometry import GeometryTracker
from retroloop.onpolicy import (
    check_rollouts,
    fixed_initial_state,
    heldout_reverse_kl,
    ifeval_rewards,
    opd_step,
    student_forward_kwargs,
)
from retroloop.opd_io import check_inputs, gather_rollouts, summary, write_outputs
from retroloop.opd_progress import Progress, resume_progress, rollout_frame, save_progress
from retroloop.rollout import RolloutEngine, make_engine
from retroloop.rollout_vllm import vllm_lora_rank
from retroloop.steplog import StepLog
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
HELDOUT = "heldout_reverse_kl_exact"  # the per-step log's column on evaluated steps


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
    dist_env: training.DistEnv | None = None,
) -> dict[str, Any]:
    """On-policy distillation of a PEFT `student` (trainable LoRA) against `teacher`.

    `prompts_df` needs a `prompt` column (plus `instruction_id_list`, `kwargs` when
    `reward_weight > 0`; `id` names rows in the rollouts). Writes `OUTPUTS` into `out_dir_tmp`
    (the caller's temporary artifact directory) and returns the summary metrics.
    `teacher_tokenizer` (checked against `tokenizer`) and `teacher_kwargs` (e.g. a looped
    teacher's recurrence) let the continual-learning cycle distil from an earlier checkpoint.
    `heldout_prompts` (never training prompts) are scored at the start (step 0) and every
    `opd.eval_every` steps (`_Loop.evaluate`); the student ends with the weights of the step
    with the lowest held-out reverse KL (the starting ones if no step improved on them).
    None: no evaluation, the last step's weights (the behaviour before `eval_every`).
    `model_dir` is the student's base model directory: `backend: vllm` loads it and samples with
    the student's adapter, saved after every step (ignored by the transformers backend).
    Every step is logged through `steplog` (a caller's, e.g. the cycle's; else one of its own
    in `out_dir_tmp`, closed here, with `logging_params`' optional sink).
    `checkpoints` (steps = `opd_params.steps`, a key naming the student, teacher and prompts)
    saves a resumable checkpoint every `every` steps and resumes from the newest; the caller
    calls its `complete` once the artifact is published. None: no checkpoints.
    `dist_env` (torchrun): this rank samples and scores its share of each step's prompts, the
    gradients are summed over ranks (`onpolicy.opd_step`); rank 0 alone logs, checkpoints and
    writes `out_dir_tmp`; the other ranks return {}.
    """
    p, out_dir, env = opd_params, Path(out_dir_tmp), dist_env or training.DistEnv()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainable = check_inputs(student, tokenizer, prompts_df, p, teacher_tokenizer, checkpoints, env)  # fmt: skip
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
                 guards or GuardParams(), env)  # fmt: skip
    loop.log_plan()
    progress, resumed = resume_progress(checkpoints, student, optimizer, tracker, seed)
    training.broadcast_from_main_(trainable, env)  # every rank starts from rank 0's weights
    if resumed is not None:
        log.info("resuming from %s (step %d of %d)", resumed, progress.step, p.steps)
    own_log = steplog is None and env.is_main
    if own_log:
        steplog = StepLog(out_dir, name=log_prefix, params=logging_params)
    for row in progress.rows if steplog is not None else ():  # a resumed run replays its steps
        steplog.log(row, sink=False)
    teacher_base = teacher.get_base_model() if hasattr(teacher, "get_base_model") else teacher
    with fixed_initial_state(base), fixed_initial_state(teacher_base):  # a looped teacher too
        # Before any sampling counts (and again on resume, in this process): the sampler's
        # cached decoding and the teacher's scoring must agree with plain cache-free forwards.
        guard = loop.guard(heldout_prompts)
        if progress.guard is None:  # a first start; a resumed run keeps the first's figures
            progress.guard, progress.kl_before = guard, loop.evaluate(0, progress, heldout_prompts)  # fmt: skip
            tracker.snapshot(0)
        loop.push_adapter(progress.step)
        loop.run_steps(progress, tracker, steplog, heldout_prompts)
    loop.keep_best(progress)
    if own_log:
        steplog.close()
    if not env.is_main:
        return {}
    geometry = write_outputs(out_dir, student, progress, tracker)
    fraction = (logging_params or LoggingParams()).summary_fraction
    return summary(p, progress, geometry, loop.n_trainable, fraction)


class _Loop:
    """One OPD run's pieces: sample → reward → score + update → log, one step at a time."""

    def __init__(self, p, student, teacher, tokenizer, engine, optimizer, trainable, rows, seed,
                 s_kwargs, teacher_kwargs, log_prefix, out_dir, checkpoints, guards, env) -> None:  # fmt: skip
        self.p, self.student, self.teacher, self.tokenizer = p, student, teacher, tokenizer
        self.env = env
        self.engine, self.optimizer, self.trainable, self.rows = engine, optimizer, trainable, rows
        self.seed, self.s_kwargs, self.teacher_kwargs = seed, s_kwargs, teacher_kwargs
        self.log_prefix, self.out_dir, self.guards = log_prefix, out_dir, guards
        self.checkpoints = checkpoints
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

    def run_steps(self, progress: Progress, tracker: GeometryTracker, steplog: StepLog | None,
                  heldout_prompts: list[str] | None) -> None:  # fmt: skip
        """Steps `progress.step + 1 .. p.steps`: each step, its held-out evaluation every
        `eval_every` (and at the last), its log row, geometry snapshot and checkpoint."""
        p, env, ckpts = self.p, self.env, self.checkpoints
        bar = tqdm(range(progress.step + 1, p.steps + 1), desc=self.log_prefix, unit="step",
                   initial=progress.step, total=p.steps, disable=not env.is_main)  # fmt: skip
        for step in bar:
            row = self.step(step, progress)
            if step % p.eval_every == 0 or step == p.steps:
                row[HELDOUT] = self.evaluate(step, progress, heldout_prompts)
            if steplog is not None:
                steplog.log(row)
            if step % p.geometry_every == 0 or step == p.steps:
                tracker.snapshot(step)
            if ckpts is not None and ckpts.due(step):
                if env.is_main:
                    save_progress(ckpts, step, self.student, self.optimizer, progress, tracker)
                training.barrier(env)
            bar.set_postfix(kl=f"{row['reverse_kl_exact']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")  # fmt: skip
            _after_step(step)

    def guard(self, heldout_prompts: list[str] | None) -> dict[str, Any]:
        """`retroloop.guards`' run-time check of the sampler and the teacher's scoring."""
        prompts = (heldout_prompts or [r["prompt"] for r in self.rows])[: self.guards.prompts]
        return check_rollouts(
            self.engine, self.student, self.teacher, prompts, pad_id=self.tokenizer.pad_token_id,
            seed=seed_for(self.seed, "opd-guard", 0), student_kwargs=self.s_kwargs,
            teacher_kwargs=self.teacher_kwargs, max_new_tokens=self.guards.new_tokens,
        )  # fmt: skip

    def evaluate(self, step: int, progress: Progress, prompts: list[str] | None) -> float | None:
        """The held-out reverse KL after `step` (0: the start), recorded in `progress`, which
        keeps the best step's weights (None: no held-out prompts). The same prompts and the
        same sampling seed at every evaluation, so steps are compared on the same draws; rank 0
        computes it and every rank gets its value (and so the same best step)."""
        if not prompts:
            return None
        value = [self.heldout_kl(prompts) if self.env.is_main else None]
        if self.env.world_size > 1:
            torch.distributed.broadcast_object_list(value, src=0)
        progress.evaluated(step, value[0], self.trainable)
        return value[0]

    def heldout_kl(self, prompts: list[str]) -> float:
        """Exact full-vocabulary reverse KL on fixed prompts with a fixed seed (`heldout_reverse_kl`)."""
        p = self.p
        return heldout_reverse_kl(
            self.student, self.teacher, self.tokenizer, prompts, n=p.rollout.samples_per_prompt,
            max_new_tokens=p.rollout.max_new_tokens, seed=self.seed,
            student_kwargs=self.s_kwargs, teacher_kwargs=self.teacher_kwargs,
        )  # fmt: skip

    def keep_best(self, progress: Progress) -> None:
        """End the run on the best evaluated step's weights (a no-op if that is the last)."""
        if progress.best_step is None or progress.best_step == self.p.steps:
            return
        with torch.no_grad():
            for q, best in zip(self.trainable, progress.best_weights, strict=True):
                q.copy_(best)
        start, last = progress.heldout[0]["value"], progress.heldout[-1]["value"]
        if progress.best_step == 0:
            log.warning(
                "%s: no step lowered the held-out reverse KL below its start (%.4f; last step "
                "%.4f): the published adapter is the starting one (lower opd.lr, or more "
                "opd.prompts_per_step x rollout.samples_per_prompt)",
                self.log_prefix, start, last,
            )  # fmt: skip
        else:
            log.info(
                "%s: keeping step %d (held-out reverse KL %.4f; start %.4f, last step %.4f)",
                self.log_prefix, progress.best_step, progress.best_value, start, last,
            )  # fmt: skip

    def push_adapter(self, step: int) -> None:
        """vLLM samples from adapter files: hand it the current adapter (no-op otherwise)."""
        if hasattr(self.engine, "set_adapter"):
            folder = self.out_dir / ".rollout_adapter" / f"rank-{self.env.rank}" / f"step-{step}"
            self.student.save_pretrained(folder)
            self.engine.set_adapter(folder)

    def step(self, step: int, progress: Progress) -> dict[str, Any]:
        """OPD step `step` (1-based): its metric row; its rollouts go to `progress`."""
        p, tokenizer = self.p, self.tokenizer
        while len(progress.order) < p.prompts_per_step:  # seeded epochs over the prompts
            progress.order += progress.rng.permutation(len(self.rows)).tolist()
        picked = [self.rows[i] for i in progress.order[: p.prompts_per_step]]
        progress.order = progress.order[p.prompts_per_step :]
        # Prompt k of the step draws from its own seed, so a rank's share of the prompts
        # (a contiguous slice) samples what one process would; `gather_rollouts` rebuilds the batch.
        seeds = [seed_for(self.seed, "opd-rollout", step, k) for k in range(len(picked))]
        env, n = self.env, len(picked)
        lo, hi = env.rank * n // env.world_size, (env.rank + 1) * n // env.world_size
        tic = time.perf_counter()
        batch = self.engine.sample(
            [r["prompt"] for r in picked[lo:hi]], n=p.rollout.samples_per_prompt, max_new_tokens=p.rollout.max_new_tokens,
            temperature=p.rollout.temperature, top_p=p.rollout.top_p, seed=seeds[lo:hi],
        )  # fmt: skip
        rewards = ifeval_rewards(tokenizer, batch, picked[lo:hi]) if p.reward_weight > 0 else None
        stats = opd_step(
            self.student, self.teacher, batch, self.optimizer, p, pad_id=tokenizer.pad_token_id,
            rewards=rewards, student_kwargs=self.s_kwargs, teacher_kwargs=self.teacher_kwargs,
            dist_env=env,
        )  # fmt: skip
        stop_if_not_finite(
            self.log_prefix, step, loss=stats["loss"], grad_norm=stats["grad_norm"],
            params=self.trainable, lr=p.lr, lr_key="opd.lr", checkpoint_dir=self.checkpoint_dir,
        )  # fmt: skip
        self.push_adapter(step)
        batch, teacher_lp, rewards = gather_rollouts(batch, stats.pop("teacher_logprobs"), rewards, lo, env)  # fmt: skip
        step_s, n_tok = time.perf_counter() - tic, batch.num_completion_tokens
        progress.rollouts.append(rollout_frame(step, batch, teacher_lp, rewards, picked, tokenizer))  # fmt: skip
        row = {"step": step, **stats, "rollout_s": batch.seconds, "step_s": step_s}
        row["tokens"], row["tokens_per_s"] = n_tok, n_tok / step_s
        row["rollout_tokens_per_s"] = n_tok / max(batch.seconds, 1e-9)
        row["response_length"] = n_tok / len(batch)
        row["finished_fraction"] = float(np.mean(batch.finished))
        row["reward"] = float(np.mean(rewards)) if rewards is not None else math.nan
        row[HELDOUT] = math.nan  # set by the loop on evaluated steps
        progress.rows.append(row)
        return row
