"""The ``vmm-cli`` entry point: the parser built from the command modules, and main()."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from vmm.cli_client import compose, deploy, events, host, kms, operate, registry, update, vms
from vmm.cli_client.client import Client, CliError, resolve_settings

DESCRIPTION = "drive a VMM daemon from the shell (commands and flags follow dstack's vmm-cli)"

#: The command modules, in help order. A new one (say ``events``) only needs a line here.
COMMANDS: tuple[ModuleType, ...] = (
    vms, operate, deploy, compose, update, events, host, registry, kms,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmm-cli", description=DESCRIPTION)
    parser.add_argument("--url", help="http(s)://HOST:PORT or unix:PATH")
    parser.add_argument("--token", help="bearer token")
    parser.add_argument("--auth-user")
    parser.add_argument("--auth-password")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client: Client | None = None
    try:
        settings = resolve_settings(args.url, args.token, args.auth_user, args.auth_password)
        client = Client(settings)
        args.run(client, args)
    except (CliError, argparse.ArgumentTypeError, OSError) as exc:
        print(f"vmm-cli: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if client is not None:
            client.close()
    return 0
