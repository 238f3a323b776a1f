"""Images from the configured OCI registry: ``pull TAG`` with a progress bar, ``lsimage --registry``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import IO, Any

from vmm.cli_client import output
from vmm.cli_client.client import Client, CliError


def cmd_lsimage_registry(client: Client, args: argparse.Namespace) -> None:
    """``lsimage --registry``: the configured registry's tags, and which are local or pulling."""
    tags = client.call("ListRegistryImages")["images"]
    if args.json:
        output.print_json(tags)
        return
    rows = [[t["tag"], "yes" if t["local"] else "no", _pull_state(t), t["error"]] for t in tags]
    output.print_table(rows, ["Tag", "Local", "Pull", "Error"])


def _pull_state(tag: dict[str, Any]) -> str:
    total = tag.get("bytes_total") or 0
    if not tag["pulling"]:
        return "failed" if tag["error"] else ""
    return f"{100 * tag['bytes_done'] // total}%" if total else "starting"


def cmd_pull(client: Client, args: argparse.Namespace) -> None:
    """``pull TAG``: start the pull, then draw a progress bar until it ends (or --no-wait)."""
    client.call("PullRegistryImage", {"tag": args.tag})
    if args.no_wait:
        return
    bar = ProgressBar(sys.stderr)
    while True:
        found = [t for t in client.call("ListRegistryImages")["images"] if t["tag"] == args.tag]
        tag: dict[str, Any] = found[0] if found else {
            "pulling": False, "local": False, "error": "the tag is no longer listed"}
        bar.show(tag.get("bytes_done") or 0, tag.get("bytes_total") or 0)
        if not tag["pulling"]:
            break
        time.sleep(args.interval)
    bar.end()
    if tag["error"] or not tag["local"]:
        raise CliError(f"pull of {args.tag} failed: {tag['error'] or 'no image was installed'}")
    print(f"dstack-{args.tag}")


class ProgressBar:
    """``[#####.....]  50%  12.0/24.0 MiB`` redrawn in place on a terminal, else every 10%."""

    WIDTH = 30

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last_tenth = -1

    def show(self, done: int, total: int) -> None:
        fraction = done / total if total else 0.0
        filled = int(fraction * self.WIDTH)
        line = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {fraction:4.0%} "
                f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB")
        if self.tty:
            self.out.write(f"\r{line}")
        elif int(fraction * 10) != self.last_tenth:
            self.last_tenth = int(fraction * 10)
            self.out.write(f"{line}\n")
        self.out.flush()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pull", help="pull an image tag from the registry, with progress")
    p.add_argument("tag")
    p.add_argument("--no-wait", action="store_true", help="return once the pull has started")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between progress polls")
    p.set_defaults(run=cmd_pull)
