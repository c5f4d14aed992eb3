"""Nothing non-finite is ever published (issue 19).

`distill.lr: .inf` used to train, exit 0 and publish an adapter of NaNs. The schema now refuses
non-finite numbers (tests/unit/test_config.py); a finite learning rate that overflows the
weights (1e30) must still stop every training loop at the first non-finite step, in one line
naming the stage, the step and the likely cause, with nothing published and the last good
checkpoint kept. Each case runs next to the good run it is compared with.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_distill import TINY, tiny, workdir  # noqa: F401  (fixture)

from retroloop import errors
from retroloop.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

OVERFLOW = 1e30  # finite, so the schema takes it; one AdamW step puts the weights at ~1e30


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _leftovers(data: Path) -> list[str]:
    return sorted(p.name for p in data.glob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def test_distill_stops_at_the_first_non_finite_step_and_publishes_nothing(
    workdir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture,
) -> None:
    short = ["--params", str(TINY), "--set", "distill.steps=3", "--set", "distill.checkpoint_every=1", "--set", "threads=1"]  # fmt: skip
    assert main(["stage", "distill", *short]) == 0, capsys.readouterr().err  # the good run
    published = _files(Path("data/distill"))
    capsys.readouterr()

    assert main(["stage", "distill", *short, "--set", f"distill.lr={OVERFLOW}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: distill: step ") and "non-finite" in line, err
    assert "distill.lr=1e+30 is too high" in line and "nothing was published" in line, line
    assert _files(Path("data/distill")) == published  # the good run's artifact, untouched
    assert _leftovers(Path("data")) == []
    # The checkpoints of the steps that passed stay; the failing step wrote none.
    step = int(line.split("step ")[1].split(":")[0])
    kept = sorted(p.name for p in Path("data/checkpoints/distill").glob("step_*"))
    assert kept == ([f"step_{step - 1}"] if step > 1 else []), (kept, line)
    if step > 1:
        assert f"the last good checkpoint data/checkpoints/distill/step_{step - 1} is kept" in line


def test_opd_stops_at_the_first_non_finite_step_and_publishes_nothing(
    workdir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OPD's loss turns NaN at step 2 (a degenerate batch, simulated in its loss function)."""
    from retroloop import onpolicy
    from retroloop.stages import opd

    real = onpolicy.opd_pg_loss
    calls = []

    def nan_on_the_second_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 1 else loss

    monkeypatch.setattr(onpolicy, "opd_pg_loss", nan_on_the_second_step)
    cfg = tiny(
        **{"threads": 1, "opd.steps": 3, "opd.rollout.batch_size": 64, "opd.checkpoint_every": 1}
    )  # one micro-batch per step
    with pytest.raises(errors.DivergedError) as err:
        opd.run(cfg)
    msg = str(err.value)
    assert msg.startswith("opd: step 2: non-finite loss") and "opd.lr=" in msg, msg
    assert "\n" not in msg
    assert not Path("data/opd").exists() and _leftovers(Path("data")) == []
    assert "the last good checkpoint data/checkpoints/opd/step_1 is kept" in msg, msg
    assert [p.name for p in Path("data/checkpoints/opd").glob("step_*")] == ["step_1"]


@pytest.mark.parametrize("lr", [OVERFLOW, 1e-3])
def test_the_cycles_sft_phases_stop_on_a_non_finite_step(lr: float) -> None:
    """The cycle's mid-training (and its SFT baseline) run `_sft`; the good lr beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from retroloop.cycle import _sft
    from retroloop.sequences import Sequence

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules="all-linear"))
    seqs = [Sequence(str(i), list(range(i, i + 8)), list(range(i, i + 8))) for i in range(4)]
    run = dict(steps=4, lr=lr, lr_key="cycle.midtrain_lr", batch_size=2, seed=0, pad_id=0)
    if lr == OVERFLOW:
        with pytest.raises(errors.DivergedError, match=r"^cycle midtrain: step \d: non-finite .*cycle\.midtrain_lr=1e\+30"):  # fmt: skip
            _sft(model, seqs, desc="midtrain", **run)
    else:
        losses = _sft(model, seqs, desc="midtrain", **run)
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
