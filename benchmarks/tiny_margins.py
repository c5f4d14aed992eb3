"""How far the tiny profile's learning assertions are from their thresholds, per CPU kernel.

The suite's stage and e2e tests assert that the method works on the tiny profile: the trained
tiny teacher is clearly better than uniform, conversion costs KL and NLL, distillation, static
training and OPD win part of it back, the R curve is not flat. A seeded run ends in a slightly
different place on each SIMD kernel torch dispatches to (`ATEN_CPU_CAPABILITY=default|avx2|
avx512`), so a margin checked on one kind of CPU is not a margin. This script runs the tiny
pipeline once per (kernel level, seed) in a fresh directory, each in its own interpreter with
the level forced, and prints every quantity an assertion reads beside its threshold, as a
"margin" = how many times the threshold the measured gain is (≥ 3 is the house rule). Gains
are written so that a broken implementation (LR 0, a frozen adapter) gives about 0; the
`--broken` rows show what it does give.

    python -m benchmarks.tiny_margins                        # this CPU's levels, seeds 0-2
    python -m benchmarks.tiny_margins --levels avx2 --seeds 0 --json
    python -m benchmarks.tiny_margins --broken               # + LR ≈ 0 / frozen-adapter rows

Not a test: it takes minutes per cell (the whole tiny pipeline) and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "profiles" / "tiny.yaml"

# (name, threshold, what the test asserts). Each measured value is a gain: broken ≈ 0.
# Keep in step with the tests named here (tests/stage/*, tests/e2e/test_dvc_repro.py).
ASSERTIONS: list[tuple[str, float | None, str]] = [
    ("teacher_gain_over_uniform", math.log(512) - 4.0, "ln V − teacher held-out NLL: NLL < 4 nats, a level  [test_prepare_trains_the_tiny_teacher_far_from_uniform]"),
    ("teacher_train_loss_drop", 0.9, "tiny teacher's train loss, first − last 10% of steps  [same]"),
    ("converted_heldout_kl", 0.1, "exact held-out KL(teacher‖converted), all eval docs  [test_distill]"),
    ("converted_domain_kl", 0.1, "evaluate's converted domain_forward_kl  [test_evaluate_four_models]"),
    ("converted_nll_gap", 0.1, "converted − teacher domain NLL  [test_evaluate_four_models]"),
    ("converted_sampled_kl", 0.2, "sampled KL(converted‖teacher)  [test_evaluate_four_models, e2e]"),
    ("distill_train_kl_recovered", 0.25, "1 − kl_end/kl_start on the training batches  [test_distill]"),
    ("distill_heldout_kl_recovered", 0.07, "1 − held-out KL after/converted  [test_distill]"),
    ("distill_r_spread", 5e-4, "max − min held-out NLL over R = 1, 2, 4  [test_distill]"),
    ("static_train_kl_recovered", 0.24, "1 − kl_end/kl_start  [test_static]"),
    ("static_heldout_kl_recovered", 0.07, "1 − held-out KL after/before  [test_static]"),
    ("opd_heldout_rkl_reduction", 0.1, "1 − held-out reverse KL after/before, 40 vOPD steps  [test_opd]"),
    ("distilled_recovery_domain_kl", 0.06, "evaluate recovery.distilled.domain_forward_kl  [e2e]"),
    ("opd_recovery_domain_kl", 0.06, "evaluate recovery.opd.domain_forward_kl  [e2e]"),
    # Not asserted: the sampled-KL recovery on 2 prompts x 6 tokens is noise-dominated.
    ("distilled_recovery_sampled_kl", None, "evaluate recovery.distilled.kl_to_teacher  [info]"),
    ("opd_recovery_sampled_kl", None, "evaluate recovery.opd.kl_to_teacher  [info]"),
]  # fmt: skip


def measure(seed: int, workdir: Path, broken: bool, sets: dict) -> dict[str, float]:
    """The whole tiny pipeline in `workdir` (in this interpreter), then every gain above."""
    import torch

    from retroloop.config import load_params
    from retroloop.eval.scaling import held_out_scores
    from retroloop.stages import (
        analyze,
        cache_teacher,
        convert,
        distill,
        evaluate,
        opd,
        prepare,
        static,
    )

    over = {**sets, "seed": seed, "prepare.model.tiny.seed": seed}
    if broken:  # what the assertions must tell apart from a working run
        over |= {"distill.lr": 1e-9, "opd.lr": 1e-9}
    cfg = load_params(TINY, over)
    os.chdir(workdir)
    prep = prepare.run(cfg).metrics
    for stage in (analyze, convert, cache_teacher):
        stage.run(cfg)
    kl = held_out_scores(Path("data/convert/model"), None, Rs=(1,))[1]["kl"]
    opd_before, opd_after = _opd_forty_steps(broken)
    teacher_nll = held_out_scores(Path("data/prepare/model"), None, Rs=(None,))[None]["nll"]
    d = distill.run(cfg).metrics
    after = held_out_scores(Path("data/convert/model"), Path("data/distill/adapter"), Rs=(1, 2, 4))
    s = static.run(cfg).metrics
    s_before = held_out_scores(Path("data/static/model"), None, Rs=(None,))[None]["kl"]
    s_after = held_out_scores(Path("data/static/model"), Path("data/static/adapter"), Rs=(None,))
    opd.run(cfg)
    e = evaluate.run(cfg).metrics
    models, recovery = e["models"], e["recovery"]
    vocab = cfg.prepare.model.tiny.vocab_size
    nlls = [after[R]["nll"] for R in (1, 2, 4)]
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "teacher_heldout_nll": teacher_nll,
        "teacher_gain_over_uniform": math.log(vocab) - teacher_nll,
        "converted_heldout_kl": kl,
        "teacher_train_loss_drop": prep["train_loss_start"] - prep["train_loss_end"],
        "converted_domain_kl": models["converted"]["domain_forward_kl"],
        "converted_nll_gap": models["converted"]["domain_nll"] - models["teacher"]["domain_nll"],
        "converted_sampled_kl": models["converted"]["kl_to_teacher"],
        "distill_train_kl_recovered": 1 - d["kl_end"] / d["kl_start"],
        "distill_heldout_kl_recovered": 1 - after[1]["kl"] / kl,
        "distill_r_spread": max(nlls) - min(nlls),
        "static_train_kl_recovered": 1 - s["kl_end"] / s["kl_start"],
        "static_heldout_kl_recovered": 1 - s_after[None]["kl"] / s_before,
        "opd_heldout_rkl_reduction": 1 - opd_after / opd_before,
        "distilled_recovery_domain_kl": recovery["distilled"]["domain_forward_kl"],
        "opd_recovery_domain_kl": recovery["opd"]["domain_forward_kl"],
        "distilled_recovery_sampled_kl": recovery["distilled"]["kl_to_teacher"],
        "opd_recovery_sampled_kl": recovery["opd"]["kl_to_teacher"],
    }


def _opd_forty_steps(broken: bool) -> tuple[float, float]:
    """test_opd's scenario: teacher = the converted model, student = it + a LoRA whose B is
    randomised (N(0, 0.03)); 40 vOPD steps (exact-KL baseline) of 4 prompts x 4 samples;
    held-out exact reverse KL (top-1024 of a 512 vocabulary) before/after."""
    import polars as pl
    import torch
    from peft import get_peft_model

    from retroloop.config import OpdParams, RolloutParams
    from retroloop.models.loading import load_model, load_tokenizer
    from retroloop.models.lora import lora_config_for
    from retroloop.onpolicy import fixed_initial_state, heldout_reverse_kl
    from retroloop.opd_loop import train_opd

    torch.manual_seed(0)
    student_dir = Path("data/convert/model")
    tok, teacher, base = (
        load_tokenizer(student_dir),
        load_model(student_dir),
        load_model(student_dir),
    )
    student = get_peft_model(base, lora_config_for(base, r=4, alpha=32, dropout=0.0))
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.03)
    student.eval()
    train = pl.read_parquet("data/prepare/datasets/instruct_train.parquet")
    heldout = pl.read_parquet("data/prepare/datasets/instruct_eval.parquet")["prompt"].to_list()[:4]
    rollout = RolloutParams(max_new_tokens=8, samples_per_prompt=4, batch_size=16)
    p = OpdParams(rollout=rollout, objective="sampled_advantage", vopd_baseline=True, vopd_top_k=1024, steps=40,
                  prompts_per_step=4, lr=1e-9 if broken else 1e-3)  # fmt: skip
    measure = dict(n=2, max_new_tokens=8, top_k=1024, seed=123)
    with fixed_initial_state(student.get_base_model()):
        before = heldout_reverse_kl(student, teacher, tok, heldout, **measure)
    train_opd(student, teacher, tok, train, p, seed=0, out_dir_tmp=Path("opd-margins"),
              heldout_prompts=heldout)  # fmt: skip
    with fixed_initial_state(student.get_base_model()):
        after = heldout_reverse_kl(student, teacher, tok, heldout, **measure)
    return before, after


def _cell(level: str, seed: int, broken: bool, sets: list[str]) -> dict:
    """One (level, seed) in a child interpreter with ATEN_CPU_CAPABILITY forced."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="margins-") as tmp:
        args = [sys.executable, "-m", "benchmarks.tiny_margins", "--child", str(seed), tmp]
        proc = subprocess.run(
            args + (["--broken"] if broken else []) + [f"--set={kv}" for kv in sets],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{level} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return {
        "level": level,
        "seed": seed,
        "broken": broken,
        **json.loads(proc.stdout.splitlines()[-1]),
    }


def available_levels() -> list[str]:
    """The kernel levels this CPU can run, lowest first (torch falls back silently otherwise)."""
    import torch

    native = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(native) + 1] if native in order else ["default"]


