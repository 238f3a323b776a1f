"""Agent start-up: read options, boot, start the services, then wait.

Start-up time counts (every second here is a second of VM boot under TCG), so this package
keeps its imports lean: no dataclasses, typing or argparse unless options are given.
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from guest_agent import boot, power, service, share, system
from guest_agent.console import DEFAULT_CONSOLE, Console


class Config:
    """Agent options; the defaults are what the guest image runs with."""

    def __init__(
        self,
        *,
        console: Path = DEFAULT_CONSOLE,
        share_dir: Path = share.SHARE_DIR,
        share_tag: str = share.SHARE_TAG,
        mount_share: bool = True,
        http_host: str = "0.0.0.0",
        http_port: int = service.DEFAULT_PORT,
        power_button: bool = True,
    ) -> None:
        self.console = console
        self.share_dir = share_dir
        self.share_tag = share_tag
        self.mount_share = mount_share
        self.http_host = http_host
        self.http_port = http_port
        self.power_button = power_button


def parse_args(argv: Sequence[str]) -> Config:
    if not argv:
        return Config()
    import argparse  # noqa: PLC0415 - only needed when options are given

    parser = argparse.ArgumentParser(prog="guest_agent", description="vmm development guest agent")
    parser.add_argument("--console", type=Path, default=DEFAULT_CONSOLE)
    parser.add_argument("--share-dir", type=Path, default=share.SHARE_DIR)
    parser.add_argument("--share-tag", default=share.SHARE_TAG)
    parser.add_argument("--no-mount", action="store_true", help="do not mount the host share")
    parser.add_argument("--http-host", default="0.0.0.0")
    parser.add_argument("--http-port", type=int, default=service.DEFAULT_PORT)
    parser.add_argument("--no-power-button", action="store_true")
    ns = parser.parse_args(argv)
    return Config(
        console=ns.console,
        share_dir=ns.share_dir,
        share_tag=ns.share_tag,
        mount_share=not ns.no_mount,
        http_host=ns.http_host,
        http_port=ns.http_port,
        power_button=not ns.no_power_button,
    )


def status_fn(state: boot.BootState) -> service.StatusFn:
    def status() -> dict[str, object]:
        return {
            "service": service.SERVICE_NAME,
            "hostname": system.hostname(),
            "uptime": system.uptime(),
            "compose_sha256": state.compose_sha256,
        }

    return status


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(config.console)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())

    state = boot.prepare(console, config.share_dir, config.mount_share, config.share_tag)
    server = service.start(status_fn(state), config.http_host, config.http_port)
    console.log(f"http service on port {server.port}")
    if config.power_button:
        watched = power.PowerButtonWatcher(
            power.power_button_devices(), power.on_power_button(console)
        ).start()
        if not watched:
            console.log("no power button input device; ACPI power-off will not work")
    console.log(f"up {system.uptime():.2f} s")
    boot.report_ready(console, state)

    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.shutdown()
    server.server_close()
    console.close()
    return 0
