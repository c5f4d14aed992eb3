"""retroloop against TRL, side by side: the same looped student, data, budget and seed.

    retroloop bench peer [--json] [--quick] [--params profiles/tiny.yaml]

Needs the `peer` extra (TRL): pip install 'retroloop[peer]'. Only this bench imports trl.

Setup: the teacher, the converted looped student and the train heads exactly as bench distill
builds them (`bench_distill._materialise`: data/ if present, else the params' model converted
in memory); `--quick` runs the tiny in-code model (profiles/tiny.yaml when the params name
another). Both sides train LoRA (distill.lora for the distill pair, opd.lora for the
on-policy pair; all-linear, the recurrence adapter trainable) from the same seeded
initialisation, on the same sequences in the same order, with the same steps, batch, sequence
length, LR (constant), weight decay, clip and seed. The arms, and what TRL computes
(lmbda, beta), are in `benchmarks.peer_arms`:
    distill:   retroloop_distill (cached teacher, the stage's loss and R schedule)
               vs trl_gkd (GKDTrainer, lmbda 0, beta 0: forward KL, teacher online; the same
               R per step, forced in by a forward pre-hook)
    on-policy: retroloop_opd (engine + opd_step) vs trl_gkd_onpolicy (GKDTrainer, lmbda 1,
               beta 1: reverse KL on the student's own samples, `model.generate`)
Every arm runs in a fresh process; `rounds` interleaved rounds, the order rotating by one per
round (`common.interleaved_times`' rule); the cache is built once first by `cache_teacher.run`
in a process of its own (`cache_build_seconds`, its peak RSS apart).

Measurements (medians over rounds):
- tokens_per_s = the arm's tokens / its training seconds (distill: non-padding input tokens;
  on-policy: generated tokens). Training seconds run from the first step to the last (set-up
  and model loading left out on both sides).
- peak_rss_mib = the arm process's VmHWM right after training (imports, models, data included).
- heldout_kl[step] = exact KL(p_T ‖ p_S) per trained position on the same held-out documents
  (eval split: ~1/3 instruct, 2/3 domain), student in eval mode at R = eval_recurrence, every
  `eval_every` steps (first round; every arm is seeded, so the rounds train alike).
- seconds_to_kl: target = TRL's final held-out KL of the pair (`target: trl_final`); an arm's
  time = its training seconds at the first evaluated step with KL ≤ target (None: not reached
  in the steps run; then `to_worse_final` gives both times to the worse of the two final KLs,
  which both reach). retroloop distill's time adds the cache build, once (`once`) and
  amortised over AMORTISE runs that read the same cache (`amortised`: distill and static in
  one `dvc repro`).
- ratios retroloop ÷ TRL with the goal beside each: wall-clock to TRL's KL ≤ 0.6, peak memory
  ≤ 0.6 (tokens/s is shown for information, no goal).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from benchmarks.bench_distill import _materialise
from retroloop import datasets
from retroloop.config import load_params
from retroloop.errors import MissingExtraError

log = logging.getLogger(__name__)
TINY = Path(__file__).resolve().parents[1] / "profiles" / "tiny.yaml"
DATA = Path("data")
AMORTISE = 2  # runs reading one teacher cache in a `dvc repro`: distill and static
PAIRS = {"distill": ("retroloop_distill", "trl_gkd"), "onpolicy": ("retroloop_opd", "trl_gkd_onpolicy")}  # fmt: skip
GOALS = {"seconds_to_trl_kl_ratio": "<= 0.6", "peak_mem_ratio": "<= 0.6"}
# steps None: the profile's distill.steps / opd.steps; heldout: eval documents.
FULL = {"rounds": 2, "steps": None, "heldout": 8, "eval_every": {"distill": 4, "opd": 2}}
QUICK = {
    "rounds": 1,
    "steps": {"distill": 4, "opd": 2},
    "heldout": 3,
    "eval_every": {"distill": 2, "opd": 1},
}


def require_trl() -> str:
    """TRL's version, or the one-line error naming the extra (before anything slow runs)."""
    try:
        import trl
    except ImportError:
        raise MissingExtraError(
            "bench peer compares against TRL, which is not installed: pip install 'retroloop[peer]'"
        ) from None
    return trl.__version__


