"""The four training arms of `retroloop bench peer`, each run in a fresh process (`child`).

    retroloop_distill  `distill._Loop.step` (the stage's own step: R schedule, data order,
                       micro-batch loss from the cached teacher rows, clip, AdamW)
    trl_gkd            TRL's `GKDTrainer`, lmbda = 0 (never on-policy), beta = 0 (forward KL),
                       the teacher online beside every step
    retroloop_opd      `TransformersEngine.sample` + `onpolicy.opd_step` (as `train_opd` steps)
    trl_gkd_onpolicy   `GKDTrainer`, lmbda = 1 (every batch sampled from the student with
                       `model.generate`), beta = 1 (reverse KL), the teacher online

What TRL 1.16 computes (trl/experimental/gkd/gkd_trainer.py, read in the installed package):
`training_step` samples the student's own completions when `random.random() <= lmbda`, so
lmbda = 0 keeps the dataset's sequences and lmbda = 1 is fully on-policy; `generalized_jsd_loss`
with beta = 0 is `F.kl_div(log p_S, log p_T, log_target=True)` = Σ_v p_T (log p_T − log p_S) =
KL(p_T ‖ p_S) (forward), with beta = 1 `F.kl_div(log p_T, log p_S)` = KL(p_S ‖ p_T) (reverse),
exactly over the vocabulary at T = 1 (`compute_loss` passes no temperature), summed over the
positions whose label is not −100 and divided by their count. `DistillationTrainer`
(trl/trainer/distillation_trainer.py) has no lmbda in 1.16 (on-policy only) and its chunked
loss calls the backbone directly, past the model's own forward; GKD runs the model's forward.

The interface, adapted without changing the math: TRL calls `model(input_ids, attention_mask)`,
so a forward pre-hook on the looped base model adds `num_recurrence` = the R that distill's
schedule draws for the same step (`seed_for(seed, "recurrence", step)`) and `bptt_k`; a
sequential sampler over indices in distill's `DataOrder` and a collator that pads our tokenised
sequences (`pad_batch`) give TRL the same batches in the same order; the optimizer is
`training.make_optimizer` at a constant LR, the LoRA the one `distill.load_student` builds.

Each arm reports its training wall seconds at every `eval_every` steps (from its first step,
set-up and model loading left out; the snapshots of the trainable weights taken there are
subtracted), its tokens (distill: non-padding input tokens; on-policy: generated tokens), its
peak RSS (VmHWM, read right after training, before anything is loaded to evaluate) and, when
asked, the held-out exact KL(p_T ‖ p_S) of every snapshot (`heldout_kl`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from benchmarks.bench_distill import _sequences
from retroloop import training
from retroloop.config import load_params
from retroloop.models.head import logits_at
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.models.recurrent import recurrence_mean_at, sample_recurrence
from retroloop.sequences import IGNORE, pad_batch, training_sequences

CPU = torch.device("cpu")


def child(job: dict) -> dict:
    """Run one arm (`job["variant"]`) and return its measurements (JSON-able)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    cfg = job_params(job)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    paths = {r: Path(p) for r, p in job["paths"].items()}
    tok = load_tokenizer(paths["student"])
    if job["variant"] == "cache":
        from retroloop.stages import cache_teacher

        tic = time.perf_counter()
        tmp = Path(job["tmp"])
        cache_teacher.run(cfg, inputs=paths, out_dir=tmp / "cache", checkpoint_dir=tmp / "ck")
        return {"seconds": time.perf_counter() - tic, "peak_rss_mib": vm_hwm_mib()}
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation in every arm of a kind
    arm = {"retroloop_distill": _retroloop_distill, "trl_gkd": _trl_distill,
           "retroloop_opd": _retroloop_opd, "trl_gkd_onpolicy": _trl_onpolicy}[job["variant"]]  # fmt: skip
    out, student, teacher = arm(cfg, job, paths, tok)
    out["peak_rss_mib"] = vm_hwm_mib()
    if job.get("evaluate"):
        teacher = teacher if teacher is not None else load_model(paths["teacher"], "float32", CPU)
        held = training_sequences(
            tok, pl.read_parquet(job["heldout"]["instruct"]), pl.read_parquet(job["heldout"]["domain"]), cfg.prepare.max_seq_len
        )  # fmt: skip
        out["heldout_kl"] = heldout_kls(student, teacher, out["snapshots"], held, tok.pad_token_id, job["eval_R"])  # fmt: skip
        if job["variant"] in ("retroloop_opd", "trl_gkd_onpolicy"):
            prompts = pl.read_parquet(job["heldout"]["instruct"])["prompt"].to_list()
            out["heldout_reverse_kl"] = heldout_reverse_kls(student, teacher, out["snapshots"], prompts, tok, cfg)  # fmt: skip
    out.pop("snapshots", None)
    return out


