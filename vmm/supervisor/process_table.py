"""The process table: spawn, watch, stop and forget children, and remember them across restarts.

Everything here runs on the supervisor's event loop thread, so no locks are needed: each
mutation is a plain synchronous step, and only ``stop`` awaits (for the reaper).

Exits are noticed through a pidfd registered with the loop (no polling, no thread per child).
For a child we spawned, the pidfd becoming readable means it is a zombie and ``Popen.poll``
collects its status. A process re-adopted after a supervisor restart is not our child, so its
status cannot be collected; we record that it exited, with ``exit_code`` None.

The table is written to the state file after every change. On start it is read back and each
entry recorded as running is re-adopted only if /proc still shows the same process (same pid AND
same start time); anything else is a reused pid that we must never signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmm.core.exceptions import BadRequest, Conflict, NotFound
from vmm.supervisor.files import atomic_write, open_append
from vmm.supervisor.procfs import read_stat
from vmm.supervisor.types import ProcessConfig, ProcessInfo, ProcessState, Status

log = logging.getLogger(__name__)

STATE_VERSION = 1
STOP_TIMEOUT = 10.0
"""How long ``stop`` waits for a SIGKILLed process to be reaped before giving up."""


@dataclass(eq=False)
class _Entry:
    config: ProcessConfig
    state: ProcessState
    start_ticks: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    """Set only for a child spawned by this supervisor process (not for re-adopted ones)."""
    pidfd: int | None = None
    """Open while the process is being watched, i.e. exactly while status is "running"."""
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def info(self) -> ProcessInfo:
        return ProcessInfo(config=self.config, state=self.state)


class ProcessTable:
    def __init__(self, state_file: Path) -> None:
        self._state_file = state_file
        self._entries: dict[str, _Entry] = {}
        self._frozen = False

    # ---- queries -------------------------------------------------------------------------

    def list(self) -> list[ProcessInfo]:
        return [e.info() for e in self._entries.values()]

    def info(self, id: str) -> ProcessInfo | None:
        entry = self._entries.get(id)
        return entry.info() if entry else None

    # ---- commands ------------------------------------------------------------------------

    def deploy(self, config: ProcessConfig) -> None:
        """Record ``config`` and spawn it; a non-running entry with the same id is replaced."""
        self._check_not_frozen()
        if not config.id:
            raise BadRequest("invalid field `id`: must not be empty")
        old = self._entries.get(config.id)
        if old is not None and old.state.running:
            raise Conflict(f"process {config.id!r} is already running")
        entry = _Entry(config=config, state=ProcessState(status="stopped", started=False))
        self._entries[config.id] = entry
        self._spawn(entry)

    def start(self, id: str) -> None:
        self._check_not_frozen()
        entry = self._get(id)
        if entry.state.running:
            raise Conflict(f"process {id!r} is already running")
        self._spawn(entry)

    async def stop(self, id: str) -> None:
        """Mark it stopped and SIGKILL it; return once it has been reaped (bounded)."""
        entry = self._get(id)
        entry.state = replace(entry.state, started=False)
        if not entry.state.running:
            entry.state = replace(entry.state, status="stopped")
            self._persist()
            return
        self._persist()
        self._kill(entry)
        try:
            await asyncio.wait_for(entry.gone.wait(), STOP_TIMEOUT)
        except TimeoutError:
            raise Conflict(
                f"process {id!r} (pid {entry.state.pid}) was sent SIGKILL but has not exited "
                f"after {STOP_TIMEOUT:g} s"
            ) from None

    def remove(self, id: str) -> None:
        entry = self._get(id)
        if entry.state.running:
            raise Conflict(f"process {id!r} is running; stop it first")
        del self._entries[id]
        self._persist()

    def clear(self) -> None:
        self._entries = {k: e for k, e in self._entries.items() if e.state.running}
        self._persist()

    async def shutdown(self) -> None:
        """Refuse new work, then stop every running process."""
        self._frozen = True
        running = [id for id, e in self._entries.items() if e.state.running]
        await asyncio.gather(*(self.stop(id) for id in running))

    def close(self) -> None:
        """Stop watching without touching the processes: they keep running for the next us."""
        loop = asyncio.get_running_loop()
        for entry in self._entries.values():
            if entry.pidfd is not None:
                loop.remove_reader(entry.pidfd)
                os.close(entry.pidfd)
                entry.pidfd = None
            # Forget the Popen so its finalizer does not warn about a child that is meant to
            # outlive us.
            if entry.popen is not None and entry.popen.returncode is None:
                entry.popen.returncode = 0
        self._persist()

    # ---- persistence ---------------------------------------------------------------------

    def load(self) -> None:
        """Read the state file (if any) and re-adopt the processes that are still ours.

        Raises ValueError when the file exists but cannot be read: starting with an empty table
        would orphan every VM it lists, so the operator has to look.
        """
        try:
            raw = self._state_file.read_bytes()
        except FileNotFoundError:
            return
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported version {doc.get('version')!r}")
            rows = doc["processes"]
            if not isinstance(rows, list):
                raise ValueError("field `processes` must be a list")
            entries = [self._row_to_entry(row) for row in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read state file {self._state_file}: {exc}") from exc
        for entry in entries:
            self._entries[entry.config.id] = entry
            if entry.state.running:
                self._readopt(entry)
        self._persist()

    @staticmethod
    def _row_to_entry(row: object) -> _Entry:
        if not isinstance(row, dict):
            raise ValueError("each process must be a JSON object")
        ticks = row.get("start_ticks")
        if ticks is not None and (isinstance(ticks, bool) or not isinstance(ticks, int)):
            raise ValueError("field `start_ticks` must be an integer or null")
        info = ProcessInfo.from_json(row)
        return _Entry(config=info.config, state=info.state, start_ticks=ticks)

    def _persist(self) -> None:
        rows: list[dict[str, Any]] = []
        for entry in self._entries.values():
            row = entry.info().to_json()
            row["start_ticks"] = entry.start_ticks
            rows.append(row)
        doc = {"version": STATE_VERSION, "processes": rows}
        # The table holds the children's environments, which may carry secrets.
        atomic_write(self._state_file, json.dumps(doc, indent=1).encode(), mode=0o600)

    # ---- process mechanics ---------------------------------------------------------------

    def _get(self, id: str) -> _Entry:
        entry = self._entries.get(id)
        if entry is None:
            raise NotFound(f"process not found: {id!r}")
        return entry

    def _check_not_frozen(self) -> None:
        if self._frozen:
            raise Conflict("the supervisor is shutting down")

    def _spawn(self, entry: _Entry) -> None:
        config = entry.config
        now = time.time()
        try:
            popen = _popen(config)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            message = f"cannot start {config.command!r}: {exc}"
            entry.state = ProcessState(
                status="error", started=False, error=message, started_at=now, stopped_at=now
            )
            self._persist()
            log.warning("spawn of %s failed: %s", config.id, message)
            raise BadRequest(message) from exc

        # The child is not reaped until we poll it, so the pid cannot have been reused yet and
        # both the pidfd and the start time name this very process.
        pidfd = os.pidfd_open(popen.pid)
        stat = read_stat(popen.pid)
        entry.popen = popen
        entry.start_ticks = stat.start_ticks if stat else None
        entry.gone = asyncio.Event()
        entry.state = ProcessState(status="running", started=True, pid=popen.pid, started_at=now)
        self._watch(entry, pidfd)
        if config.pidfile:
            try:
                atomic_write(Path(config.pidfile), f"{popen.pid}\n".encode())
            except OSError as exc:
                # A VM whose pidfile the daemon cannot find is a VM it cannot account for.
                message = f"cannot write pidfile {config.pidfile!r}: {exc}"
                log.warning("%s: %s; killing pid %d", config.id, message, popen.pid)
                entry.state = replace(entry.state, started=False)
                self._kill(entry)
                # SIGKILL lands at once; should it not, the pidfd reader reaps it later.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=STOP_TIMEOUT)
                    self._reap(entry)
                    entry.state = replace(entry.state, status="error", error=message)
                self._persist()
                raise BadRequest(message) from exc
        self._persist()
        log.info("started %s (%s) pid %d", config.id, config.name, popen.pid)

    def _readopt(self, entry: _Entry) -> None:
        pid = entry.state.pid
        pidfd = _open_verified(pid, entry.start_ticks) if pid is not None else None
        if pidfd is None:
            log.info("%s (pid %s) is gone since the last supervisor run", entry.config.id, pid)
            entry.state = replace(
                entry.state,
                status="exited" if entry.state.started else "stopped",
                exit_code=None,
                signal=None,
                stopped_at=time.time(),
            )
            entry.gone.set()
            return
        log.info("re-adopted %s pid %s", entry.config.id, pid)
        entry.gone = asyncio.Event()
        self._watch(entry, pidfd)

    def _watch(self, entry: _Entry, pidfd: int) -> None:
        entry.pidfd = pidfd
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, entry)

    def _on_exit(self, entry: _Entry) -> None:
        if entry.popen is not None and entry.popen.poll() is None:
            return  # cannot happen for a readable pidfd, but never record a live child as gone
        self._reap(entry)
        self._persist()

    def _reap(self, entry: _Entry) -> None:
        if entry.pidfd is not None:
            asyncio.get_running_loop().remove_reader(entry.pidfd)
            os.close(entry.pidfd)
            entry.pidfd = None
        exit_code: int | None = None
        sig: int | None = None
        if entry.popen is not None and entry.popen.returncode is not None:
            rc = entry.popen.returncode
            exit_code, sig = (rc, None) if rc >= 0 else (None, -rc)
        entry.popen = None
        status: Status = "exited" if entry.state.started else "stopped"
        entry.state = replace(
            entry.state, status=status, exit_code=exit_code, signal=sig, stopped_at=time.time()
        )
        entry.gone.set()
        log.info(
            "%s pid %s %s (exit code %s, signal %s)",
            entry.config.id,
            entry.state.pid,
            status,
            exit_code,
            sig,
        )

    @staticmethod
    def _kill(entry: _Entry) -> None:
        # Through the pidfd, never the bare pid: the pidfd cannot name a reused pid.
        if entry.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(entry.pidfd, signal.SIGKILL)


def _open_verified(pid: int, start_ticks: int | None) -> int | None:
    """Return a pidfd for ``pid`` if it is still the live process started at ``start_ticks``."""
    if start_ticks is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    # Checked AFTER opening the pidfd: if the start time still matches now, the pidfd refers to
    # the process we spawned, and signalling through it later cannot hit a stranger.
    stat = read_stat(pid)
    if stat is None or stat.zombie or stat.start_ticks != start_ticks:
        os.close(pidfd)
        return None
    return pidfd


def _popen(config: ProcessConfig) -> subprocess.Popen[bytes]:
    if not config.command:
        raise ValueError("command is empty")
    stdout = open_append(config.stdout)
    try:
        stderr = open_append(config.stderr)
    except OSError:
        os.close(stdout)
        raise
    try:
        # Output goes straight to the files, not through a pipe we would have to drain: the
        # child must neither block nor get SIGPIPE when the supervisor is gone.
        return subprocess.Popen(
            [config.command, *config.args],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            cwd=config.cwd or None,
            env={**os.environ, **config.env},
            # Its own session: a signal to the supervisor's group must not reach the VMs.
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(stdout)
        os.close(stderr)
