"""The scheduler: token budget, chunked prompts, first come first served, preemption and resumption."""

from tokenmill.engine.kv_cache import BlockManager
from tokenmill.engine.scheduler import Scheduler, SchedulerConfig
from tokenmill.engine.sequence import PromptGroup, Sequence
from tokenmill.sampling_params import Prompt, SamplingParams


def sequence(prompt_len: int, request_id: str = "r", first_token: int = 1) -> Sequence:
    prompt = Prompt(tuple(range(first_token, first_token + prompt_len)))
    group = PromptGroup(request_id, 0, prompt, SamplingParams(max_tokens=100), str)
    seq = Sequence(0, group, lambda ids: "")
    group.sequences.append(seq)
    return seq


def run(scheduler: Scheduler) -> dict[str, int]:
    """One step as the engine takes it: tokens computed, a token drawn at the end of what is known."""
    plan = scheduler.schedule()
    for item in plan.scheduled:
        seq = item.seq
        seq.num_computed += item.num_tokens
        upto = scheduler.cacheable(seq, seq.num_computed)
        scheduler.blocks.cache_full_blocks(seq.table, seq.token_ids(0, upto), upto)
        if item.seq.num_computed == item.seq.num_tokens:
            item.seq.output_ids.append(7)
            item.seq.group.prefilled = True
    return {item.seq.group.request_id: item.num_tokens for item in plan.scheduled}


def test_a_long_prompt_is_chunked_beside_running_decodes():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), BlockManager(64, 4))
    for name in "ab":
        s.add(sequence(3, name))
    assert run(s) == {"a": 3, "b": 3}
    s.add(sequence(30, "long"))
    steps = [run(s) for _ in range(4)]
    assert steps == [{"a": 1, "b": 1, "long": 8}] * 3 + [{"a": 1, "b": 1, "long": 6}]
    assert run(s) == {"a": 1, "b": 1, "long": 1}


def test_the_budget_and_sequence_limit_hold_and_waiting_is_first_come_first_served():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=5), BlockManager(64, 4))
    for name in "abc":
        s.add(sequence(4, name))
    assert run(s) == {"a": 4, "b": 1}
    assert run(s) == {"a": 1, "b": 3}  # c waits: two sequences run at most
    assert list(s.waiting)[0].group.request_id == "c"


def test_when_blocks_run_out_the_latest_sequence_is_preempted_and_resumes_later():
    blocks = BlockManager(num_blocks=4, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), blocks)
    first, second = sequence(8, "first"), sequence(8, "second", first_token=100)
    s.add(first)
    s.add(second)
    assert run(s) == {"first": 8, "second": 8}  # 4 blocks in use
    assert run(s) == {"first": 1}  # first needs a third block: second gives its two back
    assert s.preemptions == 1 and second.num_computed == 0 and s.waiting[0] is second
    assert second.output_ids == [7]  # it keeps its tokens, to recompute them
    s.finish(first)
    # its first prompt block is still cached; the rest of the prompt again, then its token
    assert run(s) == {"second": 4} and run(s) == {"second": 1}
    assert second.num_computed == 9


def test_a_preempted_sequence_takes_back_its_cached_blocks_and_with_generated_as_prompt_recomputes_in_one_chunk():
    for as_prompt, steps in ((True, [4]), (False, [1] * 8)):
        s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(16, 4), generated_as_prompt=as_prompt)
        seq = sequence(5)
        s.add(seq)
        for _ in range(7):
            run(s)
        assert seq.num_computed == 11 and seq.num_tokens == 12  # 5 prompt tokens, 7 generated, the last not computed yet
        s.add_first(s.pause([seq]))
        # blocks 0-1 (positions 0-7) are cached where generated blocks may be, else block 0 only (the prompt's one full block):
        # then the rest as one chunk, or the prompt's last token and each generated position one step at a time
        assert [run(s)["r"] for _ in steps] == steps, as_prompt
        assert seq.num_computed == 12 and seq.output_ids == [7] * 8


def test_a_finished_sequence_leaves_and_frees_its_blocks():
    blocks = BlockManager(num_blocks=4, block_size=4)
    s = Scheduler(SchedulerConfig(), blocks)
    seq = sequence(6)
    s.add(seq)
    run(s)
    s.finish(seq)
    assert not s.running and blocks.num_free == 4


def test_while_sequences_decode_each_prompt_advances_a_slice_and_alone_it_takes_the_budget():
    config = SchedulerConfig(max_num_batched_tokens=512, chunk_while_decoding=16)
    s = Scheduler(config, BlockManager(512, 16))
    s.add(sequence(1000, "alone"))
    assert run(s) == {"alone": 512}  # nothing decodes: the whole budget
    s.finish(s.running[0])
    s.add(sequence(2, "short", first_token=500))
    run(s)
    for name in ("long", "other"):
        s.add(sequence(1000, name, first_token=2000))
    assert run(s) == {"short": 1, "long": 16, "other": 16}


def test_sequences_decoding_side_by_side_keep_their_blocks_in_one_run():
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), BlockManager(256, 4))
    seqs = [sequence(8, name) for name in "abc"]
    for seq in seqs:
        s.add(seq)
    for _ in range(30):  # 8 prompt positions and 29 generated: 10 blocks each, taken turn by turn
        run(s)
    for seq in seqs:
        blocks = seq.table.blocks
        assert len(blocks) == 10 and blocks == list(range(blocks[0], blocks[0] + 10))
