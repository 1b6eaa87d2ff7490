"""The compiled decode-attention kernel (engine/csrc/paged_decode.cpp): close to the torch path, and its bits independent of the batch."""

import shutil

import pytest
import torch

from tokenmill.engine import native
from tokenmill.engine.attention import NativeDecodeAttention, StepContext, TorchAttention, Workspace, visibility

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    lib = native.load_paged_decode(tmp_path_factory.mktemp("kernels"))
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
    got = NativeDecodeAttention(library)._decode(query, pool, step, head_dim**-0.5)
    want = TorchAttention()._decode(query, pool, step, head_dim**-0.5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6)


def test_a_sequences_bits_do_not_depend_on_the_batch_or_the_threads(library):
    lengths = [37, 300, 5, 129, 64, 250, 1, 77]
    query, pool, step = decode_step(3, 3, 64, 16, lengths)
    kernel = NativeDecodeAttention(library)
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


def test_shapes_the_kernel_does_not_take_use_torch_ops(library):
    query, pool, step = decode_step(2, 2, 24, 16, [10, 40])  # head size not a multiple of 16
    step.decode_lens = None  # the kernel would need these: the torch path does not
    got = NativeDecodeAttention(library)._decode(query, pool, step, 0.2)
    assert torch.equal(got, TorchAttention()._decode(query, pool, step, 0.2))


def test_the_build_is_cached_and_a_broken_compiler_means_torch_ops(tmp_path, monkeypatch):
    first = native.load_paged_decode(tmp_path)
    built = list((tmp_path / "kernels").glob("paged_decode-*.so"))
    assert first is not None and len(built) == 1
    monkeypatch.setenv("CXX", "/bin/false")  # another compiler: another key, and this one fails
    assert native.load_paged_decode(tmp_path) is None
    assert list((tmp_path / "kernels").glob("*.so")) == built
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert native.load_paged_decode(tmp_path) is None


def test_the_attention_benchmark_runs(capsys):
    from tokenmill.benchmarks import attention

    assert attention.main(["--sequences", "4", "--layers", "2", "--min-len", "10", "--max-len", "70", "--repeat", "1", "--head-dim", "32"]) == 0
    out = capsys.readouterr().out
    assert "| compiled kernel |" in out and "| torch ops |" in out
    assert float(out.rsplit("them: ", 1)[1]) < 1e-5


def test_a_cache_folder_it_cannot_write_means_torch_ops(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert native.load_paged_decode(blocked) is None  # kernels/ cannot be made under a file
