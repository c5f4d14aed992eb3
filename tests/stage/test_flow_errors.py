"""Errors raised inside a Prefect flow are one line too (issue 19, item 7): `retroloop cycle`
with a registry path that is a file fails inside the cycle flow, and Prefect used to print its
tracebacks before the `error:` line. Without --debug only the one line (and Prefect's one-line
state messages) reach the console; the run's logs in the UI keep the traceback.

A real `retroloop cycle` process on the tiny upstream (`workdir`), with its own PREFECT_HOME so
the temporary API and the "gpu" slot are this test's alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers_distill import TINY, workdir  # noqa: F401  (fixture)


def test_an_error_inside_the_cycle_flow_is_one_line_without_prefects_traceback(workdir) -> None:  # noqa: F811
    Path("registry-file").write_text("not a folder\n")
    docs = Path("docs.jsonl")
    docs.write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(4)))
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    env.pop("RETROLOOP_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "retroloop.cli", "cycle", "--params", str(TINY),
         "--domain-data", str(docs), "--set", "cycle.registry=registry-file"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    err = proc.stderr
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and 'File "' not in err, err[-3000:]
    errors = re.findall(r"error: [^\r\n]*", err)
    assert len(errors) == 1, err[-3000:]
    after = err[err.index(errors[0]) + len(errors[0]) :].strip()
    assert not after or ("Stopping temporary server" in after and "\n" not in after), after
    assert "cycle.registry: registry-file is a file" in errors[0], errors[0]