def main(params_path: str | Path = "params.yaml", quick: bool = False) -> dict:
    trl_version = require_trl()
    cfg = load_params(params_path)
    if quick and cfg.prepare.model.source != "tiny_random":
        log.info("--quick: the tiny in-code model of %s instead of %s", TINY, params_path)
        params_path, cfg = TINY, load_params(TINY)
    z = QUICK if quick else FULL
    d, o, sched = cfg.distill, cfg.opd, cfg.convert.schedule
    steps = z["steps"] or {"distill": d.steps, "opd": o.steps}
    eval_R = min(1 + round(sched.mean_end), sched.max_recurrence)
    with tempfile.TemporaryDirectory(prefix="bench_peer-") as tmp_:
        tmp = Path(tmp_)
        n_seqs = max(steps["distill"] * d.batch_size * d.grad_accum, 6)  # one epoch of batches
        paths = _materialise(cfg, tmp, n_seqs)
        model_name = paths.pop("model_name")
        job = {"params": str(Path(params_path).resolve()), "tmp": str(tmp), "steps": steps,
               "paths": {r: str(p.resolve()) for r, p in paths.items()}, "eval_R": eval_R,
               "eval_every": z["eval_every"], "heldout": _heldout(cfg, tmp, z["heldout"])}  # fmt: skip
        log.info("teacher cache: cache_teacher.run in its own process")
        cache = _child(job | {"variant": "cache"})
        log.info("cache round 1: %s", json.dumps(cache))
        job["paths"]["teacher_cache"] = str(tmp / "cache")
        arms = [a for pair in PAIRS.values() for a in pair]
        runs: dict[str, list[dict]] = {a: [] for a in arms}
        for r in range(z["rounds"]):
            shift = r % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                runs[arm].append(_child(job | {"variant": arm, "evaluate": r == 0}))
                log.info("%s round %d: %s", arm, r + 1, json.dumps(runs[arm][-1]))
            log.info("round %d/%d done", r + 1, z["rounds"])
    out = {"distill": _pair(runs, *PAIRS["distill"], cache["seconds"], "heldout_kl"),
           "onpolicy": _pair(runs, *PAIRS["onpolicy"], 0.0, "heldout_reverse_kl")}  # fmt: skip
    return {
        "distill_seconds_to_trl_kl_ratio": out["distill"]["ratios"]["seconds_to_trl_kl"]["once"],
        "distill_peak_mem_ratio": out["distill"]["ratios"]["peak_mem"],
        "onpolicy_seconds_to_trl_kl_ratio": out["onpolicy"]["ratios"]["seconds_to_trl_kl"]["once"],
        "onpolicy_peak_mem_ratio": out["onpolicy"]["ratios"]["peak_mem"],
        "goals": GOALS,
        **out,
        "cache_build_seconds": round(cache["seconds"], 2),
        "cache_build_peak_rss_mib": round(cache["peak_rss_mib"], 1),
        "steps": steps, "batch_size": {"distill": d.batch_size, "onpolicy": o.prompts_per_step * o.rollout.samples_per_prompt},
        "max_seq_len": cfg.prepare.max_seq_len, "lr": {"distill": d.lr, "onpolicy": o.lr},
        "eval_recurrence": eval_R, "heldout_sequences": z["heldout"], "rounds": z["rounds"],
        "threads": cfg.threads or os.cpu_count(), "model": model_name, "trl": trl_version,
    }  # fmt: skip


