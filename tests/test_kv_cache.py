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


def test_a_table_grows_into_its_spares_so_its_blocks_stay_one_run():
    m = BlockManager(num_blocks=256, block_size=4)
    a, b = BlockTable(), BlockTable()
    for table in (a, b):  # 2 blocks of prompt, 8 spares (SPARE_BLOCKS) for the 40 positions they may reach
        assert m.allocate(table, 8, 0, sure_to=8, may_reach=40) == [] and len(table.blocks) == 2 and len(table.spares) == 8
    assert m.num_free == 256 - 4  # spares count as free
    for n in range(9, 41):  # both grow a position at a time, turn by turn
        for table in (a, b):
            assert m.allocate(table, n, n - 1, sure_to=8, may_reach=40) == []
    for table in (a, b):
        assert table.blocks == list(range(table.blocks[0], table.blocks[0] + 10)) and table.spares == []
    m.free(a)
    m.free(b)
    assert m.num_free == 256


def test_a_prompt_holds_spares_for_the_rest_of_itself_and_none_past_what_it_may_reach():
    m = BlockManager(num_blocks=256, block_size=4)
    chunked, short = BlockTable(), BlockTable()
    assert m.allocate(chunked, 8, 0, sure_to=40, may_reach=100) == []  # a 40-token prompt's first chunk
    assert len(chunked.blocks) == 2 and len(chunked.spares) == 8 + 8  # the prompt's 8 other blocks, 8 more
    assert m.allocate(short, 8, 0, sure_to=8, may_reach=9) == [] and len(short.spares) == 1


def test_spares_are_given_back_before_an_allocation_would_fail():
    m = BlockManager(num_blocks=16, block_size=4)
    a = BlockTable()
    assert m.allocate(a, 4, 0, sure_to=4, may_reach=64) == []
    assert len(a.spares) == 16 // 8  # all spares together hold at most an eighth of the pool (SPARE_SHARE)
    b = BlockTable()
    assert m.allocate(b, 60, 0) == [] and len(b.blocks) == 15  # every block but a's one: a's spares too
    assert a.spares == [] and m.num_free == 0
    assert m.allocate(a, 5, 4) is None and a.blocks == a.blocks[:1]  # nothing left: changes nothing
    m.free(a)
    m.free(b)
    c = BlockTable()
    assert m.num_free == 16 and m.allocate(c, 64, 0) == [] and sorted(c.blocks) == list(range(16))
