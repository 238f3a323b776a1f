"""The supervisor's wire types: what the daemon sends and what the supervisor reports.

Field names follow dstack's supervisor (``ProcessConfig``, ``ProcessInfo``) so a process table
reads the same in both. One deliberate simplification: dstack's status is enum-ish
(``"running"``, ``"stopped"``, ``{"exited": <raw wait status>}``, ``{"error": "..."}``); here
``status`` is always one of four plain strings and the details live in their own fields:

    running   the process is alive (spawned by us, or re-adopted after a supervisor restart)
    stopped   it was stopped on request (``POST /stop``), or never ran since a stop
    exited    it ended by itself; ``exit_code`` or ``signal`` says how when we could see it
              (``None`` for both when it ended while no supervisor was its parent)
    error     spawning failed; ``error`` holds the reason

``from_json`` validates everything and raises ``ValueError`` naming the bad field, so the server
can answer 400 with that message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast

from vmm.core.names import VM_ID, check_name

Status = Literal["running", "stopped", "exited", "error"]
STATUSES: tuple[Status, ...] = ("running", "stopped", "exited", "error")

_MAX_CID = 2**32 - 1


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"`{where or 'body'}` must be a JSON object")
    return cast(dict[str, Any], value)


def _field(obj: dict[str, Any], name: str, where: str) -> object:
    if name not in obj:
        raise ValueError(f"missing field `{where}{name}`")
    return obj[name]


def _str(obj: dict[str, Any], name: str, where: str) -> str:
    value = _field(obj, name, where)
    if not isinstance(value, str):
        raise ValueError(f"field `{where}{name}` must be a string")
    return value


def _opt_int(obj: dict[str, Any], name: str, where: str, *, required: bool = True) -> int | None:
    value = _field(obj, name, where) if required else obj.get(name)
    if value is None:
        return None
    # bool is an int subclass; a JSON true is never a pid or an exit code.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field `{where}{name}` must be an integer or null")
    return value


def _opt_float(obj: dict[str, Any], name: str, where: str) -> float | None:
    value = _field(obj, name, where)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"field `{where}{name}` must be a number or null")
    return float(value)


def _opt_str(obj: dict[str, Any], name: str, where: str) -> str | None:
    value = _field(obj, name, where)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"field `{where}{name}` must be a string or null")
    return value


@dataclass(frozen=True)
class ProcessConfig:
    """What to run. ``cid`` may be absent on the wire (null); every other field is required."""

    id: str
    name: str
    command: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    stdout: str = ""
    stderr: str = ""
    pidfile: str = ""
    cid: int | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "command": self.command,
            "args": list(self.args),
            "env": dict(self.env),
            "cwd": self.cwd,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "pidfile": self.pidfile,
            "cid": self.cid,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, value: object, where: str = "") -> ProcessConfig:
        obj = _object(value, where.rstrip("."))
        args = _field(obj, "args", where)
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError(f"field `{where}args` must be a list of strings")
        env = _field(obj, "env", where)
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ValueError(f"field `{where}env` must be an object of strings")
        cid = _opt_int(obj, "cid", where, required=False)
        if cid is not None and not 0 <= cid <= _MAX_CID:
            raise ValueError(f"field `{where}cid` must be between 0 and {_MAX_CID}")
        return cls(
            # Only VMs are supervised; an id outside the VM id rule never reaches a URL.
            id=check_name(_str(obj, "id", where), f"{where}id", VM_ID),
            name=_str(obj, "name", where),
            command=_str(obj, "command", where),
            args=cast(list[str], list(args)),
            env=cast(dict[str, str], dict(env)),
            cwd=_str(obj, "cwd", where),
            stdout=_str(obj, "stdout", where),
            stderr=_str(obj, "stderr", where),
            pidfile=_str(obj, "pidfile", where),
            cid=cid,
            note=_str(obj, "note", where),
        )


@dataclass(frozen=True)
class ProcessState:
    """What happened to it. Times are unix seconds."""

    status: Status
    started: bool
    exit_code: int | None = None
    signal: int | None = None
    error: str | None = None
    pid: int | None = None
    started_at: float | None = None
    stopped_at: float | None = None

    @property
    def running(self) -> bool:
        return self.status == "running"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "error": self.error,
            "started": self.started,
            "pid": self.pid,
            "started_at": self.started_at,
            "stopped_at": self.stopped_at,
        }

    @classmethod
    def from_json(cls, value: object, where: str = "") -> ProcessState:
        obj = _object(value, where.rstrip("."))
        status = _field(obj, "status", where)
        if status not in STATUSES:
            raise ValueError(f"field `{where}status` must be one of {', '.join(STATUSES)}")
        started = _field(obj, "started", where)
        if not isinstance(started, bool):
            raise ValueError(f"field `{where}started` must be a boolean")
        return cls(
            status=status,
            started=started,
            exit_code=_opt_int(obj, "exit_code", where),
            signal=_opt_int(obj, "signal", where),
            error=_opt_str(obj, "error", where),
            pid=_opt_int(obj, "pid", where),
            started_at=_opt_float(obj, "started_at", where),
            stopped_at=_opt_float(obj, "stopped_at", where),
        )


@dataclass(frozen=True)
class ProcessInfo:
    config: ProcessConfig
    state: ProcessState

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_json(), "state": self.state.to_json()}

    @classmethod
    def from_json(cls, value: object, where: str = "") -> ProcessInfo:
        obj = _object(value, where.rstrip("."))
        return cls(
            config=ProcessConfig.from_json(_field(obj, "config", where), f"{where}config."),
            state=ProcessState.from_json(_field(obj, "state", where), f"{where}state."),
        )
