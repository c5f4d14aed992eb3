"""static on the tiny profile: the baseline the looped model must beat (McLeish et al. 2025).

The static model is the source with only the split's kept layers, run once; it is distilled with
the `distill` section's data, steps, loss and LoRA, so the comparison with the looped student is
at an equal training budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_distill import held_out_kl, tiny, workdir  # noqa: F401  (fixture)

from retroloop.artifacts import read_manifest
from retroloop.errors import ArtifactError
from retroloop.models.loading import load_model
from retroloop.models.recurrent import RecurrentForCausalLM
from retroloop.provenance import verify
from retroloop.stages import static


@pytest.mark.learning
def test_static_is_the_kept_layers_run_once_and_distils_like_the_looped_student(workdir) -> None:  # noqa: F811
    cfg = tiny(**{"static.enabled": True})
    manifest = static.run(cfg)
    assert verify(Path("data/static")) == []
    split = json.loads(Path("data/analyze/split.json").read_text())
    kept = split["prelude"] + split["block"] + split["coda"]

    model = load_model("data/static/model")
    assert not isinstance(model, RecurrentForCausalLM)  # a plain model: no loop, no adapter
    assert len(model.model.layers) == len(kept) == manifest.metrics["kept_layers"]
    # With the pass-input init, the converted model at R = 1 is exactly the layer-dropped
    # source, i.e. the static model: the two start the comparison from the same function.
    assert cfg.convert.init == "pass_input"
    looped = load_model("data/convert/model")
    ids = torch.randint(
        0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = looped(input_ids=ids, num_recurrence=1, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    # The same budget as distill: its whole section, recorded in the manifest.
    recorded = read_manifest(Path("data/static")).params
    assert {k: recorded[k] for k in cfg.section("distill")} == cfg.section("distill")
    m = manifest.metrics
    assert m["trained"] is True and m["steps"] == cfg.distill.steps
    # It learns: gains that distill.lr=1e-9 puts at 0.07 / 2e-6 (tiny_margins.py, ≥ 3× margin).
    assert 1 - m["kl_end"] / m["kl_start"] > 0.25, m
    model_dir, adapter = Path("data/static/model"), Path("data/static/adapter")
    before = held_out_kl(model_dir, Rs=(None,))[None]["kl"]  # None: a plain model, no R
    after = held_out_kl(model_dir, adapter, Rs=(None,))[None]["kl"]
    assert 1 - after / before > 0.08, (before, after)


def test_static_disabled_builds_the_model_but_does_not_train(workdir) -> None:  # noqa: F811
    manifest = static.run(tiny(**{"static.enabled": False}))
    assert manifest.metrics["trained"] is False
    assert (Path("data/static/adapter") / "NOT_TRAINED").is_file()
    assert not (Path("data/static/adapter") / "adapter_config.json").exists()
    assert Path("data/static/model/config.json").is_file()
    assert verify(Path("data/static")) == []


@pytest.mark.parametrize("tampered", ["data/analyze/split.json", "data/prepare/model/config.json"])
def test_a_tampered_input_is_refused_before_anything_loads(workdir, monkeypatch, tampered) -> None:  # noqa: F811
    def must_not_load(*args, **kwargs):
        raise AssertionError("static loaded its source before verifying its inputs")

    monkeypatch.setattr(static, "load_model", must_not_load)
    monkeypatch.setattr(static, "load_tokenizer", must_not_load)
    path = Path(tampered)
    path.write_text(path.read_text().replace("}", ' , "x": 1}', 1) if path.suffix == ".json" else "")  # fmt: skip
    with pytest.raises(ArtifactError, match=path.name):
        static.run(tiny(**{"static.enabled": False}))
    assert not Path("data/static").exists()


def test_the_static_model_is_built_in_the_runs_dtype(workdir) -> None:  # noqa: F811
    static.run(tiny(**{"static.enabled": False, "dtype": "bfloat16"}))
    model = load_model("data/static/model", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    config = json.loads(Path("data/static/model/config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
