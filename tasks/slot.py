"""The concurrency slot a cycle holds on its Prefect server, and what frees it after a kill.

`prefect.concurrency.sync.concurrency(name, strict=True)` alone is not enough (issue 19):

- The temporary server `retroloop cycle` starts when PREFECT_API_URL is unset keeps its leases in
  its own process's memory (`server.concurrency.lease_storage` defaults to `...lease_storage.memory`)
  and does not run Prefect's lease repossessor (`prefect.server.services.repossessor` is not
  `run_in_ephemeral`). The slot count itself lives in the user's Prefect database (PREFECT_HOME).
  So a cycle killed with -9 leaves the slot taken with no lease anywhere that could expire: it
  never comes back by itself.
- Prefect's own wait retries in a background thread with no message, and no timeout unless given.
- Prefect acquires through a process-wide singleton service per set of limit names whose client
  is bound to the API URL of the first caller: a later slot under other settings (another
  server) is taken on the *first* server and released on the current one, so the first server's
  count never comes down (the hang `10ab593` reverted). Here every request is made by a client
  built from the current settings, and the slot is released by the client that took it.

So each holder leaves a record beside the Prefect database, `PREFECT_HOME/retroloop-slots/`, that
it holds an exclusive `flock` on while it holds the slot. The kernel drops the flock when its
holder dies (kill -9 included), so a record whose flock can be taken names a holder that is
provably dead; the next cycle gives that holder's slot back, by its lease if the server still has
it, or (temporary server only: nothing else ever will) by name. Anything else it waits for, in
its own loop in the main thread, with a message naming the slot, its holder and the timeout
(`cycle.slot_timeout_s`), then fails in one line naming `prefect gcl delete NAME`; SIGTERM ends
the wait like Ctrl-C (KeyboardInterrupt: the CLI exits 130).

Scope (`slot_name`): on a real server (PREFECT_API_URL set: deployments, GPU workers) the limit
is `gpu`, shared by every cycle on that server; on a temporary server (no worker can share it,
but every checkout of the user shares its database) it is named after the checkout, so one
checkout's cycles never wait for another's. `cycle.gpu_limit` names a shared one explicitly.

The temporary server itself is a child process (`SubprocessASGIServer`) that Prefect stops at
exit; a parent killed with -9 never gets there, and the server used to live on, holding its port
and the leases in its memory. `server_dies_with_parent` starts it under a watchdog that ends it
within a second or two of its parent's death (installed when this module is imported without a
PREFECT_API_URL, i.e. before `retroloop cycle` starts a temporary server).

What stays manual: a holder on another machine (its record is there), or one killed in the
instant between taking the slot and writing its record, is never provably dead from here.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import get_current_settings

from retroloop.artifacts import now_iso
from retroloop.errors import BusyError
from retroloop.runlock import try_flock

GPU_LIMIT = "gpu"
LEASE_S = 300  # Prefect's default; the server refuses < 60 s
POLL_S = 2.0  # seconds between two looks at a taken slot (Ctrl-C / SIGTERM end the wait at once)
REMIND_S = 60.0  # a waiting cycle says so again this often
TEMPORARY = "temporary server on "  # server ids of Prefect's temporary (ephemeral) servers
log = logging.getLogger("retroloop.tasks.slot")


# Run as `python -c WATCHDOG PARENT_PID UVICORN_ARGS...`: the temporary server, in this process
# (the pid Prefect stops), ended when PARENT_PID is no longer its parent (killed, even with -9).
WATCHDOG = """
import os, runpy, signal, sys, threading, time
parent = int(sys.argv[1])
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
    time.sleep(10)
    os._exit(1)
threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[2:]]
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def server_dies_with_parent() -> None:
    """Start Prefect's temporary server (`SubprocessASGIServer`, `python -m uvicorn ...`) under
    `WATCHDOG`, so it never outlives the process that started it. Idempotent."""
    from prefect.server.api import server as module

    real = module.subprocess
    if getattr(real, "retroloop_watchdog", False):
        return

    def popen(args, *rest, **kwargs):
        args = list(args)
        if args[1:3] == ["-m", "uvicorn"]:
            args = [args[0], "-c", WATCHDOG, str(os.getpid()), *args[3:]]
        return real.Popen(args, *rest, **kwargs)

    proxy = types.ModuleType("subprocess", "subprocess, with Popen under a parent watchdog")
    proxy.__dict__.update(real.__dict__)
    proxy.Popen = popen
    proxy.retroloop_watchdog = True
    module.subprocess = proxy  # only that module's name: nothing else changes


if not get_current_settings().api.url:  # a temporary server may start: before it does
    server_dies_with_parent()


