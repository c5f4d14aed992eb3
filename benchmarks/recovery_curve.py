"""The recovery-vs-compute curve (issue 24 item 3): how many training tokens buy how much.

    python -m benchmarks.recovery_curve                        # 160 steps, 8 held-out docs
    python -m benchmarks.recovery_curve --max-steps 160 --docs 8 --workdir DIR
    python -m benchmarks.recovery_curve --upstream /path/to/data   # copy a finished run's
                                                # prepare, analyze, cache_teacher, convert

For the defaults (`params.yaml`), the looped student (convert's model) and the static baseline
(the same kept layers, R = 1, no loop; `stages/static.py`) are each distilled once out to
`--max-steps` (default 160 = 10× `distill.steps`), and the adapter is saved at the points
0, 4, 8, 16, 32, 48, 64, 96, 128, 160. Each point is scored like the study (`benchmarks.study`:
its upstream, held-out set, students and `score`): held-out NLL and the exact full-vocabulary
KL(teacher ‖ model), looped at R ∈ {1, 2, 4}. recovered = 1 − KL(model, R) / KL(converted,
R = 1); a model's curve value is the study's, at its best R by held-out NLL.

One long run stands for every shorter one: step s of distill is a pure function of its position
(`stages/distill.py`: the data order is a seeded permutation per epoch of the training set, R
and every draw inside a micro-batch are seeded by (seed, step, micro-batch)), and with a
constant LR, no warm-up and a fixed `distill.recurrence` nothing depends on `distill.steps`
(the curriculum's μ does, and `cosine` / `warmup_steps` do: such a profile is refused, exit 2).
So the adapter at step s of the 160-step run is the adapter a run of s steps publishes.

Data: the defaults' training set (every pydoc topic + the instruction prompts with the
teacher's responses, 97 sequences on the default model) is all the built-in domain has, so the
points past one epoch repeat it; the table gives the epochs at each point.

x axes: training tokens = trained positions (labels ≠ −100) seen; training FLOPs ≈ 3 × forward
(`eval.scaling.flops_per_token` at the training R, the LM head only at trained positions) per
step, plus the teacher cache's one forward over the training set, counted once (the cache is
built once and reused every epoch; it is the same for looped and static).

Writes DIR/recovery_curve.csv (step, epochs, tokens, flops, model, R, kl, nll, recovered),
DIR/recovery_curve_plot.csv (one row per point: recovered of looped and static at their best
R), DIR/recovery_curve.md (the table) and DIR/recovery_curve.png (recovered vs tokens, FLOPs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks import study

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "params.yaml"
POINTS = (0, 4, 8, 16, 32, 48, 64, 96, 128, 160)
RS = (1, 2, 4)
MODELS = ("looped", "static")
UPSTREAM = ("prepare", "analyze", "cache_teacher")
log = logging.getLogger("recovery_curve")


def refusal(cfg) -> str | None:
    """Why step s of one long run would not be a run of s steps (None: it is)."""
    d = cfg.distill
    if d.recurrence is None:
        return "distill.recurrence: null samples R on a curriculum over distill.steps; set an R"
    if d.lr_schedule != "constant" or d.warmup_steps:
        return "distill.lr_schedule / warmup_steps depend on distill.steps; use constant and 0"
    return None


@contextlib.contextmanager
def snapshots(points: set[int], out: Path):
    """While open, distill saves its adapter to out/step_S after each 1-based step S in
    `points` (a subclass of its step loop; nothing else about the run changes)."""
    from retroloop.stages import distill

    plain = distill._Loop

    class Snapshotting(plain):
        def step(self, step: int, checkpoint_dir: Path) -> dict:
            row = super().step(step, checkpoint_dir)
            if step + 1 in points:
                self.model.save_pretrained(out / f"step_{step + 1}")
            return row

    distill._Loop = Snapshotting
    try:
        yield
    finally:
        distill._Loop = plain


def train(name: str, cfg, points: list[int]) -> tuple[Path, float]:
    """Distill `name`'s student out to cfg.distill.steps, saving the adapter at `points` →
    (student path, training seconds). Kept snapshots are not retrained."""
    from retroloop.stages import distill

    vdir = Path("variants") / name
    student, _ = study.build_student(cfg, vdir, static=name == "static")
    snaps = vdir / "snapshots"
    if all((snaps / f"step_{s}").is_dir() for s in points if s):
        return student, 0.0
    t0 = time.perf_counter()
    with snapshots(set(points), snaps):
        distill.run(cfg, inputs={"student": student, "teacher_cache": Path("data/cache_teacher")},
                    out_dir=vdir / "distill", checkpoint_dir=vdir / "checkpoints")  # fmt: skip
    return student, time.perf_counter() - t0


def token_counts(cfg, steps: int) -> dict:
    """Cumulative trained positions and input tokens after each step 0..steps (distill's data
    order over the same training sequences), the set's size and its input tokens."""
    from retroloop.distill_io import training_data
    from retroloop.models.loading import load_tokenizer
    from retroloop.sequences import IGNORE
    from retroloop.stages.distill import DataOrder

    ds = Path("data/prepare/datasets")
    paths = {"train_instruct": ds / "instruct_train.parquet", "train_domain": ds / "domain_train.parquet"}  # fmt: skip
    seqs = training_data(load_tokenizer("data/prepare/model"), paths, cfg.prepare.max_seq_len)
    order, gb = DataOrder(len(seqs), cfg.seed), cfg.distill.batch_size * cfg.distill.grad_accum
    trained, inputs = [0], [0]
    for s in range(steps):
        batch = [seqs[i] for i in order.take(s * gb, gb)]
        trained.append(trained[-1] + sum(sum(y != IGNORE for y in q.labels[1:]) for q in batch))
        inputs.append(inputs[-1] + sum(len(q.input_ids) for q in batch))
    n_in = sum(len(q.input_ids) for q in seqs)
    return {"trained": trained, "inputs": inputs, "sequences": len(seqs), "set_inputs": n_in}


