"""The vsock CID pool: ``[cid_start, cid_start + cid_pool_size)``, lowest free first.

The pool size is the cap on the number of VMs. A CID stays with its VM for the VM's whole life
(stopped VMs keep theirs), so a CID is never handed to a second VM while the first may still
use it.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmm.core.exceptions import ResourceExhausted


class CidPool:
    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size
        self._owner: dict[int, str] = {}
        # No CID below this one is free: loading 1,000 VMs allocates in linear time, not squared.
        self._free_from = start

    def __len__(self) -> int:
        return len(self._owner)

    def allocate(self, owner: str) -> int:
        for cid in range(self._free_from, self.start + self.size):
            if cid not in self._owner:
                self._owner[cid] = owner
                self._free_from = cid + 1
                return cid
        self._free_from = self.start + self.size
        raise ResourceExhausted(
            f"CID pool exhausted: all {self.size} VM slots are in use (cvm.cid_pool_size)"
        )

    def occupy(self, cid: int, owner: str) -> bool:
        """Claim a specific CID (a running VM's, recovered at start); False if taken or outside.

        Claiming a CID the same owner already holds succeeds: reconciliation reserves the CIDs
        of running processes before it loads their VMs.
        """
        if not self.start <= cid < self.start + self.size:
            return False
        holder = self._owner.get(cid)
        if holder is not None:
            return holder == owner
        self._owner[cid] = owner
        return True

    def contains(self, cid: int) -> bool:
        return self.start <= cid < self.start + self.size

    def owners(self) -> dict[int, str]:
        return dict(self._owner)

    def reset(self, owners: Mapping[int, str]) -> None:
        """Replace every assignment at once (reconciliation rebuilds the whole table)."""
        self._owner = {cid: owner for cid, owner in owners.items() if self.contains(cid)}
        self._free_from = self.start

    def release(self, cid: int) -> None:
        if self._owner.pop(cid, None) is not None:
            self._free_from = min(self._free_from, cid)

    def owner(self, cid: int) -> str | None:
        return self._owner.get(cid)
