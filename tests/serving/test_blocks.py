"""KV block accounting."""

from __future__ import annotations

import pytest

from stagemesh.errors import ResourceExhausted
from stagemesh.serving.blocks import BlockAllocator, blocks_needed


def test_blocks_needed_rounds_up():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="block_size=0"):
        blocks_needed(3, 0)


def test_allocate_and_free():
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 1 and alloc.num_used == 3
    alloc.free(a[:2])
    assert alloc.num_free == 3
    b = alloc.allocate(3)
    assert not set(b) & {a[2]}
    assert alloc.num_free == 0 and alloc.num_blocks == 4


def test_exhaustion_raises_and_changes_nothing():
    alloc = BlockAllocator(2)
    alloc.allocate(1)
    assert not alloc.can_allocate(2)
    with pytest.raises(ResourceExhausted, match="need 2 KV blocks but only 1 of 2"):
        alloc.allocate(2)
    assert alloc.num_free == 1


def test_free_of_unallocated_or_twice_is_refused():
    alloc = BlockAllocator(3)
    ids = alloc.allocate(2)
    alloc.free(ids)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(ids)
    with pytest.raises(ValueError):
        BlockAllocator(0)