def flops_at(student: Path, R: int | None):
    """step → training FLOPs: 3 × forward (`eval.scaling.flops_per_token` at the training R),
    the decoder at every input token, the LM head only at the trained positions."""
    from retroloop.eval.scaling import flops_per_token
    from retroloop.models.loading import load_model

    model = load_model(student)
    head = 2.0 * model.get_output_embeddings().weight.numel()
    fwd = flops_per_token(model, R)  # a plain model ignores R
    return lambda trained, inputs: 3.0 * ((fwd - head) * inputs + head * trained)


def curve_rows(name, cfg, student, points, data, counts, cache_flops) -> list[dict]:
    """One row per (point, R) of model `name`: tokens, FLOPs, held-out KL / NLL, recovered."""
    trained, inputs, n_seqs = counts["trained"], counts["inputs"], counts["sequences"]
    Rs = RS if name == "looped" else None
    train_flops = flops_at(student, cfg.distill.recurrence if name == "looped" else None)
    converted = study.score(student, None, data, Rs)
    gb = cfg.distill.batch_size * cfg.distill.grad_accum
    rows = []
    for s in points:
        snap = Path("variants", name, "snapshots", f"step_{s}")
        scored = converted if s == 0 else study.score(student, snap, data, Rs)
        best_r, best = study.recovered(converted, scored)
        flops = train_flops(trained[s], inputs[s]) + cache_flops
        for r in scored:
            rows.append({"step": s, "epochs": s * gb / n_seqs, "tokens": trained[s], "flops": flops,
                         "model": name, "R": r["R"] or 1, "kl": r["kl"], "nll": r["nll"],
                         "recovered": 1 - r["kl"] / converted[0]["kl"],
                         "best": r["R"] == best_r, "recovered_best": best})  # fmt: skip
        log.info("%s step %d: recovered %.3f at R=%s", name, s, best, best_r or 1)
    return rows


