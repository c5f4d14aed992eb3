"""static: the baseline the looped model must beat — the same kept layers, run once, no loop.

Reads:  data/prepare/model (role `base_model`), data/analyze/split.json (role `split`),
        data/cache_teacher (role `teacher_cache`), data/prepare/datasets/*_train.parquet
Writes: data/static/model/    the source with only the split's prelude + block + coda layers
                              (a plain Llama / Qwen2 `save_pretrained` dir: R = 1, no adapter)
        data/static/adapter/  PEFT LoRA adapter, distilled exactly as `distill` trains the looped
                              student: same data order, steps, LoRA, loss, teacher cache
        data/static/dvclive/, run_dvclive/  distill's per-step logs (`retroloop.steplog`)
        data/static/metrics.json, manifest.json
Run:    retroloop stage static

McLeish et al. 2025's central comparison (DESIGN.md §5, "the comparison that matters"): a
looped model is worth its loops only if it beats a static model with the same kept layers
trained on the same data with the same budget. `static.enabled: false` writes the model only
(no training), so the default profile can skip the cost.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from retroloop.artifacts import Manifest, atomic_artifact, read_manifest, verify_inputs
from retroloop.canonical import canonicalize, json_sha256
from retroloop.config import Params
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.models.recurrent import drop_layers
from retroloop.runlock import exclusive
from retroloop.stages import distill
from retroloop.stages.common import (
    BASE_MODEL,
    PATHS,
    dataset_path,
    resolve_inputs,
    setup_run,
)
from retroloop.steplog import move_logs

log = logging.getLogger(__name__)


def build_static_model(
    base_model: Path,
    split: dict,
    out: Path,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
) -> None:
    """Save the source with only the split's kept layers (prelude + block + coda, in order),
    loaded (and saved) in `dtype` on `device` (the run's `dtype` / `device`)."""
    source = load_model(base_model, dtype, device)
    kept = split["prelude"] + split["block"] + split["coda"]
    model = drop_layers(source, kept)
    model.save_pretrained(out)
    load_tokenizer(base_model).save_pretrained(out)


@exclusive("out_dir")
def run(cfg: Params, *, inputs: dict | None = None, out_dir: Path = PATHS["static"]) -> Manifest:
    device = setup_run(cfg)
    paths = resolve_inputs(
        inputs,
        {
            "base_model": BASE_MODEL,
            "split": PATHS["analyze"] / "split.json",
            "teacher_cache": PATHS["cache_teacher"],
            "train_instruct": dataset_path("instruct", "train"),
            "train_domain": dataset_path("domain", "train"),
        },
    )
    refs = verify_inputs(paths)  # refuse tampered inputs before anything reads them
    split = json.loads(Path(paths["split"]).read_text())
    # Scratch beside the other checkpoints. Its `checkpoints/` survive a kill so the rerun resumes
    # (the student's hash is in distill's run key: the rebuilt model must hash the same, hence
    # `canonicalize`); the model and a finished distill's output are rebuilt.
    scratch = Path(out_dir).parent / "checkpoints" / Path(out_dir).name
    for leftover in ("model", "distill"):
        shutil.rmtree(scratch / leftover, ignore_errors=True)
    scratch.mkdir(parents=True, exist_ok=True)
    build_static_model(paths["base_model"], split, scratch / "model", cfg.dtype, device)
    canonicalize(scratch / "model")
    trained = None
    if cfg.static.enabled:
        trained = distill.run(
            cfg,
            inputs={
                "student": scratch / "model",
                "teacher_cache": paths["teacher_cache"],
                "train_instruct": paths["train_instruct"],
                "train_domain": paths["train_domain"],
            },
            out_dir=scratch / "distill",
            checkpoint_dir=scratch / "checkpoints",
            log_name="static",
        )

    with atomic_artifact(out_dir, stage="static", kind="model") as w:
        w.inputs.extend(refs.values())
        shutil.move(scratch / "model", w.dir / "model")
        w.outputs["model"] = "model"
        kept = split["prelude"] + split["block"] + split["coda"]
        w.metrics = {"kept_layers": len(kept), "layers": kept, "trained": trained is not None}
        if trained is None:  # dvc declares adapter/: leave a note instead of an adapter
            (w.dir / "adapter").mkdir()
            (w.dir / "adapter" / "NOT_TRAINED").write_text("static.enabled: false\n")
            w.outputs["adapter"] = "report"
        else:
            name = "adapter" if cfg.distill.lora.enabled else "model_trained"
            src = scratch / "distill" / ("adapter" if cfg.distill.lora.enabled else "model")
            shutil.move(src, w.dir / name)
            move_logs(scratch / "distill", w.dir)
            w.outputs[name] = "adapter" if name == "adapter" else "model"
            w.outputs["dvclive"] = "report"
            w.metrics.update(read_manifest(scratch / "distill").metrics)
        params = {**cfg.section("distill"), "static": cfg.static.model_dump()}
        manifest = w.finish(
            params=params,
            params_sha256=json_sha256(params),
            seed=cfg.seed,
            device=str(device),
        )
    shutil.rmtree(scratch, ignore_errors=True)
    return manifest
