"""Every layer of a step in one compiled call (engine/native_layers.py): the Python loop's numbers, bit for bit."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.test_batching import engine_for, mixed_requests, together
from tokenmill.engine import native, native_layers

compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")


@compiler
def test_silu_mul_is_torchs_silu_then_mul_bit_for_bit(tmp_path):
    """The pieces torch's threads split rows into decide which elements take libm's expf: checked at awkward sizes and thread counts."""
    ops = native.load_llama_ops(tmp_path)
    lanes, exp = native_layers.silu_lanes(ops)
    if not lanes:
        pytest.skip(f"torch runs {torch.backends.cpu.get_cpu_capability()} here: no Sleef exp to match")
    gen = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for rows, width in ((1, 1536), (5, 7), (16, 1536), (17, 100), (33, 1000), (64, 1536), (129, 515)):
                gate_up = torch.randn(rows, 2 * width, generator=gen) * 8
                got = torch.empty(rows, width)
                assert ops.silu_mul(gate_up.data_ptr(), got.data_ptr(), rows, width, lanes, exp, threads, 2) == 0
                assert torch.equal(got, F.silu(gate_up[:, :width]).mul_(gate_up[:, width:])), (threads, rows, width)
    finally:
        torch.set_num_threads(before)
    assert ops.silu_mul(0, 0, 1, 8, 12, exp, 1, 1) == -1  # a vector width it has no loop for


@compiler
@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama without batch invariance"])
def test_one_call_gives_the_python_loops_tokens_and_logprobs(kind, llama_dir, qwen2_dir):
    """Chunked prompts, prefix hits and decode rows together (a 64-token budget), with and without the one call."""
    invariant = "without" not in kind
    engines = [engine_for(qwen2_dir if kind == "qwen2" else llama_dir, max_num_batched_tokens=64, no_batch_invariance=not invariant) for _ in range(2)]
    lean = engines[0].runner.lean
    if not native_layers.silu_lanes(lean.kernel)[0]:
        pytest.skip(f"no compiled silu with torch's bits here (torch runs {torch.backends.cpu.get_cpu_capability()})")
    assert lean.native is not None  # every part compiled: the tiny models' head size 16, groups of 2 and 4
    assert lean.native.model.small_rows == (0 if invariant else 4)  # without invariance, steps of 1-4 rows take small_matmul
    engines[1].runner.lean.native = None  # a second engine, so both see the same steps (without invariance, rows decide bits)
    requests = mixed_requests(12, engines[0].tokenizer.vocab_size, seed=5)
    assert together(engines[0], requests) == together(engines[1], requests)


@compiler
def test_the_last_layer_runs_the_kept_rows_only_with_every_rows_bits(llama_dir):
    """Each step with prompt rows, run again keeping every row: the trimmed call's logits are those rows' own, bit for bit."""
    engine = engine_for(llama_dir, max_num_batched_tokens=64)
    forward = engine.runner.lean
    if forward.native is None:
        pytest.skip(f"no compiled silu with torch's bits here (torch runs {torch.backends.cpu.get_cpu_capability()})")
    trimmed = []

    def checked(ids, positions, keep, step, argmax=None):
        logits = forward(ids, positions, keep, step, argmax)
        if keep.shape[0] < ids.shape[0]:  # prompt rows, of which only a finished prompt's last is kept
            every = forward(ids, positions, torch.arange(ids.shape[0]), step)  # the same keys and values written again
            trimmed.append(torch.equal(logits, every[keep]))
        return logits

    engine.runner.lean = checked
    together(engine, mixed_requests(12, engine.tokenizer.vocab_size, seed=6))
    assert len(trimmed) >= 5 and all(trimmed)


def test_no_one_call_without_the_compiled_attention(llama_dir):
    """attention torch: the Python loop (each part takes its torch ops)."""
    assert engine_for(llama_dir, attention="torch").runner.lean.native is None


@compiler
@pytest.mark.parametrize(("inter", "bias"), [(96, False), (100, False), (100, True)])
def test_the_mlp_projection_and_silu_in_one_pass_give_the_python_loops_bits(inter, bias, tmp_path):
    """MLP widths of whole panels (96: 2 of AVX-512's 48 columns, 6 of AVX2's 16) and of part of one (100, gate and up
    packed apart, with and without biases): the one call projects gate/up and applies silu in one pass (matmul_silu),
    with the Python loop's tokens and logprobs. Without batch invariance, steps of 1-4 rows would read the padded bias
    whole: the Python loop runs there."""
    from tests.conftest import build_model

    path = build_model("llama", tmp_path / f"llama{inter}", inter=inter, mlp_bias=bias)
    engines = [engine_for(path, max_num_batched_tokens=64) for _ in range(2)]
    native_loop = engines[0].runner.lean.native
    if native_loop is None:
        pytest.skip(f"no compiled silu with torch's bits here (torch runs {torch.backends.cpu.get_cpu_capability()})")
    assert native_loop.fused
    padded = engines[0].runner.lean.layers[0].gate_up.packed.width != 2 * inter
    assert (engine_for(path, no_batch_invariance=True).runner.lean.native is None) == (padded and bias)
    engines[1].runner.lean.native = None
    requests = mixed_requests(12, engines[0].tokenizer.vocab_size, seed=7)
    assert together(engines[0], requests) == together(engines[1], requests)
