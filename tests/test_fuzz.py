"""Property-based fuzzing of every HTTP entry point of the real daemon, driven by the protos.

Each method of the services the daemon serves (``Vmm`` at /prpc, ``ProxiedGuestApi`` at /guest)
is found by walking the generated descriptors, and its requests are generated from its input
message descriptor (``tests/support/fuzz_strategies.py``), so a new RPC is fuzzed without
touching this file. Every method is called as a JSON POST, a protobuf POST and a GET query
string; ``GET /logs`` gets its own query fuzzing. Each run sends a fixed checklist (every field
of every seed set to a known-dangerous value) and then Hypothesis-generated requests.

Properties, checked on every request:

* an answer comes within the client timeout (a timeout or a dropped connection fails);
* the status is not 5xx, except the allow-list below;
* the body is well formed in the request's encoding: the method's output message on 200, else
  an error with a reason (``{"error", "code"}`` JSON or a ``PrpcError``);

and after each method's run: the daemon is alive and answers, it logged no traceback besides
those of failed requests, and no path outside its own directories (VM work dirs, images,
supervisor run dir) was created, changed or removed (the sentinel tree of
``tests/support/fuzz_env.py``).

Environment knobs: ``VMM_FUZZ_EXAMPLES`` (generated examples per method and encoding, default
12; raise it for a long run), ``VMM_FUZZ_SEED`` (a random seed instead of the default
derandomized run), ``VMM_FUZZ_TIMEOUT`` (seconds per request, default 30) and
``VMM_FUZZ_COLLECT=<file>`` (record every violation as a JSON line and keep going, instead of
stopping and shrinking at the first: how a long run lists all distinct failures).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tests.support.fuzz_checklist import STRING_POISONS, checklist_values
from tests.support.fuzz_env import (
    LINKED_IMAGE,
    NO_VM_ID,
    FuzzTarget,
    NoAnswer,
    Reply,
    diff_snapshots,
    exception_of,
    fuzz_target,
    preview,
    record,
    send,
    snapshot,
    unexplained_tracebacks,
)
from tests.support.fuzz_protobuf import tag, varint
from tests.support.fuzz_requests import (
    ENCODINGS,
    FuzzRequest,
    logs_checklist,
    logs_reply_problems,
    logs_requests,
    rpc_checklist,
    rpc_reply_problems,
    rpc_requests,
)
from tests.support.fuzz_strategies import Corpus, RawJson, dump_json, encode_query, query_pairs
from tests.support.vm_ops import COMPOSE, FAKE_IMAGE
from vmm.prpc import codec
from vmm.rpc import guest_api_pb2, vmm_rpc_pb2

# Hypothesis caches (unicode tables, constants) go to /tmp, never into the repository.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "vmm-fuzz-hypothesis")

EXAMPLES = int(os.environ.get("VMM_FUZZ_EXAMPLES", "12"))
SEED = os.environ.get("VMM_FUZZ_SEED", "")
TIMEOUT = float(os.environ.get("VMM_FUZZ_TIMEOUT", "30"))
COLLECT = os.environ.get("VMM_FUZZ_COLLECT", "")

SERVICES: tuple[tuple[str, ServiceDescriptor], ...] = (
    ("/prpc", vmm_rpc_pb2.DESCRIPTOR.services_by_name["Vmm"]),
    ("/guest", guest_api_pb2.DESCRIPTOR.services_by_name["ProxiedGuestApi"]),
)
METHODS = [(mount, method) for mount, service in SERVICES for method in service.methods]

# The only 5xx a fuzzed request may get, and why. 503 (Unavailable) is documented for a peer
# the daemon depends on being absent or failing (vmm/exceptions.py):
# * GetAppEnvEncryptPubKey forwards to the KMS: a KMS that is down or refuses is a 503.
# * /guest/* forwards to the guest agent inside the VM: a VM whose agent does not answer (the
#   fixture images cannot boot one) is a 503; a VM that is not running is a 409, none is a 404.
# The registry RPCs are not in the list: this daemon has no image.registry, so
# ListRegistryImages answers an empty list and PullRegistryImage a 409 (a configured registry
# that is down is a 503 REGISTRY_ERROR, tested in tests/peers). Anything else 5xx is a bug.
ALLOWED_5XX: dict[str, frozenset[int]] = {
    "vmm.Vmm.GetAppEnvEncryptPubKey": frozenset({503}),
    **{m.full_name: frozenset({503}) for m in SERVICES[1][1].methods},
}

# Valid requests per input type, mutated by the fuzzer and poisoned field by field by the
# checklist, so calls get past the first check (and RemoveVm/DeleteImage/StartVm really act on
# the fixture VM and images). Optional: a type with no seed is fuzzed from its descriptor alone.
# "{vm}" is the stopped fixture VM, "{image}" a placeholder image, "{linked}" the image that is
# a symlink to a directory outside the daemon's.
SEEDS: dict[str, tuple[dict[str, Any], ...]] = {
    "vmm.Id": ({"id": "{vm}"}, {"id": "{image}"}, {"id": "{linked}"}),
    "guest_api.Id": ({"id": "{vm}"},),
    "vmm.VmConfiguration": (
        {"name": "fuzz", "image": "{image}", "compose_file": COMPOSE, "vcpu": 1, "memory": 64,
         "disk_size": 1, "stopped": True, "user_config": "{}", "encrypted_env": "00ff",
         "app_id": "00112233", "kms_urls": ["http://127.0.0.1:8081"],
         "gateway_urls": ["http://127.0.0.1:8082"], "networks": [{"mode": "user"}]},
        # Not stopped: QEMU is launched (and exits at once: the placeholder kernel cannot boot).
        {"name": "fuzz", "image": "{image}", "compose_file": COMPOSE, "vcpu": 1, "memory": 64,
         "disk_size": 1, "ports": [{"protocol": "tcp", "host_port": 18080, "vm_port": 80,
                                    "host_address": "127.0.0.1"}]},
    ),
    "vmm.UpdateVmRequest": (
        {"id": "{vm}", "compose_file": COMPOSE, "vcpu": 2, "memory": 128, "disk_size": 2,
         "image": "{image}", "user_config": "{}", "encrypted_env": "00ff", "update_ports": True,
         "ports": [{"protocol": "udp", "host_port": 18081, "vm_port": 53}],
         "update_kms_urls": True, "kms_urls": ["http://127.0.0.1:8081"],
         "update_networking": True, "networks": [{"mode": "user"}]},
    ),
    "vmm.ResizeVmRequest": ({"id": "{vm}", "vcpu": 2, "memory": 128, "disk_size": 2,
                             "image": "{image}"},),
    "vmm.StatusRequest": ({"ids": ["{vm}"], "brief": True, "keyword": "fuzz", "page": 1,
                           "page_size": 10},),
    "vmm.AppId": ({"app_id": "00112233445566778899aabbccddeeff00112233"},),
    "vmm.DhcpLeaseRequest": ({"mac": "02:ab:cd:ef:01:23", "ip": "10.0.2.15"},),
    "vmm.PullRegistryImageRequest": ({"tag": "{image}"},),
}


@pytest.fixture(scope="module")
def target() -> Iterator[FuzzTarget]:
    with fuzz_target() as fuzz:
        yield fuzz


def corpus_of(target: FuzzTarget) -> Corpus:
    names = {"{vm}": target.stopped_vm, "{image}": FAKE_IMAGE, "{linked}": LINKED_IMAGE}

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item) for item in value]
        return names.get(value, value) if isinstance(value, str) else value

    seeds = {name: tuple(resolve(seed) for seed in group) for name, group in SEEDS.items()}
    return Corpus(known=(target.stopped_vm, NO_VM_ID, LINKED_IMAGE), seeds=seeds)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not SEED,
        # Collect mode records every violation; there is nothing to shrink.
        phases=(Phase.generate,) if COLLECT else (Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def run_fuzz(
    target: FuzzTarget,
    label: str,
    checklist: Callable[[Corpus], list[FuzzRequest]],
    generated: Callable[[Corpus], st.SearchStrategy[FuzzRequest]],
    problems_of: Callable[[Reply], list[str]],
    examples: int = EXAMPLES,
) -> None:
    """Send the checklist, then generated requests; fail on the first violation.

    In COLLECT mode every violation is recorded and the test fails once at the end.
    """
    with httpx.Client(base_url=target.daemon.base_url, timeout=TIMEOUT) as client:
        target.prepare(client)
        corpus = corpus_of(target)
        offset = target.log_size()
        sent = found = 0
        statuses: dict[int, int] = {}

        def check(request: FuzzRequest) -> None:
            nonlocal sent, found
            sent += 1
            try:
                reply = send(client, request.method, request.raw_path, body=request.body,
                             headers={"content-type": request.content_type}
                             if request.content_type else None,
                             leave_stream=request.leave_stream)
            except NoAnswer as exc:
                problems, status, answer, request_id = [str(exc)], 0, "", ""
            else:
                problems = problems_of(reply)
                status, answer = reply.status, preview(reply.body)
                request_id = reply.headers.get("x-request-id", "")
            statuses[status] = statuses.get(status, 0) + 1
            if not problems:
                return
            found += 1
            if not COLLECT:
                raise AssertionError(f"{label}: {'; '.join(problems)} -> {status} {answer}\n"
                                     f"request: {request!r}")
            record(COLLECT, {
                "test": label, "problems": problems, "status": status, "answer": answer,
                "request": repr(request),
                "exception": exception_of(target.log_text(offset), request_id) if request_id else "",
            })

        for request in checklist(corpus):
            check(request)
        one = fuzz_settings(examples)(given(generated(corpus))(check))
        if SEED:
            one = seed(int(SEED))(one)
        one()

    after = [f"daemon exited with {target.daemon.proc.returncode}"] \
        if target.daemon.proc.poll() is not None else []
    if not after:
        with httpx.Client(base_url=target.daemon.base_url, timeout=TIMEOUT) as client:
            if client.get("/prpc/Version").status_code != 200:
                after.append("daemon no longer answers Version")
    after += [f"outside the state dirs: {change}" for change in target.untouched()]
    after += [f"daemon logged a traceback: {tb}"
              for tb in unexplained_tracebacks(target.log_text(offset))]
    if COLLECT:
        record(COLLECT, {"test": label, "requests": sent, "violations": found, "after": after,
                         "statuses": statuses})
        assert not found, f"{label}: {found} of {sent} requests violated a property (see {COLLECT})"
    assert not after, f"{label}: " + "\n".join(after)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    ("mount", "method"), METHODS, ids=[f"{mount[1:]}-{m.name}" for mount, m in METHODS]
)
def test_rpc_survives_fuzzed_requests(
    target: FuzzTarget, mount: str, method: MethodDescriptor, encoding: str
) -> None:
    """Every RPC answers fuzzed JSON, protobuf and query requests in time, well formed, no 5xx."""
    allowed = ALLOWED_5XX.get(method.full_name, frozenset())
    run_fuzz(
        target,
        f"{mount}/{method.name} ({encoding})",
        lambda corpus: rpc_checklist(mount, method, encoding, corpus),
        lambda corpus: rpc_requests(mount, method, encoding, corpus),
        lambda reply: rpc_reply_problems(
            method, reply, use_json=encoding != "protobuf", allowed_5xx=allowed
        ),
    )


def test_logs_survives_fuzzed_queries(target: FuzzTarget) -> None:
    """GET /logs answers fuzzed id/lines/follow/ansi/ch queries in time, with no 5xx."""
    # One test stands for the whole route, so it gets the examples of a few methods.
    run_fuzz(target, "/logs", logs_checklist, logs_requests, logs_reply_problems,
             examples=EXAMPLES * 4)


# --- the suite's own parts: pure functions, checked without a daemon ---------------------------


def test_wire_varints_decode_as_protobuf_reads_them() -> None:
    """The hand-built wire format is real protobuf: a uint64 field reads back as sent."""
    for value in (0, 1, 127, 128, 300, 2**32, 2**64 - 1):
        body = tag(3, 0) + varint(value)
        assert vmm_rpc_pb2.GuestEvent.FromString(body).timestamp == value


def test_query_pairs_are_what_the_get_decoder_reads() -> None:
    """A value flattened serde_qs style decodes to the same message on the daemon's GET path."""
    value = {"ids": ["a", "b"], "brief": True, "page": 3, "keyword": "x y&z"}
    query = encode_query(query_pairs(value), brackets_raw=False)
    decoded = codec.from_query_string(query, vmm_rpc_pb2.StatusRequest)
    assert decoded == vmm_rpc_pb2.StatusRequest(ids=["a", "b"], brief=True, page=3, keyword="x y&z")


