"""Status from cached per-VM encodings: no work repeated for a VM whose state did not change.

Status with 1,000 VMs used to build 1,000 ``VmInfo`` messages and encode them on every call,
on the event loop. Here each VM's ``VmInfo`` is encoded once per state, in the encoding asked
for (JSON or protobuf, brief or full), and the reply is the envelope plus the cached parts
joined (``codec.Encoded``). The joined reply itself is kept per request shape while no VM
changed (``vm.last_version()`` and the registry's size are as they were) and no uptime or
exited-at string in it has aged (``Vm.clock_valid_until``): a repeated Status then costs a
dictionary lookup.

A cached part is keyed by what the encoding depends on:

- ``Vm.version``, bumped by every assignment to a reported field of the Vm and by
  ``add_event`` (see ``vmm.model.vm``), so any path that changes a VM (an RPC, the watcher,
  auto-restart, a guest notification, a reload) invalidates its parts without knowing of this
  cache;
- the two strings that age with the clock (uptime, exited-at), computed at each call: they
  change once a second at most, so a running VM is encoded at most once a second;
- the guest channel named in the reply.

Parts of VMs that left the registry are dropped when the cache holds more than two entries
(brief and full) per registered VM. Everything is in memory: the hot path reads no file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vmm.model.vm import Vm, last_version
from vmm.prpc import codec
from vmm.rpc import vmm_rpc_pb2 as pb

_Key = tuple[int, str, str, str]  # (version, uptime, exited_at, guest channel)
Selector = Callable[[pb.StatusRequest], tuple[list[Vm], int]]
# How one VM is reported: (vm, brief, guest channel, now) -> VmInfo. Whatever it reads besides
# the Vm record must bump the VM's version when it changes (the manager's lease hook does).
InfoOf = Callable[[Vm, bool, str, float], pb.VmInfo]
# Whole replies kept, one per request shape (ids, keyword, page, brief ...): dashboards poll a
# few shapes; past this many the table starts over rather than grow with odd requests.
MAX_REPLIES = 32


@dataclass(frozen=True)
class _Reply:
    stamp: tuple[int, int]  # (the newest VM version, how many VMs) when it was built
    valid_until: float  # the first instant an uptime or exited-at in it changes
    encoded: codec.Encoded


@dataclass
class _Entry:
    vm: Vm  # identity check: a VM re-created under the same id is another VM
    key: _Key
    json: bytes | None = None
    protobuf: bytes | None = None


class StatusCache:
    """Encoded ``VmInfo`` per VM and kind (brief or full), reused while the VM is unchanged."""

    def __init__(self, registry: Mapping[str, Vm], info: InfoOf) -> None:
        self._registry = registry
        self._info = info
        self._entries: dict[tuple[str, bool], _Entry] = {}
        self._replies: dict[tuple[object, ...], _Reply] = {}

    def response(self, request: pb.StatusRequest, select: Selector, *, guest_channel: str,
                 port_mapping_enabled: bool) -> codec.Encoded:
        """The StatusResponse for ``request``, encoded lazily in the caller's encoding.

        ``select`` picks the request's VMs (in order, paged) and counts the matches.
        """
        now = time.time()
        shape = (tuple(request.ids), request.keyword, request.page, request.page_size,
                 request.brief, guest_channel, port_mapping_enabled)
        stamp = (last_version(), len(self._registry))
        reply = self._replies.get(shape)
        if reply is None or reply.stamp != stamp or now >= reply.valid_until:
            reply = self._reply(request, select, stamp=stamp, now=now,
                                guest_channel=guest_channel,
                                port_mapping_enabled=port_mapping_enabled)
            if len(self._replies) >= MAX_REPLIES:
                self._replies.clear()
            self._replies[shape] = reply
        return reply.encoded

    def _reply(self, request: pb.StatusRequest, select: Selector, *, stamp: tuple[int, int],
               now: float, guest_channel: str, port_mapping_enabled: bool) -> _Reply:
        vms, total = select(request)
        brief = request.brief
        entries = [self._entry(vm, brief, guest_channel, now) for vm in vms]
        envelope = pb.StatusResponse(port_mapping_enabled=port_mapping_enabled, total=total)
        valid_until = min((vm.clock_valid_until(now) for vm in vms), default=math.inf)
        done: dict[str, bytes] = {}

        def as_json() -> bytes:
            if "json" not in done:
                parts = [entry.json or self._fill_json(entry, brief, guest_channel, now)
                         for entry in entries]
                done["json"] = codec.to_json_with_items(envelope, "vms", parts)
            return done["json"]

        def as_protobuf() -> bytes:
            if "protobuf" not in done:
                parts = [entry.protobuf or self._fill_protobuf(entry, brief, guest_channel, now)
                         for entry in entries]
                # Repeated message fields may be split over several records: concatenating
                # serialized StatusResponses with one VM each is the list of all of them.
                done["protobuf"] = envelope.SerializeToString() + b"".join(parts)
            return done["protobuf"]

        if len(self._entries) > 2 * len(self._registry) + 64:
            self._prune()
        return _Reply(stamp, valid_until, codec.Encoded(pb.StatusResponse, as_json, as_protobuf))

    def _entry(self, vm: Vm, brief: bool, guest_channel: str, now: float) -> _Entry:
        uptime, exited = vm.clock(now)
        key = (vm.version, uptime, exited, guest_channel)
        slot = (vm.id, brief)
        entry = self._entries.get(slot)
        if entry is None or entry.vm is not vm or entry.key != key:
            entry = self._entries[slot] = _Entry(vm, key)
        return entry

    def _fill_json(self, entry: _Entry, brief: bool, guest_channel: str, now: float) -> bytes:
        info = self._info(entry.vm, brief, guest_channel, now)
        entry.json = json.dumps(codec.to_json_value(info), separators=(",", ":"),
                                ensure_ascii=False).encode()
        return entry.json

    def _fill_protobuf(self, entry: _Entry, brief: bool, guest_channel: str, now: float) -> bytes:
        info = self._info(entry.vm, brief, guest_channel, now)
        entry.protobuf = pb.StatusResponse(vms=[info]).SerializeToString()
        return entry.protobuf

    def __len__(self) -> int:
        """How many encoded entries are held (for the bound on memory)."""
        return len(self._entries)

    def _prune(self) -> None:
        registry = self._registry
        self._entries = {slot: e for slot, e in self._entries.items()
                         if registry.get(slot[0]) is e.vm}
