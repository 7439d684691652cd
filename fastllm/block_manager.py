"""KV-cache blocks shared between sequences: reference counts and a prefix cache.

A block that a sequence has filled completely is registered under the hash of
its whole prefix, ``h_i = sha256(h_{i-1} || tokens of block i)``, so equal hashes
mean equal tokens at equal positions and therefore equal keys and values. The
hash is cryptographic on purpose: with Python's 64-bit ``hash`` of a tuple of
ints (not randomised per process) a client of a shared server could craft a
prompt whose blocks collide with another's and be served its cached keys. A new
sequence whose prompt starts with registered blocks takes them (reference
count + 1) instead of computing them again: a shared system prompt or a
repeated conversation prefix is prefilled once.

Blocks nobody references go to a free list in least-recently-released order;
they keep their registration until they are handed out again, so a finished
or preempted sequence's blocks can still be hit. Registered blocks are never
written again: a sequence only writes into blocks past its reused prefix, and
the block holding a prompt's last token is never reused (its logits must be
computed).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from fastllm.cache import CachedSequence


@dataclass
class BlockPlan:
    """What admitting a sequence takes: the cached blocks it reuses and how many new ones."""

    reused: list[int]
    hashes: list[bytes]
    new: int
    missing: bytes | None = None  # the first block hash looked up and not found (None: no lookup failed)


@dataclass
class SequenceBlocks(CachedSequence):
    """A sequence's blocks plus the hashes of its registered full blocks."""

    hashes: list[bytes] = field(default_factory=list)


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """The prefix hash of a block: sha256 of its parent's hash and its token ids."""
    m = hashlib.sha256(parent or b"")
    m.update(array("q", tokens).tobytes())
    return m.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash_of: list[bytes | None] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}  # registered hash -> block
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.queried_tokens = 0  # prompt tokens looked up / found in the prefix cache
        self.hit_tokens = 0
        # Bumped whenever the free list, a reference count or the prefix cache
        # changes: while it stands, whatever was decided from them (can_admit) stands.
        self.version = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---------------------------------------------------------------- admission
    def plan(self, tokens: list[int], max_reused_tokens: int | None = None) -> BlockPlan:
        """The cached prefix blocks of ``tokens`` (never the one holding the last
        token, nor past ``max_reused_tokens`` tokens) and the number of new
        blocks the rest needs."""
        bs, reused, hashes, h, missing = self.block_size, [], [], None, None
        full = (len(tokens) - 1) // bs
        if max_reused_tokens is not None:
            full = min(full, max_reused_tokens // bs)
        if self.enable_prefix_caching:
            for i in range(full):
                h = block_hash(h, tokens[i * bs : (i + 1) * bs])
                block = self._block_of.get(h)
                if block is None:
                    missing = h
                    break
                reused.append(block)
                hashes.append(h)
        return BlockPlan(reused, hashes, self.blocks_for(len(tokens)) - len(reused), missing)

    def plan_stands(self, plan: BlockPlan) -> bool:
        """Whether ``plan(tokens, ...)`` would give ``plan`` again for the same
        arguments: every block it reuses still holds its hash, and the block
        hash it stopped at is still not registered (registrations and
        evictions elsewhere do not change it, so no hashing is needed)."""
        if plan.missing is not None and plan.missing in self._block_of:
            return False
        hash_of = self._hash_of
        return all(hash_of[b] == h for b, h in zip(plan.reused, plan.hashes))

    def can_admit(self, plan: BlockPlan, reserve: int = 0) -> bool:
        """Whether ``plan`` fits, keeping ``reserve`` blocks free. Reused blocks
        nobody holds come out of the free list too."""
        idle = sum(1 for b in plan.reused if self._ref[b] == 0)
        return plan.new + idle + reserve <= len(self._free)

    def admit(self, seq: SequenceBlocks, plan: BlockPlan, num_tokens: int) -> None:
        """Give ``seq`` (holding no blocks) the planned blocks; its cached
        length becomes the reused prefix."""
        for b in plan.reused:
            self._ref[b] += 1
            self._free.pop(b, None)
        seq.block_table = plan.reused + [self._take() for _ in range(plan.new)]
        seq.hashes = list(plan.hashes)
        seq.num_cached = len(plan.reused) * self.block_size
        self.version += 1
        self.queried_tokens += num_tokens
        self.hit_tokens += seq.num_cached

    # ----------------------------------------------------------------- running
    def grow(self, seq: SequenceBlocks, num_tokens: int) -> bool:
        """Make room for ``seq`` to hold ``num_tokens`` tokens; False (and no
        change) when there are not enough free blocks."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        seq.block_table.extend(self._take() for _ in range(need))
        self.version += 1
        return True

    def has_unregistered(self, seq: SequenceBlocks, num_tokens: int | None = None) -> bool:
        """Whether ``register(seq, tokens, num_tokens)`` could register a block:
        prefix caching is on and the cached tokens (up to ``num_tokens``) fill
        a block past those already registered."""
        upto = seq.num_cached if num_tokens is None else min(num_tokens, seq.num_cached)
        return self.enable_prefix_caching and upto // self.block_size > len(seq.hashes)

    def register(self, seq: SequenceBlocks, tokens: list[int], num_tokens: int | None = None) -> None:
        """Register the blocks of ``seq`` that its first ``num_tokens`` cached
        tokens (default: all of them) have filled (``tokens``: all of the
        sequence's tokens so far)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        upto = seq.num_cached if num_tokens is None else min(num_tokens, seq.num_cached)
        upto = min(upto, len(tokens))  # a finished speculative round caches tokens it did not keep
        h = seq.hashes[-1] if seq.hashes else None
        for i in range(len(seq.hashes), upto // bs):
            h = block_hash(h, tokens[i * bs : (i + 1) * bs])
            seq.hashes.append(h)
            block = seq.block_table[i]
            if h not in self._block_of:  # else another sequence computed the same block first: keep that one
                self._block_of[h] = block
                self._hash_of[block] = h
                self.version += 1

    def release(self, seq: SequenceBlocks) -> None:
        """Drop ``seq``'s blocks (tail first, so a prefix outlives its tail in the cache)."""
        for b in reversed(seq.block_table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None
        seq.block_table, seq.hashes, seq.num_cached = [], [], 0
        self.version += 1

    def _take(self) -> int:
        """The least recently released free block, unregistered, referenced once."""
        block, _ = self._free.popitem(last=False)
        h = self._hash_of[block]
        if h is not None:
            del self._block_of[h]
            self._hash_of[block] = None
        self._ref[block] = 1
        return block
