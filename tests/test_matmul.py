"""The compiled batch-invariant matmul (engine/linear.py, csrc/matmul.cpp): the linear's numbers, the same bits at any row count."""

import os

import pytest
import torch

from tests.test_batching import engine_for
from tokenmill.engine import native
from tokenmill.engine.host_memory import HugePageArena
from tokenmill.engine.linear import PackedLinear


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    lib = native.load_matmul(tmp_path_factory.mktemp("kernels"))
    if lib is None or lib.matmul_panel_width() == 0:
        pytest.skip("no C++ compiler, or a CPU without vector FMA")
    return lib


# SmolLM2's q/k/v and down shapes, and odd ones: columns past the last full panel, a K of 1, a prime K
SHAPES = [(960, 576, False), (576, 1536, True), (37, 21, True), (5, 1, False), (100, 257, True)]


@pytest.mark.parametrize(("out_features", "in_features", "bias"), SHAPES)
def test_every_row_has_the_same_bits_at_any_row_count_and_thread_count(kernel, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(out_features)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    packed = PackedLinear(lin.weight, lin.bias, kernel)
    x = torch.randn(130, in_features, generator=gen)
    whole = packed(x)
    for start, rows in [(0, 1), (7, 1), (0, 2), (3, 5), (0, 6), (11, 7), (1, 13), (0, 16), (20, 95), (2, 97), (0, 130)]:
        assert torch.equal(packed(x[start : start + rows]), whole[start : start + rows]), (start, rows)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(packed(x), whole)
    finally:
        torch.set_num_threads(threads)
    assert packed(x[:0]).shape == (0, out_features)


@pytest.mark.parametrize(("out_features", "in_features", "bias"), SHAPES)
def test_from_64_rows_the_threads_split_rows_with_the_same_bits(kernel, out_features, in_features, bias):
    """At 64 rows and more each thread takes its rows and every panel (ROW_SPLIT): each row as it is alone, at 1-3 threads."""
    gen = torch.Generator().manual_seed(out_features + 1)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    packed = PackedLinear(lin.weight, lin.bias, kernel)
    x = torch.randn(401, in_features, generator=gen)
    alone = torch.cat([packed(x[i : i + 1]) for i in range(x.shape[0])])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for rows in (63, 64, 65, 97, 193, 257, 401):
                assert torch.equal(packed(x[:rows]), alone[:rows]), (count, rows)
    finally:
        torch.set_num_threads(threads)


def test_units_taken_from_another_threads_share_keep_the_bits(kernel):
    """A thread out of its own units takes the other shares' last ones (run_units): with more threads than cores, some
    wait for a core while the others go on, so units change threads, and every row is still as it is alone."""
    gen = torch.Generator().manual_seed(7)
    lin = torch.nn.Linear(576, 960, bias=True)
    packed = PackedLinear(lin.weight, lin.bias, kernel)
    x = torch.randn(200, 576, generator=gen)
    alone = torch.cat([packed(x[i : i + 1]) for i in range(x.shape[0])])
    before, start = torch.get_num_threads(), kernel.matmul_stolen()
    try:
        torch.set_num_threads((os.cpu_count() or 1) + 2)
        for call in range(400):
            rows = (16, 48, 64, 200)[call % 4]  # panels split below 64 rows, rows from 64 on
            assert torch.equal(packed(x[:rows]), alone[:rows]), (call, rows)
            if call >= 40 and kernel.matmul_stolen() > start:
                break
    finally:
        torch.set_num_threads(before)
    assert kernel.matmul_stolen() > start


@pytest.mark.parametrize(("out_features", "in_features", "bias"), SHAPES)
def test_it_computes_the_linear(kernel, out_features, in_features, bias):
    """Within float32 rounding of a float64 product; a sum in order, fused, so no worse than torch's own."""
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():  # the weights seeded too (not by x's seed: the two draws would be alike); unseeded, ~1
        torch.manual_seed(0)  # draw in 10 put K = 1536 past 4x torch's error (an in-order sum's error grows faster with K)
        lin = torch.nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(40, in_features, generator=gen)
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    got = PackedLinear(lin.weight, lin.bias, kernel)(x).double()
    assert (got - want).abs().max() <= (lin(x).double() - want).abs().max() * 4 + 1e-6
    # and within the bound every in-order chain of K fused multiply-adds keeps, whatever the draw: gamma_K sum |x w|
    # (+ one rounding of the bias's add)
    unit = 2.0**-24
    gamma = in_features * unit / (1 - in_features * unit)
    bound = gamma * (x.double().abs() @ lin.weight.double().abs().T) + (2 * unit * want.abs() if bias else 0)
    assert ((got - want).abs() <= bound).all()


def test_a_non_contiguous_input_is_read_right(kernel):
    lin = torch.nn.Linear(48, 40)
    x = torch.randn(48, 9).t()  # [9, 48], strided
    assert torch.equal(PackedLinear(lin.weight, lin.bias, kernel)(x), PackedLinear(lin.weight, lin.bias, kernel)(x.contiguous()))


def test_without_the_kernel_onednn_packs_the_weight():
    lin = torch.nn.Linear(64, 30)
    x = torch.randn(20, 64)
    packed = PackedLinear(lin.weight, lin.bias)
    assert packed.kernel is None and torch.allclose(packed(x), lin(x), rtol=1e-5, atol=1e-6)


def test_the_engine_runs_its_linears_through_the_kernel(llama_dir, kernel):
    """Both paths: the own llama forward's projections, and transformers' modules (pack_linears)."""
    lean = engine_for(llama_dir).runner.lean
    assert lean is not None and lean.lm_head.packed is not None and lean.lm_head.packed.kernel is not None
    assert all(layer.gate_up.packed is not None and layer.gate_up.packed.kernel is not None for layer in lean.layers)
    stock = engine_for(llama_dir, model_impl="transformers").runner.model
    forward = stock.model.layers[0].self_attn.o_proj.forward
    assert isinstance(forward.args[0], PackedLinear) and forward.args[0].kernel is not None


def test_weights_packed_into_the_huge_page_arena_give_the_same_bits(kernel):
    arena = HugePageArena(block=1 << 20)  # small buffers, so the test also crosses into a second one
    kept = []  # alive to the end: a freed piece's memory may be handed out again
    for out_features, in_features, bias in SHAPES + [(600, 512, False)]:  # the last needs more than one buffer holds
        lin = torch.nn.Linear(in_features, out_features, bias=bias)
        x = torch.randn(7, in_features)
        packed = PackedLinear(lin.weight, lin.bias, kernel, arena)
        assert packed.packed.data_ptr() % 64 == 0
        assert torch.equal(packed(x), PackedLinear(lin.weight, lin.bias, kernel)(x))
        kept.append(packed.packed)
    pieces = sorted((p.data_ptr(), p.data_ptr() + 4 * p.numel()) for p in kept)
    assert all(end <= start for (_, end), (start, _) in zip(pieces, pieces[1:], strict=False))  # no two share memory


def test_the_llama_forward_packs_every_weight_into_one_arena(llama_dir, kernel):
    lean = engine_for(llama_dir).runner.lean
    projections = [p for layer in lean.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [lean.lm_head]
    bases = {p.packed.packed.untyped_storage().data_ptr() for p in projections}
    assert len(bases) == 1  # the tiny llama's weights fit one 64 MiB buffer: carved from it, none on its own


def test_the_mlp_projection_with_its_silu_has_the_bits_of_the_matmul_then_torchs_silu(kernel):
    """matmul_silu: silu(gate) * up straight from the tiles, bit for bit the packed matmul (gate and up packed as halves)
    then F.silu(g).mul_(u), with torch's ranges split inside rows (I = 10 panels, 69 rows: pieces of 5 panels, each with a
    scalar tail), halves of part of a panel, biases, a lone row, 1-3 threads, and rows split between the threads."""
    from tokenmill.engine.native_layers import torch_exp

    lanes, exp = torch_exp()
    if not lanes:
        pytest.skip(f"torch runs {torch.backends.cpu.get_cpu_capability()} here: no Sleef exp to match")
    width, gen = kernel.matmul_panel_width(), torch.Generator().manual_seed(5)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for inter, hidden, bias in ((2 * width, 64, False), (10 * width, 96, True), (1536, 576, False), (37, 21, True), (3 * width + 5, 64, False)):
                lin = torch.nn.Linear(hidden, 2 * inter, bias=bias)
                packed = PackedLinear(lin.weight, lin.bias, kernel, halves=True)
                half = packed.width // 2
                for rows in (1, 2, 8, 9, 16, 45, 69, 130, 250):  # from 64 rows the threads split rows
                    x = torch.randn(rows, hidden, generator=gen) * 2
                    gate_up = packed(x)
                    want = torch.nn.functional.silu(gate_up[:, :inter]).mul_(gate_up[:, half : half + inter])
                    got = torch.full((rows, inter), float("nan"))
                    b = 0 if lin.bias is None else packed.bias.data_ptr()
                    assert kernel.matmul_silu(x.data_ptr(), packed.packed.data_ptr(), b, got.data_ptr(), rows, inter, hidden, threads, lanes, exp, threads) == 0
                    assert torch.equal(got, want), (threads, inter, rows)
    finally:
        torch.set_num_threads(before)
    assert kernel.matmul_silu(0, 0, 0, 0, 0, width, 8, 1, 12, exp, 1) == -1  # a vector width it has no loop for


def test_halves_are_packed_apart_with_the_plain_packings_columns(kernel):
    """PackedLinear(halves=True): gate and up each in whole panels; the output's two halves hold the plain packing's columns,
    the padding columns are zero, and unpack gives the weight back."""
    from tokenmill.engine.linear import unpack

    width, gen = kernel.matmul_panel_width(), torch.Generator().manual_seed(6)
    for inter in (width, 37, 2 * width + 3):
        lin = torch.nn.Linear(24, 2 * inter, bias=True)
        plain, halves = PackedLinear(lin.weight, lin.bias, kernel), PackedLinear(lin.weight, lin.bias, kernel, halves=True)
        assert halves.width == 2 * -(-inter // width) * width and halves.out_features == 2 * inter
        x = torch.randn(9, 24, generator=gen)
        want, got, half = plain(x), halves(x), halves.width // 2
        assert got.shape == (9, halves.width)
        assert torch.equal(got[:, :inter], want[:, :inter]) and torch.equal(got[:, half : half + inter], want[:, inter:])
        assert not got[:, inter:half].any() and not got[:, half + inter :].any()
        assert torch.equal(unpack(halves.packed, 2 * inter, 24, width, halves=True), lin.weight.detach())
