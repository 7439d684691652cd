"""Paged KV cache: fixed-size blocks, a block table per sequence.

Keys and values of all layers live in two tensors
``[num_layers, num_blocks, block_size, Hk, D]``. A sequence owns a list of
block ids (its block table); token ``p`` of the sequence is stored in slot
``block_table[p // block_size] * block_size + p % block_size``. Paging lets
sequences of different lengths share one pool without padding, and lets the
engine free, share and reuse blocks (continuous batching, prefix caching).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastllm.ops import AttentionMetadata

DEFAULT_BLOCK_SIZE = 16


def blocks_needed(lengths: Iterable[int], block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Blocks that hold sequences of these lengths, each in blocks of its own."""
    return sum(-(-n // block_size) for n in lengths)


class BlockAllocator:
    """A free list of block ids."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache is full: asked for {n} blocks, {len(self._free)} free")
        taken, self._free = self._free[len(self._free) - n :], self._free[: len(self._free) - n]
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = DEFAULT_BLOCK_SIZE,
        reserved_blocks: int = 0,
    ):
        """``num_blocks`` blocks for sequences (handed out by ``allocator``) and
        ``reserved_blocks`` more after them that no sequence gets (ids
        ``num_blocks ...``; CUDA graphs park their padding rows' K/V there)."""
        shape = (num_layers, num_blocks + reserved_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.device = torch.device(device)
        self.num_blocks, self.reserved_blocks = num_blocks, reserved_blocks
        self.allocator = BlockAllocator(num_blocks)

    def layers(self) -> list[tuple[Tensor, Tensor]]:
        return [(self.k[i], self.v[i]) for i in range(self.k.shape[0])]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reserved_block(self, i: int = 0) -> int:
        if not 0 <= i < self.reserved_blocks:
            raise ValueError(f"the cache has {self.reserved_blocks} reserved blocks, asked for number {i}")
        return self.num_blocks + i

    def reset(self) -> None:
        """Forget every sequence: all blocks are free again (contents stay)."""
        self.allocator = BlockAllocator(self.num_blocks)


@dataclass
class CachedSequence:
    """What the cache knows about one sequence: its blocks and cached length."""

    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0


def prepare_step(
    cache: KVCache, seqs: list[CachedSequence], new_tokens: list[list[int]]
) -> tuple[Tensor, Tensor, AttentionMetadata, Tensor]:
    """Pack one step: allocate blocks for the new tokens, compute their slots.

    Returns (input_ids [N], positions [N], metadata, last_token_indices [B]) and
    advances each sequence's ``num_cached`` by its number of new tokens.
    """
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    for seq, toks in zip(seqs, new_tokens):
        start = seq.num_cached
        slots.extend(append_slots(cache, seq, len(toks)))
        ids.extend(toks)
        positions.extend(range(start, seq.num_cached))
        query_lens.append(len(toks))
        seq_lens.append(seq.num_cached)
    width = max(len(s.block_table) for s in seqs)
    cu = [0]
    for q in query_lens:
        cu.append(cu[-1] + q)
    last = [c - 1 for c in cu[1:]]
    n, b = len(ids), len(seqs)
    # Two host-to-device copies per step (one per dtype) instead of seven.
    longs = to_device(ids + positions + slots + last, torch.int64, cache.device)
    table: list[int] = []
    for s in seqs:
        table.extend(s.block_table)
        table.extend([0] * (width - len(s.block_table)))
    ints = to_device(cu + seq_lens + table, torch.int32, cache.device)
    meta = AttentionMetadata(
        cu_seqlens_q=ints[: b + 1],
        seq_lens=ints[b + 1 : 2 * b + 1],
        block_tables=ints[2 * b + 1 :].view(b, width),
        slot_mapping=longs[2 * n : 3 * n],
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
    )
    return longs[:n], longs[n : 2 * n], meta, longs[3 * n :]


def append_slots(cache: KVCache, seq: CachedSequence, n: int) -> list[int]:
    """Make room for ``n`` more tokens of ``seq`` (allocating blocks as needed),
    advance its ``num_cached``, and return the new tokens' flat cache slots."""
    bs = cache.block_size
    start, end = seq.num_cached, seq.num_cached + n
    need = cache.blocks_for(end) - len(seq.block_table)
    if need > 0:
        seq.block_table.extend(cache.allocator.allocate(need))
    seq.num_cached = end
    return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]


def append_one_slot(cache: KVCache, seqs: Iterable[CachedSequence]) -> tuple[list[int], list[int]]:
    """``append_slots(cache, seq, 1)`` for each of ``seqs`` in one pass (a
    decode step): the new tokens' flat cache slots and their positions (each
    sequence's ``num_cached`` before it advanced)."""
    bs, allocator = cache.block_size, cache.allocator
    slots: list[int] = []
    positions: list[int] = []
    for seq in seqs:
        p = seq.num_cached
        q, r = divmod(p, bs)
        table = seq.block_table
        if q >= len(table):
            table.extend(allocator.allocate(q + 1 - len(table)))
        seq.num_cached = p + 1
        slots.append(table[q] * bs + r)
        positions.append(p)
    return slots, positions


def to_device(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device``: through pinned memory with an
    asynchronous copy for a GPU (the host buffer lives until the copy ran)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` the current CUDA device for the block (a no-op on CPU),
    so that kernels launch where the model lives whichever GPU is current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
