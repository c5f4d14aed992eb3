"""Small helpers shared by the training stages (distill, opd, the cycle's phases): distributed
setup, the optimizer over trainable parameters only, gradient all-reduce, the stop on a
non-finite step, and pickle-free resumable checkpoints.

Checkpoint layout (one directory per step, written to a temporary name and renamed):
    step_N/adapter/                PEFT `save_pretrained` (LoRA runs): adapter weights only
    step_N/trainable.safetensors   every trainable tensor (full fine-tuning runs)
    step_N/optimizer.safetensors   optimizer state tensors, keys "<param index>.<name>"
    step_N/optimizer.json          optimizer param groups (hyper-parameters)
    step_N/trainer_state.json      step, data position, run key, the metric rows so far, ...
    step_N/...                     whatever else a loop keeps (`extra`: OPD's rollouts, RNG state)
No pickle anywhere (DESIGN.md §3). `Checkpoints` is the resume protocol every loop follows:
find the newest checkpoint of the same run, save every `checkpoint_every` steps and at the last,
clear the step folders once the artifact is published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from retroloop.artifacts import now_iso, write_json_atomic
from retroloop.canonical import json_sha256
from retroloop.errors import DivergedError

log = logging.getLogger(__name__)

STATE_JSON = "trainer_state.json"


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a `torchrun` launch (world_size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group when launched by torchrun (`WORLD_SIZE` > 1): gloo on CPU,
    nccl on CUDA. Returns a single-process `DistEnv` otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    env = DistEnv(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns
    )
    log.info("distributed: rank %d of %d (%s)", env.rank, env.world_size, dist.get_backend())
    return env


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensors: list[torch.Tensor], env: DistEnv) -> None:
    """In-place sum over ranks (one flat buffer, one collective)."""
    if env.world_size <= 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast_from_main_(tensors: list[torch.Tensor], env: DistEnv) -> None:
    """Make every rank start from rank 0's values (random LoRA A init, resumed weights)."""
    if env.world_size <= 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def all_reduce_grads_(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Sum gradients over ranks. The caller scales each micro-batch loss by its share of the
    global batch's tokens, so the sum is the gradient of the global token mean."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum_([p.grad for p in params], env)


# --------------------------------------------------------------------------- parameters / optimizer


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen base weights get no optimizer state)."""
    params = [p for _, p in trainable_parameters(model)]
    assert params, "no trainable parameters"
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_factor(step: int, steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based) of `steps`:
    linear warm-up (step + 1) / w for the first w = `warmup_steps` steps, then 1 (`constant`) or
    ½·(1 + cos(π·(step − w) / (steps − w))) (`cosine`: from 1 down towards 0, never 0 at a step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(steps - warmup_steps, 1)))


def stop_if_not_finite(
    stage: str,
    step: int,
    *,
    loss: float,
    grad_norm: float,
    params: Iterable[torch.Tensor],
    lr: float,
    lr_key: str,
    checkpoint_dir: Path | None = None,
) -> None:
    """Raise `DivergedError` (one line: stage, step, what, the likely cause) if this step's
    loss, its gradient norm (before clipping) or any trainable weight after the update is not
    finite. Called once per optimizer step, after the update and before anything of the step
    is logged or checkpointed: the raise leaves the atomic artifact unpublished and the last
    checkpoint (of a step that passed) in place. Under torchrun every rank sees the same
    all-reduced loss and gradients, so every rank stops at the same step."""
    bad = [name for name, value in (("loss", loss), ("gradient norm", grad_norm)) if not math.isfinite(value)]  # fmt: skip
    params = [p.detach() for p in params]
    if params and not bool(torch.stack([p.isfinite().all() for p in params]).all()):
        bad.append("trainable weights after the update")
    if not bad:
        return
    kept = ""
    if checkpoint_dir is not None and (steps := list(Path(checkpoint_dir).glob("step_*"))):
        last = max(steps, key=lambda p: int(p.name.removeprefix("step_")))
        kept = f"; the last good checkpoint {last} is kept"
    raise DivergedError(
        f"{stage}: step {step}: non-finite {', '.join(bad)} (loss {loss:g}, gradient norm "
        f"{grad_norm:g}); nothing was published{kept}; likely cause: the learning rate "
        f"{lr_key}={lr:g} is too high (lower it), or a degenerate batch in the training data"
    )


def seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from `parts` (e.g. seed, "data", epoch): independent streams that
    depend only on position, so a resumed run draws exactly what an uninterrupted one would."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------- checkpoints


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `root/step_<step>` atomically and delete older step directories. `extra(dir)`
    writes a loop's own files into the step directory before it is renamed into place."""
    root = Path(root)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if _is_peft(model):
        model.save_pretrained(tmp / "adapter")
    else:
        save_file(
            {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model)},
            tmp / "trainable.safetensors",
        )
    opt = optimizer.state_dict()
    tensors = {
        f"{idx}.{name}": value.detach().contiguous().cpu()
        for idx, entry in opt["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    save_file(tensors, tmp / "optimizer.safetensors")
    write_json_atomic(tmp / "optimizer.json", opt["param_groups"])
    write_json_atomic(tmp / STATE_JSON, {"step": step, **state})
    if extra is not None:
        extra(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in root.glob("step_*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path, run_key: str) -> Path | None:
    """The newest complete `step_N` under `root` written by a run with the same `run_key`."""
    best: tuple[int, Path] | None = None
    for path in Path(root).glob("step_*"):
        state_path = path / STATE_JSON
        if not state_path.is_file():
            continue
        state = json.loads(state_path.read_text())
        if state.get("run_key") != run_key:
            log.info("ignoring checkpoint %s: written with other inputs or parameters", path)
            continue
        if best is None or state["step"] > best[0]:
            best = (state["step"], path)
    return None if best is None else best[1]


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore trainable weights and optimizer state in place; return the trainer state."""
    path = Path(path)
    device = next(p.device for _, p in trainable_parameters(model))
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(
            model, load_file(path / "adapter" / "adapter_model.safetensors")
        )
        assert not result.unexpected_keys, result.unexpected_keys
    else:
        weights = load_file(path / "trainable.safetensors")
        missing = {n for n, _ in trainable_parameters(model)} - weights.keys()
        assert not missing, f"checkpoint {path} lacks {sorted(missing)[:3]}"
        model.load_state_dict(weights, strict=False)
    tensors = load_file(path / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value if name == "step" else value.to(device)
    groups = json.loads((path / "optimizer.json").read_text())
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return json.loads((path / STATE_JSON).read_text())


def run_key(*parts: Any) -> str:
    """The identity of a training run (its parameters, its inputs' content hashes): a
    checkpoint is resumed only by a run with the same key."""
    return json_sha256(list(parts))


@dataclass(frozen=True)
class Checkpoints:
    """The resume protocol of a training loop (distill, static, OPD): `root/step_N` every
    `every` optimizer steps and at the last, resumed only by a run with the same `key`, cleared
    once the run's artifact is published (the folder stays, with a note of the run). `None` as
    `root` turns checkpointing off (the cycle's in-memory phases)."""

    root: Path | None
    key: str
    every: int
    steps: int

    def resume(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[Path, dict[str, Any]] | None:
        """(checkpoint, trainer state) with weights and optimizer restored, or None."""
        if self.root is None or (path := latest_checkpoint(self.root, self.key)) is None:
            return None
        return path, load_checkpoint(path, model, optimizer)

    def due(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) ends with a checkpoint."""
        return self.root is not None and (step % self.every == 0 or step == self.steps)

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        extra: Callable[[Path], None] | None = None,
    ) -> Path:
        assert self.root is not None
        return save_checkpoint(
            self.root, step, model, optimizer, {"run_key": self.key, **state}, extra
        )

    def complete(self, note: dict[str, Any]) -> None:
        """Nothing is left to resume: drop the step folders, keep `last_run.json`."""
        if self.root is None:
            return
        for old in Path(self.root).glob("step_*"):
            shutil.rmtree(old, ignore_errors=True)
        note = {"run_key": self.key, "steps": self.steps, **note, "completed_at": now_iso()}
        write_json_atomic(Path(self.root) / "last_run.json", note)
