"""``events [-f] [--id ID]``: the daemon's recent VM events from ``GET /events``, then new ones live."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vmm.cli_client.client import Client, CliError, error_message


def cmd_events(client: Client, args: argparse.Namespace) -> None:
    """The daemon's recent events (its bounded history), then with -f new ones as they come."""
    params: dict[str, Any] = {"last_event_id": "0", "follow": str(args.follow).lower()}
    if args.id:
        params["id"] = args.id
    with client.http.stream("GET", "/events", params=params, timeout=None) as response:
        if response.status_code != 200:
            response.read()
            raise CliError(f"events failed: {error_message(response)}")
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:") and kind == "vm":
                event = json.loads(line.partition(":")[2])
                print(f"{event['timestamp']} {event['vm_id']} {event['status'] or '-'} "
                      f"{event['event']} {event['body']}".rstrip(), flush=True)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("events", help="print the daemon's VM events (-f: follow)")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--id", action="append", default=[], help="only this VM (repeatable)")
    p.set_defaults(run=cmd_events)