def job_params(job: dict):
    """The params file with the bench's step counts (`job["steps"]`: distill, opd)."""
    cfg = load_params(job["params"])
    d = cfg.distill.model_copy(update={"steps": job["steps"]["distill"]})
    o = cfg.opd.model_copy(update={"steps": job["steps"]["opd"]})
    return cfg.model_copy(update={"distill": d, "opd": o})


def _clock(steps: int, every: int):
    """(mark, result): mark(step, model) after each step records the cumulative training
    seconds and, every `every` steps and at the last, a snapshot (its time not counted)."""
    state = {"t0": None, "excluded": 0.0, "seconds": {}, "snapshots": {}}

    def mark(step: int, model) -> None:
        if step == 0:
            state["snapshots"][0], state["t0"] = trainable_state(model), time.perf_counter()
            return
        if step % every == 0 or step == steps:
            now = time.perf_counter()
            state["seconds"][step] = now - state["t0"] - state["excluded"]
            state["snapshots"][step] = trainable_state(model)
            state["excluded"] += time.perf_counter() - now

    return mark, state


def _retroloop_distill(cfg, job, paths, tok):
    from retroloop.stages import distill

    seqs = _sequences(tok, paths, cfg)
    d = cfg.distill
    cache = distill.open_cache(paths, tok, seqs, d.temperature, d.divergence)
    model = distill.load_student(paths["student"], cfg, CPU)
    env = training.init_distributed(CPU)
    loop = distill._Loop(cfg, env, CPU, model, seqs, cache, None, tok.pad_token_id, "bench-peer")
    mark, st = _clock(d.steps, job["eval_every"]["distill"])
    tokens, R = 0, []
    mark(0, model)
    for step in range(d.steps):
        row = loop.step(step, Path(job["tmp"]) / "ck-distill")
        tokens += sum(len(seqs[i].input_ids) for i in loop.order.take(step * loop.global_batch, loop.global_batch))  # fmt: skip
        R.append(row["recurrence"])
        mark(step + 1, model)
    return {"seconds": st["seconds"], "tokens": tokens, "recurrence": R, "snapshots": st["snapshots"]}, model, None  # fmt: skip


def _schedule_R(cfg, step: int) -> int:
    """The R distill's `_Loop.step` draws at (0-based) `step`: μ by the curriculum, then the seeded draw."""
    d, s = cfg.distill, cfg.convert.schedule
    mu = recurrence_mean_at(step, d.steps, s.mean_start, s.mean_end, s.ramp_fraction)
    gen = torch.Generator().manual_seed(training.seed_for(cfg.seed, "recurrence", step))
    return sample_recurrence(mu, s.sigma, gen, s.max_recurrence)


