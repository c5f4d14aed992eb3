"""The bf16 lane (issue 21 item 4): the tiny pipeline end to end with `dtype: bfloat16`, beside
the same pipeline in float32, every stage's `run(cfg)` in order in a temporary directory.

`slow` (about 2-3 minutes on a loaded 2-core box: two pipelines, the tiny teacher trained
once): it runs in `make test-slow` (`pytest -m slow`), not in `make test`. It asserts

(a) the weights each stage saves are in the dtype they should be: the converted and static
    models in bf16; the source (prepare) in fp32 on purpose (saved as fetched, every later
    stage casts it at load); every trained adapter (distill, static, OPD) in fp32, LoRA by
    PEFT and the recurrence adapter by `lora.fp32_trainable` (bf16 rounds its updates away);
(b) the guards passed at bf16's tolerance: convert's R = 1 equivalence and cached generation,
    OPD's sampler / teacher-scoring checks, evaluate's cached generation for every model;
(c) evaluate's held-out domain KL of each model is within `MARGIN` of the float32 run's;
(d) distill still learns in bf16: the share of the conversion's held-out KL it wins back.

Measured, seed 0 (evaluate's held-out `domain_forward_kl`, bf16 / fp32; AVX2 and default with
ATEN_CPU_CAPABILITY forced on an AVX-512 + AMX machine, see `_attention`):

    kernel    converted        distilled        static           bf16 distill recovers
    AVX-512   0.4799 / 0.4797  0.3074 / 0.3104  0.3076 / 0.3097  0.359
    AVX2      0.4796 / 0.4798  0.3022 / 0.3085  0.3053 / 0.3093  0.370
    default   0.4800 / 0.4797  0.3056 / 0.3090  0.3090 / 0.3095  0.363
    seed 1    0.6713 / 0.6708  0.5320 / 0.5383  0.5121 / 0.5176  0.207   (AVX-512)
    seed 2    0.9699 / 0.9691  0.8098 / 0.8151  0.8007 / 0.8055  0.165   (AVX-512)

distill.lr = 1e-9 puts the recovery at 0.000 (test_distill_learns_in_bf16 fails); convert
loading in fp32 fails the dtype and guard-tolerance tests.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.nn.attention import SDPBackend, sdpa_kernel

from retroloop.config import STAGES, Params, load_params
from retroloop.guards import TOLERANCE
from retroloop.stages.convert import EQUIVALENCE_TOLERANCE
from tests.conftest import TINY_PROFILE

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
log = logging.getLogger(__name__)

# |bf16 − fp32| of evaluate's held-out domain forward KL, per model: at most 0.0063 on
# AVX-512, AVX2 and default kernels and seeds 0-2 (the table above); 0.03 keeps ≥ 4.7×
# headroom and is ~1/5 of what distill wins back (0.14-0.18 nats).
MARGIN = 0.03
# Share of the conversion's held-out KL gap distill wins back in bf16 (evaluate's
# recovery.distilled.domain_forward_kl): ≥ 0.359 on every kernel level at seed 0, 0.165 at
# seed 2 (the table above); distill.lr = 1e-9 puts it at 0. The threshold keeps ≥ 3.3×.
RECOVERED = 0.05
COMPARED = ("converted", "distilled", "static")


def _run_pipeline(root: Path, cfg: Params) -> dict[str, float]:
    """Every stage's `run(cfg)` in order with `root` as the working directory; seconds each."""
    seconds = {}
    root.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name in STAGES:
            tic = time.perf_counter()
            importlib.import_module(f"retroloop.stages.{name}").run(cfg)
            seconds[name] = time.perf_counter() - tic
    return seconds


def _attention():
    """torch's CPU flash attention decides to pack bf16 blocks for AMX from the hardware's
    flags, then calls a packing routine only its AVX-512 build has: with ATEN_CPU_CAPABILITY
    forced to avx2 / default on an AMX machine (this one), bf16 SDPA over ≥ 64 positions raises
    "pack_vnni2 is only supported when avx512 is supported". A CPU that really is AVX2 never
    packs; under a forced level the math backend stands in, for both dtypes."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default"):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bf16_lane")
    out = {}
    with _attention():
        for dtype in ("float32", "bfloat16"):
            seconds = _run_pipeline(base / dtype, load_params(TINY_PROFILE, {"dtype": dtype}))
            log.info("%s: %s", dtype, {k: round(v, 1) for k, v in seconds.items()})
            out[dtype] = base / dtype / "data"
    return out


def _dtypes(folder: Path) -> set[str]:
    """The dtypes of every tensor in the safetensors files under `folder`."""
    found = set()
    for file in folder.rglob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            found |= {f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
    return found


def _metrics(data: Path, stage: str) -> dict:
    return json.loads((data / stage / "manifest.json").read_text())["metrics"]


def test_each_stage_saves_the_dtype_it_should(runs) -> None:
    bf16, fp32 = runs["bfloat16"], runs["float32"]
    saved = {
        "prepare/model": "F32",  # the source as fetched; later stages cast it at load
        "convert/model": "BF16",
        "static/model": "BF16",
        "distill/adapter": "F32",  # trained weights: fp32 (LoRA by PEFT, the adapter by us)
        "static/adapter": "F32",
        "opd/adapter": "F32",
    }
    for folder, dtype in saved.items():
        assert _dtypes(bf16 / folder) == {dtype}, folder
        assert _dtypes(fp32 / folder) == {"F32"}, folder
    for folder in ("convert/model", "static/model"):
        config = json.loads((bf16 / folder / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16", folder


def test_the_guards_pass_at_the_bf16_tolerance(runs) -> None:
    data, tol = runs["bfloat16"], TOLERANCE[torch.bfloat16]
    convert = _metrics(data, "convert")
    assert convert["equivalence_max_abs_diff"] <= EQUIVALENCE_TOLERANCE["bfloat16"]
    generate = convert["guard_cached_generate"]
    assert generate["tolerance"] == tol and generate["token_agreement"] == 1.0
    assert generate["max_abs_logp_diff"] <= tol
    rollouts = _metrics(data, "opd")["guard_rollouts"]
    assert rollouts["tolerance"] == tol and rollouts["tokens"] > 0
    assert rollouts["sampler_vs_learner_max_abs_logp_diff"] <= tol
    assert rollouts["teacher_scoring_max_abs_logp_diff"] <= tol
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())["models"]
    for name, row in evaluated.items():
        assert row["guard_cached_generate_max_abs_logp_diff"] <= tol, name


def test_held_out_kl_is_within_the_margin_of_fp32(runs) -> None:
    got = {
        dtype: json.loads((data / "evaluate" / "metrics.json").read_text())["models"]
        for dtype, data in runs.items()
    }
    for name in COMPARED:
        bf16, fp32 = (got[d][name]["domain_forward_kl"] for d in ("bfloat16", "float32"))
        log.info("%s domain_forward_kl: bf16 %.4f fp32 %.4f", name, bf16, fp32)
        assert abs(bf16 - fp32) <= MARGIN, (name, bf16, fp32)


@pytest.mark.learning
def test_distill_learns_in_bf16(runs) -> None:
    metrics = json.loads((runs["bfloat16"] / "evaluate" / "metrics.json").read_text())
    recovered = metrics["recovery"]["distilled"]["domain_forward_kl"]
    log.info("bf16 distill recovers %.3f of the conversion's held-out KL", recovered)
    assert recovered > RECOVERED
