"""distill: teach the looped student back what conversion lost, from the cached teacher.

Reads:  data/convert/model (role `student`), data/cache_teacher (role `teacher_cache`; or
        data/prepare/model, role `teacher`, with `distill.teacher: online`),
        data/prepare/datasets/{instruct,domain}_train.parquet (roles `train_instruct`, `train_domain`)
Writes: data/distill/adapter/   PEFT adapter (LoRA on; `PeftModel.from_pretrained(student, ...)`)
        data/distill/model/     HF save_pretrained of the whole student (LoRA off: full fine-tuning)
        data/distill/dvclive/   per-step loss, ce, kl, lr, recurrence, mu (dvclive; dvc plots)
        data/distill/run_dvclive/  per-step tokens_per_s (timings, outside content_sha256)
        data/distill/metrics.json, manifest.json
Side:   data/checkpoints/distill/step_N   resumable checkpoints (dvc `persist: true`), removed
        once the artifact is in place; data/checkpoints/distill/dvclive* the live per-step
        logs while it runs (rebuilt from the checkpoint's rows on resume)
Run:    retroloop stage distill          (or: torchrun --nproc_per_node=N -m retroloop.cli stage distill)
Inputs, teacher (cache or online) and student: `retroloop.distill_io`.

Loss (DESIGN.md §5, `retroloop.losses.distill_loss`), over positions with labels != −100:
    total = α·CE + (1−α)·T²·D(p_T^T ‖ p_S^T),  D ∈ {forward_kl, reverse_kl, jsd(β), tvd}
on the cache's k + 1 outcomes (top-k ids + tail bucket), or exactly over the vocabulary with an
online teacher or a `full_vocab` cache. Four modes: LoRA on/off × distillation on/off.

Recurrence curriculum (McLeish et al. 2025): at step s, μ = recurrence_mean_at(s, steps, …),
R ~ Poisson(LogNormal(μ)) + 1 capped at max_recurrence, the forward runs R iterations with
gradients through the last `bptt_k` only; `distill.recurrence: R` trains at that R every step
instead. A plain (non-looped) student ignores R. The LR at step s is lr · training.lr_factor(s)
(`lr_schedule`, `warmup_steps`); the recurrence adapter can have its own peak (`adapter_lr`).

Reproducibility: the data order is a seeded permutation per epoch, and R and every random draw
inside a micro-batch come from seeds derived from (seed, step, micro-batch). A step is therefore a
pure function of its position: resuming from step_N, or splitting the global batch over torchrun
ranks instead of gradient-accumulation micro-batches, follows the same trajectory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from retroloop import teacher_cache as tc
from retroloop import training
from retroloop.artifacts import (
    Manifest,
    atomic_artifact,
    read_manifest,
)
from retroloop.canonical import json_sha256
from retroloop.config import Params
from retroloop.distill_io import (
    input_paths,
    load_student,
    online_teacher,
    open_cache,
    training_data,
)
from retroloop.losses import distill_loss_sums
from retroloop.models.head import chunked_rows, final_hidden_states, logits_at, output_head
from retroloop.models.loading import load_tokenizer
from retroloop.models.recurrent import RecurrentForCausalLM, recurrence_mean_at, sample_recurrence
from retroloop.runlock import exclusive
from retroloop.sequences import IGNORE, Sequence, pad_batch
from retroloop.stages.common import (
    DISTILL_CHECKPOINTS,
    PATHS,
    setup_run,
)
from retroloop.steplog import StepLog, edge_steps, move_logs

log = logging.getLogger(__name__)


def _after_step(step: int) -> None:
    """Called after each optimizer step (1-based); tests replace it to simulate a kill."""


@exclusive("out_dir", "checkpoint_dir")
def run(
    cfg: Params,
    *,
    inputs: dict | None = None,
    out_dir: Path = PATHS["distill"],
    checkpoint_dir: Path = DISTILL_CHECKPOINTS,
    log_name: str = "distill",
) -> Manifest:
    device = setup_run(cfg)
    env = training.init_distributed(device)
    if env.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    d = cfg.distill
    paths, refs = input_paths(inputs, d)
    tokenizer = load_tokenizer(paths["student"])
    seqs = training_data(tokenizer, paths, cfg.prepare.max_seq_len)
    cached = d.distillation and d.teacher == "cached"
    cache = open_cache(paths, tokenizer, seqs, d.temperature, d.divergence) if cached else None
    online = d.distillation and d.teacher == "online"
    teacher = online_teacher(paths["teacher"], tokenizer, cfg.dtype, device) if online else None
    model = load_student(paths["student"], cfg, device)
    loop = _Loop(cfg, env, device, model, seqs, cache, teacher, tokenizer.pad_token_id, log_name)
    loop.log_plan()

    # Resume: the newest checkpoint of a run with the same inputs and parameters.
    run_params = {
        **cfg.section("distill"),
        "schedule": cfg.convert.schedule.model_dump(),
        "max_seq_len": cfg.prepare.max_seq_len,
    }
    params_sha256 = json_sha256([run_params])
    run_key = json_sha256([params_sha256, [r.content_sha256 for r in refs]])
    ckpts = training.Checkpoints(checkpoint_dir, run_key, d.checkpoint_every, d.steps)
    start, rows = 0, []
    if (found := ckpts.resume(model, loop.optimizer)) is not None:
        (ckpt, state), start = found, found[1]["step"]
        rows = state["rows"]
        log.info("resuming from %s (step %d of %d)", ckpt, start, d.steps)
    training.broadcast_from_main_(loop.params, env)
    # Per-step metrics go to dvclive live, in the checkpoint folder until the artifact is
    # written; a resumed run replays the checkpoint's rows first (rank 0 only).
    steplog = None
    if env.is_main:
        steplog = StepLog(checkpoint_dir, name=log_name, params=cfg.logging, rows=rows)
    bar = tqdm(range(start, d.steps), desc="distill", unit="step", initial=start, total=d.steps,
               disable=not env.is_main)  # fmt: skip
    for step in bar:
        rows.append(loop.step(step, checkpoint_dir))
        if steplog is not None:
            steplog.log(rows[-1])
        if (step + 1) % d.log_every == 0:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", kl=f"{rows[-1]['kl']:.4f}", R=rows[-1]["recurrence"])  # fmt: skip
        if ckpts.due(step + 1):
            if env.is_main:
                state = {"data_position": (step + 1) * loop.global_batch, "rows": rows,
                         "rng": "derived from (seed, step, micro-batch): nothing to restore"}  # fmt: skip
                ckpts.save(step + 1, model, loop.optimizer, state)
            training.barrier(env)
        _after_step(step + 1)

    if env.is_main:
        steplog.close()
        manifest = _write_artifact(cfg, out_dir, env, model, tokenizer, refs, rows, run_params, params_sha256, device, loop.n_trainable, checkpoint_dir)  # fmt: skip
        # Complete: nothing left to resume. The folder stays (dvc `persist`) with a note of the run.
        note = {"artifact": str(out_dir), "content_sha256": manifest.content_sha256}
        ckpts.complete(note)
    training.barrier(env)
    if not env.is_main:
        manifest = read_manifest(out_dir)
    training.shutdown(env)
    return manifest


class _Loop:
    """One distill run's optimizer step. Micro-batch j of step s holds global positions
    [(s·M + j)·b, +b); rank r takes j = a·W + r. Each loss is weighted by its share of the
    step's trained tokens, so the summed gradient is the gradient of the token mean over the
    whole global batch."""

    def __init__(self, cfg, env, device, model, seqs, cache, teacher, pad_id, log_name) -> None:
        self.cfg, self.d, self.sched = cfg, cfg.distill, cfg.convert.schedule
        self.env, self.device, self.model, self.seqs = env, device, model, seqs
        self.cache, self.teacher, self.pad_id, self.log_name = cache, teacher, pad_id, log_name
        base = model.get_base_model() if self.d.lora.enabled else model
        self.looped = isinstance(base, RecurrentForCausalLM)
        self.params = [p for _, p in training.trainable_parameters(model)]
        self.optimizer = self._optimizer(base)
        self._peak_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.micro_per_step = self.d.grad_accum * env.world_size  # micro-batches per step
        self.global_batch = self.d.batch_size * self.micro_per_step  # sequences per step
        self.n_targets = [sum(label != IGNORE for label in s.labels[1:]) for s in seqs]
        self.n_trainable = sum(p.numel() for p in self.params)
        self.order = DataOrder(len(seqs), cfg.seed)

    def _optimizer(self, base) -> torch.optim.AdamW:
        """AdamW over the trainable parameters; with `distill.adapter_lr` the recurrence
        adapter's weights are a second group at that LR (both follow the same schedule)."""
        d = self.d
        if d.adapter_lr is None or not self.looped:
            return training.make_optimizer(self.model, d.lr, d.weight_decay)
        own = {id(p) for p in base.model.adapter.parameters()}
        groups = [
            {"params": [p for p in self.params if id(p) not in own], "lr": d.lr},
            {"params": [p for p in self.params if id(p) in own], "lr": d.adapter_lr},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=d.weight_decay)

    def log_plan(self) -> None:
        """Derived quantities (nanoGPT style), logged before anything trains."""
        d, env, seqs, N, gb = self.d, self.env, self.seqs, len(self.seqs), self.global_batch
        n_total = sum(p.numel() for p in self.model.parameters())
        log.info(
            "distill: %d sequences; effective batch %d = %d per micro-batch × %d accum × %d ranks; "
            "~%.0f tokens/step (%.0f trained); %d steps ≈ %.2f epochs; trainable %d / %d (%.3f%%); "
            "lora=%s distillation=%s teacher=%s D=%s looped=%s",
            N, gb, d.batch_size, d.grad_accum, env.world_size,
            gb * sum(len(s.input_ids) for s in seqs) / N, gb * sum(self.n_targets) / N,
            d.steps, d.steps * gb / N, self.n_trainable, n_total, 100 * self.n_trainable / n_total,
            d.lora.enabled, d.distillation, d.teacher, d.divergence, self.looped,
        )  # fmt: skip

    def step(self, step: int, checkpoint_dir: Path) -> dict:
        """Optimizer step `step` (0-based) → its metric row (1-based `step`)."""
        d, sched, env, seed = self.d, self.sched, self.env, self.cfg.seed
        t0 = time.perf_counter()
        mu = recurrence_mean_at(step, d.steps, sched.mean_start, sched.mean_end, sched.ramp_fraction)  # fmt: skip
        R = None
        if self.looped and d.recurrence is not None:
            R = d.recurrence
        elif self.looped:
            gen = torch.Generator().manual_seed(training.seed_for(seed, "recurrence", step))
            R = sample_recurrence(mu, sched.sigma, gen, sched.max_recurrence)
        factor = training.lr_factor(step, d.steps, d.lr_schedule, d.warmup_steps)
        for group, peak in zip(self.optimizer.param_groups, self._peak_lrs, strict=True):
            group["lr"] = peak * factor
        batches = [
            self.order.take((step * self.micro_per_step + j) * d.batch_size, d.batch_size)
            for j in range(self.micro_per_step)
        ]
        step_targets = max(sum(self.n_targets[i] for mb in batches for i in mb), 1)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, kl (token-weighted), input tokens
        for a in range(d.grad_accum):
            j = a * env.world_size + env.rank
            torch.manual_seed(training.seed_for(seed, "micro-batch", step, j))  # s_0, dropout
            mb = batches[j]
            rows_mb = [self.cache.rows(i) for i in mb] if self.cache is not None else None
            loss, stats, n_in = micro_batch_loss(self.model, [self.seqs[i] for i in mb], self.pad_id, d, R, sched.bptt_k, self.device, self.teacher, rows_mb)  # fmt: skip
            weight = sum(self.n_targets[i] for i in mb) / step_targets
            (loss * weight).backward()
            sums += torch.tensor(
                [stats["loss"] * weight, stats["ce"] * weight, stats["kl"] * weight, n_in],
                dtype=torch.float64,
            )
        training.all_reduce_grads_(self.params, env)
        training.all_reduce_sum_([sums], env)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, d.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_, ce, kl, tokens = sums.tolist()
        training.stop_if_not_finite(
            self.log_name, step + 1, loss=loss_, grad_norm=grad_norm, params=self.params, lr=d.lr,
            lr_key="distill.lr", checkpoint_dir=checkpoint_dir,
        )  # fmt: skip
        lr = self.optimizer.param_groups[0]["lr"]
        return {"step": step + 1, "loss": loss_, "ce": ce, "kl": kl, "lr": lr,
                "tokens_per_s": tokens / (time.perf_counter() - t0), "recurrence": R or 0, "mu": mu}  # fmt: skip


