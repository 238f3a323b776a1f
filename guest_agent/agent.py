"""Agent start-up: read options, boot, start the services, then wait.

Start-up time counts (every second here is a second of VM boot under TCG), so this package
keeps its imports lean: no dataclasses, typing or argparse unless options are given, and the
modules that only serve requests (SysInfo, NetworkInfo, Docker) load on first use.

Boot, as the host sees it (Notify over the host API, and the serial console):
``boot.progress`` "mounting host share" → "computing instance id" → ``instance.info`` and the
identity as one JSON line on the console → "starting services" → console ``VMM-GUEST-BOOT-OK``
→ ``boot.progress`` "done". A failed step sends ``boot.error`` with the reason and boot goes on
without "done" (the marker is still printed: it says the agent finished booting, not that everything worked).
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path

from guest_agent import boot, channel, host_api, identity, power, service, share, system, vsock
from guest_agent.api_server import AGENT_PORT_NAME, VSOCK_PORT, FrameServer, start_tcp, start_vsock
from guest_agent.console import DEFAULT_CONSOLE, Console
from guest_agent.guest_api import GuestApi

SHUTDOWN_NOTIFY_TIMEOUT = 5.0
POWER_BUTTON_NOTIFY_TIMEOUT = 2.0


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
        poweroff: bool = True,
        vsock: bool = True,
        api_tcp: tuple[str, int] | None = None,
        agent_port: Path | None = None,
        host_api_port: Path | None = None,
        state_dir: Path = identity.STATE_DIR,
        run_dir: Path = boot.RUN_DIR,
        docker_socket: Path | None = None,
    ) -> None:
        self.console = console
        self.share_dir = share_dir
        self.share_tag = share_tag
        self.mount_share = mount_share
        self.http_host = http_host
        self.http_port = http_port
        self.power_button = power_button
        self.poweroff = poweroff
        self.vsock = vsock
        self.api_tcp = api_tcp
        self.agent_port = agent_port
        self.host_api_port = host_api_port
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.docker_socket = docker_socket


def parse_args(argv: Sequence[str]) -> Config:
    if not argv:
        return Config()
    import argparse  # noqa: PLC0415 - only needed when options are given

    from guest_agent.api_server import parse_hostport  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="guest_agent", description="vmm development guest agent")
    parser.add_argument("--console", type=Path, default=DEFAULT_CONSOLE)
    parser.add_argument("--share-dir", type=Path, default=share.SHARE_DIR)
    parser.add_argument("--share-tag", default=share.SHARE_TAG)
    parser.add_argument("--no-mount", action="store_true", help="do not mount the host share")
    parser.add_argument("--http-host", default="0.0.0.0")
    parser.add_argument("--http-port", type=int, default=service.DEFAULT_PORT)
    parser.add_argument("--no-power-button", action="store_true")
    parser.add_argument("--no-poweroff", action="store_true", help="Shutdown and the power button only log")
    parser.add_argument("--no-vsock", action="store_true", help="neither listen on nor call over vsock")
    parser.add_argument(
        "--api-tcp", type=parse_hostport, metavar="HOST:PORT", help="also serve the guest API on TCP"
    )
    parser.add_argument(
        "--agent-port",
        type=Path,
        metavar="PATH",
        help="guest API frames here instead of the org.vmm.guest-agent port "
        "(a Unix socket is connected to; anything else is opened read-write)",
    )
    parser.add_argument(
        "--host-api-port",
        type=Path,
        metavar="PATH",
        help="host API frames here instead of vsock or the org.vmm.host-api port (same rule)",
    )
    parser.add_argument("--state-dir", type=Path, default=identity.STATE_DIR)
    parser.add_argument("--run-dir", type=Path, default=boot.RUN_DIR)
    parser.add_argument("--docker-socket", type=Path)
    ns = parser.parse_args(argv)
    return Config(
        console=ns.console,
        share_dir=ns.share_dir,
        share_tag=ns.share_tag,
        mount_share=not ns.no_mount,
        http_host=ns.http_host,
        http_port=ns.http_port,
        power_button=not ns.no_power_button,
        poweroff=not ns.no_poweroff,
        vsock=not ns.no_vsock,
        api_tcp=ns.api_tcp,
        agent_port=ns.agent_port,
        host_api_port=ns.host_api_port,
        state_dir=ns.state_dir,
        run_dir=ns.run_dir,
        docker_socket=ns.docker_socket,
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


class Boot:
    """Boot progress to the host, unless an earlier run of the agent already reported it."""

    def __init__(self, notifier: host_api.Notifier, console: Console, report: bool) -> None:
        self.notifier = notifier
        self.console = console
        self.report = report
        self.failed = False

    def progress(self, step: str) -> None:
        if self.report:
            self.notifier.notify("boot.progress", step)

    def error(self, reason: str) -> None:
        self.failed = True
        self.console.log(f"boot error: {reason}")
        if self.report:
            self.notifier.notify("boot.error", reason)


def powering_off(
    console: Console, notifier: host_api.Notifier, poweroff: bool, timeout: float
) -> Callable[[], None]:
    """Tell the host (bounded wait), then power off; with ``poweroff`` False only log."""

    def run() -> None:
        notifier.notify_wait("shutdown.progress", "powering off", timeout)
        if poweroff:
            power.power_off(console)
        else:
            console.log("power off skipped (--no-poweroff)")

    return run


def shutdown_once(console: Console, action: Callable[[], None]) -> Callable[[], None]:
    """The Shutdown call's after-reply hook: run ``action`` in a thread, once."""
    lock = threading.Lock()

    def start() -> None:
        if lock.acquire(blocking=False):
            console.log("shutdown requested, powering off")
            threading.Thread(target=action, name="shutdown", daemon=True).start()

    return start


