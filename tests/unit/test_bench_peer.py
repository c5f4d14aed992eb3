"""`retroloop bench peer` without TRL: one line naming the extra, exit 2, before any model work;
and the core never imports TRL (only benchmarks/bench_peer.py and its arms do, lazily)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_peer_without_trl_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from retroloop.cli import main

    # `sys.modules["trl"] = None` makes `import trl` raise ImportError, as when it is absent.
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.chdir(tmp_path)
    code = main(["bench", "peer", "--quick", "--params", str(ROOT / "profiles" / "tiny.yaml")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert lines[-1].startswith("error:") and "pip install 'retroloop[peer]'" in lines[-1], lines
    assert sum(line.startswith("error:") for line in lines) == 1, lines
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())  # nothing written


def test_the_core_never_imports_trl() -> None:
    code = (
        "import sys, retroloop.cli, retroloop.commands, retroloop.stages.distill, "
        "retroloop.stages.opd, retroloop.opd_loop, retroloop.onpolicy, benchmarks.bench_peer; "
        "print('trl' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"
