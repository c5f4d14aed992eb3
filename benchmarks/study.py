"""The study (issue 13): does the retrofitted looped model earn its loops, and which settings?

    python -m benchmarks.study                    # reduced: 8 distill steps, 4 held-out docs, 6 variants
    python -m benchmarks.study --full             # 40 distill steps, 16 held-out docs (~90+ min)
    python -m benchmarks.study --workdir DIR      # default data/study (never touches data/<stage>/)
    python -m benchmarks.study --sweep recovery --workdir data/study-recovery   # issue 24's axes
    python -m benchmarks.study --sweep recovery --steps 16 --docs 8   # at the default run's budget

On the default model (SmolLM2-135M-Instruct, `profiles/study.yaml`), every variant gets the
same training budget (distill steps, batch, LoRA, data order, teacher cache) and changes one
thing against the `base` row (McLeish et al. 2025's comparisons; DESIGN.md §5):

- init: pass-input `[0 | I]` (base) vs repeat-block `[I | 0]`, s_0 = e;
- the contiguous split chosen by all-token (base) vs last-token angular distance;
- distillation α = 0.5, T = 2 (base: the defaults, from the reduced study) vs α = 0.1, T = 1;
- 16 of 30 layers kept (P4-B8-C4, base) vs 24 of 30 (P6-B12-C6);
- looped vs static: the same kept layers run once (R = 1, no loop), distilled the same way.

Every model is scored teacher-forced on the same held-out pydoc documents: NLL and the exact
full-vocabulary KL(teacher ‖ model) at R ∈ {1, 2, 4, 8}, with forward FLOPs per token
(`retroloop.eval.scaling`). "recovered" = 1 − KL(distilled, best R) / KL(converted, R = 1): the
share of the conversion's KL gap to the teacher that distillation closed.

Writes DIR/results.json, DIR/study.md (the table) and DIR/study.png (NLL vs R per variant).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import polars as pl
import torch

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "study.yaml"
RS = (1, 2, 4, 8)
# name -> dotted overrides of profiles/study.yaml (the base row has none); "static" = base split, no loop.
KEEP24 = {"analyze.split.prelude_layers": 6, "analyze.split.block_layers": 12,
          "analyze.split.coda_layers": 6}  # fmt: skip
VARIANTS: dict[str, dict] = {  # in order of importance: a run cut short still has the key rows
    "base": {},
    "static": {},
    "repeat_block": {"convert.init": "repeat_block"},
    "keep24": KEEP24,
    "keep24_static": KEEP24,
    "alpha0.1_T1": {"distill.alpha": 0.1, "distill.temperature": 1.0},
    "last_token": {"analyze.split.variant": "last_token"},
    "keep24_repeat_block": {**KEEP24, "convert.init": "repeat_block"},
}
# The recovery sweep (issue 24): what recovers the most of the conversion's KL gap at the same
# budget. Every row changes one thing against `base`; `plain` is the baseline a user of TRL's
# GKDTrainer gets (R = 2 every step with full backprop, pure KL at T = 1).
RECOVERY: dict[str, dict] = {
    "base": {},
    "plain": {"distill.recurrence": 2, "convert.schedule.bptt_k": 8, "distill.alpha": 0.0,
              "distill.temperature": 1.0},
    "fixed_R2": {"distill.recurrence": 2},
    "fixed_R2_full_bptt": {"distill.recurrence": 2, "convert.schedule.bptt_k": 8},
    "curriculum_mean2": {"convert.schedule.mean_start": 1.0, "convert.schedule.mean_end": 2.0},
    "pure_kl": {"distill.alpha": 0.0},
    "T1": {"distill.temperature": 1.0},
    "lr5e-4": {"distill.lr": 5e-4},
    "lr1e-3": {"distill.lr": 1e-3},
    "lr2e-3": {"distill.lr": 2e-3},
    "adapter_lr10x": {"distill.adapter_lr": 2e-3},
    "r64": {"distill.lora.r": 64},
    "r256": {"distill.lora.r": 256},
    "cosine_warmup": {"distill.lr_schedule": "cosine", "distill.warmup_steps": 2},
    "batch8": {"distill.batch_size": 8},
    "static": {},
    # 2026-12-01's default-model run: lr 1e-3 helps the LoRA (KL at R=1 2.61 -> 2.07) but the
    # full-rank recurrence adapter at that LR makes R > 1 worse; these keep the adapter at 2e-4.
    "lr1e-3_adapter2e-4": {"distill.lr": 1e-3, "distill.adapter_lr": 2e-4},
    "fixed_R2_lr1e-3_adapter2e-4": {"distill.recurrence": 2, "distill.lr": 1e-3,
                                    "distill.adapter_lr": 2e-4},
}  # fmt: skip
SWEEPS = {"design": VARIANTS, "recovery": RECOVERY}
# reduced: what fits ~40 min of a shared 2-core CPU; full: the issue's ~90 min study (idle CPU).
SIZES = {
    "reduced": {"distill.steps": 8, "docs": 4, "skip": ("keep24_repeat_block", "keep24_static"),
                "prepare": {"prepare.teacher_responses.max_new_tokens": 24}},
    "full": {"distill.steps": 40, "docs": 16, "skip": (), "prepare": {}},
}  # fmt: skip

log = logging.getLogger("study")


def main(
    workdir: Path,
    size: str,
    only: list[str] | None = None,
    profile: Path = PROFILE,
    variants: dict[str, dict] = VARIANTS,
    steps: int | None = None,
    docs: int | None = None,
) -> dict:
    from retroloop.config import load_params
    from retroloop.stages import distill

    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the stages' default paths (data/...) now live under the study dir
    steps = steps or SIZES[size]["distill.steps"]
    docs = docs or SIZES[size]["docs"]
    common = {"distill.steps": steps, **SIZES[size]["prepare"]}
    cfg0 = upstream(profile, common)
    data, teacher = held_out_set(cfg0, docs)
    results_path = Path("results.json")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("teacher", {"rows": teacher})

    for name, overrides in variants.items():
        if (only and name not in only) or name in results or name in SIZES[size]["skip"]:
            continue
        t1 = time.perf_counter()
        cfg = load_params(profile, {**common, **overrides})
        vdir = Path("variants") / name
        if vdir.exists():
            shutil.rmtree(vdir)
        student, split = build_student(cfg, vdir, static=name.endswith("static"))
        cache = teacher_cache_for(cfg, cfg0, profile, common)
        m = distill.run(cfg, inputs={"student": student, "teacher_cache": cache},
                        out_dir=vdir / "distill", checkpoint_dir=vdir / "checkpoints")  # fmt: skip
        rec: dict = {"split": split, "overrides": overrides, "distill": m.metrics}
        rec["converted"] = score(student, None, data, RS)
        rec["distilled"] = score(student, vdir / "distill" / "adapter", data, RS)
        rec["seconds"] = time.perf_counter() - t1
        results[name] = rec
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        log.info("%s done in %.0f s: %s", name, rec["seconds"], rec["distilled"])
        shutil.rmtree(vdir / "checkpoints", ignore_errors=True)
    write_table(results, steps, docs)
    return results


# The pieces `main` and `benchmarks.recovery_curve` share: the upstream stages, the held-out
# set, a variant's student (converted or static) and the scoring of a student (+ adapter).


def upstream(profile: Path, common: dict):
    """prepare, analyze and cache_teacher under ./data (skipped where a manifest is present,
    e.g. copied from a finished pipeline's data/) → the profile's Params with `common`."""
    from retroloop.config import load_params
    from retroloop.stages import analyze, cache_teacher, prepare

    cfg0 = load_params(profile, common)
    t0 = time.perf_counter()
    for stage, done in (
        (prepare, "data/prepare"),
        (analyze, "data/analyze"),
        (cache_teacher, "data/cache_teacher"),
    ):
        if not Path(done, "manifest.json").is_file():
            stage.run(cfg0)
    log.info("upstream ready after %.0f s", time.perf_counter() - t0)
    return cfg0


def held_out_set(cfg0, docs: int, eval_docs: Path | None = None):
    """The teacher over the first `docs` held-out domain documents (prepare's, or the Parquet
    file `eval_docs`) → (eval.scaling.HeldOut, the teacher's scaling row: NLL, KL ≈ 0, FLOPs)."""
    from retroloop.eval.scaling import held_out, scaling_rows
    from retroloop.models.loading import load_model, load_tokenizer

    teacher = load_model("data/prepare/model")
    tokenizer = load_tokenizer("data/prepare/model")
    eval_docs = eval_docs or Path("data/prepare/datasets/domain_eval.parquet")
    texts = pl.read_parquet(eval_docs)["text"].head(docs)
    data = held_out(
        teacher, tokenizer, texts.to_list(), max_seq_len=cfg0.prepare.max_seq_len, batch_size=4
    )
    return data, scaling_rows(teacher, data, None)


def build_student(cfg, vdir: Path, *, static: bool) -> tuple[Path, dict]:
    """The variant's split (analyze's table, `cfg.analyze.split`) and its untrained student:
    convert's looped model (kept if vdir/convert already holds one) or the static model."""
    from retroloop.analysis import choose_split
    from retroloop.stages import convert
    from retroloop.stages.static import build_static_model

    table = pl.read_parquet("data/analyze/layer_scores.parquet")
    N = json.loads(Path("data/analyze/split.json").read_text())["num_layers"]
    vdir.mkdir(parents=True, exist_ok=True)
    split = choose_split(cfg.analyze.split, N, table)
    (vdir / "split.json").write_text(json.dumps({**split.as_dict(), "num_layers": N}) + "\n")
    if static:
        student = vdir / "static_model"
        if not (student / "config.json").is_file():
            build_static_model(Path("data/prepare/model"), split.as_dict(), student)
        return student, split.as_dict()
    if not (vdir / "convert" / "manifest.json").is_file():
        convert.run(cfg, inputs={"split": vdir / "split.json"}, out_dir=vdir / "convert")
    return vdir / "convert" / "model", split.as_dict()


def teacher_cache_for(cfg, cfg0, profile: Path, common: dict) -> Path:
    """data/cache_teacher, or a cache at the variant's temperature (built once)."""
    from retroloop.config import load_params
    from retroloop.stages import cache_teacher

    if cfg.distill.temperature == cfg0.cache_teacher.temperature:
        return Path("data/cache_teacher")
    cache = Path(f"data/cache_teacher_T{cfg.distill.temperature:g}")
    if not (cache / "manifest.json").is_file():
        t_cfg = load_params(
            profile, {**common, "cache_teacher.temperature": cfg.distill.temperature}
        )
        cache_teacher.run(t_cfg, out_dir=cache)
    return cache


def score(student: Path, adapter: Path | None, data, Rs) -> list[dict]:
    """`eval.scaling.scaling_rows` of the student (+ the PEFT adapter, merged): held-out NLL,
    exact KL(teacher ‖ model) and forward FLOPs/token per R (one R = None row if not looped)."""
    from peft import PeftModel

    from retroloop.eval.scaling import scaling_rows
    from retroloop.models.loading import load_model

    model = load_model(student)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, trust_remote_code=False)
        model = model.merge_and_unload().eval()
    return scaling_rows(model, data, Rs)


def recovered(converted: list[dict], rows: list[dict]) -> tuple[int | None, float]:
    """(best R by held-out NLL, 1 − KL(rows at best R) / KL(converted at R = 1)): the share of
    the conversion's KL gap to the teacher that training closed (README "The study")."""
    by_r = {row["R"]: row for row in rows}
    best_r = min(by_r, key=lambda r: by_r[r]["nll"])
    return best_r, 1 - by_r[best_r]["kl"] / converted[0]["kl"]


def summary(results: dict) -> list[dict]:
    """One row per variant: split, KL of converted (R=1) and distilled (per R), recovered share."""
    rows = []
    for name, rec in results.items():
        if name == "teacher":
            continue
        by_r = {row["R"]: row for row in rec["distilled"]}
        conv1 = rec["converted"][0]
        best_r, share = recovered(rec["converted"], rec["distilled"])
        s = rec["split"]
        rows.append({
            "variant": name,
            "block": f"{s['block'][0]}-{s['block'][-1]}",
            "kept": len(s["prelude"]) + len(s["block"]) + len(s["coda"]),
            "distill KL start→end": f"{rec['distill']['kl_start']:.2f}→{rec['distill']['kl_end']:.2f}",
            "KL conv R=1": conv1["kl"],
            **{f"NLL R={r}": by_r[r]["nll"] for r in RS if r in by_r},
            **({"NLL (static)": by_r[None]["nll"]} if None in by_r else {}),
            **{f"KL R={r}": by_r[r]["kl"] for r in (1, 4) if r in by_r},
            "best R": best_r or 1,
            "recovered": share,
            "GFLOP/tok at best R": by_r[best_r]["flops_per_token"] / 1e9,
            "minutes": rec["seconds"] / 60,
        })  # fmt: skip
    return rows


def write_table(results: dict, steps: int, docs: int) -> None:
    rows = summary(results)
    teacher = results["teacher"]["rows"][0]
    cols = sorted(
        {k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99
    )
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"teacher: NLL {teacher['nll']:.3f}, {teacher['flops_per_token'] / 1e9:.3f} GFLOP/token; "
             f"{steps} distill steps per variant, {docs} held-out docs\n",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]  # fmt: skip
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    Path("study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(results, teacher["nll"])


def _plot(results: dict, teacher_nll: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rec in results.items():
        if name == "teacher":
            continue
        rows = rec["distilled"]
        if rows[0]["R"] is None:
            grey = "dimgrey" if name.startswith("keep24") else "darkgrey"
            ax.axhline(rows[0]["nll"], ls="--", color=grey, label=f"{name} (R=1, no loop)")
        else:
            ax.plot([r["R"] for r in rows], [r["nll"] for r in rows], marker="o", label=name)
    ax.axhline(teacher_nll, ls=":", color="black", label="teacher")
    ax.set(xscale="log", xticks=list(RS), xticklabels=[str(r) for r in RS], xlabel="recurrence R",
           ylabel="held-out NLL (nats/token)", title="distilled looped models vs R (equal budget)")  # fmt: skip
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # only R's own ticks
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("study.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "data" / "study")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--only", nargs="*")
    parser.add_argument(
        "--sweep", choices=sorted(SWEEPS), default="design",
        help="design: init/split/alpha-T/kept layers (issue 13); recovery: R schedule, objective, "
        "LR, adapter LR, LoRA rank, LR schedule, batch (issue 24); each in its own --workdir",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, help="distill steps per variant (default: per size)")
    parser.add_argument("--docs", type=int, help="held-out documents scored (default: per size)")
    parser.add_argument(
        "--profile", type=Path, default=PROFILE, help="e.g. profiles/tiny.yaml (smoke run)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    main(
        args.workdir.resolve(),
        "full" if args.full else "reduced",
        args.only,
        args.profile.resolve(),
        SWEEPS[args.sweep],
        args.steps,
        args.docs,
    )
