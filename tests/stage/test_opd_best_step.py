"""OPD publishes its best held-out step, not its last (issue 24 item 5).

The stage scores the held-out prompts at the start (step 0: the starting adapter is a
candidate) and every `opd.eval_every` steps, on the same draws each time, and publishes the
adapter of the lowest held-out reverse KL, saying which step it kept and whether any step
improved on the start. Upstream artifacts: the tiny profile's prepare → analyze → convert
(`helpers_distill.build_upstream`); each test works on its own copy of `data/`.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from helpers_distill import build_upstream
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from retroloop import opd_loop
from retroloop.config import load_params
from retroloop.errors import ConfigError
from retroloop.models.loading import load_model, load_tokenizer
from retroloop.models.lora import lora_config_for
from retroloop.onpolicy import fixed_initial_state, heldout_reverse_kl
from retroloop.opd_io import validation_split
from retroloop.stages import opd
from retroloop.steplog import read_steps

TINY = Path(__file__).resolve().parents[2] / "profiles" / "tiny.yaml"
STUDENT, TEACHER = Path("data/convert/model"), Path("data/prepare/model")
ADAPTER = "adapter/adapter_model.safetensors"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def workdir(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    shutil.copytree(build_upstream(tmp_path_factory) / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    return tmp_path


def tiny(**over):
    return load_params(TINY, {"threads": 1, **over})


def save_parent(b_std: float = 0.05) -> dict[str, torch.Tensor]:
    """A distill adapter (LoRA r = 2, B randomised) for OPD to continue; its weights."""
    base = load_model(STUDENT)
    parent = get_peft_model(base, lora_config_for(base, r=2, alpha=32, dropout=0.0))
    with torch.no_grad():
        for name, param in parent.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    parent.save_pretrained("data/distill/adapter")
    return load_file("data/distill/adapter/adapter_model.safetensors")


def heldout_kl_of(adapter: Path, cfg) -> float:
    """The stage's held-out measure, recomputed from a published adapter."""
    student = PeftModel.from_pretrained(load_model(STUDENT), adapter).eval()
    frame = pl.read_parquet("data/prepare/datasets/instruct_train.parquet")
    prompts = frame["prompt"].tail(cfg.opd.heldout_prompts).to_list()  # opd_io.validation_split
    p = cfg.opd
    with fixed_initial_state(student.get_base_model()):
        return heldout_reverse_kl(
            student, load_model(TEACHER), load_tokenizer(STUDENT), prompts,
            n=p.rollout.samples_per_prompt, max_new_tokens=p.rollout.max_new_tokens,
            seed=cfg.seed,
        )  # fmt: skip


def test_stage_publishes_the_best_heldout_step_not_the_last(workdir, monkeypatch):
    # Held-out values scripted so step 2 of 4 is the best: the published adapter must be the
    # one a 2-step run ends with (the trajectory does not depend on the run's length), not the
    # 4-step one. The scripted measure is called at steps 0, 1, 2, 3, 4 (eval_every 1).
    save_parent()
    values = iter([1.0, 0.9, 0.5, 0.7, 0.8])
    monkeypatch.setattr(opd_loop._Loop, "heldout_kl", lambda self, prompts: next(values))
    m = opd.run(tiny(**{"opd.steps": 4, "opd.eval_every": 1}), out_dir=Path("data/best")).metrics
    assert (m["kept_step"], m["improved"]) == (2, True)
    assert m["heldout_reverse_kl_exact_kept"] == 0.5
    assert (m["heldout_reverse_kl_exact_before"], m["heldout_reverse_kl_exact_after"]) == (1.0, 0.8)  # fmt: skip
    steps = read_steps(Path("data/best"))
    assert steps[opd_loop.HELDOUT].to_list() == [0.9, 0.5, 0.7, 0.8]

    # Every step better than the last: the last step is published. (Same held-out prompts, so
    # the same training pool: opd_io.validation_split holds them out of it.)
    falling = itertools.count(0, -1)
    monkeypatch.setattr(opd_loop._Loop, "heldout_kl", lambda self, prompts: float(next(falling)))
    two = opd.run(tiny(**{"opd.steps": 2}), out_dir=Path("data/two"), checkpoint_dir=Path("data/c2"))  # fmt: skip
    four = opd.run(tiny(**{"opd.steps": 4}), out_dir=Path("data/four"), checkpoint_dir=Path("data/c4"))  # fmt: skip
    assert (two.metrics["kept_step"], four.metrics["kept_step"]) == (2, 4)
    best = load_file(f"data/best/{ADAPTER}")
    assert best.keys() == load_file(f"data/two/{ADAPTER}").keys()
    for k, v in load_file(f"data/two/{ADAPTER}").items():
        assert torch.equal(best[k], v), k
    assert any(not torch.equal(best[k], v) for k, v in load_file(f"data/four/{ADAPTER}").items())


