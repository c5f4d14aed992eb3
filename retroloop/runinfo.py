"""What a manifest records about a run beside its content (DESIGN.md §3): the code version
(git sha, `-dirty` when the code differs), library versions, the compute (torch's CPU kernel
level, threads, accelerator) and timestamps. None of it enters `content_sha256`; all of it says
what the content depends on. `retroloop.artifacts` writes it into every manifest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

_LIBRARIES = ("torch", "transformers", "peft", "datasets", "polars", "prefect", "dvc", "vllm")

# What "the code" is for `code_version`: the tracked files that compute an artifact.
CODE_PATHS = (
    "retroloop", "flows", "tasks", "benchmarks", "pyproject.toml", "requirements.lock", "dvc.yaml",
)  # fmt: skip


def code_version(repo: str | Path | None = None) -> str:
    """Git sha of the checkout, with `-dirty` when the *code* differs from it.

    The code is the tracked files under `CODE_PATHS`: the package, flows, tasks, benchmarks,
    `pyproject.toml`, `requirements.lock` and `dvc.yaml` (staged or not). Everything else does
    not count: `params.yaml` (every manifest records its params and their hash on their own, and
    the README's `cp profiles/tiny.yaml params.yaml` must not mark every artifact dirty), profiles,
    `data/`, `dvc.lock` and `*.dvc` files, docs and tests, and any untracked file."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def compute_environment() -> dict[str, Any]:
    """What the numbers depend on below the library versions: torch's CPU kernel level
    (`ATEN_CPU_CAPABILITY` forces one; a seeded run ends in a different place on each, so
    `content_sha256` is reproducible per level, not across levels) and the accelerator."""
    import torch  # lazy: manifests are also read where torch is not needed

    out: dict[str, Any] = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the machine type (x86_64, arm64)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