def slot_name(configured: str | None = None, checkout: Path | None = None) -> str:
    """The limit a cycle holds: `configured` (`cycle.gpu_limit`) if set; `gpu` on a real server;
    on a temporary server `gpu-<folder>-<sha8 of the checkout's path>` (see the module doc)."""
    if configured:
        return configured
    if get_current_settings().api.url:
        return GPU_LIMIT
    root = (checkout or Path.cwd()).resolve()
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.name)[:40] or "root"
    return f"{GPU_LIMIT}-{folder}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def gpu_slot(name: str = GPU_LIMIT, *, timeout_s: float) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `name` for the block, creating the limit
    (limit 1) if the server has none. A cycle never runs unthrottled because the limit is
    missing; a second cycle on the same server waits here for the first, at most `timeout_s`
    seconds (then `BusyError`, one line naming `prefect gcl delete NAME`)."""
    server = _server_id()
    _ensure_limit(name)
    with _sigterm_interrupts():
        lease_id = _wait_for_slot(name, server, timeout_s)
    try:
        with _renewing(lease_id), _holder_record(name, server, lease_id):
            # The record goes before the slot does: it never names a slot already returned.
            yield
    finally:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id)


def _wait_for_slot(name: str, server: str, timeout_s: float) -> uuid.UUID:
    """Poll (read the limit; try to take a slot only when it has room) until a slot is ours."""
    start = time.monotonic()
    told_at: float | None = None
    while True:
        _give_back_dead_holders(name, server)
        if _has_room(name) and (lease_id := _try_to_take(name)) is not None:
            if told_at is not None:
                log.info("got the Prefect concurrency slot %r after %.0f s", name, time.monotonic() - start)  # fmt: skip
            return lease_id
        waited = time.monotonic() - start
        if waited >= timeout_s:
            raise BusyError(
                f"the Prefect concurrency slot {name!r} is still taken after {timeout_s:g} s "
                f"(cycle.slot_timeout_s), by {_holders(name, server)}; if no cycle is running, "
                f"free it with `prefect gcl delete {name}` (the next cycle creates it again)"
            )
        if told_at is None or time.monotonic() - told_at >= REMIND_S:
            log.warning(
                "waiting up to %g s (cycle.slot_timeout_s; %.0f s left) for the Prefect "
                "concurrency slot %r, taken by %s; if no cycle is running, free it with "
                "`prefect gcl delete %s`",
                timeout_s, timeout_s - waited, name, _holders(name, server), name,
            )  # fmt: skip
            told_at = time.monotonic()
        time.sleep(max(0.05, min(POLL_S, timeout_s - waited)))


def _try_to_take(name: str) -> uuid.UUID | None:
    """One try, no retries, by a client of the current settings. None when the server refuses
    (HTTP 423: another cycle took the slot since `_has_room` looked) or the limit was deleted
    in between (`_has_room` creates it again on the next look)."""
    with get_client(sync_client=True) as client:
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=LEASE_S
            )
        except httpx.HTTPStatusError as err:
            if err.response.status_code == 423:
                return None
            raise
    body = response.json()
    if not body.get("limits"):  # strict: no limit, no slot (the server grants an empty lease)
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(uuid.UUID(body["lease_id"]))
        return None
    return uuid.UUID(body["lease_id"])


@contextlib.contextmanager
def _renewing(lease_id: uuid.UUID) -> Iterator[None]:
    """Renew the lease every third of its duration while the block runs (a real server's
    repossessor takes back a lease nobody renews: that is how a dead holder's slot comes back
    there). The thread runs in a copy of this context, so its client has these settings."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_S / 3):
            try:
                with get_client(sync_client=True) as client:
                    client.renew_concurrency_lease(lease_id, lease_duration=LEASE_S)
            except Exception as err:  # noqa: BLE001  (a missed renewal is retried; say so)
                log.warning("could not renew the lease %s of the concurrency slot (%s: %s)", lease_id, type(err).__name__, err)  # fmt: skip

    thread = threading.Thread(
        target=contextvars.copy_context().run, args=(renew,), name="gpu-slot-lease", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


def _has_room(name: str) -> bool:
    """Whether the limit has a free slot now (re-created, so free, if it was deleted)."""
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:  # `prefect gcl delete` while we waited: the README's way out
            _ensure_limit(name)
            return True
    return limit.active_slots < limit.limit


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while this block runs, as Ctrl-C does: a cycle waiting for
    its slot has done nothing yet, and the CLI turns KeyboardInterrupt into exit 130. (In a flow
    run Prefect's own handler would crash the run and re-send SIGTERM: exit -15, no message.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ensure_limit(name: str) -> bool:
    """Create the limit `name` (limit 1) if the server has none; True if this call created it."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=1)
                )
            except ObjectAlreadyExists:  # another cycle created it first
                return True
    log.info("created the global concurrency limit %r (limit 1)", name)
    return True


# --------------------------------------------------------------------------- holder records


def _server_id() -> str:
    """Which server's slots a record counts against: the API URL, or for a temporary server the
    database they all share (hashed: a database URL may carry a password)."""
    settings = get_current_settings()
    if settings.api.url:
        return settings.api.url
    url = settings.server.database.connection_url
    secret = url.get_secret_value() if url is not None else str(Path(settings.home) / "prefect.db")
    return TEMPORARY + "database " + hashlib.sha256(secret.encode()).hexdigest()[:16]


def _records_dir() -> Path:
    return Path(get_current_settings().home) / "retroloop-slots"


@contextlib.contextmanager
def _holder_record(name: str, server: str, lease_id: uuid.UUID) -> Iterator[None]:
    """A record of this process holding one slot of `name`, flocked for as long as it does.

    Written under a hidden name, locked, then renamed into place: a reader never sees a record
    whose flock is not held yet (it would take it for a dead holder's)."""
    from prefect.runtime import flow_run

    token = uuid.uuid4().hex
    final, tmp = _records_dir() / f"{name}.{token}.json", _records_dir() / f".{name}.{token}.tmp"
    record = {
        "slot": name, "server": server, "lease_id": str(lease_id),
        "pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:160],
        "flow_run": flow_run.get_name(),
    }  # fmt: skip
    fd = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(record).encode())
        os.rename(tmp, final)
    except OSError as err:  # the cycle can run without it; only a kill would then need a hand
        log.warning("cannot record the holder of the %r slot in %s (%s): if this cycle is killed, its slot needs `prefect gcl delete %s`", name, final.parent, err.strerror or err, name)  # fmt: skip
    try:
        yield
    finally:
        for path in (final, tmp):
            with contextlib.suppress(OSError):
                path.unlink()
        if fd is not None:
            os.close(fd)


def _live_and_dead(name: str, server: str) -> Iterator[tuple[Path, int, dict[str, Any], bool]]:
    """Each record of `name` on `server`: (path, an fd locking it if dead, record, alive). The
    caller closes the fd. A record this loop could lock but that was meanwhile removed (another
    cycle gave its slot back first) is skipped."""
    for path in sorted(_records_dir().glob(f"{name}.*.json")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            alive = not try_flock(fd)  # a holder that is alive keeps its record's flock
        except OSError:
            os.close(fd)
            raise
        try:
            record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except ValueError:
            record = {}
        if (not alive and os.fstat(fd).st_nlink == 0) or record.get("server") != server:
            os.close(fd)
            continue
        yield path, fd, record, alive


def _describe(record: dict[str, Any]) -> str:
    run = f", flow run {record['flow_run']!r}" if record.get("flow_run") else ""
    return f"pid {record.get('pid')} on {record.get('host')} ({record.get('command')}{run}, since {record.get('since')})"  # fmt: skip


def _holders(name: str, server: str) -> str:
    """Who holds `name`, as far as this machine knows (the message of a waiting cycle)."""
    live = []
    for _path, fd, record, alive in _live_and_dead(name, server):
        os.close(fd)
        if alive:
            live.append(_describe(record))
    return "; ".join(live) or "a run with no record here (on another machine, or killed just as it took the slot)"  # fmt: skip


def _give_back_dead_holders(name: str, server: str) -> None:
    """Give back the slot of every holder of `name` whose record's flock is free: it is dead."""
    for path, fd, record, alive in _live_and_dead(name, server):
        try:
            if alive:
                continue
            how = _give_back(name, server, record)
            if how:
                log.warning("gave back the Prefect concurrency slot %r of a dead cycle, %s (%s)", name, _describe(record), how)  # fmt: skip
            path.unlink(missing_ok=True)  # still locked: no other cycle gives it back twice
        finally:
            os.close(fd)


def _give_back(name: str, server: str, record: dict[str, Any]) -> str | None:
    """Release a dead holder's one slot: by its lease while the server still has it (exactly
    that lease's slot, never another holder's); else, on a temporary server only, by name."""
    with get_client(sync_client=True) as client:
        if lease_id := record.get("lease_id"):
            try:  # renewing tells whether the server still has the lease
                client.renew_concurrency_lease(uuid.UUID(lease_id), lease_duration=60)
            except httpx.HTTPStatusError as err:
                if err.response.status_code not in (404, 410):
                    raise
            else:
                client.release_concurrency_slots_with_lease(uuid.UUID(lease_id))
                return "released its lease"
        if server.startswith(TEMPORARY):
            # The lease died with the temporary server that granted it and no repossessor runs
            # on one: nothing else will ever give this slot back. On a real server a lease it no
            # longer has was repossessed, and its slot is already back.
            client.release_concurrency_slots([name], slots=1, occupancy_seconds=1.0)
            return "its temporary server's lease is gone: released by name"
    return None
