"""The block manager: allocation, reference counts, the prefix hash chain, eviction, freeing."""

from tokenmill.engine.kv_cache import BlockManager, BlockTable


def filled(manager: BlockManager, tokens: list[int]) -> BlockTable:
    """A table holding `tokens`, its full blocks made findable in the prefix cache."""
    table = BlockTable()
    assert manager.allocate(table, len(tokens), 0) == []
    manager.cache_full_blocks(table, tokens, len(tokens))
    return table


def test_allocate_grows_a_table_block_by_block():
    m = BlockManager(num_blocks=4, block_size=4)
    table = BlockTable()
    assert m.allocate(table, 5, 0) == [] and len(table.blocks) == 2 and m.num_free == 2
    assert m.allocate(table, 8, 5) == [] and len(table.blocks) == 2
    assert m.allocate(table, 9, 8) == [] and len(table.blocks) == 3 and m.num_free == 1


def test_running_out_of_blocks_changes_nothing():
    m = BlockManager(num_blocks=2, block_size=4)
    table = BlockTable()
    assert m.allocate(table, 12, 0) is None
    assert table.blocks == [] and m.num_free == 2


def test_fork_shares_blocks_and_writing_a_shared_block_copies_it():
    m = BlockManager(num_blocks=8, block_size=4)
    parent = filled(m, list(range(6)))  # one full block, one partial
    child = m.fork(parent)
    assert child.blocks == parent.blocks and all(m.blocks[b].ref_count == 2 for b in parent.blocks)
    copies = m.allocate(child, 7, 6)  # writes position 6, inside the shared partial block
    assert copies == [(parent.blocks[1], child.blocks[1])] and child.blocks[1] != parent.blocks[1]
    assert child.blocks[0] == parent.blocks[0] and m.blocks[parent.blocks[1]].ref_count == 1
    assert m.allocate(parent, 7, 6) == []  # now the parent's alone: written in place


def test_free_releases_only_the_last_reference():
    m = BlockManager(num_blocks=4, block_size=4)
    parent = filled(m, [1, 2, 3])
    child = m.fork(parent)
    m.free(parent)
    assert m.num_free == 3 and m.blocks[child.blocks[0]].ref_count == 1
    m.free(child)
    assert m.num_free == 4 and child.blocks == []


def test_a_cached_prefix_is_found_by_its_hash_chain():
    m = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    first = filled(m, tokens)
    second = BlockTable()
    assert m.reuse_prefix(second, tokens, limit=9) == 8  # two full blocks
    assert second.blocks == first.blocks[:2] and m.blocks[first.blocks[0]].ref_count == 2
    assert (m.hit_tokens, m.queried_tokens) == (8, 9)


def test_the_chain_stops_at_the_first_different_block():
    m = BlockManager(num_blocks=8, block_size=4)
    filled(m, [0, 1, 2, 3, 4, 5, 6, 7])
    other = BlockTable()
    assert m.reuse_prefix(other, [9, 1, 2, 3, 4, 5, 6, 7], limit=8) == 0  # same second block, other first
    assert m.reuse_prefix(BlockTable(), [0, 1, 2, 3, 4, 5, 6, 8], limit=8) == 4


def test_the_limit_leaves_the_last_prompt_token_to_compute():
    m = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    filled(m, tokens)
    assert m.reuse_prefix(BlockTable(), tokens, limit=len(tokens) - 1) == 4


def cached(manager: BlockManager, tokens: list[int]) -> int:
    """How many leading tokens the prefix cache holds (looked up, then let go)."""
    table = BlockTable()
    found = manager.reuse_prefix(table, [*tokens, 0], limit=len(tokens))
    manager.free(table)
    return found


def test_freed_blocks_keep_their_prefix_until_evicted_least_recently_freed_first():
    m = BlockManager(num_blocks=3, block_size=2)
    old, new, partial = filled(m, [1, 2]), filled(m, [3, 4]), filled(m, [5])
    for table in (old, new, partial):
        m.free(table)
    grab = BlockTable()
    assert m.allocate(grab, 2, 0) == [] and grab.blocks == [2]  # the never-cached block goes first
    assert m.allocate(grab, 4, 2) == [] and grab.blocks == [2, 0]  # then [1, 2], freed before [3, 4]
    assert cached(m, [1, 2]) == 0 and cached(m, [3, 4]) == 2


def test_prefix_caching_off_finds_nothing():
    m = BlockManager(num_blocks=4, block_size=2, prefix_caching=False)
    filled(m, [1, 2, 3, 4])
    assert m.reuse_prefix(BlockTable(), [1, 2, 3, 4, 5], limit=4) == 0
