"""Commands on existing VMs: lsvm, info, start, stop, remove, resize, logs, top."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from vmm.cli_client import output, parsing
from vmm.cli_client.client import Client, CliError
from vmm.cli_client.waiting import wait_for_boot

DEFAULT_WAIT = 600.0


def _gpus(config: dict[str, Any]) -> str:
    gpus = config.get("gpus") or {}
    if gpus.get("attach_mode") == "all":
        return "all"
    return ",".join(g["slot"] for g in gpus.get("gpus") or []) or "-"


def vm_rows(vms: list[dict[str, Any]], verbose: bool) -> tuple[list[list[str]], list[str]]:
    headers = ["VM ID", "App ID", "Name", "Status", "Uptime"]
    rows = [[vm["id"], vm["app_id"], vm["name"], vm["status"], vm["uptime"] or "-"] for vm in vms]
    if verbose:
        headers += ["Instance ID", "vCPU", "Memory", "Disk", "Image", "GPUs"]
        for row, vm in zip(rows, vms, strict=True):
            config = vm.get("configuration") or {}
            row += [vm.get("instance_id") or "-", str(config.get("vcpu", "")),
                    f"{config.get('memory', '')}M", f"{config.get('disk_size', '')}G",
                    config.get("image", ""), _gpus(config)]
    return rows, headers


def cmd_lsvm(client: Client, args: argparse.Namespace) -> None:
    vms = client.call("Status", {"brief": not args.verbose})["vms"]
    if args.json:
        output.print_json(vms)
        return
    output.print_table(*vm_rows(vms, args.verbose))


def cmd_info(client: Client, args: argparse.Namespace) -> None:
    info = client.vm_info(args.id)
    if args.json:
        output.print_json(info)
        return
    for key in ("id", "name", "status", "uptime", "app_id", "instance_id", "app_url",
                "boot_progress", "boot_error", "shutdown_progress", "image_version"):
        print(f"{key:18s} {info.get(key) or '-'}")
    config = info.get("configuration") or {}
    print(f"{'resources':18s} {config.get('vcpu')} vCPU, {config.get('memory')}M, "
          f"{config.get('disk_size')}G, image {config.get('image')}")
    for mapping in config.get("ports") or []:
        print(f"{'port':18s} {mapping['protocol']}:{mapping['host_address']}:"
              f"{mapping['host_port']} -> {mapping['vm_port']}")
    for event in info.get("events") or []:
        print(f"  event {event['timestamp']} {event['event']}: {event['body']}")


def cmd_start(client: Client, args: argparse.Namespace) -> None:
    client.call("StartVm", {"id": args.id})
    if args.wait:
        wait_for_boot(lambda: client.vm_info(args.id), args.id, args.wait_timeout)
    print(f"StartVm {args.id}: ok")


def cmd_stop(client: Client, args: argparse.Namespace) -> None:
    method = "StopVm" if args.force else "ShutdownVm"
    client.call(method, {"id": args.id})
    print(f"{method} {args.id}: ok")


def cmd_remove(client: Client, args: argparse.Namespace) -> None:
    client.call("RemoveVm", {"id": args.id})
    print(f"RemoveVm {args.id}: ok")


def cmd_resize(client: Client, args: argparse.Namespace) -> None:
    request: dict[str, Any] = {"id": args.id}
    for key, value in (("vcpu", args.vcpu), ("memory", args.memory),
                       ("disk_size", args.disk), ("image", args.image)):
        if value is not None:
            request[key] = value
    if len(request) == 1:
        raise CliError("resize: give at least one of --vcpu, --memory, --disk, --image")
    client.call("ResizeVm", request)
    print(f"ResizeVm {args.id}: ok")


def cmd_logs(client: Client, args: argparse.Namespace) -> None:
    params = {"id": args.id, "lines": str(args.lines), "follow": str(args.follow).lower(),
              "ansi": "false", "ch": args.channel}
    try:
        with client.http.stream("GET", "/logs", params=params, timeout=None) as response:
            if response.status_code != 200:
                response.read()
                raise CliError(f"logs failed: {response.text.strip()}")
            for chunk in response.iter_bytes():
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
    except BrokenPipeError:
        # `vmm-cli logs ... | head`: the reader is gone; keep the exit-time flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def top_table(vms: list[dict[str, Any]]) -> str:
    rows = [[vm["id"][:12], vm["name"], vm["status"], vm["uptime"] or "-",
             vm.get("boot_progress") or "-", vm.get("boot_error") or ""] for vm in vms]
    return output.format_table(rows, ["VM ID", "Name", "Status", "Uptime", "Boot", "Error"])


def cmd_top(client: Client, args: argparse.Namespace) -> None:
    while True:
        answer = client.call("Status", {"brief": True})
        vms = answer["vms"]
        if args.json:
            output.print_json(vms)
        else:
            if not args.once and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")  # home + clear, like top(1)
            print(f"{time.strftime('%H:%M:%S')}  {len(vms)} VMs  "
                  f"({sum(vm['status'] == 'running' for vm in vms)} running)  {client.url}")
            print(top_table(vms))
        sys.stdout.flush()
        if args.once:
            return
        time.sleep(args.interval)


def add_wait_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="follow the boot until the guest reports done (or an error)")
    p.add_argument("--wait-timeout", type=float, default=DEFAULT_WAIT, metavar="SECONDS")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lsvm", help="list VMs")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_lsvm)
    p = sub.add_parser("info", help="show one VM")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)
    p = sub.add_parser("start", help="start a VM")
    p.add_argument("id")
    add_wait_arguments(p)
    p.set_defaults(run=cmd_start)
    p = sub.add_parser("stop", help="shut a VM down gracefully (-f: hard stop)")
    p.add_argument("id")
    p.add_argument("-f", "--force", action="store_true")
    p.set_defaults(run=cmd_stop)
    p = sub.add_parser("remove", help="remove a VM")
    p.add_argument("id")
    p.set_defaults(run=cmd_remove)
    p = sub.add_parser("resize", help="change a stopped VM's size or image")
    p.add_argument("id")
    p.add_argument("--vcpu", type=int)
    p.add_argument("--memory", type=parsing.size_mb, help="MB, or with M/G/T")
    p.add_argument("--disk", type=parsing.size_gb, help="GB, or with G/T (grows only)")
    p.add_argument("--image")
    p.set_defaults(run=cmd_resize)
    p = sub.add_parser("logs", help="print (or follow) a VM's console")
    p.add_argument("id")
    p.add_argument("-n", "--lines", type=int, default=20)
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--channel", choices=("serial", "stdout", "stderr"), default="serial")
    p.set_defaults(run=cmd_logs)
    p = sub.add_parser("top", help="a live table of VMs (status, uptime, boot progress)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    p.set_defaults(run=cmd_top)
