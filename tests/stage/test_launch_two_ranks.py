"""`launch.nproc_per_node: 2` makes `retroloop stage distill` (what dvc.yaml runs) relaunch itself
under torch.distributed.run with two gloo ranks, no hand-written torchrun: the adapter equals
the one-process run with the same global batch (grad_accum 2) within float tolerance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_distill import TINY, tiny, workdir  # noqa: F401  (fixture)
from safetensors.torch import load_file

from retroloop.artifacts import read_manifest
from retroloop.stages import distill


# Two fresh interpreters import torch + transformers + peft (as the torchrun test in
# test_distill.py, 70-90 s on the shared 2-core box): `slow`, run with `make test-slow`.
@pytest.mark.slow
def test_nproc_per_node_two_relaunches_distill_and_matches_one_process(workdir) -> None:  # noqa: F811
    steps = {"distill.steps": 3, "distill.batch_size": 2}
    single = distill.run(
        tiny(**steps, **{"distill.grad_accum": 2}),
        out_dir=Path("data/d1"),
        checkpoint_dir=Path("data/c1"),
    )
    sets = [f"--set={k}={v}" for k, v in {**steps, "launch.nproc_per_node": 2}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    proc = subprocess.run(
        ["retroloop", "stage", "distill", "--params", str(TINY), *sets],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_manifest(Path("data/distill"))
    assert two.metrics["world_size"] == 2 and single.metrics["world_size"] == 1
    wa = load_file("data/d1/adapter/adapter_model.safetensors")
    wb = load_file("data/distill/adapter/adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