def _trl_distill(cfg, job, paths, tok):
    from retroloop.stages import distill

    seqs, d = _sequences(tok, paths, cfg), cfg.distill
    model = distill.load_student(paths["student"], cfg, CPU)
    teacher = load_model(paths["teacher"], "float32", CPU)
    order = distill.DataOrder(len(seqs), cfg.seed)
    B = d.batch_size * d.grad_accum
    rows = [{"idx": i} for i in order.take(0, d.steps * B)]
    R_now = {"R": None}
    base = model.get_base_model()
    hook = base.register_forward_pre_hook(
        lambda _m, args, kw: (args, {**kw, "num_recurrence": R_now["R"], "bptt_k": cfg.convert.schedule.bptt_k}),
        with_kwargs=True,
    )  # fmt: skip

    def collate(batch: list[dict]) -> dict:
        ids, mask, labels = pad_batch([seqs[r["idx"]] for r in batch], tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    mark, st = _clock(d.steps, job["eval_every"]["distill"])
    tr = _gkd_trainer(cfg, job, model, teacher, tok, rows, collate, mark, lmbda=0.0, beta=0.0,
                      batch=d.batch_size, accum=d.grad_accum, steps=d.steps, lr=d.lr,
                      wd=d.weight_decay, clip=d.max_grad_norm, before_step=lambda s: R_now.update(R=_schedule_R(cfg, s)))  # fmt: skip
    tr.train()
    hook.remove()
    tokens = sum(len(seqs[r["idx"]].input_ids) for r in rows)
    return {"seconds": st["seconds"], "tokens": tokens, "snapshots": st["snapshots"]}, model, teacher  # fmt: skip


def _gkd_trainer(cfg, job, model, teacher, tok, rows, collate, mark, *, lmbda, beta, batch, accum, steps, lr, wd, clip,
                 before_step=None, new_tokens=128, temperature=1.0):  # fmt: skip
    """A `GKDTrainer` on `rows` in order (sequential sampler), our optimizer at a constant LR,
    and a callback that calls `before_step(step)` / `mark(step, model)` around every step."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            mark(0, model)

        def on_step_begin(self, args, state, control, **kw):
            if before_step is not None:
                before_step(state.global_step)

        def on_step_end(self, args, state, control, **kw):
            mark(state.global_step, model)

    args = GKDConfig(
        output_dir=str(Path(job["tmp"]) / f"trl-{job['variant']}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, max_steps=steps, learning_rate=lr, weight_decay=wd,
        max_grad_norm=clip, lr_scheduler_type="constant", warmup_steps=0, seed=cfg.seed, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=max(steps, 1), disable_tqdm=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, lmbda=lmbda, beta=beta,
        temperature=temperature, max_new_tokens=new_tokens, max_length=cfg.prepare.max_seq_len,
        bf16=False, gradient_checkpointing=False,
    )  # fmt: skip
    opt = training.make_optimizer(model, lr, wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _s: 1.0)
    return GKDTrainer(model=model, teacher_model=teacher, args=args, data_collator=collate,
                      train_dataset=Dataset.from_list(rows), processing_class=tok,
                      optimizers=(opt, sched), callbacks=[Clock()])  # fmt: skip


def prompt_order(n: int, per_step: int, steps: int, seed: int) -> list[list[int]]:
    """The prompts of every OPD step: seeded permutations per epoch, as bench opd's `_run`."""
    rng, order, out = np.random.default_rng(seed), [], []
    for _ in range(steps):
        while len(order) < per_step:
            order += rng.permutation(n).tolist()
        out.append(order[:per_step])
        order = order[per_step:]
    return out


def _opd_student(cfg, paths):
    from peft import get_peft_model

    from retroloop.models.lora import lora_config_for

    lo, base = cfg.opd.lora, load_model(paths["student"], "float32", CPU)
    lora = lora_config_for(base, r=lo.r, alpha=lo.alpha, dropout=lo.dropout,
                           target_modules=lo.target_modules, train_adapter=lo.train_adapter)  # fmt: skip
    return get_peft_model(base, lora)


def _retroloop_opd(cfg, job, paths, tok):
    from retroloop.onpolicy import fixed_initial_state, opd_step, student_forward_kwargs
    from retroloop.rollout import TransformersEngine

    p = cfg.opd
    student, teacher = _opd_student(cfg, paths), load_model(paths["teacher"], "float32", CPU)
    teacher.eval().requires_grad_(False)
    student.eval()  # as train_opd: sampler and learner run the same function
    prompts = pl.read_parquet(paths["train_instruct"])["prompt"].to_list()
    s_kwargs = student_forward_kwargs(student.get_base_model(), p.recurrence)
    engine = TransformersEngine(student, tok, p.rollout.batch_size, generate_kwargs=s_kwargs)
    trainable = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=p.weight_decay)
    mark, st = _clock(p.steps, job["eval_every"]["opd"])
    tokens = 0
    with fixed_initial_state(student.get_base_model()):
        mark(0, student)
        for step, picked in enumerate(prompt_order(len(prompts), p.prompts_per_step, p.steps, cfg.seed), 1):  # fmt: skip
            seed = [training.seed_for(cfg.seed, "opd-rollout", step, k) for k in range(len(picked))]  # fmt: skip
            batch = engine.sample([prompts[i] for i in picked], n=p.rollout.samples_per_prompt,
                                  max_new_tokens=p.rollout.max_new_tokens, seed=seed)  # fmt: skip
            opd_step(student, teacher, batch, opt, p, pad_id=tok.pad_token_id, student_kwargs=s_kwargs)  # fmt: skip
            tokens += batch.num_completion_tokens
            mark(step, student)
    return {"seconds": st["seconds"], "tokens": tokens, "snapshots": st["snapshots"]}, student, teacher  # fmt: skip


