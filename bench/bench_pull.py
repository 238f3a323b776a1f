"""Pull throughput from a local registry against curl downloading the same blobs, same run.

A Debian docker-registry is started on a loopback port (tests/support/registry.py) and the
development image is pushed to it as one layer (or --random MiB of random data in a loadable
image when that image is absent). Rounds alternate between:

  curl        each layer blob fetched with ``curl -o`` (the floor: no verification, no unpack)
  download    the registry client: manifest, then each blob streamed to disk, sha256 checked
  pull        the daemon's whole pull (vms.image_pull): download, verify, unpack, install

Medians in MB/s and the ratios to curl are printed; nothing passes or fails on a time.

    .venv/bin/python bench/bench_pull.py [--rounds 3] [--tls] [--random MIB]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.registry import (  # noqa: E402
    Registry,
    dev_image_tarball,
    push_image,
    registry_server,
    small_image_files,
    tar_of,
)
from tests.support.short_dirs import short_dir  # noqa: E402
from vmm.core.config import parse_registry  # noqa: E402
from vmm.peers.registry import RegistryClient  # noqa: E402
from vmm.vms.image_pull import ImagePulls  # noqa: E402

TAG = "bench"
DEV_IMAGE = Path(os.environ.get("VMM_TEST_IMAGES_DIR", ROOT / ".cache" / "images")) / \
    "vmm-dev-0.5.0"


def client_for(registry: Registry) -> RegistryClient:
    if registry.ca is not None:
        return RegistryClient(parse_registry(registry.ref), ca_file=str(registry.ca.ca_file))
    return RegistryClient(parse_registry(registry.ref), plain_http=True)


def round_curl(registry: Registry, digests: list[str], out: Path) -> float:
    started = time.perf_counter()
    for digest in digests:
        argv = ["curl", "-sSf", "-o", str(out / digest[7:]),
                f"{registry.base_url}/v2/{registry.repository}/blobs/{digest}"]
        if registry.ca is not None:
            argv[1:1] = ["--cacert", str(registry.ca.ca_file)]
        subprocess.run(argv, check=True, timeout=600)
    return time.perf_counter() - started


def round_download(registry: Registry, out: Path) -> float:
    client = client_for(registry)
    try:
        started = time.perf_counter()
        for layer in client.image_manifest(TAG).layers:
            client.download_blob(layer, out / layer.digest[7:], lambda n: None)
        return time.perf_counter() - started
    finally:
        client.close()


def round_pull(registry: Registry, images: Path) -> float:
    pulls = ImagePulls(images, client_for(registry))

    async def main() -> float:
        started = time.perf_counter()
        pulls.start(TAG)
        await pulls.wait(TAG)
        elapsed = time.perf_counter() - started
        status = pulls.status(TAG)
        if status.error or not status.local:
            raise SystemExit(f"the pull failed: {status.error}")
        return elapsed

    try:
        return asyncio.run(main())
    finally:
        assert pulls.client is not None
        pulls.client.close()
        shutil.rmtree(images / f"dstack-{TAG}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="TLS from a test CA (curl too)")
    parser.add_argument("--random", type=int, default=0,
                        help="MiB of random data instead of the development image")
    args = parser.parse_args()

    with short_dir("vmmbench") as workdir, registry_server(workdir / "registry",
                                                           tls=args.tls) as registry:
        if args.random or not DEV_IMAGE.is_dir():
            layer: bytes | Path = tar_of({**small_image_files(),
                                          "data.bin": os.urandom((args.random or 256) << 20)})
            what = f"{args.random or 256} MiB random"
        else:
            layer = dev_image_tarball(DEV_IMAGE, workdir / "layer.tar")
            what = f"development image {DEV_IMAGE.name}"
        push_image(registry, TAG, [layer])
        if isinstance(layer, Path):
            layer.unlink()
        client = client_for(registry)
        manifest = client.image_manifest(TAG)
        client.close()
        size = manifest.total_bytes
        digests = [blob.digest for blob in manifest.layers]
        print(f"{what}: {len(digests)} layer(s), {size / 1e6:.1f} MB, "
              f"{'https' if args.tls else 'http'} on loopback, {args.rounds} rounds")

        times: dict[str, list[float]] = {"curl": [], "download": [], "pull": []}
        for _ in range(args.rounds):
            for kind, samples in times.items():
                out = workdir / kind
                out.mkdir()
                if kind == "curl":
                    samples.append(round_curl(registry, digests, out))
                elif kind == "download":
                    samples.append(round_download(registry, out))
                else:
                    samples.append(round_pull(registry, out))
                shutil.rmtree(out)
        floor = statistics.median(times["curl"])
        for kind, samples in times.items():
            median = statistics.median(samples)
            print(f"{kind:>9}: median {median:6.3f} s  {size / median / 1e6:8.1f} MB/s  "
                  f"throughput vs curl {floor / median:5.2f}x")


if __name__ == "__main__":
    main()
