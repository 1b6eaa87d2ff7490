"""The compiled attention kernels (engine/csrc/paged_attention.cpp): close to the torch path, and their bits independent of the batch."""

import shutil

import pytest
import torch

from tokenmill.engine import native
from tokenmill.engine.attention import Chunk, NativeAttention, StepContext, TorchAttention, Workspace, key_rows, visibility

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    lib = native.load_paged_attention(tmp_path_factory.mktemp("kernels"))
    assert lib is not None
    return lib


def decode_step(kv_heads: int, group: int, head_dim: int, block_size: int, lengths: list[int], seed: int = 0):
    """A random one-layer pool, block tables for sequences of the given lengths, and their queries [H, B, D]."""
    gen = torch.Generator().manual_seed(seed)
    width = -(-max(lengths) // 64) * 64 // block_size  # tables padded to whole 64-key chunks, as the model runner pads them
    num_blocks = sum(-(-n // block_size) for n in lengths) + 1
    pool = torch.randn(1, 2, kv_heads, num_blocks + 1, block_size, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in lengths:
        need = -(-n // block_size)
        tables.append(order[:need] + [num_blocks] * (width - need))
        order = order[need:]
    blocks = torch.tensor(tables)
    positions = torch.tensor(lengths) - 1
    bias = visibility(positions, width * block_size, torch.float32)[:, None, :]
    step = StepContext(
        pool, torch.zeros(0, dtype=torch.long), len(lengths), blocks, bias, positions + 1, workspace=Workspace(torch.float32, torch.device("cpu"))
    )
    query = torch.randn(kv_heads * group, len(lengths), head_dim, generator=gen)
    return query, pool[0], step


@pytest.mark.parametrize("kv_heads, group, head_dim, block_size", [(3, 3, 64, 16), (2, 2, 16, 16), (1, 4, 128, 8), (4, 1, 32, 32), (2, 7, 64, 16)])
def test_the_kernel_agrees_with_the_torch_path(library, kv_heads, group, head_dim, block_size):
    query, pool, step = decode_step(kv_heads, group, head_dim, block_size, [1, 5, 16, 17, 63, 64, 65, 200, 333])
    got = NativeAttention(library)._decode(query, pool, step, head_dim**-0.5)
    want = TorchAttention()._decode(query, pool, step, head_dim**-0.5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_a_sequences_bits_do_not_depend_on_the_batch_or_the_threads(library):
    lengths = [37, 300, 5, 129, 64, 250, 1, 77]
    query, pool, step = decode_step(3, 3, 64, 16, lengths)
    kernel = NativeAttention(library)
    together = kernel._decode(query, pool, step, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = kernel._decode(query, pool, step, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, single_thread)
    for i in range(len(lengths)):
        one = StepContext(step.kv, step.slots, 1, step.decode_blocks[i : i + 1], step.decode_bias[i : i + 1], step.decode_lens[i : i + 1])
        assert torch.equal(kernel._decode(query[:, i : i + 1].contiguous(), pool, one, 0.125)[0], together[i])


def reblocked(pool: torch.Tensor, blocks: list[torch.Tensor], lengths: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sequences' keys and values (blocks[i]: sequence i's block ids) in a pool of `block_size`-token blocks ([2, KVH, NB, BS, D]),
    and their tables, padded as decode_step pads them."""
    width = -(-max(lengths) // 64) * 64 // block_size
    needs = [-(-n // block_size) for n in lengths]
    source = torch.stack([key_rows(pool[0]), pool[1]])  # keys as rows, like the values
    moved = pool.new_zeros(2, pool.shape[1], sum(needs) + 1, block_size, pool.shape[-1])  # rows too, then keys into columns
    tables, first = [], 0
    for i, (n, need) in enumerate(zip(lengths, needs, strict=True)):
        rows = source[:, :, blocks[i]].flatten(2, 3)[:, :, :n]  # [2, KVH, n, D] in position order
        moved[:, :, first : first + need].flatten(2, 3)[:, :, :n] = rows
        tables.append(list(range(first, first + need)) + [sum(needs)] * (width - need))
        first += need
    out = torch.empty_like(moved)
    key_rows(out[0]).copy_(moved[0])
    out[1] = moved[1]
    return out, torch.tensor(tables)


def test_the_block_size_does_not_change_a_bit(library):
    """Blocks of 16 or 32 keys are read in place, blocks of 8 gathered first: the same keys, the same bits."""
    lengths = [1, 5, 16, 17, 63, 64, 65, 200, 333]
    query, pool, step = decode_step(3, 3, 64, 16, lengths)
    kernel = NativeAttention(library)
    outs = []
    for block_size in (8, 16, 32):
        kv, tables = reblocked(pool, list(step.decode_blocks), lengths, block_size)
        bias = visibility(step.decode_lens - 1, tables.shape[1] * block_size, torch.float32)[:, None, :]
        moved = StepContext(kv[None], step.slots, len(lengths), tables, bias, step.decode_lens, workspace=step.workspace)
        outs.append(kernel._decode(query, kv, moved, 0.125))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    lengths = [17, 130, 333]
    prompts, prompt_tables, queries, _ = prompt_pool(2, 4, 32, 16, lengths)
    chunks = []
    for block_size in (8, 16, 32):
        kv, tables = reblocked(prompts[0], [torch.tensor(t) for t in prompt_tables], lengths, block_size)
        own = [row[: -(-n // block_size)] for row, n in zip(tables.tolist(), lengths, strict=True)]
        chunks.append(prefill(kernel, kv[None], own, queries, kv.shape[2] - 1, [(0, 0, 17), (1, 50, 130), (2, 0, 333)], block_size, 0.2))
    for ours in zip(*chunks, strict=True):
        assert torch.equal(ours[0], ours[1]) and torch.equal(ours[1], ours[2])


def test_shapes_the_kernel_does_not_take_use_torch_ops(library):
    query, pool, step = decode_step(2, 2, 24, 16, [10, 40])  # head size not a multiple of 16
    step.decode_lens = None  # the kernel would need these: the torch path does not
    got = NativeAttention(library)._decode(query, pool, step, 0.2)
    assert torch.equal(got, TorchAttention()._decode(query, pool, step, 0.2))


def test_the_build_is_cached_and_a_broken_compiler_means_torch_ops(tmp_path, monkeypatch):
    first = native.load_paged_attention(tmp_path)
    built = list((tmp_path / "kernels").glob("paged_attention-*.so"))
    assert first is not None and len(built) == 1
    monkeypatch.setenv("CXX", "/bin/false")  # another compiler: another key, and this one fails
    assert native.load_paged_attention(tmp_path) is None
    assert list((tmp_path / "kernels").glob("*.so")) == built
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert native.load_paged_attention(tmp_path) is None


def test_the_attention_benchmark_runs(capsys):
    from tokenmill.benchmarks import attention

    assert attention.main(["--sequences", "4", "--layers", "2", "--min-len", "10", "--max-len", "70", "--repeat", "1", "--head-dim", "32"]) == 0
    out = capsys.readouterr().out
    assert "| compiled kernel |" in out and "| torch ops |" in out
    assert float(out.rsplit("them: ", 1)[1]) < 1e-5
    if "| compiled kernel, float16 pool |" in out:  # where the CPU converts half in hardware
        assert 0 < float(out.split("output: ", 1)[1].split()[0]) < 1e-2


def test_a_cache_folder_it_cannot_write_means_torch_ops(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert native.load_paged_attention(blocked) is None  # kernels/ cannot be made under a file


def prompt_pool(kv_heads: int, group: int, head_dim: int, block_size: int, lengths: list[int], seed: int = 0):
    """A random one-layer pool holding prompts of the given lengths, their block tables, and a query [H, n, D] for every position."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lengths) + 1
    pool = torch.randn(1, 2, kv_heads, num_blocks + 1, block_size, head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, queries = [], []
    for n in lengths:
        need = -(-n // block_size)
        tables.append(order[:need])
        order = order[need:]
        queries.append(torch.randn(kv_heads * group, n, head_dim, generator=gen))
    return pool, tables, queries, num_blocks


def prefill(backend, pool, tables, queries, scratch, pieces: list[tuple[int, int, int]], block_size: int, scale: float) -> list[torch.Tensor]:
    """One step over prompt pieces (sequence, first position, end): each piece's output [n, H, D], as the model runner lays the step out."""
    multiple = max(1, 64 // block_size)  # tables padded to whole 64-key value chunks
    chunks, rows, qs = [], 0, []
    for seq, a, b in pieces:
        need = -(-b // block_size)
        width = -(-need // multiple) * multiple
        blocks = torch.tensor(tables[seq][:need] + [scratch] * (width - need))
        chunks.append(Chunk(slice(rows, rows + b - a), a, blocks))
        qs.append(queries[seq][:, a:b])
        rows += b - a
    query = torch.cat(qs, dim=1)  # [H, T, D]
    step = StepContext(pool, torch.zeros(0, dtype=torch.long), 0, None, None, chunks=chunks, workspace=Workspace(torch.float32, torch.device("cpu")))
    out = query.new_zeros(rows, query.shape[0], query.shape[2])
    backend._prefill(query, pool[0], step, scale, out)
    return [out[c.rows] for c in chunks]


@pytest.mark.parametrize("kv_heads, group, head_dim, block_size", [(3, 3, 64, 16), (2, 2, 16, 16), (1, 4, 128, 8), (4, 1, 32, 32), (2, 7, 64, 16)])
def test_the_prefill_kernel_agrees_with_the_torch_path(library, kv_heads, group, head_dim, block_size):
    lengths = [1, 17, 64, 130, 333]
    pool, tables, queries, scratch = prompt_pool(kv_heads, group, head_dim, block_size, lengths)
    pieces = [(0, 0, 1), (1, 0, 17), (2, 0, 64), (3, 50, 130), (4, 0, 333)]
    scale = head_dim**-0.5
    got = prefill(NativeAttention(library), pool, tables, queries, scratch, pieces, block_size, scale)
    want = prefill(TorchAttention(), pool, tables, queries, scratch, pieces, block_size, scale)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kv_heads, group, head_dim, block_size", [(3, 3, 64, 16), (2, 2, 16, 16), (1, 4, 128, 8)])
def test_a_prompt_positions_bits_do_not_depend_on_its_chunk_the_batch_or_the_threads(library, kv_heads, group, head_dim, block_size):
    # with AVX-512 the first two shapes run positions in pairs and the third one at a time: a position's bits must
    # not depend on whether it runs paired, alone, or paired with its other neighbour
    lengths = [300, 90]
    pool, tables, queries, scratch = prompt_pool(kv_heads, group, head_dim, block_size, lengths)
    kernel = NativeAttention(library)
    run = lambda pieces: prefill(kernel, pool, tables, queries, scratch, pieces, block_size, head_dim**-0.5)  # noqa: E731
    whole = run([(0, 0, 300)])[0]
    pieces = run([(1, 0, 90), (0, 0, 37), (0, 37, 200), (0, 200, 300)])  # one sequence's chunks beside another's (keys already in the pool)
    assert torch.equal(torch.cat(pieces[1:]), whole)
    one_by_one = torch.cat([run([(0, p, p + 1)])[0] for p in range(0, 300, 23)])
    assert torch.equal(one_by_one, whole[::23])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(run([(0, 0, 300)])[0], whole)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(pieces[0], run([(1, 0, 90)])[0])


def test_prefill_shapes_the_kernel_does_not_take_use_torch_ops(library):
    for kv_heads, group, head_dim in [(1, 9, 64), (2, 2, 48)]:  # 9 query heads a kv head; a head size of 48
        pool, tables, queries, scratch = prompt_pool(kv_heads, group, head_dim, 16, [40])
        got = prefill(NativeAttention(library), pool, tables, queries, scratch, [(0, 0, 40)], 16, 0.2)
        assert torch.equal(got[0], prefill(TorchAttention(), pool, tables, queries, scratch, [(0, 0, 40)], 16, 0.2)[0])


def test_the_float16_kernels_read_a_half_pool_as_its_float_values_bit_for_bit(library):
    """--kv-cache-dtype float16: each half is read exactly into a float lane, then the float recipes run unchanged."""
    if not hasattr(library, "paged_decode_f16"):
        pytest.skip("this CPU has no hardware half conversion (F16C): a float16 pool runs in torch ops")
    kernel = NativeAttention(library)
    query, pool, step = decode_step(3, 3, 64, 16, [1, 5, 16, 17, 63, 64, 65, 200, 333])
    half = pool.half()
    assert torch.equal(kernel._decode(query, half, step, 0.125), kernel._decode(query, half.float(), step, 0.125))
    lengths = [1, 17, 64, 130, 333]
    pool, tables, queries, scratch = prompt_pool(2, 4, 32, 16, lengths)
    pieces = [(0, 0, 1), (1, 0, 17), (2, 0, 64), (3, 50, 130), (4, 0, 333)]
    half = pool.half()
    got = prefill(kernel, half, tables, queries, scratch, pieces, 16, 0.2)
    want = prefill(kernel, half.float(), tables, queries, scratch, pieces, 16, 0.2)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    torch_ops = prefill(TorchAttention(), half, tables, queries, scratch, pieces, 16, 0.2)  # the torch path reads a half pool too
    for g, w in zip(got, torch_ops, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("block_size", [16, 8])
def test_a_position_has_the_same_bits_generated_or_prompt(library, block_size):
    """Both kernels score a key by one chain of multiply-adds over its columns: a position's output does not depend on which computed it."""
    lengths = [333, 64, 17, 1]
    pool, tables, queries, scratch = prompt_pool(3, 3, 64, block_size, lengths)
    kernel = NativeAttention(library)
    prompts = prefill(kernel, pool, tables, queries, scratch, [(i, 0, n) for i, n in enumerate(lengths)], block_size, 0.125)
    width = -(-max(lengths) // 64) * 64 // block_size
    blocks = torch.tensor([t + [scratch] * (width - len(t)) for t in tables])
    lens = torch.tensor(lengths)
    bias = visibility(lens - 1, width * block_size, torch.float32)[:, None, :]
    step = StepContext(pool, torch.zeros(0, dtype=torch.long), len(lengths), blocks, bias, lens, workspace=Workspace(torch.float32, torch.device("cpu")))
    query = torch.stack([q[:, -1] for q in queries], dim=1)  # [H, B, D]: each sequence's last position
    generated = kernel._decode(query, pool[0], step, 0.125)
    for i, out in enumerate(prompts):
        assert torch.equal(generated[i], out[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_decode_kernel_writes_each_new_key_as_the_torch_path_does(library, dtype):
    """Given the step's keys, the decode kernel writes each sequence's new key into its column, rounded as every other write."""
    decode = getattr(library, "paged_decode" if dtype == torch.float32 else "paged_decode_f16", None)
    if decode is None:
        pytest.skip("this CPU has no hardware half conversion (F16C)")
    lengths = [1, 16, 17, 200, 333]
    query, pool, step = decode_step(3, 3, 64, 16, lengths)
    pool = pool.to(dtype)
    gen = torch.Generator().manual_seed(1)
    new = torch.randn(len(lengths), 3, 64, generator=gen) * 3e4  # [B, KVH, D]: past half's range in places, so it saturates
    blocks, offsets = step.decode_blocks[torch.arange(len(lengths)), (step.decode_lens - 1) // 16], (step.decode_lens - 1) % 16
    want = pool.clone()
    rounded = new.transpose(0, 1) if dtype == torch.float32 else new.transpose(0, 1).clamp(-65504, 65504).to(dtype)  # half saturates
    key_rows(want[0])[:, blocks, offsets] = rounded
    out = torch.empty(len(lengths), 9, 64)
    decode(
        query.data_ptr(), query.stride(0), query.stride(1), pool[0].data_ptr(), pool[1].data_ptr(), step.decode_blocks.data_ptr(),
        step.decode_lens.data_ptr(), new.data_ptr(), 3 * 64, out.data_ptr(), len(lengths), 9, 3, pool.shape[2], 16, 64,
        step.decode_blocks.shape[1], 0.125, torch.get_num_threads(),
    )  # fmt: skip
    assert torch.equal(pool, want)
    assert torch.equal(out, NativeAttention(library)._decode(query, want, step, 0.125))