class DataOrder:
    """Sequence index at a global position: a seeded permutation per epoch, so any step's
    batch is known from its position alone (resume, and every rank agrees without talking)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.perms = n, seed, {}

    def take(self, position: int, count: int) -> list[int]:
        return [self._at(p) for p in range(position, position + count)]

    def _at(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch not in self.perms:
            gen = torch.Generator().manual_seed(training.seed_for(self.seed, "data", epoch))
            self.perms[epoch] = torch.randperm(self.n, generator=gen).tolist()
        return self.perms[epoch][i]


def micro_batch_loss(
    model, batch: list[Sequence], pad_id: int, d, R, bptt_k, device, teacher, rows
) -> tuple[torch.Tensor, dict[str, float], int]:
    """Forward one micro-batch → (mean loss over its trained positions, stats, input tokens).

    Pre-shifted alignment: position t predicts labels[t + 1]; only the N positions whose next
    token is trained on reach the LM head and the loss (`models.head`), and those are exactly
    the rows the teacher cache stores, in the same row-major order. With
    `d.loss_chunk_rows > 0` the head + loss run in chunks of that many rows under activation
    checkpointing, so at most one chunk's `[rows, V]` logits (and their copies) is alive at a
    time; the backward recomputes each chunk's head once.
    """
    ids_B_T, mask_B_T, labels_B_T = pad_batch(batch, pad_id)
    ids_B_T, mask_B_T = ids_B_T.to(device), mask_B_T.to(device)
    trained_B_Tm1 = labels_B_T[:, 1:] != IGNORE
    select_B_T = F.pad(trained_B_Tm1, (0, 1), value=False).to(
        device
    )  # last column predicts nothing
    targets_N = labels_B_T[:, 1:][trained_B_Tm1].to(device)
    extra = {} if R is None else {"num_recurrence": R, "bptt_k": bptt_k}
    hidden_N_H = final_hidden_states(model, ids_B_T, mask_B_T, **extra)[select_B_T]
    teacher_N: dict[str, torch.Tensor] = {}
    if teacher is not None:
        with torch.no_grad():
            teacher_N["teacher_logits_N_V"] = logits_at(teacher, select_B_T, ids_B_T, mask_B_T)
    elif rows is not None:
        teacher_N = {k: v.to(device) for k, v in tc.batch_rows(rows, trained_B_Tm1).items()}
        if "teacher_logits_N_V" in teacher_N:  # full-vocabulary cache: exact D, since
            teacher_N["teacher_logits_N_V"] *= d.temperature  # log_softmax(T·logp / T) = logp
    head = output_head(model)
    kw = dict(alpha=d.alpha, temperature=d.temperature, kind=d.divergence, beta=d.jsd_beta,
              distillation=d.distillation)  # fmt: skip

    def chunk_sums(h_n_H: torch.Tensor, rows_: slice) -> tuple[torch.Tensor, ...]:
        return distill_loss_sums(
            head(h_n_H), targets_N[rows_], **{k: v[rows_] for k, v in teacher_N.items()}, **kw
        )

    slices = chunked_rows(len(targets_N), d.loss_chunk_rows)
    totals = [torch.zeros((), device=device) for _ in range(3)]  # loss, ce, kl (sums)
    for rows_ in slices:
        if len(slices) > 1 and hidden_N_H.requires_grad:
            sums = checkpoint(chunk_sums, hidden_N_H[rows_], rows_, use_reentrant=False)
        else:
            sums = chunk_sums(hidden_N_H[rows_], rows_)
        totals = [t + x for t, x in zip(totals, sums, strict=True)]
    n = max(len(targets_N), 1)
    loss, ce, kl = (t / n for t in totals)
    stats = {"ce": float(ce.detach()), "kl": float(kl.detach()), "loss": float(loss.detach())}
    return loss, stats, int(mask_B_T.sum())


def _write_artifact(
    cfg, out_dir, env, model, tokenizer, refs, rows, run_params, params_sha256, device, n_trainable,
    log_dir,
) -> Manifest:  # fmt: skip
    """The adapter (or full model), the per-step logs (from `log_dir`) and the summary
    metrics, atomically (rank 0)."""
    lora = cfg.distill.lora.enabled
    name = "adapter" if lora else "model"
    with atomic_artifact(out_dir, stage="distill", kind=name) as w:
        w.inputs.extend(refs)
        model.save_pretrained(w.dir / name)
        if not lora:
            tokenizer.save_pretrained(w.dir / name)
        move_logs(log_dir, w.dir)
        w.outputs = {name: name, "dvclive": "report"}
        steps = pl.DataFrame(rows)
        edge = edge_steps(len(rows), cfg.logging.summary_fraction)  # *_start / *_end windows
        head, tail = steps.head(edge), steps.tail(edge)
        w.metrics = {
            "steps": len(rows),
            "kl_start": float(head["kl"].mean()),
            "kl_end": float(tail["kl"].mean()),
            "ce_start": float(head["ce"].mean()),
            "ce_end": float(tail["ce"].mean()),
            "loss_end": float(tail["loss"].mean()),
            "trainable_parameters": n_trainable,
            "tokens_per_s": float(steps["tokens_per_s"].median()),
            "mean_recurrence": float(steps["recurrence"].mean()),
            "world_size": env.world_size,
        }
        manifest = w.finish(
            params=run_params, params_sha256=params_sha256, seed=cfg.seed, device=str(device)
        )
    log.info(
        "distill: kl %.4f → %.4f, ce %.4f → %.4f",
        *(w.metrics[k] for k in ("kl_start", "kl_end", "ce_start", "ce_end")),
    )
    return manifest
