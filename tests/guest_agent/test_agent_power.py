"""guest_agent.power: finding the ACPI power button and reacting to its key press."""

import os
import threading
from pathlib import Path

from guest_agent import power

# /sys/class/input/eventN/device/capabilities/key of the ACPI "Power Button" (KEY_POWER = 116).
ACPI_POWER_BUTTON_KEYS = "10000000000000 0"


def event(ev_type: int, code: int, value: int) -> bytes:
    return power.INPUT_EVENT.pack(1, 2, ev_type, code, value)


def test_bitmap_has_reads_multiword_sysfs_bitmaps() -> None:
    """Capability bitmaps are 64-bit hex words, most significant first, leading zeros dropped."""
    assert power.bitmap_has(ACPI_POWER_BUTTON_KEYS, power.KEY_POWER)
    assert not power.bitmap_has(ACPI_POWER_BUTTON_KEYS, power.KEY_POWER + 1)
    assert power.bitmap_has("10000000000000", 52)
    assert not power.bitmap_has("10000000000000", power.KEY_POWER)
    assert not power.bitmap_has("", power.KEY_POWER)
    assert not power.bitmap_has("0", 0)


def test_power_button_devices_are_found_by_key_capability(tmp_path: Path) -> None:
    """Only event devices that can send KEY_POWER are watched."""
    sys_input = tmp_path / "sys"
    for name, keys in (("event0", ACPI_POWER_BUTTON_KEYS), ("event1", "fffffffffffffffe")):
        caps = sys_input / name / "device" / "capabilities"
        caps.mkdir(parents=True)
        (caps / "key").write_text(keys + "\n")
    (sys_input / "mouse0").mkdir()
    devices = power.power_button_devices(sys_input, Path("/dev/input"))
    assert devices == [Path("/dev/input/event0")]


def test_only_a_key_power_press_counts() -> None:
    """A KEY_POWER press (value 1) is recognised; releases, other keys and syncs are not."""
    data = event(power.EV_KEY, power.KEY_POWER, 0) + event(0, 0, 0) + event(power.EV_KEY, 30, 1)
    assert list(power.parse_events(data)) == [
        (power.EV_KEY, power.KEY_POWER, 0),
        (0, 0, 0),
        (power.EV_KEY, 30, 1),
    ]
    assert not power.is_power_press(power.parse_events(data))
    assert power.is_power_press(power.parse_events(data + event(power.EV_KEY, power.KEY_POWER, 1)))
    assert list(power.parse_events(b"\0" * (power.INPUT_EVENT.size - 1))) == []


def test_watcher_runs_the_action_on_a_press(tmp_path: Path) -> None:
    """The watcher thread reads input events from the device and runs the action on a press."""
    fifo = tmp_path / "event0"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)
    pressed = threading.Event()
    try:
        watched = power.PowerButtonWatcher([fifo, tmp_path / "missing"], pressed.set).start()
        assert watched == [fifo]
        os.write(writer, event(power.EV_KEY, power.KEY_POWER, 0))
        assert not pressed.wait(0.2)
        os.write(writer, event(power.EV_KEY, power.KEY_POWER, 1) + event(0, 0, 0))
        assert pressed.wait(10)
    finally:
        os.close(writer)
