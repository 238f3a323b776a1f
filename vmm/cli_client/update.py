"""``update`` and its narrow forms (update-env, -app-compose, -user-config, -ports).

Every form builds ONE UpdateVmRequest and makes one call, so changes given together land
together or not at all. dstack's ``update`` made a second call for the env that rebuilt the
compose from the VM's old one, so ``--compose`` with ``--env-file`` lost the new compose (its
bug #707). Here the env's ``allowed_envs`` edit is applied to the compose being sent: the new
one when ``--compose`` is given, else the VM's current one.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vmm.cli_client import compose, kms, parsing
from vmm.cli_client.client import Client, CliError


def build_update(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"id": args.id}
    info: dict[str, Any] | None = None

    def current() -> dict[str, Any]:
        nonlocal info
        if info is None:
            info = client.vm_info(args.id)
        return info

    for key, value in (("vcpu", getattr(args, "vcpu", None)), ("memory", getattr(args, "memory", None)),
                       ("disk_size", getattr(args, "disk", None)), ("image", getattr(args, "image", None))):
        if value is not None:
            request[key] = value
    env = parsing.parse_env_file(args.env_file) if getattr(args, "env_file", None) else None
    prelaunch = getattr(args, "prelaunch_script", None)
    swap = getattr(args, "swap", None)
    new_compose = getattr(args, "compose", None)
    if new_compose is not None or env is not None or prelaunch is not None or swap is not None:
        if new_compose is not None:
            base, where = compose.read_text(new_compose), str(new_compose)
        else:
            base = (current().get("configuration") or {}).get("compose_file") or ""
            where = f"the compose of VM {args.id}"
        text = compose.edit(base, env=env, prelaunch=prelaunch, swap=swap, where=where)
        if new_compose is not None or text != base:
            request["compose_file"] = text
    if env is not None:
        app_id = current()["app_id"]
        kms_urls = getattr(args, "kms_url", None) or []
        url = args.kms_encrypt_url or (kms_urls[0] if kms_urls else None)
        request["encrypted_env"] = kms.seal_env(client, env, app_id, url, args.trust_signer)
    if getattr(args, "user_config", None) is not None:
        request["user_config"] = compose.read_text(args.user_config)
    if getattr(args, "no_ports", False):
        request.update(update_ports=True, ports=[])
    elif getattr(args, "port", None):
        request.update(update_ports=True, ports=args.port)
    if getattr(args, "no_gpus", False):
        request["gpus"] = {"attach_mode": "listed", "gpus": []}
    else:
        gpus = parsing.gpu_config(getattr(args, "gpu", []) or [], getattr(args, "ppcie", False))
        if gpus is not None:
            request["gpus"] = gpus
    if getattr(args, "no_tee", None) is not None:
        request["no_tee"] = args.no_tee
    if getattr(args, "kms_url", None) and not getattr(args, "kms_url_is_source", False):
        request.update(update_kms_urls=True, kms_urls=args.kms_url)
    if getattr(args, "gateway_url", None):
        request.update(update_gateway_urls=True, gateway_urls=args.gateway_url)
    if len(request) == 1:
        raise CliError("nothing to update: give at least one change")
    return request


def run_update(client: Client, args: argparse.Namespace) -> None:
    request = build_update(client, args)
    answer = client.call("UpdateVm", request) or {}
    print(f"UpdateVm {args.id}: ok")
    if "compose_file" in request:
        print(f"compose hash: {compose.compose_hash(request['compose_file'])}")
    if answer.get("id"):
        print(f"app id of this compose: {answer['id']} (the VM keeps its app id)")


def cmd_update_env(client: Client, args: argparse.Namespace) -> None:
    if args.env_file is None:
        raise CliError("update-env: --env-file is required")
    run_update(client, args)


def cmd_update_app_compose(client: Client, args: argparse.Namespace) -> None:
    args.compose = args.compose_file
    run_update(client, args)


def _ports_flags(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    p.add_argument("--port", type=parsing.port, action="append", default=[], required=required,
                   help="proto[:addr]:host:vm, repeatable; replaces every mapping")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("update", help="change a VM in one call (applies at its next start)")
    p.add_argument("id")
    p.add_argument("--vcpu", type=int)
    p.add_argument("--memory", type=parsing.size_mb)
    p.add_argument("--disk", type=parsing.size_gb)
    p.add_argument("--image")
    p.add_argument("--compose", type=Path, help="a new app-compose.json")
    p.add_argument("--prelaunch-script", type=Path)
    p.add_argument("--swap", type=parsing.size_bytes)
    kms.add_env_arguments(p)
    p.add_argument("--user-config", type=Path)
    ports = p.add_mutually_exclusive_group()
    ports.add_argument("--port", type=parsing.port, action="append", default=[])
    ports.add_argument("--no-ports", action="store_true", help="remove every port mapping")
    gpus = p.add_mutually_exclusive_group()
    gpus.add_argument("--gpu", action="append", default=[], metavar="SLOT|all")
    gpus.add_argument("--ppcie", action="store_true")
    gpus.add_argument("--no-gpus", action="store_true", help="detach every GPU")
    tee = p.add_mutually_exclusive_group()
    tee.add_argument("--no-tee", dest="no_tee", action="store_true", default=None)
    tee.add_argument("--tee", dest="no_tee", action="store_false")
    p.add_argument("--kms-url", action="append", default=[])
    p.add_argument("--gateway-url", action="append", default=[])
    p.set_defaults(run=run_update)

    p = sub.add_parser("update-env", help="replace a VM's encrypted env (and its allowed_envs)")
    p.add_argument("id")
    kms.add_env_arguments(p)
    p.add_argument("--kms-url", action="append", default=[],
                   help="the KMS to ask for the key (not stored in the VM)")
    # Here --kms-url only says where the key comes from; the VM's KMS URLs stay as they are.
    p.set_defaults(run=cmd_update_env, kms_url_is_source=True)

    p = sub.add_parser("update-app-compose", help="replace a VM's app-compose.json")
    p.add_argument("id")
    p.add_argument("compose_file", type=Path)
    p.set_defaults(run=cmd_update_app_compose)

    p = sub.add_parser("update-user-config", help="replace a VM's user config")
    p.add_argument("id")
    p.add_argument("user_config", type=Path)
    p.set_defaults(run=run_update)

    p = sub.add_parser("update-ports", help="replace a VM's port mappings")
    p.add_argument("id")
    _ports_flags(p, required=True)
    p.set_defaults(run=run_update)
