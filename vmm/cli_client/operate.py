"""Beyond dstack's commands: ``pause``/``resume`` a VM and the daemon's ``log-level``."""

from __future__ import annotations

import argparse

from vmm.cli_client.client import Client

LEVELS = ("debug", "info", "warning", "error")


def cmd_pause(client: Client, args: argparse.Namespace) -> None:
    client.call("PauseVm", {"id": args.id})
    print(f"PauseVm {args.id}: ok")


def cmd_resume(client: Client, args: argparse.Namespace) -> None:
    client.call("ResumeVm", {"id": args.id})
    print(f"ResumeVm {args.id}: ok")


def cmd_log_level(client: Client, args: argparse.Namespace) -> None:
    """With a level, set it now (until the daemon restarts); without, print the current one."""
    if args.level:
        client.call("SetLogLevel", {"level": args.level})
    print(client.call("GetMeta")["log_level"])


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, text, run in (("pause", "stop a running VM's vCPUs (Status: paused)", cmd_pause),
                            ("resume", "let a paused VM run again", cmd_resume)):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        p.set_defaults(run=run)
    p = sub.add_parser("log-level", help="the daemon's log level: print it, or set it now")
    p.add_argument("level", nargs="?", choices=LEVELS)
    p.set_defaults(run=cmd_log_level)
