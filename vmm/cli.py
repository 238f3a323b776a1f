"""``vmm``: run the daemon (``vmm serve``) or check a config (``vmm check-config``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from pathlib import Path

from vmm import __version__
from vmm.core import log_level
from vmm.core.config import Config, load_config, parse_address
from vmm.core.exceptions import ConfigError

log = logging.getLogger("vmm")


def _config_path(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    local = Path("vmm.toml")
    return local if local.is_file() else None


def describe_config(path: Path | None) -> str:
    return str(path.resolve()) if path is not None else "(embedded defaults)"


def cmd_version(path: Path | None) -> int:
    """The version and the config file this invocation would run with (as a service: /etc)."""
    print(f"vmm {__version__}")
    print(f"config: {describe_config(path)}")
    return 0


def cmd_serve(config: Config, path: Path | None) -> int:
    # Imported here so check-config stays light.
    from vmm.api.app import build_app  # noqa: PLC0415
    from vmm.api.auth import warn_if_exposed  # noqa: PLC0415
    from vmm.api.server import listeners, serve  # noqa: PLC0415
    from vmm.daemon import Daemon  # noqa: PLC0415

    daemon = Daemon(config, config_file=str(path.resolve()) if path is not None else "")
    app = build_app(daemon)
    tcp_hosts = [where for kind, where, _ in map(parse_address, config.addresses) if kind == "tcp"]
    warn_if_exposed(daemon.authenticator, tcp_hosts)
    # What exists now (modules, the app) lives as long as the process: frozen out of the
    # collector's sight, a full collection (while 1,000 VMs load, say) does not walk it again.
    gc.freeze()
    with listeners(config) as sockets:
        asyncio.run(serve(app, config, sockets))
    return 0


def cmd_check_config(config: Config, path: Path | None) -> int:
    from vmm.api.auth import Authenticator  # noqa: PLC0415
    from vmm.host.capabilities import detect  # noqa: PLC0415

    Authenticator.from_config(config.auth)
    host = detect(config.cvm)
    where = describe_config(path)
    print(f"config OK: {where}")
    print(f"  listen: {', '.join(config.addresses)}")
    print(f"  run_path: {config.run_path}  images: {config.image.path}")
    print(f"  accel: {host.accel}  tee: {host.tee}  guest channel: {host.channel}")
    print(f"  qemu: {host.qemu_path or '(not found)'} {host.qemu_version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``-c`` is accepted before or after the subcommand (``vmm check-config -c FILE``)."""
    config_help = "vmm.toml (default: ./vmm.toml if present)"
    parser = argparse.ArgumentParser(prog="vmm", description=__doc__)
    parser.add_argument("-c", "--config", type=Path, help=config_help)
    parser.add_argument("--version", action="store_true",
                        help="print the version and the config file in use, then exit")
    # SUPPRESS: a subcommand without -c must not reset a -c given before it to None.
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("-c", "--config", type=Path, default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", parents=[after], help="run the daemon (the default)")
    sub.add_parser(
        "check-config", parents=[after], help="validate the config and print what it resolves to"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = _config_path(args.config)
    if args.version:
        return cmd_version(path)
    try:
        config = load_config(path)
        log_level.configure(config.log_level)
        if args.command == "check-config":
            return cmd_check_config(config, path)
        log.info("vmm %s, config %s", __version__, describe_config(path))
        return cmd_serve(config, path)
    except ConfigError as exc:
        print(f"vmm: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