def test_stage_evaluates_every_eval_every_steps_and_the_last(workdir, monkeypatch):
    calls = []

    def measure(self, prompts):
        calls.append(list(prompts))
        return 1.0  # a tie everywhere: the earliest step (the start) is kept

    monkeypatch.setattr(opd_loop._Loop, "heldout_kl", measure)
    cfg = tiny(**{"opd.steps": 3, "opd.eval_every": 2})
    m = opd.run(cfg).metrics
    steps = read_steps(Path("data/opd"))
    assert steps[opd_loop.HELDOUT].to_list() == [None, 1.0, 1.0]  # steps 2 and 3 (the last)
    # The held-out prompts are the train split's last rows (not instruct_eval, which evaluate
    # reports on), and OPD never samples them for training.
    train = pl.read_parquet("data/prepare/datasets/instruct_train.parquet")
    tail = train.tail(cfg.opd.heldout_prompts)
    assert calls == [tail["prompt"].to_list()] * 3  # steps 0, 2, 3
    evaluated = set(pl.read_parquet("data/prepare/datasets/instruct_eval.parquet")["prompt"])
    trained = set(pl.read_parquet("data/opd/rollouts.parquet")["prompt_id"])
    assert calls[0] and trained and not trained & set(tail["id"].cast(str))
    assert not evaluated & set(tail["prompt"])
    assert (m["kept_step"], m["improved"], m["heldout_eval_every"]) == (0, False, 2)


@pytest.mark.learning
def test_stage_with_a_harmful_lr_keeps_the_starting_adapter(workdir, caplog):
    # The teacher is the student's own base model and the parent adapter sits 0.15 nat/token
    # from it (B ~ N(0, 0.01)): near the optimum, lr 0.3 (Adam moves every LoRA weight by ~0.3
    # a step) overshoots, so every evaluated step is worse than the start (0.57, 1.7, 2.0 for
    # 3 steps) and the published adapter is the parent's, byte for byte, and says so.
    parent = save_parent(b_std=0.01)
    cfg = tiny(**{"opd.steps": 2, "opd.eval_every": 1, "opd.lr": 0.3})
    with caplog.at_level(logging.WARNING, logger="retroloop.opd_loop"):
        m = opd.run(cfg, inputs={"teacher": STUDENT}).metrics
    assert (m["kept_step"], m["improved"]) == (0, False), m
    assert m["heldout_reverse_kl_exact_kept"] == m["heldout_reverse_kl_exact_before"]
    assert m["heldout_reverse_kl_exact_after"] > 2 * m["heldout_reverse_kl_exact_before"]
    assert "the published adapter is the starting one" in caplog.text
    published = load_file(f"data/opd/{ADAPTER}")
    assert published.keys() == parent.keys()
    assert all(torch.equal(published[k], v) for k, v in parent.items())


@pytest.mark.learning
def test_stage_published_adapter_is_no_worse_than_its_start_on_the_heldout_measure(workdir):
    # The tiny profile's own OPD (lr 1e-3, 2 prompts x 2 samples), 4 steps from a distill
    # adapter: whatever the steps do, the published adapter's held-out reverse KL, recomputed
    # from its files, is the kept figure and is <= the parent's.
    save_parent()
    cfg = tiny(**{"opd.steps": 4, "opd.eval_every": 1})
    m = opd.run(cfg).metrics
    kept, before = m["heldout_reverse_kl_exact_kept"], m["heldout_reverse_kl_exact_before"]
    assert kept <= before and m["improved"] == (kept < before)
    assert heldout_kl_of(Path("data/opd/adapter"), cfg) == pytest.approx(kept, rel=1e-5)
    assert heldout_kl_of(Path("data/distill/adapter"), cfg) == pytest.approx(before, rel=1e-5)


def test_heldout_prompts_that_leave_too_few_to_train_on_are_one_line() -> None:
    frame = pl.DataFrame({"prompt": [f"p{i}" for i in range(5)]})
    p = tiny().opd.model_copy(update={"heldout_prompts": 4, "prompts_per_step": 2})
    with pytest.raises(ConfigError, match=r"opd.heldout_prompts: 4 held out .* 5 prompts"):
        validation_split(frame, p)
    train, heldout = validation_split(frame, p.model_copy(update={"heldout_prompts": 3}))
    assert train["prompt"].to_list() == ["p0", "p1"] and heldout == ["p2", "p3", "p4"]
    assert validation_split(frame, p.model_copy(update={"heldout_prompts": 0}))[1] is None
