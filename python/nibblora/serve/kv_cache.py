"""A KV cache in fixed-size blocks (vLLM's paged layout): memory is taken as sequences grow, not reserved for the
longest possible one, and a finished or aborted sequence gives its blocks straight back.

Per layer, keys and values are one tensor each, [num_blocks, block_size, kv_heads, head_dim]. A sequence owns a
block table (list of block ids); its token at position p lives in block table[p // block_size], row
p % block_size.
"""

from __future__ import annotations

import torch

from nibblora.models.config import ModelConfig


class BlockAllocator:
    """Free list of block ids. allocate/free are O(blocks); no block is ever handed out twice."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """How many more blocks a table needs to hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` in place to hold `num_tokens`; False (and no change) when there are not enough blocks."""
        need = self.blocks_needed(table, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            table.append(self._free.pop())
        return True

    def free(self, table: list[int]) -> None:
        self._free.extend(reversed(table))
        table.clear()


class PagedKVCache:
    """Key and value blocks of every layer, plus the allocator that hands them out."""

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store key/value [tokens, kv_heads, head_dim] at flat slots (block * block_size + offset)."""
        kv_heads, head_dim = key.shape[-2:]
        self.keys[layer].view(-1, kv_heads, head_dim)[slot_mapping] = key
        self.values[layer].view(-1, kv_heads, head_dim)[slot_mapping] = value

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole blocks for each row of `tables` int64 [rows, max_blocks]:
        [rows, kv_heads, max_blocks * block_size, head_dim] each (positions past a row's length are junk)."""
        rows, max_blocks = tables.shape
        k = self.keys[layer][tables]  # [rows, max_blocks, block_size, kv_heads, head_dim]
        v = self.values[layer][tables]
        k = k.view(rows, max_blocks * self.block_size, *k.shape[-2:]).transpose(1, 2)
        v = v.view(rows, max_blocks * self.block_size, *v.shape[-2:]).transpose(1, 2)
        return k, v
