"""Where keys and values live: a pool of fixed-size blocks, reference-counted, with a prefix cache.

Bookkeeping only (no tensors): the model runner owns the pool tensor these block ids index.

A block id is also a place in memory: in one layer, one kv head's blocks lie in id order (the pool is
[layers, 2, kv_heads, blocks, block_size, head_dim]). The decode kernel reads each running sequence's
blocks in table order, and on a 2-core Zen 4 it reads 64 sequences of 256-384 tokens in 63-71 ms with
every block elsewhere, 43-46 ms with each sequence's blocks in one run (`benchmarks.attention`): one
4 KiB block at a time the memory is read at 14 GB/s, in 64 KiB runs at 29 (a plain read, 2 threads).
So blocks taken together are handed out in id order, and a table holds spare blocks past its end (the
rest of a prompt being prefilled and SPARE_BLOCKS more, never past the tokens it may reach) to grow
into: its generated tokens then continue the run instead of landing wherever the next free block is.
Spares count as free: any allocation that would otherwise fail takes them back first, so they never
cause a preemption.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Block:
    """One block of the pool: who holds it, and which tokens it caches (when full and hashed)."""

    block_id: int
    ref_count: int = 0
    hash: bytes | None = None


@dataclass
class BlockTable:
    """A sequence's blocks, in order; block i holds positions [i*block_size, (i+1)*block_size)."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of its leading full, cached blocks
    spares: list[int] = field(default_factory=list)  # held past its end, ascending, for it to grow into


def chain_hash(previous: bytes | None, tokens) -> bytes:
    """The hash of a full block: its tokens and, through `previous`, every token before them."""
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


SPARE_BLOCKS = 8  # most spare blocks a table holds: a 32 KiB run of keys per head at SmolLM2's 16 x 64 floats
SPARE_SHARE = 8  # all tables' spares together hold at most 1 / SPARE_SHARE of the pool: the rest keeps cached prefixes


class BlockManager:
    """Hands out blocks, shares them by reference count, and keeps freed full blocks for reuse.

    Free blocks wait in least-recently-freed order; a free block that still caches a prefix stays
    findable by its hash until it is handed out again (evicted).
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self._spare_holders: dict[int, BlockTable] = {}  # id(table) -> a table holding spares
        self._num_spares = 0
        self.hit_tokens = 0  # prompt tokens served from the prefix cache
        self.queried_tokens = 0  # prompt tokens looked up in it

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks an allocation can have: the free ones and every table's spares."""
        return len(self._free) + self._num_spares

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    def reuse_prefix(self, table: BlockTable, token_ids, limit: int) -> int:
        """Point an empty table at cached blocks of the longest cached prefix (at most `limit` tokens)."""
        if not self.prefix_caching:
            return 0
        bs, previous = self.block_size, None
        for i in range(limit // bs):
            previous = chain_hash(previous, token_ids[i * bs : (i + 1) * bs])
            block_id = self._cached.get(previous)
            if block_id is None:
                break
            self._hold(block_id)
            table.blocks.append(block_id)
            table.hashes.append(previous)
        self.queried_tokens += limit
        self.hit_tokens += len(table.blocks) * bs
        return len(table.blocks) * bs

    def allocate(self, table: BlockTable, num_tokens: int, writes_from: int, sure_to: int = 0, may_reach: int = 0) -> list[tuple[int, int]] | None:
        """Grow `table` to hold `num_tokens` positions, writable from position `writes_from`.

        A shared block that is about to be written is copied first (copy on write). Returns the
        (source, destination) block copies to make, or None, changing nothing, when blocks run out.
        Spares are held for the positions it will surely hold (`sure_to`: a prompt's) and SPARE_BLOCKS
        blocks more, but never past the positions it may come to hold (`may_reach`; 0: no spares).
        """
        first = writes_from // self.block_size
        shared = [i for i in range(first, len(table.blocks)) if self.blocks[table.blocks[i]].ref_count > 1]
        grow = max(0, self.blocks_for(num_tokens) - len(table.blocks))
        if grow + len(shared) > self.num_free:
            return None
        own = min(grow, len(table.spares))  # its own spares first: they continue its run
        if own:
            table.blocks += table.spares[:own]
            self._set_spares(table, table.spares[own:])
        needed = grow - own
        if needed + len(shared) > len(self._free):
            self._reclaim(needed + len(shared))
        copies = []
        for i in shared:
            fresh = self._take()
            copies.append((table.blocks[i], fresh))
            self._release(table.blocks[i])
            table.blocks[i] = fresh
        del table.hashes[first:]  # a block written again no longer holds what its hash says
        if needed:
            ahead = self._spares_wanted(num_tokens, sure_to, may_reach, needed)
            taken = sorted(self._take() for _ in range(needed + ahead))  # in id order: one run where the free list allows
            table.blocks += taken[:needed]
            self._set_spares(table, taken[needed:])
        return copies

    def _spares_wanted(self, num_tokens: int, sure_to: int, may_reach: int, needed: int) -> int:
        """How many spares a table growing to `num_tokens` positions takes beside the `needed` blocks."""
        reach = min(self.blocks_for(may_reach), self.blocks_for(max(sure_to, num_tokens)) + SPARE_BLOCKS)
        room = min(len(self._free) - needed, self.num_blocks // SPARE_SHARE - self._num_spares)
        return max(0, min(reach - self.blocks_for(num_tokens), room))

    def fork(self, table: BlockTable) -> BlockTable:
        """A new table sharing every block of `table` (n and best_of candidates of one prompt)."""
        for block_id in table.blocks:
            self._hold(block_id)
        return BlockTable(list(table.blocks), list(table.hashes))

    def cache_full_blocks(self, table: BlockTable, token_ids, upto: int) -> None:
        """Make the full blocks among positions [0, upto) findable by their prefix hash."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(table.hashes), min(upto // bs, len(table.blocks))):
            previous = table.hashes[-1] if table.hashes else None
            digest = chain_hash(previous, token_ids[i * bs : (i + 1) * bs])
            table.hashes.append(digest)
            block = self.blocks[table.blocks[i]]
            if block.hash is None and digest not in self._cached:
                block.hash = digest
                self._cached[digest] = block.block_id

    def free(self, table: BlockTable) -> None:
        """Give back a table's blocks, last first, so a prefix's tail is evicted before its head."""
        self._reclaim_from(table)
        for block_id in reversed(table.blocks):
            self._release(block_id)
        table.blocks.clear()
        table.hashes.clear()

    def _set_spares(self, table: BlockTable, spares: list[int]) -> None:
        """Make `spares` the table's spares (the ones it had are already taken or given back)."""
        self._num_spares += len(spares) - len(table.spares)
        table.spares = spares
        if spares:
            self._spare_holders[id(table)] = table
        else:
            self._spare_holders.pop(id(table), None)

    def _reclaim(self, needed: int) -> None:
        """Take tables' spares back until `needed` blocks are free (the caller checked that they exist)."""
        for holder in list(self._spare_holders.values()):
            if len(self._free) >= needed:
                return
            self._reclaim_from(holder)

    def _reclaim_from(self, table: BlockTable) -> None:
        """Give a table's spares back, highest first, so the free list's front is the lowest of them."""
        spares = table.spares
        self._set_spares(table, [])
        for block_id in reversed(spares):
            self._release(block_id)

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.hash is None:  # nothing to keep: hand it out before blocks that cache a prefix
                self._free.move_to_end(block_id, last=False)

    def _take(self) -> int:
        """The least recently freed block, evicted from the prefix cache if it was there."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:
            del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id