def table(rows: list[dict]) -> str:
    head = "| assertion | threshold | " + " | ".join(
        f"{r['level']} s{r['seed']}{' broken' if r['broken'] else ''}" for r in rows
    )
    lines = [head + " | min margin |", "|---|---:|" + "---:|" * (len(rows) + 1)]
    lines.append(
        "| teacher held-out NLL (nats) | |"
        + "".join(f" {r['teacher_heldout_nll']:.3f} |" for r in rows)
        + " |"
    )
    for name, threshold, _ in ASSERTIONS:
        vals = [r[name] for r in rows]
        cells = "".join(f" {v:.4g} |" for v in vals)
        if threshold is None:  # shown, not asserted
            lines.append(f"| {name} | – |{cells} – |")
            continue
        margin = min(v / threshold for v, r in zip(vals, rows, strict=True) if not r["broken"])
        lines.append(f"| {name} | {threshold:.3g} |{cells} {margin:.1f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", nargs="+", default=None, help="default: every level this CPU has")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--broken", action="store_true", help="add LR ≈ 0 rows (seed 0, native level)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a tiny-profile override for every cell (YAML value), e.g. distill.lr=3e-3",
    )
    ap.add_argument("--child", nargs=2, metavar=("SEED", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        import yaml

        sets = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
        print(json.dumps(measure(int(args.child[0]), Path(args.child[1]), args.broken, sets)))
        return
    levels = args.levels or available_levels()
    rows = [_cell(level, seed, False, args.set) for level in levels for seed in args.seeds]
    if args.broken:
        rows.append(_cell(levels[-1], args.seeds[0], True, args.set))
    print(json.dumps(rows, indent=2) if args.json else table(rows))


if __name__ == "__main__":
    main()
