"""evaluate: what the conversion lost and what distillation and OPD won back.

Reads:  the teacher (`common.teacher_dir()`: data/prepare/teacher when `prepare.teacher` is
        set, else the source model data/prepare/model), data/convert/model (the looped model),
        data/distill/adapter, data/opd/adapter (PEFT adapters on the converted model),
        data/prepare/datasets/{instruct,domain}_eval.parquet (held-out prompts and documents),
        `evaluate.ifeval_path` / `evaluate.gsm8k_path` when set (real IFEval / GSM8K files).
Writes: data/evaluate/metrics.json            {"models": {name: {...}}, "recovery": {...},
                                               "recurrence_scaling": {name: {"R<k>": {...}}},
                                               "teacher": {path, content_sha256, source} only
                                               when it is not the converted model's source}
        data/evaluate/report.md               tables: metrics, deltas vs teacher, recovery
        data/evaluate/models.png              one panel per metric, one bar per model
        data/evaluate/recurrence_scaling.png  held-out NLL and KL vs R (converted, distilled, opd)
        data/evaluate/recurrence_scaling.csv  long: model, R, domain_nll, domain_forward_kl, …
        data/evaluate/recurrence_{nll,kl}.csv wide: R, one column per model (`dvc plots show`)
        data/evaluate/manifest.json
Run:    retroloop stage evaluate

Four models, the same prompts and decoding for each: teacher, converted (R = the model's
default), distilled (converted + distill adapter) and opd (converted + OPD adapter), plus the
static baseline (data/static: the same kept layers, R = 1, no loop, distilled with the same
budget) when `static.enabled` and it was trained. Every model reports `gflops_per_token` and
`domain_forward_kl`, the exact full-vocabulary KL(teacher ‖ model) teacher-forced on the
held-out domain documents; the looped models also at every R of `evaluate.recurrence_scaling`. IFEval
is greedy; KL to the teacher uses seeded temperature-1 samples of each model. Adapters are
merged into a fresh copy of the converted model before evaluation (same outputs, faster).

`evaluate_models` / `write_evaluation` take an explicit {name: ModelSpec} so tests and the
continual-learning cycle can evaluate any set of models against any reference model.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import torch

from retroloop.artifacts import Manifest, atomic_artifact, verify_inputs
from retroloop.config import Params
from retroloop.errors import ArtifactError
from retroloop.eval.generation import encode_chat_prompts
from retroloop.eval.models import (
    ModelSpec,
    check_tokenizer,
    chosen_teacher,
    default_recurrence,
    load_spec,
    spec_identity,
)
from retroloop.eval.report import recovery_table, write_report
from retroloop.eval.scaling import HeldOut, flops_per_token, held_out
from retroloop.eval.suite import (
    EvalData,
    build_eval_data,
    evaluate_model,
    recurrence_scaling,
    teacher_forced_rows,
)
from retroloop.guards import check_cached_generate
from retroloop.models.loading import load_tokenizer, tokenizer_fingerprint
from retroloop.runlock import exclusive
from retroloop.sequences import pad_id
from retroloop.stages.common import (
    CONVERTED_MODEL,
    DATA,
    DISTILL_ADAPTER,
    OPD_ADAPTER,
    PATHS,
    dataset_path,
    resolve_inputs,
    setup_run,
    teacher_dir,
)

log = logging.getLogger(__name__)

# Generated responses, keyed by model/adapter hash + prompts + decoding. Not an artifact.
EVAL_CACHE = DATA / "cache" / "evaluate"
# The stage that produces each input role (for "run this first" errors).
PRODUCER = {
    "teacher": "prepare",
    "converted": "convert",
    "distill_adapter": "distill",
    "opd_adapter": "opd",
    "instruct_eval": "prepare",
    "domain_eval": "prepare",
}


@exclusive("out_dir")
def run(cfg: Params, *, inputs: dict | None = None, out_dir: Path = PATHS["evaluate"]) -> Manifest:
    paths = resolve_inputs(
        inputs,
        {
            "teacher": teacher_dir(),
            "converted": CONVERTED_MODEL,
            "distill_adapter": DISTILL_ADAPTER,
            "opd_adapter": OPD_ADAPTER,
            "instruct_eval": dataset_path("instruct", "eval"),
            "domain_eval": dataset_path("domain", "eval"),
        },
    )
    for role, path in paths.items():
        if not Path(path).exists():
            stage = PRODUCER.get(role)
            hint = f"run `retroloop stage {stage}` first" if stage else "pass an existing path"
            raise ArtifactError(f"{path}: evaluate input '{role}' does not exist; {hint}")
    # The static baseline (stage `static`): the same kept layers, R = 1, no loop, same budget.
    static_dir = Path((inputs or {}).get("static", PATHS["static"]))
    static = cfg.static.enabled and (static_dir / "adapter" / "adapter_config.json").is_file()
    if static:
        paths["static_model"] = static_dir / "model"
        paths["static_adapter"] = static_dir / "adapter"
    verify_inputs(paths)  # before anything is read: a tampered input is refused, not consumed
    specs = {
        "teacher": ModelSpec(paths["teacher"], model_role="teacher"),
        "converted": ModelSpec(paths["converted"], model_role="converted"),
        "distilled": ModelSpec(
            paths["converted"],
            paths["distill_adapter"],
            model_role="converted",
            adapter_role="distill_adapter",
        ),
        "opd": ModelSpec(
            paths["converted"],
            paths["opd_adapter"],
            model_role="converted",
            adapter_role="opd_adapter",
        ),
    }
    if static:
        specs["static"] = ModelSpec(
            paths["static_model"],
            paths["static_adapter"],
            model_role="static_model",
            adapter_role="static_adapter",
        )
    return write_evaluation(
        cfg,
        specs,
        instruct_eval=paths["instruct_eval"],
        domain_eval=paths["domain_eval"],
        out_dir=out_dir,
        scaling=("converted", "distilled", "opd"),
        teacher_identity=chosen_teacher(paths["teacher"], paths["converted"]),
    )


# --------------------------------------------------------------------------- lower level


def evaluate_models(
    cfg: Params,
    specs: Mapping[str, ModelSpec],
    *,
    data: EvalData,
    teacher: str = "teacher",
    scaling: Sequence[str] = (),
    cache_dir: Path | None = EVAL_CACHE,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Evaluate every spec against `specs[teacher]` (the reference for KL, kept in memory
    throughout; the others are loaded one at a time). Returns
    {"models": {name: metrics}, "recurrence_scaling": {name: {"R<k>": {...}}}}."""
    if teacher not in specs:
        raise ArtifactError(
            f"reference model '{teacher}' is not among the models to evaluate: {list(specs)}"
        )
    teacher_spec = specs[teacher]
    teacher_model = load_spec(teacher_spec, cfg.dtype, device)
    tokenizer = load_tokenizer(teacher_spec.model_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    models: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, dict[str, Any]]] = {}
    # The reference's log-probs on the held-out domain documents, once: every model's exact
    # full-vocabulary KL(reference ‖ model) there (and at every R of the scaling curves).
    reference = _reference(teacher_model, tokenizer, data, cfg.evaluate.batch_size)
    guard_prompts = (data.kl_prompts or [item.prompt for item in data.ifeval])[: cfg.guards.prompts]
    guard_ids = encode_chat_prompts(tokenizer, guard_prompts) if guard_prompts else []
    for name, spec in specs.items():
        check_tokenizer(name, spec, fingerprint, teacher_spec)
        model = teacher_model if name == teacher else load_spec(spec, cfg.dtype, device)
        R = spec.recurrence or default_recurrence(model)
        forward_kwargs = {"num_recurrence": R} if R is not None else {}
        # Before this model generates anything: cached decoding must match cache-free decoding.
        guard = check_cached_generate(
            model, guard_ids, what=f"'{name}'", pad_id=pad_id(tokenizer),
            forward_kwargs=forward_kwargs, max_new_tokens=cfg.guards.new_tokens,
        )  # fmt: skip
        # A looped model's held-out figures at its default R and every R of the scaling curve,
        # from one unrolled pass per batch (the block runs max(R) times, not sum(R)).
        tf = {}
        if name in scaling and R is not None:
            Rs = {*cfg.evaluate.recurrence_scaling, R}
            tf = teacher_forced_rows(model, tokenizer, data, Rs, cfg.evaluate.batch_size, reference)
        metrics = evaluate_model(
            name,
            model,
            tokenizer,
            teacher=teacher_model,
            data=data,
            params=cfg.evaluate,
            cache_dir=cache_dir,
            forward_kwargs=forward_kwargs,
            identity=spec_identity(spec),
            seed=cfg.seed,
            reference=reference,  # domain NLL and KL(reference ‖ model) from one forward
            teacher_forced=tf.get(R),
        )
        domain_kl = metrics.pop("domain_forward_kl", None)  # re-placed: metrics.json's key order
        if R is not None:
            metrics["recurrence"] = R
        if reference is not None:
            metrics["domain_forward_kl"] = domain_kl
        metrics["gflops_per_token"] = flops_per_token(model, R) / 1e9  # linear layers + head
        metrics["guard_cached_generate_max_abs_logp_diff"] = guard["max_abs_logp_diff"]
        models[name] = metrics
        if name in scaling:
            if R is None:
                log.warning("%s is not a looped model; no recurrence scaling", name)
            else:  # every row measured above (the default R's is `metrics`)
                curves[name] = _scaling_curve(model, tokenizer, data, cfg, reference, tf)
        if model is not teacher_model:
            del model
            gc.collect()
    return {"models": models, "recurrence_scaling": curves}


