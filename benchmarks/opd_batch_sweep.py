"""Does a bigger OPD batch make OPD improve reliably? (issue 24 item 5)

Runs `train_opd` from a tiny pipeline's distill adapter against its teacher for each
prompts-per-step x samples-per-prompt setting and seed, and prints one JSON line per run: the
held-out reverse KL at the start, at the last step and at the kept (best) step, and whether
the last step improved on the start (what a last-step publisher would have shipped).

Usage (in a folder where `dvc repro` ran with profiles/tiny.yaml as params.yaml):
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/opd_batch_sweep.py --steps 8 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import polars as pl
import torch

from retroloop.config import load_params
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.stages.opd import load_student, train_opd


def one_run(cfg, prompts: int, samples: int, steps: int, seed: int) -> dict:
    torch.manual_seed(seed)
    rollout = cfg.opd.rollout.model_copy(update={"samples_per_prompt": samples})
    p = cfg.opd.model_copy(
        update={"steps": steps, "prompts_per_step": prompts, "rollout": rollout, "eval_every": 1}
    )
    student = load_student(load_model("data/convert/model"), Path("data/distill/adapter"), p)
    teacher = load_model("data/prepare/model")
    tok = load_tokenizer("data/convert/model")
    train = pl.read_parquet("data/prepare/datasets/instruct_train.parquet")
    heldout = pl.read_parquet("data/prepare/datasets/instruct_eval.parquet")["prompt"]
    with tempfile.TemporaryDirectory() as out:
        m = train_opd(
            student, teacher, tok, train, p, seed=seed, out_dir_tmp=Path(out),
            heldout_prompts=heldout.head(p.heldout_prompts).to_list(),
        )  # fmt: skip
    before, last = m["heldout_reverse_kl_topk_lb_before"], m["heldout_reverse_kl_topk_lb_after"]
    return {
        "kernel": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
        "prompts_x_samples": f"{prompts}x{samples}",
        "seed": seed,
        "before": round(before, 4),
        "last": round(last, 4),
        "kept": round(m["heldout_reverse_kl_topk_lb_kept"], 4),
        "kept_step": m["kept_step"],
        "last_improved": last < before,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", nargs="+", default=["2x2", "4x4", "8x4"])
    args = ap.parse_args()
    cfg = load_params(args.params, {"threads": 1})
    torch.set_num_threads(1)
    for batch in args.batches:
        prompts, samples = (int(x) for x in batch.split("x"))
        for seed in args.seeds:
            print(json.dumps(one_run(cfg, prompts, samples, args.steps, seed)), flush=True)


if __name__ == "__main__":
    main()