def _pair(runs: dict, ours: str, peer: str, cache_s: float, metric: str) -> dict:
    """One comparison: per arm, medians over rounds; the target `metric`; retroloop ÷ TRL."""
    arms = {a: _arm(runs[a]) for a in (ours, peer)}
    kl = {a: runs[a][0][metric] for a in (ours, peer)}
    final = {a: kl[a][max(kl[a], key=int)] for a in kl}
    trl_target, worse = final[peer], max(final.values())

    def reach(a: str, target: float, extra: float) -> float | None:
        step = next((s for s in sorted(kl[a], key=int) if int(s) > 0 and kl[a][s] <= target), None)
        if step is None:
            return None
        return statistics.median(r["seconds"][step] for r in runs[a]) + extra

    def times(target: float) -> dict:
        t_peer = reach(peer, target, 0.0)
        once, amort = reach(ours, target, cache_s), reach(ours, target, cache_s / AMORTISE)
        ratio = {k: None if v is None or not t_peer else round(v / t_peer, 3)
                 for k, v in (("once", once), ("amortised", amort))}  # fmt: skip
        return {"target_kl": round(target, 5), ours: _r(once), f"{ours}_amortised": _r(amort), peer: _r(t_peer), "ratio": ratio}  # fmt: skip

    to_trl, to_worse = times(trl_target), times(worse)
    for a in arms:
        for m in ("heldout_kl", "heldout_reverse_kl"):
            if m in runs[a][0]:
                arms[a][m] = {s: round(v, 5) for s, v in runs[a][0][m].items()}
    return {
        "arms": arms,
        "seconds_to_kl": {
            "metric": metric,
            "target": "trl_final",
            **to_trl,
            "to_worse_final": to_worse,
        },
        "ratios": {
            "seconds_to_trl_kl": to_trl["ratio"],
            "peak_mem": round(arms[ours]["peak_rss_mib"] / arms[peer]["peak_rss_mib"], 3),
            "tokens_per_s": round(arms[ours]["tokens_per_s"] / arms[peer]["tokens_per_s"], 3),
            "final_heldout_kl": round(final[ours] / final[peer], 3),
        },
    }


def _arm(rs: list[dict]) -> dict:
    last = max(rs[0]["seconds"], key=int)
    secs = [r["seconds"][last] for r in rs]
    return {
        "tokens_per_s": round(statistics.median(r["tokens"] / r["seconds"][last] for r in rs), 2),
        "train_seconds": round(statistics.median(secs), 3),
        "train_seconds_spread": round((max(secs) - min(secs)) / statistics.median(secs), 3),
        "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in rs), 1),
        "process_seconds": round(statistics.median(r["process_s"] for r in rs), 2),
        "tokens": rs[0]["tokens"],
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _heldout(cfg, tmp: Path, n: int) -> dict[str, str]:
    """Held-out documents (prepare's eval split, else the params' split): parquet heads, ~1/3
    instruct, 2/3 domain, written for the arm processes."""
    p, ds = cfg.prepare, DATA / "prepare" / "datasets"
    out = {}
    for name, src, key, k in (("instruct", p.instructions, "prepare.instructions", n // 3),
                              ("domain", p.domain, "prepare.domain", n - n // 3)):  # fmt: skip
        if (ds / f"{name}_eval.parquet").is_file():
            frame = pl.read_parquet(ds / f"{name}_eval.parquet")
        else:
            frame = datasets.load_source(src, seed=cfg.seed, key=key)
            frame = datasets.split_train_eval(frame, p.eval_fraction, cfg.seed)[1]
        out[name] = str(tmp / f"heldout_{name}.parquet")
        frame.head(k).write_parquet(out[name])
    return out


def _child(job: dict) -> dict:
    """`peer_arms.child(job)` in a fresh interpreter: its result, with its wall seconds."""
    code = "import json,sys; from benchmarks.peer_arms import child; print(json.dumps(child(json.loads(sys.argv[1]))))"  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRL_EXPERIMENTAL_SILENCE": "1"}  # fmt: skip
    log.info("arm %s", job["variant"])
    tic = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, env=env)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"bench peer arm {job['variant']!r} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - tic
    return out