def main(
    workdir: Path,
    max_steps: int = 160,
    docs: int = 8,
    profile: Path = PROFILE,
    only: list[str] | None = None,
    upstream_dir: Path | None = None,
    overrides: dict | None = None,
    fresh_from: Path | None = None,
) -> dict:
    from retroloop.config import load_params
    from retroloop.eval.scaling import flops_per_token
    from retroloop.models.loading import load_model

    common = {**(overrides or {}), "distill.steps": max_steps}
    cfg = load_params(profile, common)
    if (why := refusal(cfg)) is not None:
        print(f"{profile}: {why} (one long run would not stand for shorter ones)", file=sys.stderr)
        raise SystemExit(2)
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    if upstream_dir is not None:
        _copy_upstream(Path(upstream_dir))
    eval_docs = None
    if fresh_from is not None:  # a bigger training set; the same students and held-out docs
        common.update(fresh_domain(Path(fresh_from), cfg.prepare.max_seq_len))
        cfg = load_params(profile, common)
        eval_docs = Path(fresh_from, "prepare", "datasets", "domain_eval.parquet")
    study.upstream(profile, common)
    points = sorted({p for p in POINTS if p < max_steps} | {max_steps})
    data, _ = study.held_out_set(cfg, docs, eval_docs)
    counts = token_counts(cfg, max_steps)
    # the teacher's one forward over the training set that builds the cache (counted once)
    cache_flops = flops_per_token(load_model("data/prepare/model")) * counts["set_inputs"]
    results_path = Path("recovery_curve.json")
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in MODELS:
        if (only and name not in only) or name in results:
            continue
        student, seconds = train(name, cfg, points)
        rows = curve_rows(name, cfg, student, points, data, counts, cache_flops)
        # re-read: a second process (--only the other model) may have written meanwhile
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results[name] = {"rows": rows, "train_seconds": seconds}
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        shutil.rmtree(Path("variants", name, "checkpoints"), ignore_errors=True)
    meta = {"teacher_nll": data.teacher_nll, "cache_flops": cache_flops, "docs": docs,
            "max_steps": max_steps, "sequences": counts["sequences"]}  # fmt: skip
    write_outputs(results, meta)
    return results


def fresh_domain(src: Path, max_seq_len: int) -> dict:
    """`--fresh-from DIR` (a finished default run's data/): its domain_train documents cut
    into consecutive windows of `max_seq_len` − 8 tokens (the default set keeps only each
    document's first `max_seq_len`), written to ./fresh_domain.jsonl as the domain source of a
    new prepare; DIR's analyze, convert and downloads are copied so the students are the
    default run's. The held-out documents stay DIR's (no window of them is trained on).
    → the prepare overrides."""
    import polars as pl

    from retroloop.models.loading import load_tokenizer

    _copy_upstream(src, stages=("analyze",))
    if not Path("data", "cache").is_dir() and (src / "cache").is_dir():
        shutil.copytree(src / "cache", Path("data", "cache"))
    tok = load_tokenizer(src / "prepare" / "model")
    width, out = max_seq_len - 8, Path("fresh_domain.jsonl")
    if not out.is_file():
        docs = pl.read_parquet(src / "prepare" / "datasets" / "domain_train.parquet")
        with out.open("w") as f:
            for doc_id, text in docs.select("id", "text").iter_rows():
                ids = tok(text, add_special_tokens=False)["input_ids"]
                for k in range(0, len(ids), width):
                    piece = tok.decode(ids[k : k + width]).strip()
                    if piece:
                        f.write(json.dumps({"id": f"{doc_id}#{k // width}", "text": piece}) + "\n")
    return {"prepare.domain.source": "local", "prepare.domain.path": str(out.resolve()),
            "prepare.domain.max_records": 10**6}  # fmt: skip


def _copy_upstream(src: Path, stages: tuple[str, ...] = UPSTREAM) -> None:
    """A finished pipeline's prepare, analyze, cache_teacher (and convert, as the looped
    student) into ./data and ./variants/looped, where not already present."""
    for stage in stages:
        if not Path("data", stage, "manifest.json").is_file():
            shutil.copytree(src / stage, Path("data", stage), dirs_exist_ok=True)
    conv = Path("variants", "looped", "convert")
    if not (conv / "manifest.json").is_file() and (src / "convert" / "manifest.json").is_file():
        shutil.copytree(src / "convert", conv, dirs_exist_ok=True)


def plot_rows(results: dict) -> list[dict]:
    """One row per point: tokens, each model's FLOPs and recovered share at its best R."""
    by_step: dict[int, dict] = {}
    for name in (m for m in MODELS if m in results):
        for r in results[name]["rows"]:
            if r["best"]:
                row = by_step.setdefault(r["step"], {"step": r["step"], "epochs": r["epochs"],
                                                     "tokens": r["tokens"]})  # fmt: skip
                row[name], row[f"{name}_R"] = r["recovered"], r["R"]
                row[f"{name}_flops"] = round(r["flops"])
    return [by_step[s] for s in sorted(by_step)]


