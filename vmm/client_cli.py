"""``vmm-cli``: drive a VMM daemon from the shell (command names follow dstack's vmm-cli).

    vmm-cli [--url URL] [--token T | --auth-user U --auth-password P] COMMAND ...

The URL is ``http(s)://host:port`` or ``unix:/path/to/vmm.sock``; it defaults to
``$DSTACK_VMM_URL``, then ``http://127.0.0.1:9080``. Calls are ``POST /prpc/<Method>?json``.
A failed call prints the daemon's error and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:9080"


class CliError(Exception):
    pass


class Client:
    def __init__(self, url: str, *, token: str = "", user: str = "", password: str = "") -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        auth = httpx.BasicAuth(user, password) if user and not token else None
        if url.startswith("unix:"):
            transport = httpx.HTTPTransport(uds=url.removeprefix("unix:"))
            self.http = httpx.Client(transport=transport, base_url="http://vmm", headers=headers,
                                     auth=auth, timeout=60)
        else:
            self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, auth=auth,
                                     timeout=60)

    def call(self, method: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self.http.post(f"/prpc/{method}?json", json=body or {})
        except httpx.HTTPError as exc:
            raise CliError(f"cannot reach the VMM: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json().get("error", response.text)
            except (json.JSONDecodeError, AttributeError):
                message = response.text or f"HTTP {response.status_code}"
            raise CliError(f"{method} failed: {message}")
        return response.json() if response.content else None


def _size_mb(text: str) -> int:
    """Memory: a bare number is MB; M, G and T suffixes are accepted (whole numbers only)."""
    return _size(text, {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}, "memory")


def _size_gb(text: str) -> int:
    """Disk: a bare number is GB; G and T suffixes are accepted (whole numbers only)."""
    return _size(text, {"": 1, "G": 1, "T": 1024}, "disk")


def _size(text: str, units: dict[str, int], what: str) -> int:
    value = text.strip().upper().removesuffix("B")
    unit = value[-1] if value and value[-1].isalpha() else ""
    number = value[: -1] if unit else value
    if unit not in units or not number.isdigit():
        raise argparse.ArgumentTypeError(f"bad {what} size {text!r} (e.g. 1024, 2G)")
    return int(number) * units[unit]


def _port(text: str) -> dict[str, Any]:
    """``proto[:addr]:host:vm``, e.g. ``tcp:8080:80`` or ``tcp:0.0.0.0:8080:80``."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("tcp", "udp"):
        raise argparse.ArgumentTypeError(f"bad port {text!r}: use proto[:addr]:host:vm")
    address = parts[1] if len(parts) == 4 else ""
    try:
        host, vm = int(parts[-2]), int(parts[-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port numbers in {text!r}") from None
    return {"protocol": parts[0], "host_address": address, "host_port": host, "vm_port": vm}


def _print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def cmd_lsvm(client: Client, args: argparse.Namespace) -> None:
    vms = client.call("Status", {"brief": not args.verbose})["vms"]
    if args.json:
        print(json.dumps(vms, indent=2))
        return
    headers = ["VM ID", "App ID", "Name", "Status", "Uptime"]
    rows = [[vm["id"], vm["app_id"], vm["name"], vm["status"], vm["uptime"]] for vm in vms]
    if args.verbose:
        headers += ["Instance ID", "vCPU", "Memory", "Disk", "Image"]
        for row, vm in zip(rows, vms, strict=True):
            config = vm["configuration"] or {}
            row += [vm["instance_id"] or "-", str(config.get("vcpu", "")),
                    f"{config.get('memory', '')}M", f"{config.get('disk_size', '')}G",
                    config.get("image", "")]
    _print_table(rows, headers)


def cmd_info(client: Client, args: argparse.Namespace) -> None:
    answer = client.call("GetInfo", {"id": args.id})
    if not answer["found"]:
        raise CliError(f"VM not found: {args.id}")
    info = answer["info"]
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key in ("id", "name", "status", "uptime", "app_id", "instance_id", "app_url",
                "boot_progress", "boot_error", "shutdown_progress", "image_version"):
        print(f"{key:18s} {info.get(key) or '-'}")
    for event in info["events"]:
        print(f"  event {event['timestamp']} {event['event']}: {event['body']}")


def cmd_lifecycle(client: Client, args: argparse.Namespace) -> None:
    method = {"start": "StartVm", "remove": "RemoveVm"}.get(args.command)
    if args.command == "stop":
        method = "StopVm" if args.force else "ShutdownVm"
    assert method is not None
    client.call(method, {"id": args.id})
    print(f"{method} {args.id}: ok")


def cmd_logs(client: Client, args: argparse.Namespace) -> None:
    params = {"id": args.id, "lines": str(args.lines), "follow": str(args.follow).lower(),
              "ansi": "false", "ch": args.channel}
    with client.http.stream("GET", "/logs", params=params, timeout=None) as response:
        if response.status_code != 200:
            response.read()
            raise CliError(f"logs failed: {response.text}")
        for chunk in response.iter_bytes():
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()


def cmd_events(client: Client, args: argparse.Namespace) -> None:
    """The daemon's recent events (its bounded history), then with -f new ones as they come."""
    params: dict[str, Any] = {"last_event_id": "0", "follow": str(args.follow).lower()}
    if args.id:
        params["id"] = args.id
    with client.http.stream("GET", "/events", params=params, timeout=None) as response:
        if response.status_code != 200:
            response.read()
            raise CliError(f"events failed: {response.text}")
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line.startswith("data:") and kind == "vm":
                event = json.loads(line.partition(":")[2])
                print(f"{event['timestamp']} {event['vm_id']} {event['status'] or '-'} "
                      f"{event['event']} {event['body']}".rstrip(), flush=True)


def cmd_lsimage(client: Client, args: argparse.Namespace) -> None:
    images = client.call("ListImages")["images"]
    if args.json:
        print(json.dumps(images, indent=2))
        return
    _print_table([[i["name"], i["version"], "yes" if i["is_dev"] else "no"] for i in images],
                 ["Name", "Version", "Dev"])


def cmd_deploy(client: Client, args: argparse.Namespace) -> None:
    request: dict[str, Any] = {
        "name": args.name, "image": args.image, "compose_file": Path(args.compose).read_text(),
        "vcpu": args.vcpu, "memory": args.memory, "disk_size": args.disk,
        "ports": args.port, "stopped": args.stopped, "no_tee": args.no_tee,
        "kms_urls": args.kms_url, "gateway_urls": args.gateway_url,
    }
    if args.user_config:
        request["user_config"] = Path(args.user_config).read_text()
    if args.app_id:
        request["app_id"] = args.app_id
    print(client.call("CreateVm", request)["id"])


def cmd_version(client: Client, args: argparse.Namespace) -> None:
    answer = client.call("Version")
    print(f"{answer['version']} ({answer['rev']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmm-cli", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("DSTACK_VMM_URL", DEFAULT_URL))
    parser.add_argument("--token", default=os.environ.get("DSTACK_VMM_TOKEN", ""))
    parser.add_argument("--auth-user", default=os.environ.get("DSTACK_VMM_AUTH_USER", ""))
    parser.add_argument("--auth-password", default=os.environ.get("DSTACK_VMM_AUTH_PASSWORD", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("lsvm", help="list VMs")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_lsvm)
    p = sub.add_parser("info", help="show one VM")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)
    for name, text in (("start", "start a VM"), ("stop", "shut down a VM (-f: hard stop)"),
                       ("remove", "remove a VM")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        if name == "stop":
            p.add_argument("-f", "--force", action="store_true")
        p.set_defaults(run=cmd_lifecycle)
    p = sub.add_parser("logs", help="print (or follow) a VM's console")
    p.add_argument("id")
    p.add_argument("-n", "--lines", type=int, default=20)
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--channel", choices=("serial", "stdout", "stderr"), default="serial")
    p.set_defaults(run=cmd_logs)
    p = sub.add_parser("events", help="print the daemon's VM events (-f: follow)")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--id", action="append", default=[], help="only this VM (repeatable)")
    p.set_defaults(run=cmd_events)
    p = sub.add_parser("lsimage", help="list images")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_lsimage)
    p = sub.add_parser("deploy", help="create (and start) a VM")
    p.add_argument("--name", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--compose", required=True, help="app-compose.json file")
    p.add_argument("--vcpu", type=int, default=1)
    p.add_argument("--memory", type=_size_mb, default=1024, help="MB, or with M/G/T")
    p.add_argument("--disk", type=_size_gb, default=20, help="GB, or with G/T")
    p.add_argument("--port", type=_port, action="append", default=[],
                   help="proto[:addr]:host:vm, repeatable")
    p.add_argument("--user-config")
    p.add_argument("--app-id")
    p.add_argument("--kms-url", action="append", default=[])
    p.add_argument("--gateway-url", action="append", default=[])
    p.add_argument("--stopped", action="store_true")
    p.add_argument("--no-tee", action="store_true")
    p.set_defaults(run=cmd_deploy)
    p = sub.add_parser("version", help="the daemon's version")
    p.set_defaults(run=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = Client(args.url, token=args.token, user=args.auth_user, password=args.auth_password)
    try:
        args.run(client, args)
    except CliError as exc:
        print(f"vmm-cli: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vmm-cli: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
