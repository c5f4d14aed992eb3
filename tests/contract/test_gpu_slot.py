"""The "gpu" concurrency slot against a real Prefect server (issue 19, item 5): a killed cycle
never blocks the next one.

A slot nobody gives back makes the next cycle wait with a message, then fail in one line naming
`prefect gcl delete gpu`; SIGTERM ends the wait at once (exit 130); the slot of a holder killed
with -9 is given back by the next cycle, on a real server and on the temporary one
`retroloop cycle` starts (which has no lease repossessor: there it was lost for good). A slot
taken under one server's settings is given back on that server, whatever ran before (Prefect's
own acquisition service kept the first server's client: the hang that reverted e402870); the
limit is per checkout on a temporary server; and a temporary server dies with its parent.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from retroloop.errors import BusyError
from tasks.slot import GPU_LIMIT, gpu_slot
from tests.conftest import REPO_ROOT, TINY_PROFILE, PrefectServer, prefect_settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def api(prefect_server: PrefectServer) -> Iterator[PrefectServer]:
    """In-process clients on the session server, and a 'gpu' limit (limit 1) that is free."""
    from prefect.client.orchestration import get_client

    from tasks.slot import _ensure_limit

    with prefect_settings(prefect_server):
        _ensure_limit(GPU_LIMIT)
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        assert (limit.limit, limit.active_slots) == (1, 0), "another test left 'gpu' taken"
        yield prefect_server


@pytest.fixture
def gpu_taken(api: PrefectServer) -> Iterator[str]:
    """'gpu' taken by a lease nobody renews or releases (a holder on another machine, or one
    killed before it left a record), given back when the test ends."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client.increment_concurrency_slots_with_lease(
            names=[GPU_LIMIT], slots=1, mode="concurrency", lease_duration=300
        )
        lease_id = response.json()["lease_id"]
        try:
            yield lease_id
        finally:
            client.release_concurrency_slots_with_lease(lease_id)


def test_a_slot_nobody_gives_back_ends_the_wait_in_one_line(gpu_taken: str, caplog) -> None:
    caplog.set_level(logging.INFO, logger="retroloop")
    start = time.monotonic()
    with pytest.raises(BusyError) as err, gpu_slot(GPU_LIMIT, timeout_s=1.5):
        pytest.fail("got a slot that is taken")
    message = str(err.value)
    assert time.monotonic() - start < 20
    assert "\n" not in message
    assert "`prefect gcl delete gpu`" in message and "'gpu'" in message
    assert "1.5 s (cycle.slot_timeout_s)" in message
    assert "no record here" in message  # who holds it, as far as this machine knows
    waiting = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert len(waiting) == 1, caplog.text  # said once, before the wait, with the time it gives
    assert "'gpu'" in waiting[0] and "up to 1.5 s (cycle.slot_timeout_s" in waiting[0]


def _active(name: str = GPU_LIMIT) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_a_slot_is_taken_and_given_back_on_the_server_of_its_settings(api) -> None:
    """The leak of the reverted e402870: a slot taken on one server first made every later slot
    of that name go to that server (Prefect's acquisition service is a process-wide singleton
    per limit name, holding the first caller's client), while the release went to the current
    one; the first server's count stayed at 1 and the next cycle there waited for ever."""
    from prefect.testing.utilities import prefect_test_harness

    with gpu_slot(GPU_LIMIT, timeout_s=10):  # the session server (the `api` fixture's settings)
        assert _active() == 1
    with prefect_test_harness(server_startup_timeout=180):  # another server, as test_cycle's
        with gpu_slot(GPU_LIMIT, timeout_s=10):
            assert _active() == 1, "the slot was taken on another server"
        assert _active() == 0
    assert _active() == 0, "the session server's slot was left taken"


