"""Power: the ACPI power button watcher and the power-off action.

QEMU's ``system_powerdown`` presses the ACPI power button; the kernel's ``button`` driver turns
that into a KEY_POWER key event on an evdev node (/dev/input/eventN). A thread polls every
input device that can send KEY_POWER and runs the action on the first press.
"""

import contextlib
import os
import select
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from guest_agent import system
from guest_agent.console import Console

EV_KEY = 1
KEY_POWER = 116
KEY_PRESS = 1
#: struct input_event on 64-bit Linux: struct timeval (2 longs), u16 type, u16 code, s32 value.
INPUT_EVENT = struct.Struct("llHHi")
SYS_INPUT = Path("/sys/class/input")
DEV_INPUT = Path("/dev/input")
SYSRQ_TRIGGER = Path("/proc/sysrq-trigger")


def bitmap_has(bitmap: str, bit: int) -> bool:
    """Whether ``bit`` is set in a sysfs capability bitmap.

    The kernel prints the bitmap as space-separated 64-bit words in hex, most significant word
    first, with leading zero words left out.
    """
    words = bitmap.split()
    index, offset = divmod(bit, 64)
    if index >= len(words):
        return False
    return bool(int(words[len(words) - 1 - index], 16) >> offset & 1)


def power_button_devices(sys_input: Path = SYS_INPUT, dev_input: Path = DEV_INPUT) -> list[Path]:
    """Event device nodes whose key capabilities include KEY_POWER."""
    found: list[Path] = []
    for event_dir in sorted(sys_input.glob("event*")):
        try:
            keys = (event_dir / "device" / "capabilities" / "key").read_text()
        except OSError:
            continue
        if bitmap_has(keys, KEY_POWER):
            found.append(dev_input / event_dir.name)
    return found


def parse_events(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, code, value) of each whole struct input_event in ``data``."""
    size = INPUT_EVENT.size
    for start in range(0, len(data) - size + 1, size):
        _sec, _usec, ev_type, code, value = INPUT_EVENT.unpack_from(data, start)
        yield ev_type, code, value


def is_power_press(events: Iterable[tuple[int, int, int]]) -> bool:
    return any(t == EV_KEY and c == KEY_POWER and v == KEY_PRESS for t, c, v in events)


class PowerButtonWatcher:
    """Runs ``action`` each time a power button device reports a press."""

    def __init__(self, devices: list[Path], action: Callable[[], None]) -> None:
        self.devices = devices
        self.action = action
        self._fds: dict[int, Path] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> list[Path]:
        """Open the devices and start the thread; returns the devices actually watched."""
        for device in self.devices:
            try:
                fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            self._fds[fd] = device
        if self._fds:
            self._thread = threading.Thread(target=self._run, name="power-button", daemon=True)
            self._thread.start()
        return list(self._fds.values())

    def _run(self) -> None:
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        while self._fds:
            for fd, _mask in poller.poll():
                try:
                    data = os.read(fd, INPUT_EVENT.size * 64)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the device went away
                    poller.unregister(fd)
                    os.close(fd)
                    self._fds.pop(fd, None)
                    continue
                if is_power_press(parse_events(data)):
                    self.action()  # returns only if powering off failed: keep watching


def power_off(console: Console) -> None:
    """Sync, remount / read-only (best effort) and power off; falls back to sysrq."""
    os.sync()
    with contextlib.suppress(OSError):
        system.mount("none", Path("/"), "none", system.MS_REMOUNT | system.MS_RDONLY)
    try:
        system.reboot_power_off()
    except OSError as exc:
        console.log(f"power off failed: {exc}; trying sysrq")
    with contextlib.suppress(OSError):
        SYSRQ_TRIGGER.write_text("o")


def on_power_button(console: Console, off: Callable[[], None] | None = None) -> Callable[[], None]:
    """Build the action: log, then power off (or run ``off``, which tells the host first)."""

    def action() -> None:
        console.log("power button, powering off")
        if off is None:
            power_off(console)
        else:
            off()

    return action
