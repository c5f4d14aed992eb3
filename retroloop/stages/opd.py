"""opd: on-policy distillation of the looped student against the original model.

Reads:  data/convert/model (role `student`), data/distill/adapter (role `parent_adapter`; if it
        does not exist a fresh LoRA from `opd.lora` is started), data/prepare/model (role
        `teacher`), data/prepare/datasets/instruct_train.parquet (prompts; its last
        `opd.heldout_prompts` rows are held out, never trained on: `opd_io.validation_split`)
Writes: data/opd/adapter/            PEFT adapter (continues the distill LoRA)
        data/opd/dvclive/            per-step metrics (dvclive; the dvc plots)
        data/opd/run_dvclive/        per-step timings and throughput (outside content_sha256)
        data/opd/rollouts.parquet    every sampled completion with sampler / teacher log-probs
        data/opd/geometry.parquet    per-module ΔW diagnostics (retroloop.geometry)
        data/opd/geometry.png
        data/opd/metrics.json, manifest.json
Run:    retroloop stage opd

The method and the step live in `retroloop.onpolicy` (Thinking Machines, "On-Policy
Distillation", 2025; Agarwal et al., GKD, arXiv:2306.13649), the loop in `retroloop.opd_loop`
(`train_opd`, which the continual-learning cycle calls with its own teacher); this module
loads and verifies the inputs and publishes the artifact.
The held-out reverse KL (on the train split's held-out tail, not on instruct_eval, which evaluate
reports on) is measured at the start (step 0) and every `opd.eval_every` steps; the
adapter published is the best evaluated step's, the starting one if no step improved on it
(`kept_step`, `improved` in the metrics). Under torchrun each rank samples its share of every
step's prompts and the gradients are summed over ranks (`onpolicy.opd_step`); rank 0 writes.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import polars as pl
import torch

from retroloop import training
from retroloop.artifacts import Manifest, atomic_artifact, read_manifest, verify_inputs
from retroloop.config import Params
from retroloop.models.loading import load_model, load_tokenizer, tokenizer_fingerprint
from retroloop.onpolicy import check_same_tokenizer
from retroloop.opd_io import load_student, validation_split
from retroloop.opd_loop import OUTPUTS, train_opd
from retroloop.rollout import make_engine
from retroloop.rollout_vllm import vllm_lora_rank
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

OPD_CHECKPOINTS = DATA / "checkpoints" / "opd"  # resumable step_N (outside the artifact)


@exclusive("out_dir", "checkpoint_dir")
def run(
    cfg: Params,
    *,
    inputs: dict | None = None,
    out_dir: Path = PATHS["opd"],
    checkpoint_dir: Path = OPD_CHECKPOINTS,
) -> Manifest:
    device = setup_run(cfg)
    env = training.init_distributed(device)  # torchrun (`launch.nproc_per_node`): one rank
    if env.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    p = cfg.opd
    defaults = {
        "student": CONVERTED_MODEL,
        "parent_adapter": DISTILL_ADAPTER,
        "teacher": teacher_dir(),  # prepare.teacher, else the source model
        "train_data": dataset_path("instruct", "train"),
    }
    paths = resolve_inputs(inputs, defaults)
    verified = verify_inputs(paths, optional=("parent_adapter",))  # tampered: refused
    tokenizer = load_tokenizer(paths["student"])
    teacher_tokenizer = load_tokenizer(paths["teacher"])
    check_same_tokenizer(tokenizer, teacher_tokenizer)
    has_parent = (paths["parent_adapter"] / "adapter_config.json").is_file()
    student = load_student(
        load_model(paths["student"], cfg.dtype, device), paths["parent_adapter"], p
    )
    teacher = load_model(paths["teacher"], cfg.dtype, device)
    prompts, heldout = validation_split(pl.read_parquet(paths["train_data"]), p)
    engine = None
    if p.rollout.backend == "vllm":  # the student's model dir; train_opd hands it each adapter
        engine = make_engine(
            p.rollout, None, None, model_dir=paths["student"],
            max_lora_rank=vllm_lora_rank(student), seed=cfg.seed,
        )  # fmt: skip
    roles = ["student", "teacher", "train_data"]
    roles += ["parent_adapter"] if has_parent else []
    section, sha = cfg.section("opd"), cfg.section_sha256("opd")
    key = training.run_key(sha, [(r, verified[r].content_sha256) for r in roles])
    checkpoints = training.Checkpoints(checkpoint_dir, key, p.checkpoint_every, p.steps)
    train = functools.partial(
        train_opd, student, teacher, tokenizer, prompts, p, seed=cfg.seed,
        teacher_tokenizer=teacher_tokenizer, heldout_prompts=heldout, engine=engine,
        logging_params=cfg.logging, checkpoints=checkpoints, guards=cfg.guards, dist_env=env,
    )  # fmt: skip
    if not env.is_main:  # rank 0 writes the artifact; this rank trains its share, then reads it
        with tempfile.TemporaryDirectory(prefix=f"opd-rank{env.rank}-") as scratch:
            train(out_dir_tmp=Path(scratch))
        training.barrier(env)
        training.shutdown(env)
        return read_manifest(out_dir)
    with atomic_artifact(out_dir, stage="opd", kind="adapter") as w:
        for role in roles:
            w.add_input(role, paths[role])
        metrics = train(out_dir_tmp=w.dir)
        w.outputs.update(OUTPUTS)
        w.metrics = {**metrics, **tokenizer_fingerprint(tokenizer), "world_size": env.world_size}
        manifest = w.finish(params=section, params_sha256=sha, seed=cfg.seed, device=str(device))
    checkpoints.complete({"artifact": str(out_dir), "content_sha256": manifest.content_sha256})
    training.barrier(env)
    training.shutdown(env)
    return manifest