def start_services(
    *,
    config: Config,
    console: Console,
    api: GuestApi,
    state: boot.BootState,
    report: Boot,
    cid: int | None,
) -> list[ThreadingHTTPServer]:
    servers: list[ThreadingHTTPServer] = []
    try:
        server = service.start(status_fn(state), config.http_host, config.http_port)
    except OSError as exc:
        report.error(f"http service on port {config.http_port}: {exc}")
    else:
        servers.append(server)
        console.log(f"http service on port {server.port}")
    if config.api_tcp is not None:
        try:
            tcp = start_tcp(api, *config.api_tcp)
        except OSError as exc:
            report.error(f"guest api on tcp {config.api_tcp[0]}:{config.api_tcp[1]}: {exc}")
        else:
            servers.append(tcp)
            host, bound = tcp.server_address[:2]
            console.log(f"guest api on tcp {host!s}:{bound}")
    if cid is not None:
        try:
            servers.append(start_vsock(api))
            console.log(f"guest api on vsock port {VSOCK_PORT}")
        except OSError as exc:
            console.log(f"guest api on vsock port {VSOCK_PORT} not available: {exc}")
    port = config.agent_port or channel.find_port(AGENT_PORT_NAME)
    if port is not None:
        FrameServer(channel.PortChannel(port, console.log), api, console.log).start()
        console.log(f"guest api on serial {port}")
    return servers


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(config.console)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())

    first_run = not boot.already_reported(config.run_dir)
    if not first_run:
        console.log("agent restarted; boot was already reported")
    notifier = host_api.Notifier(console.log)
    report = Boot(notifier, console, first_run)

    report.progress("mounting host share")
    state = boot.prepare(console, config.share_dir, config.mount_share, config.share_tag)
    if state.error:
        report.error(state.error)
    cid = vsock.guest_cid() if config.vsock else None
    host = host_api.choose(config.share_dir, config.host_api_port, cid, console.log)
    console.log(f"host api: {host.description if host else 'none (events are not sent)'}")
    notifier.attach(host)

    report.progress("computing instance id")
    ident, problems = identity.compute(config.share_dir, config.state_dir)
    for problem in problems:
        console.log(problem)
    if first_run:
        notifier.notify("instance.info", ident.instance_info())
        # As dstack's guest does: the measured identity on the console, one JSON line to grep.
        console.line(ident.console_line(state.compose_sha256, identity.app_name(config.share_dir)))

    report.progress("starting services")
    off = powering_off(console, notifier, config.poweroff, SHUTDOWN_NOTIFY_TIMEOUT)
    api = GuestApi(ident, shutdown_once(console, off), config.docker_socket)
    servers = start_services(config=config, console=console, api=api, state=state, report=report, cid=cid)
    if config.power_button:
        button_off = powering_off(console, notifier, config.poweroff, POWER_BUTTON_NOTIFY_TIMEOUT)
        watched = power.PowerButtonWatcher(
            power.power_button_devices(), power.on_power_button(console, off=button_off)
        ).start()
        if not watched:
            console.log("no power button input device; ACPI power-off will not work")
    console.log(f"up {system.uptime():.2f} s")
    if first_run:
        boot.report_ready(console, state)
        boot.mark_reported(config.run_dir)
        if not report.failed:
            report.progress("done")

    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    for server in servers:
        server.shutdown()
        server.server_close()
    console.close()
    return 0
