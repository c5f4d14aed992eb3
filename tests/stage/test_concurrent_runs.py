"""Two `retroloop stage distill` at once (issue 19, item 6): both used to die with a
JSONDecodeError on the dvclive logs they shared in `data/checkpoints/distill/`. Now the second is
refused at once in one line naming the first, and the first finishes untouched.

The second run starts while the first is between two optimizer steps (distill's `_after_step`
hook, as the resume tests simulate kills), so the overlap is certain, not a race.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from helpers_distill import TINY, workdir  # noqa: F401  (fixture)

from retroloop.cli import main
from retroloop.provenance import verify
from retroloop.stages import distill


def test_a_second_distill_while_one_runs_is_refused_and_the_first_completes(
    workdir,  # noqa: F811
    monkeypatch,
    capsys,
) -> None:
    argv = ["stage", "distill", "--params", str(TINY), "--set", "distill.steps=4"]
    second: list[int] = []

    def start_another(step: int) -> None:
        if step == 1:
            second.append(main(argv))

    monkeypatch.setattr(distill, "_after_step", start_another)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert second == [2], err
    errors = re.findall(r"error: [^\r\n]*", err)  # (tqdm's bar shares the line)
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "data/distill" in errors[0] and f"pid {os.getpid()}" in errors[0], errors[0]
    assert not verify(Path("data/distill"))  # the first run's artifact is whole
    assert not list(Path("data").glob(".*.lock")), "locks are released"