def test_dump_json_writes_raw_fragments_verbatim() -> None:
    """RawJson parts (huge numbers, depth) go into the body as written; strings are escaped."""
    text = dump_json({"a": RawJson("1e400"), "b": ["\ud800"]}, ascii_only=True)
    assert text == '{"a":1e400,"b":["\\ud800"]}'


def test_checklist_poisons_one_field_per_request() -> None:
    """Each checklist value is the seed with exactly one field replaced, then the seed itself."""
    corpus = Corpus(seeds={"vmm.Id": ({"id": "vm"},)})
    values = checklist_values(vmm_rpc_pb2.DESCRIPTOR.pool.FindMessageTypeByName("vmm.Id"), corpus)
    assert values[-1] == {"id": "vm"}
    assert [v["id"] for v in values[:-1]] == list(STRING_POISONS)


def test_seeds_are_valid_requests_of_their_type() -> None:
    """Every seed names a real input type and decodes cleanly, so a proto rename shows up here."""
    pool = vmm_rpc_pb2.DESCRIPTOR.pool
    for name, group in SEEDS.items():
        message_class = GetMessageClass(pool.FindMessageTypeByName(name))
        for value in group:
            codec.from_json_value(value, message_class)


def test_snapshot_diff_sees_writes_creates_and_removals(tmp_path: Path) -> None:
    """The sentinel check notices a changed, a new and a deleted file, and skips owned dirs."""
    (tmp_path / "own").mkdir()
    (tmp_path / "keep").write_text("a")
    (tmp_path / "gone").write_text("b")
    before = snapshot(tmp_path, frozenset({tmp_path / "own"}))
    (tmp_path / "own" / "free").write_text("c")
    (tmp_path / "keep").write_text("changed")
    (tmp_path / "gone").unlink()
    (tmp_path / "new").write_text("d")
    changes = diff_snapshots(before, snapshot(tmp_path, frozenset({tmp_path / "own"})))
    assert "removed gone" in changes and "created new" in changes
    assert any(c.startswith("changed keep (size") for c in changes)
    assert not any("own" in c for c in changes)
