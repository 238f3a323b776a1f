"""The VM's identity: app id, instance id and device id (reference §9).

- app_id: the ``app_id`` of the share's ``.instance_info`` (the VMM writes it at create), else
  the first 20 bytes of sha256(app-compose.json).
- instance_id_seed: 20 random bytes made once per disk and kept on it, so a reboot keeps the
  instance id and a fresh disk gets a new one. The seed in ``.instance_info`` is deliberately
  not reused: with no key provider the disk, not the host, decides an instance's lifetime.
- instance_id: sha256(seed || app_id)[:20]; empty when the compose sets ``no_instance_id``.
- device_id: sha256 of /etc/machine-id, or of the seed when the machine id is empty (the
  development image ships an empty one).
"""

import contextlib
import hashlib
import json
import os
from pathlib import Path

from guest_agent import share

INSTANCE_INFO_FILE = ".instance_info"
STATE_DIR = Path("/var/lib/vmm-guest")
SEED_FILE = "instance_id_seed"
MACHINE_ID = Path("/etc/machine-id")
ID_LEN = 20


class Identity:
    __slots__ = ("app_id", "device_id", "instance_id", "seed")

    def __init__(self, app_id: bytes, seed: bytes, instance_id: bytes, device_id: bytes) -> None:
        self.app_id = app_id
        self.seed = seed
        self.instance_id = instance_id
        self.device_id = device_id

    def instance_info(self) -> str:
        """The ``instance.info`` Notify payload (also what the VMM stores as .instance_info)."""
        return json.dumps(
            {
                "instance_id_seed": self.seed.hex(),
                "instance_id": self.instance_id.hex(),
                "app_id": self.app_id.hex(),
            },
            separators=(",", ":"),
        )

    def console_line(self, compose_hash: str | None, app_name: str | None) -> str:
        """The identity as one JSON line for the serial console, with dstack's AppInfo key names.

        An operator (or dstack's tooling) greps the console for ``compose_hash`` to see what the
        guest measured; every id is lowercase hex, empty when there is none.
        """
        return json.dumps(
            {
                "app_id": self.app_id.hex(),
                "app_name": app_name or "",
                "compose_hash": compose_hash or "",
                "instance_id": self.instance_id.hex(),
                "device_id": self.device_id.hex(),
            },
            separators=(",", ":"),
        )


def parse_hex_id(value: object) -> bytes | None:
    """A 20-byte id from hex text (``0x`` optional, any case); None if it is not one."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    return raw if len(raw) == ID_LEN else None


def app_id_of(share_dir: Path, compose: bytes | None, problems: list[str]) -> bytes:
    try:
        info = json.loads((share_dir / INSTANCE_INFO_FILE).read_bytes())
    except FileNotFoundError:
        info = None
    except (OSError, ValueError) as exc:
        problems.append(f"{INSTANCE_INFO_FILE} unreadable: {exc}")
        info = None
    if isinstance(info, dict) and info.get("app_id"):
        app_id = parse_hex_id(info["app_id"])
        if app_id is not None:
            return app_id
        problems.append(f"{INSTANCE_INFO_FILE} app_id {info['app_id']!r} is not 20 bytes of hex")
    if compose is None:
        return b""
    return hashlib.sha256(compose).digest()[:ID_LEN]


def load_seed(state_dir: Path, problems: list[str]) -> bytes:
    """The disk's instance id seed, made and stored (atomically) the first time."""
    path = state_dir / SEED_FILE
    try:
        seed = parse_hex_id(path.read_text())
    except FileNotFoundError:
        seed = None
    except OSError as exc:
        problems.append(f"cannot read {path}: {exc}")
        seed = None
    if seed is not None:
        return seed
    seed = os.urandom(ID_LEN)
    try:
        _write_atomic(path, seed.hex() + "\n")
    except OSError as exc:
        problems.append(f"cannot store {path}: {exc}; the instance id will change at reboot")
    return seed


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _compose_doc(compose: bytes | None) -> dict[str, object]:
    if compose is None:
        return {}
    try:
        doc = json.loads(compose)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def no_instance_id(compose: bytes | None) -> bool:
    return _compose_doc(compose).get("no_instance_id") is True


def app_name(share_dir: Path) -> str | None:
    """The compose's ``name``, if it has one."""
    try:
        name = _compose_doc((share_dir / share.COMPOSE_FILE).read_bytes()).get("name")
    except OSError:
        return None
    return name if isinstance(name, str) else None


def compute(
    share_dir: Path,
    state_dir: Path = STATE_DIR,
    machine_id: Path = MACHINE_ID,
) -> tuple[Identity, list[str]]:
    """The identity of this boot and the problems met while working it out (for the log)."""
    problems: list[str] = []
    try:
        compose: bytes | None = (share_dir / share.COMPOSE_FILE).read_bytes()
    except OSError:
        compose = None
    app_id = app_id_of(share_dir, compose, problems)
    seed = load_seed(state_dir, problems)
    if no_instance_id(compose):
        instance_id = b""
    elif not app_id:
        problems.append("no app-compose.json and no app_id: the instance id is empty")
        instance_id = b""
    else:
        instance_id = hashlib.sha256(seed + app_id).digest()[:ID_LEN]
    try:
        mid = machine_id.read_text().strip()
    except OSError:
        mid = ""
    device_id = hashlib.sha256(mid.encode() if mid else seed).digest()
    return Identity(app_id, seed, instance_id, device_id), problems
