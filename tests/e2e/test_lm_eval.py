"""The looped model in the tool people evaluate with (issue 20, item 5): `retroloop lm-eval`
is lm-eval's own command line with the architecture registered, on a `retroloop export`ed
tiny model and a small local lm-eval task (no download). lm-eval's per-sample log-likelihoods
must be the merged model's own, computed here token by token the way lm-eval encodes a
(context, continuation) pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import Built, sh

pytestmark = pytest.mark.e2e

DOCS = [
    {"context": "Note 3: the pump on line 3 needs oil every", "target": "5 days."},
    {"context": "The tiny model reads", "target": "a short note."},
    {"context": "Question: what does the pump need? Answer:", "target": "oil"},
    {"context": "Every night the cycle", "target": "runs at three."},
]


def _task(folder: Path) -> None:
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny.yaml").write_text(
        "task: retroloop_tiny_notes\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: " {{target}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def _direct_loglikelihoods(model_dir: Path) -> list[float]:
    """sum log p(continuation | context) under the merged model, encoded as lm-eval's HFLM does:
    tokens of context + continuation, no BOS, the continuation = what follows the context's
    own tokens."""
    import torch
    import transformers

    import retroloop  # noqa: F401  (registers the looped architecture)

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for doc in DOCS:
        context, target = doc["context"], " " + doc["target"]
        whole = tok(context + target, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
        picked = logp[torch.arange(n_ctx - 1, len(whole) - 1), torch.tensor(whole[n_ctx:])]
        out.append(float(picked.sum()))
    return out


def test_retroloop_lm_eval_scores_an_exported_looped_model_with_its_own_likelihoods(
    tiny_built: Built, tmp_path: Path
) -> None:
    merged = tmp_path / "merged"
    sh(["retroloop", "export", "data/opd/adapter", "--out", str(merged)], tiny_built.path)
    _task(tmp_path / "task")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = sh(
        ["retroloop", "lm-eval", "--model", "hf",
         "--model_args", f"pretrained={merged},dtype=float32",
         "--tasks", "retroloop_tiny_notes", "--include_path", str(tmp_path / "task"),
         "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "results"), "--log_samples"],
        tmp_path, env=offline, timeout=600,
    )  # fmt: skip
    assert "retroloop_tiny_notes" in proc.stdout
    samples = sorted(
        (json.loads(line) for f in (tmp_path / "results").rglob("samples_*.jsonl")
         for line in f.read_text().splitlines()),
        key=lambda s: s["doc_id"],
    )  # fmt: skip
    assert [s["doc_id"] for s in samples] == [0, 1, 2, 3]
    scored = [float(s["resps"][0][0][0]) for s in samples]
    direct = _direct_loglikelihoods(merged)
    assert max(abs(a - b) for a, b in zip(scored, direct, strict=True)) < 1e-3, (scored, direct)