def test_the_limit_is_gpu_on_a_real_server_and_per_checkout_on_a_temporary_one(
    tmp_path: Path,
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.slot import slot_name

    one, other = tmp_path / "one", tmp_path / "other"
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert slot_name(None, one) == slot_name(None, other) == "gpu"  # its workers share it
        assert slot_name("shared-a100", one) == "shared-a100"  # cycle.gpu_limit
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert slot_name(None, one) == slot_name(None, one)
        assert slot_name(None, one).startswith("gpu-one-")
        assert slot_name(None, one) != slot_name(None, other)
        assert slot_name("shared-a100", one) == "shared-a100"


# The parent of a temporary server: starts one (no PREFECT_API_URL), says its pid, waits.
SERVER_PARENT = """
import time
import tasks.slot  # noqa: F401  (what `retroloop cycle` imports before Prefect starts)
from prefect.client.orchestration import get_client
from prefect.server.api.server import SubprocessASGIServer
with get_client(sync_client=True) as client:
    client.hello()
print(SubprocessASGIServer._instances[None].server_process.pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie nobody has reaped yet runs nothing


def test_a_temporary_server_dies_with_its_parent_killed_with_9(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    parent = subprocess.Popen(
        [sys.executable, "-c", SERVER_PARENT], cwd=REPO_ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    server = None
    try:
        line = parent.stdout.readline().strip()
        assert line.isdigit(), f"no server pid: {line!r} {parent.stderr.read()[-3000:]}"
        server = int(line)
        assert not _gone(server)
        _kill_9(parent)
        deadline = time.monotonic() + 15
        while not _gone(server):
            assert time.monotonic() < deadline, "the temporary server outlived its parent"
            time.sleep(0.2)
    finally:
        if parent.poll() is None:
            parent.kill()
        if server is not None and not _gone(server):
            os.kill(server, signal.SIGKILL)


# A process that takes the slot, says so, and waits to be killed.
HOLDER = """
import sys, time
from tasks.slot import gpu_slot
with gpu_slot("gpu", timeout_s=120):
    print("held", flush=True)
    time.sleep(600)
"""


def _start_holder(env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own group: a temporary server it starts dies with it here
    )  # fmt: skip
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        pytest.fail(f"holder did not take the slot: {line!r} {proc.stderr.read()[-3000:]}")
    return proc


def _kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: the slot and its record stay
    proc.wait(timeout=30)


def test_a_dead_holders_slot_is_given_back_and_a_live_one_is_named(api, caplog) -> None:
    caplog.set_level(logging.INFO, logger="retroloop")
    holder = _start_holder(api.env)
    try:
        with pytest.raises(BusyError) as err, gpu_slot(GPU_LIMIT, timeout_s=1):
            pytest.fail("got a slot a live cycle holds")
        assert f"pid {holder.pid} on " in str(err.value)  # alive: named, not taken
        assert "-c" in str(err.value)  # its command line
    finally:
        _kill_9(holder)
    start = time.monotonic()
    with gpu_slot(GPU_LIMIT, timeout_s=30):
        pass
    assert time.monotonic() - start < 10, "waited for a dead holder's lease to expire"
    assert f"gave back the Prefect concurrency slot 'gpu' of a dead cycle, pid {holder.pid}" in caplog.text  # fmt: skip
    assert "released its lease" in caplog.text
    assert not list((api.home / "retroloop-slots").glob("gpu.*"))  # no record outlives its slot


def test_on_a_temporary_server_a_dead_holders_slot_is_given_back(tmp_path: Path) -> None:
    """What `retroloop cycle` does without PREFECT_API_URL: each run starts its own temporary
    server on the user's Prefect database, so the killed holder's lease is gone with its server
    and nothing would ever give its slot back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    holder = _start_holder(env)
    try:
        _kill_9(holder)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # its temporary server (no cleanup ran)
    next_cycle = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(600)", "pass")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert next_cycle.returncode == 0, next_cycle.stderr[-3000:]
    assert next_cycle.stdout.strip() == "held"
    assert f"of a dead cycle, pid {holder.pid}" in next_cycle.stderr
    assert "released by name" in next_cycle.stderr


# --------------------------------------------------------------------------- the CLI


def _cycle(api: PrefectServer, tmp_path: Path, *set_: str) -> subprocess.Popen:
    """`retroloop cycle` on a valid domain file: it reaches the slot before it needs the
    pipeline's outputs (read_inputs runs inside the slot)."""
    domain = tmp_path / "notes.jsonl"
    domain.write_text("".join(json.dumps({"text": f"note {i}"}) + "\n" for i in range(3)))
    retroloop = Path(sys.executable).with_name("retroloop")
    sets = [arg for s in set_ for arg in ("--set", s)]
    return subprocess.Popen(
        [str(retroloop), "cycle", "--domain-data", str(domain), "--params", str(TINY_PROFILE), *sets],  # fmt: skip
        cwd=tmp_path, env=api.env | {"COLUMNS": "400"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in stream], daemon=True).start()
    return lines


def test_sigterm_ends_a_waiting_cycle_at_once_with_exit_130(gpu_taken: str, api, tmp_path) -> None:
    proc = _cycle(api, tmp_path)
    err, lines = [], _lines(proc.stderr)
    try:
        deadline = time.monotonic() + 180
        while not any("for the Prefect concurrency slot 'gpu'" in x for x in err):
            assert proc.poll() is None, "".join(err)
            assert time.monotonic() < deadline, "no waiting message:\n" + "".join(err)
            try:
                err.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        waiting = next(x for x in err if "for the Prefect concurrency slot 'gpu'" in x)
        assert "'gpu'" in waiting and "cycle.slot_timeout_s" in waiting, waiting
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    while not lines.empty():
        err.append(lines.get())
    text = "".join(err)
    assert proc.returncode == 130, text[-3000:]
    assert took < 15, f"SIGTERM took {took:.0f} s"
    assert text.rstrip().splitlines()[-1].startswith("error: interrupted"), text[-3000:]


def test_a_cycle_that_cannot_get_the_slot_fails_in_one_line(gpu_taken: str, api, tmp_path) -> None:
    proc = _cycle(api, tmp_path, "cycle.slot_timeout_s=2")
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors == err.rstrip().splitlines()[-1:], err[-3000:]
    assert "`prefect gcl delete gpu`" in errors[0] and "cycle.slot_timeout_s" in errors[0]
