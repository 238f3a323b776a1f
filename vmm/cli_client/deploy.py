"""``deploy``: CreateVm from an app compose, with every dstack flag, and ``--wait``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vmm.cli_client import compose, kms, parsing
from vmm.cli_client.client import Client, CliError
from vmm.cli_client.vms import add_wait_arguments
from vmm.cli_client.waiting import wait_for_boot

SIMULATED_TEES = ("dstack-tdx", "dstack-gcp-tdx", "dstack-amd-sev-snp", "dstack-nitro-enclave",
                  "dstack-aws-nitro-tpm")


def encrypt_url(args: argparse.Namespace) -> str | None:
    """The KMS asked for the env key: --kms-encrypt-url, else the first --kms-url."""
    return args.kms_encrypt_url or (args.kms_url[0] if args.kms_url else None)


def deploy_request(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    source = compose.read_text(args.compose)
    env = parsing.parse_env_file(args.env_file) if args.env_file else None
    text = compose.edit(source, env=env, prelaunch=None, swap=args.swap, where=str(args.compose))
    request: dict[str, Any] = {
        "name": args.name, "image": args.image, "compose_file": text,
        "vcpu": args.vcpu, "memory": args.memory, "disk_size": args.disk,
        "ports": args.port, "stopped": args.stopped, "no_tee": args.no_tee,
        "kms_urls": args.kms_url, "gateway_urls": args.gateway_url,
        "hugepages": args.hugepages, "pin_numa": args.pin_numa,
    }
    if args.user_config:
        request["user_config"] = compose.read_text(args.user_config)
    if args.app_id:
        request["app_id"] = args.app_id
    gpus = parsing.gpu_config(args.gpu, args.ppcie)
    if gpus is not None:
        request["gpus"] = gpus
    if args.net:
        request["networking"] = {"mode": args.net}
    if args.simulated_tee:
        request["simulated_tee"] = args.simulated_tee
    if env is not None:
        doc = compose.load(text, str(args.compose))
        if not (doc.get("kms_enabled") or doc.get("key_provider") == "kms"):
            raise CliError("--env-file needs a KMS-backed app: set kms_enabled (vmm-cli compose "
                           "--kms) so the guest can get the key to decrypt it")
        app_id = (args.app_id or compose.app_id_of(text)).lower().removeprefix("0x")
        request["encrypted_env"] = kms.seal_env(client, env, app_id, encrypt_url(args),
                                                args.trust_signer)
    return request


def cmd_deploy(client: Client, args: argparse.Namespace) -> None:
    if args.wait and args.stopped:
        raise CliError("--wait and --stopped contradict each other")
    request = deploy_request(client, args)
    vm_id = client.call("CreateVm", request)["id"]
    print(vm_id)
    sys.stdout.flush()
    print(f"compose hash: {compose.compose_hash(request['compose_file'])}", file=sys.stderr)
    if args.wait:
        wait_for_boot(lambda: client.vm_info(vm_id), vm_id, args.wait_timeout, stream=sys.stderr)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("deploy", help="create (and start) a VM; prints its id")
    p.add_argument("--name", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--compose", type=Path, required=True, help="app-compose.json")
    p.add_argument("--vcpu", type=int, default=1)
    p.add_argument("--memory", type=parsing.size_mb, default=1024, help="MB, or with M/G/T")
    p.add_argument("--disk", type=parsing.size_gb, default=20, help="GB, or with G/T")
    p.add_argument("--swap", type=parsing.size_bytes, help="swap_size in the compose (MB, K/M/G/T)")
    kms.add_env_arguments(p)
    p.add_argument("--user-config", type=Path)
    p.add_argument("--app-id", help="40 hex digits (default: from the compose hash)")
    p.add_argument("--port", type=parsing.port, action="append", default=[],
                   help="proto[:addr]:host:vm (addr 127.0.0.1 if omitted), repeatable")
    p.add_argument("--gpu", action="append", default=[], metavar="SLOT|all")
    p.add_argument("--ppcie", action="store_true", help="attach every GPU (protected PCIe)")
    p.add_argument("--pin-numa", action="store_true")
    p.add_argument("--hugepages", action="store_true")
    p.add_argument("--kms-url", action="append", default=[])
    p.add_argument("--gateway-url", action="append", default=[])
    p.add_argument("--stopped", action="store_true", help="create without starting")
    tee = p.add_mutually_exclusive_group()
    tee.add_argument("--no-tee", dest="no_tee", action="store_true")
    tee.add_argument("--tee", dest="no_tee", action="store_false")
    p.add_argument("--simulated-tee", choices=SIMULATED_TEES)
    p.add_argument("--net", choices=("bridge", "user"))
    add_wait_arguments(p)
    p.set_defaults(run=cmd_deploy)
