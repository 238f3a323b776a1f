"""The app compose document: ``vmm-cli compose`` and the edits deploy and update make to it.

The hash the guest measures is sha256 of the exact bytes, so every edit here re-serializes the
document the way ``compose`` writes it (4-space indent, UTF-8 kept), and the caller prints the
hash of what is actually sent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

from vmm.cli_client import parsing
from vmm.cli_client.client import Client, CliError

LAUNCH_TOKEN = "APP_LAUNCH_TOKEN"  # noqa: S105 - the name of an env key, not a secret


def compose_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def app_id_of(text: str) -> str:
    """The app id a compose gets when none is given: sha256(compose)[:40] (dstack's rule)."""
    return compose_hash(text)[:40]


def dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=4, ensure_ascii=False)


def load(text: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise CliError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CliError(f"{where}: the app compose must be a JSON object")
    return doc


def with_env_keys(doc: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """The compose with ``allowed_envs`` set to exactly the env's keys.

    The guest drops keys not listed; ``launch_token_hash`` follows ``APP_LAUNCH_TOKEN`` as
    dstack's clients do.
    """
    doc = dict(doc)
    doc["allowed_envs"] = sorted(env)
    if LAUNCH_TOKEN in env:
        doc["launch_token_hash"] = hashlib.sha256(env[LAUNCH_TOKEN].encode()).hexdigest()
    return doc


def edit(text: str, *, env: dict[str, str] | None, prelaunch: Path | None,
         swap: int | None, where: str) -> str:
    """``text`` with the edits applied; unchanged (byte for byte) when there are none."""
    if env is None and prelaunch is None and swap is None:
        return text
    doc = load(text, where)
    if env is not None:
        doc = with_env_keys(doc, env)
    if prelaunch is not None:
        doc["pre_launch_script"] = read_text(prelaunch)
    if swap is not None:
        doc["swap_size"] = swap
    return dump(doc)


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc}") from None


def build(args: argparse.Namespace, env_keys: list[str]) -> dict[str, Any]:
    key_provider = args.key_provider or ("kms" if args.kms else
                                         "local" if args.local_key_provider else "none")
    doc: dict[str, Any] = {
        "manifest_version": 2,
        "name": args.name,
        "runner": "docker-compose",
        "docker_compose_file": read_text(args.docker_compose),
        "kms_enabled": key_provider == "kms",
        "gateway_enabled": args.gateway,
        "local_key_provider_enabled": key_provider == "local",
        "key_provider": key_provider,
        "key_provider_id": args.key_provider_id,
        "public_logs": args.public_logs,
        "public_sysinfo": args.public_sysinfo,
        "public_tcbinfo": args.public_tcbinfo,
        "allowed_envs": env_keys,
        "no_instance_id": args.no_instance_id,
        "secure_time": args.secure_time,
    }
    if args.prelaunch_script:
        doc["pre_launch_script"] = read_text(args.prelaunch_script)
    if args.swap is not None:
        doc["swap_size"] = args.swap
    if args.event_log_version is not None:
        doc["event_log_version"] = args.event_log_version
    return doc


def cmd_compose(client: Client, args: argparse.Namespace) -> None:
    env: dict[str, str] = {}
    if args.env_file:
        if not (args.kms or args.key_provider == "kms"):
            raise CliError("--env-file needs --kms: only a KMS-backed app can decrypt its env")
        env = parsing.parse_env_file(args.env_file)
    doc = build(args, sorted(env))
    if LAUNCH_TOKEN in env:
        doc = with_env_keys(doc, env)
    text = dump(doc)
    try:
        args.output.write_text(text)
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc}") from None
    print(f"compose hash: {compose_hash(text)}")
    print(f"app id: {app_id_of(text)}")
    print(f"written to {args.output}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("compose", help="write an app-compose.json and print its hash")
    p.add_argument("--name", required=True)
    p.add_argument("--docker-compose", type=Path, required=True, help="docker-compose.yaml")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--prelaunch-script", type=Path)
    p.add_argument("--kms", action="store_true", help="keys from a KMS")
    p.add_argument("--gateway", action="store_true", help="enable the gateway")
    p.add_argument("--local-key-provider", action="store_true")
    p.add_argument("--key-provider", choices=("none", "kms", "local", "tpm"))
    p.add_argument("--key-provider-id", default="", help="hex id of the key provider")
    p.add_argument("--public-logs", action="store_true")
    p.add_argument("--public-sysinfo", action="store_true")
    p.add_argument("--public-tcbinfo", action="store_true")
    p.add_argument("--env-file", type=Path, help="list its keys in allowed_envs (needs --kms)")
    p.add_argument("--no-instance-id", action="store_true")
    p.add_argument("--secure-time", action="store_true")
    p.add_argument("--swap", type=parsing.size_bytes, help="MB, or with K/M/G/T")
    p.add_argument("--event-log-version", type=int, choices=(1, 2))
    p.set_defaults(run=cmd_compose)
