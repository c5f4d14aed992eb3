"""evaluate on the tiny profile: real prepare/analyze/convert, two random LoRA adapters."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from helpers_distill import build_upstream

from retroloop.artifacts import read_manifest
from retroloop.canonical import split_run_dependent
from retroloop.config import load_params
from retroloop.errors import ArtifactError
from retroloop.provenance import verify

TINY = Path(__file__).resolve().parents[2] / "profiles" / "tiny.yaml"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the repo
MODELS = ("teacher", "converted", "distilled", "opd")
PER_MODEL = (
    "ifeval_prompt_strict",
    "ifeval_prompt_loose",
    "ifeval_inst_strict",
    "ifeval_inst_loose",
    "ifeval_skipped",
    "kl_to_teacher",
    "instruct_nll",
    "domain_nll",
    "domain_ppl",
)


def _random_adapter(model_dir: Path, out: Path, seed: int) -> None:
    """A LoRA adapter on all linear layers with a random (non-zero) B, as distill/opd would save
    (the looped model's recurrence adapter in `modules_to_save`)."""
    from peft import get_peft_model

    from retroloop.models.loading import load_model
    from retroloop.models.lora import lora_config_for

    model = load_model(model_dir)
    torch.manual_seed(seed)  # lora_A's init
    peft_model = get_peft_model(model, lora_config_for(model, r=2, alpha=32, dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
            elif "modules_to_save" in name:
                # Off pass-through, the state s_k reaches the block, so R changes the output.
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(out)


def _reference_nll(model_dir: Path, texts: list[str], max_seq_len: int) -> float:
    """Mean next-token NLL, one unpadded text at a time through the model's own `labels` loss."""
    from retroloop.models.loading import load_model, load_tokenizer

    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_seq_len)["input_ids"]
            if len(ids) < 2:
                continue
            ids_1_T = torch.tensor([ids])
            total += model(input_ids=ids_1_T, labels=ids_1_T).loss.item() * (len(ids) - 1)
            count += len(ids) - 1
    return total / count


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    """data/ of the tiny profile up to convert (a copy of the stage tests' shared upstream),
    plus distill and opd adapters."""
    root = tmp_path_factory.mktemp("evaluate")
    shutil.copytree(build_upstream(tmp_path_factory) / "data", root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _random_adapter(Path("data/convert/model"), Path("data/distill/adapter"), seed=1)
        _random_adapter(Path("data/convert/model"), Path("data/opd/adapter"), seed=2)
    return root


@pytest.mark.learning
def test_evaluate_four_models(pipeline_dir, monkeypatch):
    from retroloop.stages import evaluate

    monkeypatch.chdir(pipeline_dir)
    cfg = load_params(TINY)
    manifest = evaluate.run(cfg)

    out = Path("data/evaluate")
    assert manifest.kind == "report" and manifest.stage == "evaluate"
    roles = {ref.role for ref in manifest.inputs}
    assert roles == {
        "teacher",
        "converted",
        "distill_adapter",
        "opd_adapter",
        "instruct_eval",
        "domain_eval",
    }
    assert verify(out) == []
    assert read_manifest(out).content_sha256 == manifest.content_sha256

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(split_run_dependent(manifest.metrics)[0]))
    run = json.loads((out / "run.json").read_text())  # wall-clock figures: outside the hash
    assert set(run["models"]) == set(MODELS)
    assert set(metrics["models"]) == set(MODELS)
    for name in MODELS:
        missing = set(PER_MODEL) - set(metrics["models"][name])
        assert not missing, f"{name} lacks {missing}"
        assert "seconds" not in metrics["models"][name] and run["models"][name]["seconds"] > 0
        assert "gsm8k_accuracy" not in metrics["models"][name]  # gsm8k_path is null
        m = metrics["models"][name]
        assert m["domain_ppl"] == pytest.approx(math.exp(m["domain_nll"]), rel=1e-6)
    # The teacher's NLL equals Hugging Face's own shifted loss, text by text, token-weighted.
    reference = _reference_nll(
        Path("data/prepare/model"),
        pl.read_parquet("data/prepare/datasets/domain_eval.parquet")["text"]
        .head(cfg.evaluate.nll_records)
        .to_list(),
        cfg.prepare.max_seq_len,
    )
    assert metrics["models"]["teacher"]["domain_nll"] == pytest.approx(reference, rel=1e-5)
    assert metrics["models"]["teacher"]["kl_to_teacher"] == 0.0
    assert metrics["models"]["converted"]["kl_to_teacher"] > 0.2  # measured ≥ 0.64 (tiny_margins)
    assert metrics["models"]["converted"]["recurrence"] == cfg.convert.recurrence
    # The adapters change the model, so their NLL differs from the converted model's.
    assert (
        metrics["models"]["distilled"]["domain_nll"] != metrics["models"]["converted"]["domain_nll"]
    )

    assert set(metrics["recovery"]) == {"distilled", "opd"}
    # The tiny teacher is trained (held-out NLL < 4), so conversion costs NLL on held-out text
    # (measured ≥ 0.41 nats on every kernel level and seed 0-2, benchmarks/tiny_margins.py).
    nll = {name: metrics["models"][name]["domain_nll"] for name in ("teacher", "converted")}
    assert nll["converted"] > nll["teacher"] + 0.1, nll
    assert {"domain_nll", "kl_to_teacher", "ifeval_prompt_strict"} <= set(
        metrics["recovery"]["opd"]
    )
    assert set(metrics["recurrence_scaling"]) == {"converted", "distilled", "opd"}
    assert set(metrics["recurrence_scaling"]["converted"]) == {
        f"R{r}" for r in cfg.evaluate.recurrence_scaling
    }

    report = (out / "report.md").read_text()
    for name in MODELS:
        assert f"| {name} |" in report
    for png in ("models.png", "recurrence_scaling.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    csv = pl.read_csv(out / "recurrence_scaling.csv")
    assert {"model", "R", "domain_nll"} <= set(csv.columns)
    assert {"domain_forward_kl", "gflops_per_token"} <= set(csv.columns)
    assert csv.height == 3 * len(cfg.evaluate.recurrence_scaling)
    # The pass-through recurrence adapter ignores s_k, so the converted model's NLL does not
    # depend on R; the distilled one's (perturbed adapter) does. The default R of the scaling
    # curve equals the model's own evaluation.
    curves = metrics["recurrence_scaling"]
    assert curves["converted"]["R1"]["domain_nll"] == pytest.approx(
        curves["converted"]["R2"]["domain_nll"]
    )
    assert curves["distilled"]["R1"]["domain_nll"] != pytest.approx(
        curves["distilled"]["R2"]["domain_nll"]
    )
    R = f"R{cfg.convert.recurrence}"
    for key in ("domain_nll", "domain_forward_kl", "gflops_per_token"):
        assert curves["converted"][R][key] == pytest.approx(
            metrics["models"]["converted"][key], rel=1e-5
        )
        assert curves["distilled"][R][key] == pytest.approx(
            metrics["models"]["distilled"][key], rel=1e-5
        )
    # Exact full-vocabulary KL(teacher ‖ model) on the held-out documents: 0 for the teacher,
    # positive for the conversion; R-independent for the pass-input converted model only.
    assert metrics["models"]["teacher"]["domain_forward_kl"] == 0.0
    assert metrics["models"]["converted"]["domain_forward_kl"] > 0.1  # measured ≥ 0.48
    assert curves["converted"]["R1"]["domain_forward_kl"] == pytest.approx(
        curves["converted"]["R2"]["domain_forward_kl"]
    )
    assert curves["opd"]["R1"]["domain_forward_kl"] != pytest.approx(
        curves["opd"]["R2"]["domain_forward_kl"]
    )
    # Compute per token grows by one block (+ adapter) per extra iteration.
    flops = [curves["converted"][f"R{r}"]["gflops_per_token"] for r in (1, 2)]
    assert flops[1] > flops[0]
    assert metrics["models"]["teacher"]["gflops_per_token"] > flops[0]

    # Greedy IFEval generations are cached on disk, one file per (model, adapter, prompts, R).
    assert len(list(Path("data/cache/evaluate").glob("gen-*.json"))) == len(MODELS)


def test_missing_adapter_names_the_stage(pipeline_dir, monkeypatch):
    from retroloop.stages import evaluate

    monkeypatch.chdir(pipeline_dir)
    with pytest.raises(ArtifactError, match=r"opd_adapter.*retroloop stage opd"):
        evaluate.run(
            load_params(TINY),
            inputs={"opd_adapter": "data/opd/missing"},
            out_dir=Path("data/never"),
        )
    assert not Path("data/never").exists()


def test_real_ifeval_and_gsm8k_on_any_model_set(pipeline_dir, monkeypatch):
    from retroloop.eval import suite
    from retroloop.eval.gsm8k import extract_answer
    from retroloop.stages.common import dataset_path
    from retroloop.stages.evaluate import ModelSpec, write_evaluation

    ifeval_file, gsm8k_file = (
        SHARED / "ifeval" / "input_data.jsonl",
        SHARED / "gsm8k" / "test.jsonl",
    )
    if not (ifeval_file.is_file() and gsm8k_file.is_file()):
        pytest.skip(f"real IFEval / GSM8K files not found under {SHARED}")
    monkeypatch.chdir(pipeline_dir)
    # Repo-relative paths, as a user writes them in params.yaml, resolved from this tmp dir.
    cfg = load_params(
        TINY,
        {
            "evaluate.ifeval_path": os.path.relpath(ifeval_file),
            "evaluate.gsm8k_path": os.path.relpath(gsm8k_file),
        },
    )
    # The tiny models answer no GSM8K question, so grading is checked on known answers: the
    # real generation runs, then the even-numbered questions get their gold answer back.
    golds = [json.loads(line)["answer"] for line in gsm8k_file.read_text().splitlines()[:4]]
    generate = suite.generate_responses

    def half_right(model, tokenizer, prompts, **kwargs):
        texts = generate(model, tokenizer, prompts, **kwargs)
        if kwargs["cache_key_parts"]["purpose"] != "gsm8k":
            return texts
        assert len(prompts) == len(golds) == cfg.evaluate.gsm8k_questions
        return [f"so #### {extract_answer(g)}" if i % 2 == 0 else "no idea" for i, g in enumerate(golds)]  # fmt: skip

    monkeypatch.setattr(suite, "generate_responses", half_right)
    specs = {
        "base": ModelSpec(Path("data/prepare/model")),
        "looped_r3": ModelSpec(
            Path("data/convert/model"), Path("data/distill/adapter"), recurrence=3
        ),
    }
    manifest = write_evaluation(
        cfg,
        specs,
        instruct_eval=dataset_path("instruct", "eval"),
        domain_eval=dataset_path("domain", "eval"),
        out_dir=Path("data/evaluate_real"),
        teacher="base",
        scaling=("looped_r3",),
    )
    roles = {ref.role for ref in manifest.inputs}
    assert {"base", "looped_r3", "looped_r3_adapter", "ifeval", "gsm8k"} <= roles
    models = manifest.metrics["models"]
    assert set(models) == {"base", "looped_r3"}
    assert manifest.metrics["recovery"] == {}  # no "converted" among the specs
    assert models["looped_r3"]["recurrence"] == 3
    for m in models.values():
        # The first 4 real IFEval prompts, graded (a checker needing NLTK data is skipped).
        assert 0 < m["ifeval_prompts"] <= cfg.evaluate.ifeval_prompts
        assert m["gsm8k_accuracy"] == 0.5 and m["gsm8k_questions"] == 4
    report = (Path("data/evaluate_real") / "report.md").read_text()
    assert "| base |" in report and "| looped_r3 |" in report


def _static_artifact(out: Path) -> Path:
    """A `static` artifact (model + adapter, with its manifest) as the static stage writes it."""
    from retroloop.artifacts import atomic_artifact

    with atomic_artifact(out, stage="static", kind="model") as w:
        shutil.copytree("data/convert/model", w.dir / "model")
        shutil.copytree("data/distill/adapter", w.dir / "adapter")
        w.finish(params={}, params_sha256="", seed=0, device="cpu")
    return out


class _Loaded(Exception):
    """Raised by the stubbed loaders: evaluate got past verification and began to read."""


def test_tampered_static_artifact_is_refused_before_anything_loads(
    pipeline_dir, monkeypatch, tmp_path
):
    """The static baseline (data/static, found by evaluate itself) is an input like the others:
    verified before any model is loaded. The intact artifact gets past verification (the stub
    loader is reached); the tampered one is refused naming the file, and nothing is loaded."""
    from retroloop.stages import evaluate

    shutil.copytree(pipeline_dir / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)

    def loader(*args, **kwargs):
        raise _Loaded(args[0] if args else None)

    from retroloop.eval import models as eval_models

    monkeypatch.setattr(eval_models, "load_model", loader)  # evaluate's load_spec
    monkeypatch.setattr(evaluate, "load_tokenizer", loader)
    cfg = load_params(TINY)
    assert cfg.static.enabled
    static = _static_artifact(Path("data/static"))
    with pytest.raises(_Loaded):  # intact: verification passes, loading begins
        evaluate.run(cfg, out_dir=Path("data/never"))

    weights = static / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=r"adapter_model\.safetensors.*'static_adapter'"):
        evaluate.run(cfg, out_dir=Path("data/never"))
    assert not Path("data/never").exists()
