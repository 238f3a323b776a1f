"""``kms list|add|remove``: the KMS signers this user trusts, and env sealing that checks them.

The whitelist is ``~/.dstack-vmm/kms-whitelist.json``, ``{"trusted_signers": [hex, ...]}``,
the file and format of dstack's vmm-cli. A KMS key whose signer is not listed is refused; on a
terminal the CLI asks first (as dstack's does), and ``--trust-signer`` adds a key for one call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from vmm.cli_client import envcrypt, output
from vmm.cli_client.client import Client, CliError, config_dir, error_message, load_json_file

WHITELIST_FILE = "kms-whitelist.json"


def whitelist_path() -> Path:
    return config_dir() / WHITELIST_FILE


def load_whitelist() -> list[str]:
    signers = load_json_file(whitelist_path()).get("trusted_signers", [])
    if not isinstance(signers, list):
        raise CliError(f"{whitelist_path()}: trusted_signers must be a list")
    return [str(s).lower().removeprefix("0x") for s in signers]


def save_whitelist(signers: list[str]) -> None:
    path = whitelist_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"trusted_signers": signers}, indent=2) + "\n")
    tmp.replace(path)


def fetch_kms_key(client: Client, app_id: str, kms_url: str | None) -> dict[str, Any]:
    """GetAppEnvEncryptPubKey from ``kms_url`` directly, else through the daemon's KMS."""
    if not kms_url:
        answer: dict[str, Any] = client.call("GetAppEnvEncryptPubKey", {"app_id": app_id})
        return answer
    url = f"{kms_url.rstrip('/')}/prpc/GetAppEnvEncryptPubKey?json"
    try:
        # A KMS serves RA-TLS certificates no CA signs; the signature below is the check.
        response = httpx.post(url, json={"app_id": app_id}, timeout=30, verify=False)  # noqa: S501
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the KMS at {kms_url}: {exc}") from None
    if response.status_code != 200:
        raise CliError(f"KMS at {kms_url} refused: {error_message(response)}")
    try:
        data = response.json()
    except ValueError:
        raise CliError(f"KMS at {kms_url} sent a non-JSON answer") from None
    if not isinstance(data, dict):
        raise CliError(f"KMS at {kms_url} sent an unexpected answer")
    return data


def trusted_key(client: Client, app_id: str, kms_url: str | None, extra_trusted: list[str]) -> bytes:
    """The KMS's X25519 key for ``app_id``, once its signer is known to be trusted."""
    try:
        app_bytes = bytes.fromhex(app_id.lower().removeprefix("0x"))
    except ValueError:
        raise CliError(f"app id {app_id!r} is not hex") from None
    answer = fetch_kms_key(client, app_bytes.hex(), kms_url)
    try:
        key = envcrypt.check_kms_answer(app_bytes, answer)
    except envcrypt.SignatureError as exc:
        raise CliError(f"refusing the KMS key: {exc}") from None
    signer = key.signer.hex()
    trusted = set(load_whitelist()) | {s.lower().removeprefix("0x") for s in extra_trusted}
    if signer in trusted:
        return key.public_key
    where = kms_url or "the VMM's KMS"
    if sys.stdin.isatty() and sys.stderr.isatty():
        sys.stderr.write(f"The KMS key from {where} is signed by 0x{signer}, which is not in "
                         f"{whitelist_path()}.\nEncrypt the env to it anyway? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() in ("y", "yes"):
            return key.public_key
    raise CliError(f"refusing the KMS key from {where}: its signer 0x{signer} is not trusted "
                   f"(vmm-cli kms add 0x{signer} to trust it)")


def seal_env(client: Client, env: dict[str, str], app_id: str, kms_url: str | None,
             extra_trusted: list[str]) -> str:
    """The encrypted env as hex, for CreateVm / UpdateVm."""
    public_key = trusted_key(client, app_id, kms_url, extra_trusted)
    return envcrypt.encrypt_env(env, public_key).hex()


def cmd_kms_list(client: Client, args: argparse.Namespace) -> None:
    signers = load_whitelist()
    if args.json:
        output.print_json(signers)
    elif not signers:
        print(f"no trusted KMS signers ({whitelist_path()})")
    else:
        for signer in signers:
            print(f"0x{signer}")


def cmd_kms_add(client: Client, args: argparse.Namespace) -> None:
    try:
        signer = envcrypt.normalize_signer(args.pubkey)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    signers = load_whitelist()
    if signer in signers:
        print(f"0x{signer} is already trusted")
        return
    save_whitelist([*signers, signer])
    print(f"trusted 0x{signer}")


def cmd_kms_remove(client: Client, args: argparse.Namespace) -> None:
    signer = args.pubkey.strip().lower().removeprefix("0x")
    signers = load_whitelist()
    if signer not in signers:
        raise CliError(f"0x{signer} is not in {whitelist_path()}")
    save_whitelist([s for s in signers if s != signer])
    print(f"removed 0x{signer}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kms = sub.add_parser("kms", help="the KMS signers trusted for env encryption")
    actions = kms.add_subparsers(dest="kms_command", required=True)
    p = actions.add_parser("list", help="list trusted signers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_kms_list)
    p = actions.add_parser("add", help="trust a signer (33-byte compressed secp256k1 key, hex)")
    p.add_argument("pubkey")
    p.set_defaults(run=cmd_kms_add)
    p = actions.add_parser("remove", help="stop trusting a signer")
    p.add_argument("pubkey")
    p.set_defaults(run=cmd_kms_remove)


def add_env_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every command that encrypts an env file."""
    p.add_argument("--env-file", type=Path, help="KEY=VALUE file, sealed to the KMS's key")
    p.add_argument("--kms-encrypt-url", help="ask this KMS for the key (default: the first "
                   "--kms-url, else the VMM's KMS)")
    p.add_argument("--trust-signer", action="append", default=[], metavar="PUBKEY",
                   help="also trust this KMS signer for this call")
