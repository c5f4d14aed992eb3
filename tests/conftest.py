"""Shared test settings: offline, analytics off, the repo root and the shared data dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_PROFILE = REPO_ROOT / "profiles" / "tiny.yaml"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_report_header(config) -> str:
    """The CPU kernel level torch dispatches to: a seeded training run ends in a slightly
    different place on each, so say which one this run's margins were measured on."""
    import torch

    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}" + (
        f" (forced: ATEN_CPU_CAPABILITY={forced})" if forced else " (native)"
    )


@pytest.fixture
def tiny_cfg():
    from retroloop.config import load_params

    return load_params(TINY_PROFILE)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared evaluation data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core box, 2 threads spin against other jobs and tiny
    matmuls get ~10x slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class PrefectServer:
    """A running Prefect server: its API URL and the environment that points a client at it."""

    api_url: str
    home: Path
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real `prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite),
    the UI off and the scheduler looping every second; stopped at the end of the session.
    Subprocesses get `server.env`; in-process clients use `prefect_settings(server)`."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    log = open(home / "server.log", "wb")  # noqa: SIM115 (closed below)
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180  # a loaded 2-core box can take a minute to import it
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(1)
        yield PrefectServer(api_url=api_url, home=home, env=env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def prefect_settings(server: PrefectServer):
    """Point in-process Prefect clients at `server` (a context manager)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_HOME: server.home})
