"""What the daemon offers: lsimage, lsgpu, version."""

from __future__ import annotations

import argparse

from vmm.cli_client import output
from vmm.cli_client.client import Client
from vmm.cli_client.registry import cmd_lsimage_registry


def cmd_lsimage(client: Client, args: argparse.Namespace) -> None:
    images = client.call("ListImages")["images"]
    if args.json:
        output.print_json(images)
        return
    output.print_table([[i["name"], i["version"], "yes" if i["is_dev"] else "no",
                         i.get("description") or ""] for i in images],
                       ["Name", "Version", "Dev", "Description"])


def cmd_lsgpu(client: Client, args: argparse.Namespace) -> None:
    answer = client.call("ListGpus")
    if args.json:
        output.print_json(answer)
        return
    output.print_table([[g["slot"], g["product_id"], g["description"],
                         "yes" if g["is_free"] else "no"] for g in answer["gpus"]],
                       ["Slot", "Product", "Description", "Free"])
    print(f"attach all allowed: {'yes' if answer['allow_attach_all'] else 'no'}")


def cmd_version(client: Client, args: argparse.Namespace) -> None:
    answer = client.call("Version")
    if args.json:
        output.print_json(answer)
        return
    print(f"{answer['version']} ({answer['rev']})")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, text, run in (("lsimage", "list images (--registry: the registry's tags)",
                             cmd_lsimage),
                            ("lsgpu", "list GPUs that can be attached", cmd_lsgpu),
                            ("version", "the daemon's version", cmd_version)):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true")
        p.set_defaults(run=run)
        if name == "lsimage":
            p.add_argument("--registry", action="store_const", dest="run",
                           const=cmd_lsimage_registry, default=cmd_lsimage)
