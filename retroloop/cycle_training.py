"""How the cycle's phases train and resume (`retroloop.cycle`): the supervised loop, plain
next-token cross-entropy on a list of sequences, for mid-training on the domain documents and
the SFT-on-own-samples baseline; and where and under which key mid-training's and OPD's
checkpoints live (`resume_dir`, `phase_checkpoints`).

    L(θ) = −(1/|S|) Σ_{(b,t)∈S} log p_θ(x_{b,t+1} | x_{b,≤t})      (S: the batch's supervised
                                                                    positions, labels ≠ IGNORE)

AdamW (constant LR) on the trainable parameters (LoRA + recurrence adapter), the gradient's L2
norm clipped, seeded batches drawn with replacement. With `checkpoints` (`training.Checkpoints`)
the loop saves every `every` steps and at the last, and a rerun with the same key resumes from
the newest: the adapter and AdamW (`training.save_checkpoint`), the batch sampler's generator,
the process's random state (`rngstate`, so dropout and the next step draw what an uninterrupted
run would) and the losses so far (the step log is replayed from them), so a resumed loop ends
with the same bytes as one that was never killed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from retroloop import training
from retroloop.artifacts import input_ref, sha256_file
from retroloop.canonical import hash_tree
from retroloop.errors import DataError
from retroloop.rngstate import restore_rng_state, save_rng_state
from retroloop.sequences import IGNORE, pad_batch
from retroloop.steplog import StepLog
from retroloop.training import Checkpoints, make_optimizer, stop_if_not_finite

if TYPE_CHECKING:
    from retroloop.cycle import Checkpoint, CycleRun

log = logging.getLogger(__name__)

RESUME = ".resume"  # under cycle.registry: the phases' checkpoints (`resume_dir`)
# cycle.* keys outside the resume key: where the cycle runs and registers, not what it trains
# (a registry moved elsewhere resumes; `cycle.registry` names the folder, so keys never mix).
NOT_TRAINING = {"registry", "watch_dir", "slot_timeout_s", "gpu_limit", "checkpoint_every"}

SAMPLER = "sampler.safetensors"  # the batch sampler's torch.Generator state
RNG = "rng.safetensors"  # the process's random state (`rngstate`: + rng.json)


def _after_step(step: int) -> None:
    """Called after every optimizer step (and its checkpoint); tests kill the loop here."""


def sft(model, seqs: list, *, steps: int, lr: float, lr_key: str, batch_size: int, seed: int,
        pad_id: int, desc: str, steplog: StepLog | None = None, weight_decay: float = 0.0,
        max_grad_norm: float = 1.0, checkpoints: Checkpoints | None = None) -> list[float]:  # fmt: skip
    """`steps` optimizer steps of next-token CE (module docstring) on `seqs`, batches of
    `batch_size` drawn with a generator seeded by `seed`; each step's loss also goes to
    `steplog` (under `desc/`). A non-finite step stops the cycle
    (`training.stop_if_not_finite`, naming `lr_key`) before anything is registered. Returns
    every step's loss, resumed steps included."""
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
    losses = _resume(checkpoints, model, optimizer, gen, desc, steplog)
    model.train()
    for step in tqdm(range(len(losses) + 1, steps + 1), desc=desc, unit="step",
                     initial=len(losses), total=steps):  # fmt: skip
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
            lr=lr, lr_key=lr_key, checkpoint_dir=checkpoints.root if checkpoints else None,
        )  # fmt: skip
        if steplog is not None:
            steplog.log({"step": step, "loss": losses[-1]}, prefix=f"{desc}/")
        if checkpoints is not None and checkpoints.due(step):
            checkpoints.save(step, model, optimizer, {"losses": losses}, extra=_extra(gen))
        _after_step(step)
    model.eval()
    return losses


def _extra(gen: torch.Generator):
    def write(directory: Path) -> None:
        save_file({"generator": gen.get_state()}, directory / SAMPLER)
        save_rng_state(directory / RNG)

    return write


def _resume(checkpoints, model, optimizer, gen, desc: str, steplog) -> list[float]:
    """The losses of the steps a checkpoint of this run holds (none: a fresh start), with the
    weights, AdamW, the sampler and the random state restored and the step log replayed."""
    if checkpoints is None or (found := checkpoints.resume(model, optimizer)) is None:
        return []
    path, state = found
    gen.set_state(load_file(path / SAMPLER)["generator"])
    restore_rng_state(path / RNG)
    losses = [float(x) for x in state["losses"]]
    for step, loss in enumerate(losses, start=1):  # dvclive only, as OPD replays its rows
        if steplog is not None:
            steplog.log({"step": step, "loss": loss}, prefix=f"{desc}/", sink=False)
    log.info("cycle %s: resuming from %s (step %d of %d)", desc, path, len(losses), checkpoints.steps)  # fmt: skip
    return losses


# --------------------------------------------------------------------------- resume


def resume_dir(run: CycleRun) -> Path:
    """`registry/.resume/cycle-NNNN/`: the training phases' checkpoints. Outside `.work/`, which
    the next claim clears, so a rerun of a killed cycle finds them; only the one cycle holding
    the registry lock writes or reads it; cleared by `register` and, for other numbers, by the
    next claim (`load_models`)."""
    return run.registry / RESUME / f"cycle-{run.number:04d}"


def phase_checkpoints(run: CycleRun, phase: str, steps: int, student: Checkpoint, *inputs: Path):
    """`phase`'s resumable checkpoints (`training.Checkpoints`, every `cycle.checkpoint_every`
    optimizer steps and at the last), resumed only by a run with the same key: the phase, the
    cycle number, seed, dtype, the cycle section but for the keys that do not change what is
    trained (`NOT_TRAINING`), the opd and guards sections, the domain file's bytes,
    the student's starting adapter and random state, and the content of `inputs` (the base
    model; OPD: the teacher and its prompts). A changed parameter or input starts afresh."""
    cfg = run.cfg
    cycle = cfg.cycle.model_dump(exclude=NOT_TRAINING)
    key = training.run_key(
        phase, run.number, cfg.seed, cfg.dtype, cycle, cfg.opd.model_dump(), cfg.guards.model_dump(),
        run.inputs.source.content_sha256, hash_tree(student.adapter)[0],
        [sha256_file(f) for f in (student.rng, student.rng.with_suffix(".json"))],
        [input_ref(phase, path).content_sha256 for path in inputs],
    )  # fmt: skip
    return training.Checkpoints(resume_dir(run) / phase, key, cfg.cycle.checkpoint_every, steps)
