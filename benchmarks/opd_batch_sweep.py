"""Does OPD improve reliably, and with which batch and objective? (issue 24 item 5)

Runs `train_opd` from a pipeline's distill adapter against its teacher for each
objective x prompts-per-step x samples-per-prompt setting and seed, and prints one JSON line per
run: the held-out top-k reverse KL lower bound (what OPD keeps its best step by) at the start, at
the last step and at the kept step, whether the last step improved on the start (what a
last-step publisher would have shipped), and the exact full-vocabulary reverse KL on the
held-out prompts' samples before and after (`eval.likelihood.reverse_kl_exact_on_samples`).

Usage (in a folder where `dvc repro` ran; profiles/tiny.yaml or the default params.yaml):
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/opd_batch_sweep.py --steps 8 --seeds 0 1 2
    python benchmarks/opd_batch_sweep.py --steps 4 --batches 2x2 \
        --objectives sampled_advantage exact_reverse_kl     # the default model's 4-step budget
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from retroloop.config import load_params
from retroloop.eval.likelihood import reverse_kl_exact_on_samples
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.onpolicy import fixed_initial_state
from retroloop.opd_io import load_student
from retroloop.opd_loop import train_opd


def one_run(cfg, objective: str, prompts: int, samples: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rollout = cfg.opd.rollout.model_copy(update={"samples_per_prompt": samples})
    p = cfg.opd.model_copy(
        update={"steps": steps, "prompts_per_step": prompts, "rollout": rollout, "eval_every": 1,
                "objective": objective}
    )  # fmt: skip
    student = load_student(load_model("data/convert/model"), Path("data/distill/adapter"), p)
    teacher = load_model("data/prepare/model")
    tok = load_tokenizer("data/convert/model")
    train = pl.read_parquet("data/prepare/datasets/instruct_train.parquet")
    heldout = pl.read_parquet("data/prepare/datasets/instruct_eval.parquet")["prompt"]
    heldout = heldout.head(p.heldout_prompts).to_list()
    exact = functools.partial(
        reverse_kl_exact_on_samples, teacher=teacher, tokenizer=tok, prompts=heldout,
        max_new_tokens=p.rollout.max_new_tokens, batch_size=p.rollout.batch_size, seed=1234,
    )  # fmt: skip
    with fixed_initial_state(student.get_base_model()):
        exact_before = exact(student)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        m = train_opd(
            student, teacher, tok, train, p, seed=seed, out_dir_tmp=Path(out),
            heldout_prompts=heldout,
        )  # fmt: skip
    seconds = time.perf_counter() - tic
    with fixed_initial_state(student.get_base_model()):
        exact_after = exact(student)  # the kept step's weights
    before, last = m["heldout_reverse_kl_exact_before"], m["heldout_reverse_kl_exact_after"]
    return {
        "kernel": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
        "objective": objective,
        "prompts_x_samples": f"{prompts}x{samples}",
        "seed": seed,
        "before": round(before, 4),
        "last": round(last, 4),
        "kept": round(m["heldout_reverse_kl_exact_kept"], 4),
        "kept_step": m["kept_step"],
        "last_improved": last < before,
        "exact_before": round(exact_before, 4),
        "exact_kept": round(exact_after, 4),
        "train_s": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", nargs="+", default=["2x2", "4x4", "8x4"])
    ap.add_argument("--objectives", nargs="+", default=["sampled_advantage"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cfg = load_params(args.params, {"threads": args.threads})
    torch.set_num_threads(args.threads)
    for batch in args.batches:
        prompts, samples = (int(x) for x in batch.split("x"))
        for seed in args.seeds:
            for objective in args.objectives:  # innermost: both objectives see the same load
                row = one_run(cfg, objective, prompts, samples, args.steps, seed)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