def write_outputs(results: dict, meta: dict) -> None:
    """recovery_curve.csv (long), recovery_curve_plot.csv (wide), .md (the table), .png."""
    import polars as pl

    cols = ["step", "epochs", "tokens", "flops", "model", "R", "kl", "nll", "recovered"]
    long = [{c: round(r[c]) if c == "flops" else r[c] for c in cols}
            for m in MODELS if m in results for r in results[m]["rows"]]  # fmt: skip
    pl.DataFrame(long).write_csv("recovery_curve.csv", float_precision=6)
    wide = plot_rows(results)
    pl.DataFrame(wide).write_csv("recovery_curve_plot.csv", float_precision=6)
    Path("recovery_curve.md").write_text(table(results, meta))
    print(Path("recovery_curve.md").read_text())
    _plot(wide)


def table(results: dict, meta: dict) -> str:
    """Markdown: one row per point; looped KL / NLL at each R, static's, each model's training
    TFLOP and recovered share at its best R."""
    rows: dict[int, dict] = {}
    for name in (m for m in MODELS if m in results):
        for r in results[name]["rows"]:
            row = rows.setdefault(r["step"], {"step": r["step"], "epochs": f"{r['epochs']:.2f}",
                                              "tokens": r["tokens"]})  # fmt: skip
            tag = f"R={r['R']}" if name == "looped" else "static"
            row[f"KL {tag}"], row[f"NLL {tag}"] = f"{r['kl']:.3f}", f"{r['nll']:.3f}"
            if r["best"]:
                row[f"TFLOP {name}"] = f"{r['flops'] / 1e12:.1f}"
                row[f"best R {name}"] = r["R"]
                row[f"recovered {name}"] = f"**{r['recovered']:.3f}**"
    lead = ["step", "epochs", "tokens"]
    looped = [f"{q} R={R}" for q in ("KL", "NLL") for R in RS]
    tail = [f"{q} {m}" for m in MODELS for q in ("TFLOP", "best R", "recovered")]
    cols = lead + looped + ["KL static", "NLL static"] + tail
    cols = [c for c in cols if any(c in row for row in rows.values()) and c != "best R static"]
    head = (f"teacher NLL {meta['teacher_nll']:.3f} on {meta['docs']} held-out docs; "
            f"{meta['sequences']} training sequences (epochs = passes over them); TFLOP = training "
            f"(3 × forward) + the teacher cache's {meta['cache_flops'] / 1e12:.1f} TFLOP once; "
            "recovered = 1 − KL(best R by NLL) / KL(converted, R = 1)\n\n")  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(rows[s].get(c, "")) for c in cols) + " |" for s in sorted(rows)]
    return head + "\n".join(lines) + "\n"


def _plot(wide: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name in MODELS:
        pts = [r for r in wide if name in r]
        axes[0].plot([r["tokens"] for r in pts], [r[name] for r in pts], marker="o", label=name)
        axes[1].plot([r[f"{name}_flops"] for r in pts], [r[name] for r in pts], marker="o",
                     label=name)  # fmt: skip
    for ax, xlabel in zip(
        axes, ("training tokens (trained positions)", "FLOPs (incl. cache)"), strict=True
    ):
        ax.axhline(0.8, ls=":", color="black", label="0.80 (issue 24)")
        ax.set(xlabel=xlabel, ylabel="recovered share of the conversion's KL gap")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig("recovery_curve.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=160, help="distill steps (default 160)")
    parser.add_argument("--docs", type=int, default=8, help="held-out documents scored")
    parser.add_argument("--workdir", type=Path, default=REPO / "data" / "recovery_curve")
    parser.add_argument("--profile", type=Path, default=PROFILE, help="default params.yaml")
    parser.add_argument("--only", nargs="*", choices=MODELS, help="looped and/or static")
    parser.add_argument("--upstream", type=Path, help="a finished pipeline's data/ to copy from")
    parser.add_argument("--fresh-from", type=Path, help="a finished default run's data/: train "
                        "on all of its domain documents in windows (fresh data at every point)")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(0)
    main(args.workdir.resolve(), args.max_steps, args.docs, args.profile.resolve(), args.only,
         args.upstream and args.upstream.resolve(),
         fresh_from=args.fresh_from and args.fresh_from.resolve())  # fmt: skip