def _reference(teacher_model, tokenizer, data: EvalData, batch_size: int) -> HeldOut | None:
    """The reference's log-probs on the held-out domain documents (None without documents)."""
    if not data.domain_texts:
        return None
    return held_out(
        teacher_model,
        tokenizer,
        data.domain_texts,
        max_seq_len=data.max_seq_len,
        batch_size=batch_size,
    )


def _scaling_curve(
    model, tokenizer, data: EvalData, cfg: Params, reference, known: dict | None = None
) -> dict[str, Any]:
    """{"R<k>": metrics} at every R of `evaluate.recurrence_scaling`; `known`: rows by R
    already measured (`recurrence_scaling`)."""
    rows = recurrence_scaling(
        model,
        tokenizer,
        data,
        cfg.evaluate.recurrence_scaling,
        batch_size=cfg.evaluate.batch_size,
        reference=reference,
        known=known,
    )
    return {f"R{row['R']}": {k: v for k, v in row.items() if k != "R"} for row in rows}


def load_eval_data(
    cfg: Params, tokenizer, *, instruct_eval: Path, domain_eval: Path
) -> tuple[EvalData, dict[str, Path]]:
    """The held-out frames plus the real IFEval / GSM8K files when `evaluate.*_path` is set.
    Returns the data and the extra input files by role (for the manifest)."""
    e = cfg.evaluate
    extra: dict[str, Path] = {}
    ifeval_frame = gsm8k_frame = None
    if e.ifeval_path:
        from retroloop.eval.ifeval import load_ifeval

        extra["ifeval"] = Path(e.ifeval_path)
        ifeval_frame = load_ifeval(e.ifeval_path)
    if e.gsm8k_path:
        from retroloop.eval.gsm8k import load_gsm8k

        extra["gsm8k"] = Path(e.gsm8k_path)
        gsm8k_frame = load_gsm8k(e.gsm8k_path)
    data = build_eval_data(
        e,
        tokenizer,
        instruct_eval=pl.read_parquet(instruct_eval),
        domain_eval=pl.read_parquet(domain_eval),
        max_seq_len=cfg.prepare.max_seq_len,
        ifeval_frame=ifeval_frame,
        gsm8k_frame=gsm8k_frame,
    )
    return data, extra


