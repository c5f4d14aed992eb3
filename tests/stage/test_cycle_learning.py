"""The cycle's phases learn (issue 24.7): on the tiny profile, LoRA mid-training lowers the
held-out domain NLL of the starting model, and OPD then lowers the exact reverse KL to the
teacher (`evaluate.kl_to_teacher`, on the student's own samples) of the mid-trained model. Each
assertion fails with its phase's learning rate set to ~0 (1e-12: the schema refuses 0).

The domain documents are the tiny upstream's prepared eval split (documents the tiny teacher
never trained on; the cycle holds one of the five out). Measured (the tiny upstream built and
the cycle run on each kernel level; the house rule of `benchmarks/tiny_margins.py`: each gain ≥
3× its threshold):

    kernel    domain NLL before → after mid-training    KL after mid-training → after OPD
    AVX-512   3.232 → 3.014  (drop 0.218; threshold 0.07)   0.139 → 0.053  (ratio 0.38; ≤ 0.85)
    AVX2      3.232 → 3.014  (drop 0.217)                   0.112 → 0.045  (ratio 0.40)
    default   3.232 → 3.015  (drop 0.217)                   0.112 → 0.050  (ratio 0.45)

With cycle.midtrain_lr 1e-12 the NLL assertion fails, with opd.lr 1e-12 the KL one.
"""

from __future__ import annotations

import pytest
from helpers_cycle import cycle_params, domain_file, recipe
from helpers_distill import workdir  # noqa: F401  (fixture)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.learning]

# Enough steps for each phase to move its number, enough KL prompts and tokens to measure it.
RUN = {
    "cycle.midtrain_steps": 6,
    "cycle.opd_steps": 12,
    "opd.prompts_per_step": 4,
    "cycle.eval_records": 4,
    "evaluate.kl_prompts": 4,
    "evaluate.kl_max_new_tokens": 16,
    "opd.rollout.max_new_tokens": 16,
    "cycle.registry": "reg",
}
NLL_DROP = 0.07  # nats: before − after mid-training, at least
KL_RATIO = 0.85  # after OPD / after mid-training, at most


def test_midtraining_lowers_domain_nll_and_opd_lowers_kl_to_the_teacher(workdir) -> None:  # noqa: F811
    data = domain_file(workdir, "eval", "unseen.jsonl")
    _, phases = recipe(cycle_params(workdir, "learn", **RUN), data)
    before, mid, opd = (phases[p] for p in ("before", "after_midtrain", "after_opd"))
    assert before["kl_to_teacher"] == 0.0  # the teacher is the starting model (cycle 1)
    assert mid["domain_nll"] < before["domain_nll"] - NLL_DROP, (before, mid)
    assert mid["kl_to_teacher"] > 0.05, mid  # mid-training drifted: something to recover
    assert opd["kl_to_teacher"] < KL_RATIO * mid["kl_to_teacher"], (mid, opd)