def _trl_onpolicy(cfg, job, paths, tok):
    from benchmarks.bench_opd import _left_pad
    from retroloop.rollout import encode_prompts

    p = cfg.opd
    student, teacher = _opd_student(cfg, paths), load_model(paths["teacher"], "float32", CPU)
    prompts = pl.read_parquet(paths["train_instruct"])["prompt"].to_list()
    n = p.rollout.samples_per_prompt
    order = prompt_order(len(prompts), p.prompts_per_step, p.steps, cfg.seed)
    rows = [{"idx": i} for picked in order for i in picked for _ in range(n)]
    encoded = encode_prompts(tok, prompts)
    generated = {"tokens": 0}

    def collate(batch: list[dict]) -> dict:
        # No "labels": GKD's training_step sets them from the generated tokens. With labels in
        # the batch, Trainer would count num_items_in_batch from these prompt-only rows (0:
        # the loss becomes sum / 0); without, the loss is the mean over generated tokens.
        ids, attn = _left_pad([encoded[r["idx"]] for r in batch], tok.pad_token_id)
        return {"prompts": ids, "prompt_attention_mask": attn, "input_ids": ids, "attention_mask": attn}  # fmt: skip

    mark, st = _clock(p.steps, job["eval_every"]["opd"])
    tr = _gkd_trainer(cfg, job, student, teacher, tok, rows, collate, mark, lmbda=1.0, beta=1.0,
                      batch=p.prompts_per_step * n, accum=1, steps=p.steps, lr=p.lr, wd=p.weight_decay,
                      clip=p.max_grad_norm, new_tokens=p.rollout.max_new_tokens, temperature=p.rollout.temperature)  # fmt: skip
    own = tr.generate_on_policy_outputs

    def counted(model, inputs, generation_config):  # counts the generated tokens, nothing more
        ids, mask, labels = own(model, inputs, generation_config)
        generated["tokens"] += int((labels != IGNORE).sum())
        return ids, mask, labels

    tr.generate_on_policy_outputs = counted
    tr.train()
    return {"seconds": st["seconds"], "tokens": generated["tokens"], "snapshots": st["snapshots"]}, student, teacher  # fmt: skip


@torch.no_grad()
def heldout_kls(student, teacher, snapshots: dict, held: list, pad_id: int, R: int) -> dict:
    """Per snapshot: exact KL(p_T ‖ p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v)) per trained
    position of the held-out sequences, at T = 1, the student in eval mode with R iterations."""
    student.eval()
    batches, teacher_logp = [], []
    for s in range(0, len(held), 4):
        ids, mask, labels = pad_batch(held[s : s + 4], pad_id)
        select = F.pad(labels[:, 1:] != IGNORE, (0, 1), value=False)
        batches.append((select, ids, mask))
        teacher_logp.append(torch.log_softmax(logits_at(teacher, select, ids, mask), -1))
    n = max(sum(int(b[0].sum()) for b in batches), 1)
    out = {}
    for step, snap in snapshots.items():
        restore(student, snap)
        total = 0.0
        for (select, ids, mask), t_logp in zip(batches, teacher_logp, strict=True):
            s_logp = torch.log_softmax(logits_at(student, select, ids, mask, num_recurrence=R), -1)
            total += float((t_logp.exp() * (t_logp - s_logp)).sum())
        out[step] = total / n
    return out


@torch.no_grad()
def heldout_reverse_kls(student, teacher, snapshots: dict, prompts: list[str], tok, cfg) -> dict:
    """Per snapshot: exact KL(π_S ‖ π_T) = Σ_v π_S(v) (log π_S(v) − log π_T(v)) per generated
    token, on the student's own samples of the held-out prompts (opd.rollout's n, length and
    T = 1; one fixed seed), student in eval mode at its OPD recurrence: the on-policy objective."""
    from retroloop.onpolicy import fixed_initial_state, score_rollouts, student_forward_kwargs
    from retroloop.rollout import TransformersEngine

    p, out = cfg.opd, {}
    s_kwargs = student_forward_kwargs(student.get_base_model(), p.recurrence)
    engine = TransformersEngine(student, tok, p.rollout.batch_size, generate_kwargs=s_kwargs)
    student.eval()
    with fixed_initial_state(student.get_base_model()):
        for step, snap in snapshots.items():
            restore(student, snap)
            batch = engine.sample(prompts, n=p.rollout.samples_per_prompt,
                                  max_new_tokens=p.rollout.max_new_tokens, seed=cfg.seed)  # fmt: skip
            pk = batch.pack(tok.pad_token_id, CPU)
            s_logp = torch.log_softmax(score_rollouts(student, pk, s_kwargs)[0], -1)
            t_logp = torch.log_softmax(score_rollouts(teacher, pk, None)[0], -1)
            out[step] = float((s_logp.exp() * (s_logp - t_logp)).sum()) / max(len(s_logp), 1)
    return out


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}


@torch.no_grad()
def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    for n, q in model.named_parameters():
        if n in state:
            q.copy_(state[n])


def vm_hwm_mib() -> float:
    """This process image's own peak RSS (VmHWM; ru_maxrss carries the parent's across exec)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))  # fmt: skip
    return int(line.split()[1]) / 1024
