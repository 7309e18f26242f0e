"""A stage's paged KV cache: fixed-size blocks preallocated from a budget, a block table per sequence.

The gateway's scheduler reserves blocks for a whole sequence before admitting it (against the
smallest stage's block count), so ``ensure`` here cannot run out for an admitted sequence.
"""

from __future__ import annotations

import torch

from stagemesh.serving.blocks import BlockAllocator, blocks_needed


class KVCache:
    """K and V blocks for the local layers of one stage (one TP rank's KV heads)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if num_blocks < 1:
            raise ValueError(f"the KV budget gives {num_blocks} blocks; give the stage more KV memory")
        # [layer, K or V, block, offset, KV head, D]
        self.kv = torch.zeros((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.seq_tokens: dict[int, int] = {}
        """Sequence id -> tokens its blocks hold (what ``ensure`` was last asked for)."""

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow ``seq_id``'s block table to hold ``num_tokens`` tokens; returns the table."""
        table = self.block_tables.setdefault(seq_id, [])
        missing = blocks_needed(num_tokens, self.block_size) - len(table)
        if missing > 0:
            table.extend(self.allocator.allocate(missing))
        self.seq_tokens[seq_id] = num_tokens
        return table

    def free(self, seq_id: int) -> None:
        table = self.block_tables.pop(seq_id, None)
        self.seq_tokens.pop(seq_id, None)
        if table:
            self.allocator.free(table)

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - self.allocator.num_free
