"""The CID pool hands out the lowest free CID, however CIDs were freed or claimed before."""

from __future__ import annotations

import pytest

from vmm.core.exceptions import ResourceExhausted
from vmm.model.cid_pool import CidPool


def test_lowest_free_first_after_releases_claims_and_resets() -> None:
    """Allocation stays lowest-first through release, occupy and reset (the start-up path)."""
    pool = CidPool(1000, 6)
    assert [pool.allocate(f"vm-{n}") for n in range(3)] == [1000, 1001, 1002]
    pool.release(1001)
    assert pool.allocate("a") == 1001
    assert pool.occupy(1004, "running")
    assert [pool.allocate("b"), pool.allocate("c")] == [1003, 1005]
    with pytest.raises(ResourceExhausted):
        pool.allocate("d")
    pool.release(1000)
    pool.release(1000)  # twice: nothing more to free
    assert pool.allocate("e") == 1000
    pool.reset({1002: "kept", 1005: "kept too"})
    assert [pool.allocate(f"f{n}") for n in range(4)] == [1000, 1001, 1003, 1004]
    assert pool.owner(1002) == "kept" and len(pool) == 6