def write_evaluation(
    cfg: Params,
    specs: Mapping[str, ModelSpec],
    *,
    instruct_eval: Path,
    domain_eval: Path,
    out_dir: Path,
    teacher: str = "teacher",
    converted: str = "converted",
    scaling: Sequence[str] = (),
    stage: str = "evaluate",
    cache_dir: Path | None = EVAL_CACHE,
    teacher_identity: dict[str, Any] | None = None,
) -> Manifest:
    """Evaluate `specs`, then write metrics.json, the report and the manifest to `out_dir`.

    Recovery fractions are computed when both `teacher` and `converted` are among the specs.
    `teacher_identity` (`chosen_teacher`): recorded as metrics["teacher"] and named in the report.
    """
    device = setup_run(cfg)
    data, extra = load_eval_data(
        cfg,
        load_tokenizer(specs[teacher].model_dir),
        instruct_eval=instruct_eval,
        domain_eval=domain_eval,
    )
    result = evaluate_models(
        cfg, specs, data=data, teacher=teacher, scaling=scaling, cache_dir=cache_dir, device=device
    )
    recovery = (
        recovery_table(result["models"], teacher=teacher, converted=converted)
        if converted in specs
        else {}
    )

    with atomic_artifact(out_dir, stage=stage, kind="report") as w:
        seen: set[str] = set()
        for name, spec in specs.items():
            for role, path in (
                (spec.model_role or name, spec.model_dir),
                (spec.adapter_role or f"{name}_adapter", spec.adapter_dir),
            ):
                if path is not None and role not in seen:
                    seen.add(role)
                    w.add_input(role, path)
        w.add_input("instruct_eval", instruct_eval)
        w.add_input("domain_eval", domain_eval)
        for role, path in extra.items():
            w.add_input(role, path)
        w.metrics = {
            "models": result["models"],
            "recovery": recovery,
            "recurrence_scaling": result["recurrence_scaling"],
        }
        if teacher_identity is not None:
            w.metrics["teacher"] = teacher_identity
        for path in write_report(w.metrics, w.dir):
            w.outputs[path.name] = "report"
        w.outputs["metrics.json"] = "report"
        return w.finish(
            params=cfg.section("evaluate"),
            params_sha256=cfg.section_sha256("evaluate"),
            seed=cfg.seed,
            device=str(device),
        )
