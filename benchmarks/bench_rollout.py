"""Rollout engine vs `model.generate` on the looped student, at the OPD default (issue 23 item 3).

    python -m benchmarks.bench_rollout [--data data] [--params params.yaml] [--threads 1 2]
                                       [--repeats 5] [--profile] [--json]

Student: `<data>/convert/model` + `<data>/distill/adapter`, loaded as the `opd` stage loads it
(`opd_io.load_student`: PEFT, LoRA unmerged), in eval mode, R = `opd.recurrence` or the model's.
Rows: the first `opd.prompts_per_step` prompts of `<data>/prepare/datasets/instruct_train.parquet`
× `opd.rollout.samples_per_prompt`, `opd.rollout.max_new_tokens` new tokens, T = 1, top-p = 1.
Candidates, on the same rows:
- engine: `TransformersEngine.sample` (batch `opd.rollout.batch_size`) with one seed per prompt,
  as `train_opd` draws them;
- generate: `student.generate(do_sample, temperature 1, top_p 1, top_k 0)` on the left-padded
  rows, each prompt repeated n times (what `num_return_sequences` does), the global RNG seeded.
Each thread count: one warm-up call each, then `repeats` rounds, the order rotating per round.
Rate = rows × decode steps per CPU second (`time.process_time`: another job's load slows the
process but is not counted) and per wall second; the ratio is of the medians. `--profile`
prints cProfile's top functions (by own CPU time) of one call of each.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import polars as pl
import torch

from retroloop.config import load_params
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.onpolicy import student_forward_kwargs
from retroloop.opd_io import load_student
from retroloop.rollout import TransformersEngine, encode_prompts
from retroloop.training import seed_for

GOAL = ">= 1.5"


def setup(data: Path, params: Path):
    """(engine call, generate call, sizes): each call returns rows × decode steps."""
    cfg = load_params(params)
    p, r = cfg.opd, cfg.opd.rollout
    base = load_model(data / "convert" / "model")
    tok = load_tokenizer(data / "convert" / "model")
    student = load_student(base, data / "distill" / "adapter", p).eval()
    kw = student_forward_kwargs(base, p.recurrence)
    train = pl.read_parquet(data / "prepare" / "datasets" / "instruct_train.parquet")
    prompts, n, N = train["prompt"].to_list()[: p.prompts_per_step], r.samples_per_prompt, r.max_new_tokens  # fmt: skip
    engine = TransformersEngine(student, tok, r.batch_size, kw)
    seeds = [seed_for(cfg.seed, "opd-rollout", 1, k) for k in range(len(prompts))]
    rows = [ids for ids in encode_prompts(tok, prompts) for _ in range(n)]
    P = max(map(len, rows))
    ids_B_P = torch.tensor([[engine.pad_id] * (P - len(x)) + x for x in rows])
    attn_B_P = torch.tensor([[0] * (P - len(x)) + [1] * len(x) for x in rows])

    def run_engine() -> int:
        b = engine.sample(prompts, n=n, max_new_tokens=N, seed=seeds)
        return len(b) * max(map(len, b.completion_ids))

    @torch.no_grad()
    def run_generate() -> int:
        torch.manual_seed(cfg.seed)
        out = student.generate(
            input_ids=ids_B_P, attention_mask=attn_B_P, do_sample=True, temperature=1.0,
            top_p=1.0, top_k=0, max_new_tokens=N, pad_token_id=engine.pad_id,
            eos_token_id=sorted(engine.eos), **kw,
        )  # fmt: skip
        return out[:, P:].numel()

    sizes = {"prompts": len(prompts), "samples": n, "max_new_tokens": N,
             "batch_size": r.batch_size, "recurrence": kw.get("num_recurrence", base.config.recurrence)}  # fmt: skip
    return {"engine": run_engine, "generate": run_generate}, sizes


def measure(calls: dict, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    for call in calls.values():
        call()
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in calls}
    names = list(calls)
    for i in range(repeats):
        for name in names[i % 2 :] + names[: i % 2]:
            cpu, wall = time.process_time(), time.perf_counter()
            work = calls[name]()
            rates[name].append((work / (time.process_time() - cpu), work / (time.perf_counter() - wall)))  # fmt: skip
    med = {k: [statistics.median(x[j] for x in v) for j in (0, 1)] for k, v in rates.items()}
    return {
        "threads": threads,
        "rows_steps_per_cpu_s": {k: round(m[0], 2) for k, m in med.items()},
        "rows_steps_per_wall_s": {k: round(m[1], 2) for k, m in med.items()},
        "engine_vs_generate_cpu": round(med["engine"][0] / med["generate"][0], 3),
        "engine_vs_generate_wall": round(med["engine"][1] / med["generate"][1], 3),
        "cpu_rates": {k: [round(x[0], 1) for x in v] for k, v in rates.items()},
    }


def profile(calls: dict, top: int = 14) -> dict[str, str]:
    out = {}
    for name, call in calls.items():
        pr = cProfile.Profile(timer=time.process_time)
        pr.runcall(call)
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
        out[name] = s.getvalue()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    calls, sizes = setup(a.data, a.params)
    result = {
        "goal": GOAL,
        "sizes": sizes,
        "runs": [measure(calls, t, a.repeats) for t in a.threads],
    }
    if a.profile:
        torch.set_num_threads(a.threads[0])
        for name, text in profile(calls).items():
            print(f"--- {name} ---\n{text}")
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        for run in result["runs"]:
            print(f"threads {run['threads']}: engine / generate = {run['engine_vs_generate_cpu']} "
                  f"(CPU s), {run['engine_vs_generate_wall']} (wall s); goal {GOAL}; "
                  f"rows x steps / CPU s {run['rows_steps_per_cpu_s']}")  # fmt: skip


if __name__ == "__main__":
    main()
