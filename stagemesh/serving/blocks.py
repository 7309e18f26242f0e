"""KV-cache block accounting: a free list of fixed-size block ids.

Stage workers hand these ids to their paged KV cache; the scheduler runs the same
accounting to reserve room for a sequence before admitting it, so a stage never runs out.
"""

from __future__ import annotations

import logging
from collections import deque

from stagemesh.errors import ResourceExhausted

logger = logging.getLogger(__name__)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks of ``block_size`` tokens that hold ``num_tokens`` tokens (rounded up)."""
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be > 0")
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} must be >= 0")
    return -(-num_tokens // block_size)


class BlockAllocator:
    """A free list of the block ids ``0 .. num_blocks-1``.

    ``allocate`` raises ``ResourceExhausted`` when too few blocks are free (never a partial
    or ``None`` answer); ask ``can_allocate`` first when waiting is the right response.
    Freed ids are reused first-in first-out.
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be > 0")
        self._num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free block ids; raises ``ResourceExhausted`` when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate n={n} blocks; n must be >= 0")
        if n > len(self._free):
            raise ResourceExhausted(
                f"need {n} KV blocks but only {len(self._free)} of {self._num_blocks} are free"
            )
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int] | tuple[int, ...]) -> None:
        """Return block ids to the free list; an id that is not allocated is a bug (ValueError)."""
        bad = [i for i in ids if i not in self._used]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"cannot free blocks {bad or list(ids)}: not allocated (or listed twice)")
        self._used.difference_update(ids)
        self._free.extend(ids)
