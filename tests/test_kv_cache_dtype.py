"""--kv-cache-dtype: a float16 (or bfloat16) pool under float32 weights, with every promise but the numbers' closeness kept."""

import shutil

import pytest
import torch

from tests.test_batching import alone, engine_for, mixed_requests, together
from tokenmill.engine import native, native_layers
from tokenmill.outputs import ModelInfo
from tokenmill.sampling_params import Prompt, SamplingParams
from tokenmill.server.responses import fingerprint

compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler")


def test_a_float16_pool_holds_twice_the_tokens_in_the_same_memory(llama_dir):
    wide = engine_for(llama_dir, kv_cache_memory="1MiB")
    narrow = engine_for(llama_dir, kv_cache_memory="1MiB", kv_cache_dtype="float16")
    assert wide.runner.kv.dtype == torch.float32 and narrow.runner.kv.dtype == torch.float16
    assert narrow.blocks.num_blocks in (2 * wide.blocks.num_blocks, 2 * wide.blocks.num_blocks + 1)


@pytest.mark.parametrize("kind, dtype, attention", [("llama", "float16", "auto"), ("gpt2", "float16", "auto"), ("llama", "bfloat16", "torch")])
def test_a_requests_tokens_still_do_not_depend_on_the_batch(kind, dtype, attention, llama_dir, gpt2_dir):
    """llama: the one compiled call; gpt2: transformers' modules over the compiled kernels; bfloat16: torch ops."""
    engine = engine_for(gpt2_dir if kind == "gpt2" else llama_dir, kv_cache_dtype=dtype, attention=attention, max_num_batched_tokens=64)
    assert engine.runner.kv.dtype == getattr(torch, dtype)
    if kind == "llama" and attention == "auto" and engine.runner.lean.native is not None:
        assert engine.runner.lean.native.kv_half  # the one call writes and reads half
    requests = mixed_requests(14, engine.tokenizer.vocab_size, seed=11)
    assert together(engine, requests) == alone(engine, requests)


@compiler
def test_the_one_call_gives_the_python_loops_numbers_on_a_float16_pool(llama_dir):
    engines = [engine_for(llama_dir, kv_cache_dtype="float16", max_num_batched_tokens=64) for _ in range(2)]
    if engines[0].runner.lean.native is None:
        pytest.skip("no compiled silu with torch's bits, or no hardware half conversion, here")
    engines[1].runner.lean.native = None
    assert engines[1].runner.lean.layers[0].store is not None  # the Python loop's compiled RoPE + half K/V write
    requests = mixed_requests(12, engines[0].tokenizer.vocab_size, seed=12)
    assert together(engines[0], requests) == together(engines[1], requests)


def test_prompt_logprobs_move_a_little_and_only_with_the_option(llama_dir):
    """What the option costs: echo logprobs (lm-evaluation-harness's scores) are no longer the float32 pool's."""
    prompt = [Prompt(tuple(range(3, 120)))]
    params = SamplingParams(max_tokens=0, echo=True, logprobs=0)
    scores = {}
    for dtype in ("auto", "float16"):
        result = together(engine_for(llama_dir, kv_cache_dtype=dtype), [(prompt, params)])["r0"][0][2]
        scores[dtype] = torch.tensor(result[1:])  # the first prompt token has no logprob
    gap = (scores["float16"] - scores["auto"]).abs().max().item()
    assert 0 < gap < 0.05


@compiler
def test_the_half_write_rounds_saturates_and_keeps_nan(tmp_path):
    ops = native.load_llama_ops(tmp_path)
    if not hasattr(ops, "rope_store_f16"):
        pytest.skip("this CPU has no hardware half conversion (F16C)")
    d = 16  # one row, one query head, one kv head: [q | k | v]
    qkv = torch.zeros(1, 3 * d)
    qkv[0, d : 2 * d] = torch.tensor([1e6, -1e6, 65519.0, 65520.0, 3.0, 1 / 3, -2.5e-8, 7.0] * 2)  # RoPE at angle 0 keeps them
    qkv[0, 2 * d :] = torch.tensor([1e6, -1e6, 65519.0, 65520.0, float("nan"), 1 / 3, -2.5e-8, 7.0] * 2)
    cos, sin = torch.ones(1, d), torch.zeros(1, d)
    keys, values = torch.zeros(4, d, dtype=torch.float16), torch.zeros(4, d, dtype=torch.float16)
    slots = torch.tensor([2])
    args = [qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), keys.data_ptr(), values.data_ptr(), 1, 1, 1, d, 3 * d, 4, 4]
    ops.rope_store_f16(*args, 1, 1)  # rows below 1 keep their keys out of the pool (the decode kernel writes them)
    assert keys.abs().sum() == 0 and values[2].isfinite().sum() == 14
    ops.rope_store_f16(*args, 0, 1)
    want = qkv[0, 2 * d :].clamp(-65504, 65504).half()  # torch's rounding to nearest, saturated
    assert torch.equal(values[2].isnan(), want.isnan()) and values[2].isnan().sum() == 2
    assert torch.equal(values[2].nan_to_num(), want.nan_to_num()) and values[2].isfinite().sum() == 14
    assert values[[0, 1, 3]].abs().sum() == 0
    column = keys.view(d, 4)  # a block's keys are its columns: key 2 is column 2
    assert torch.equal(column[:, 2], qkv[0, d : 2 * d].clamp(-65504, 65504).half())
    assert column[:, [0, 1, 3]].abs().sum() == 0


def test_the_fingerprint_says_when_the_numbers_come_from_another_pool():
    plain = ModelInfo("m", "/models/m", 2048, 1000, "float32", "cpu")
    half = ModelInfo("m", "/models/m", 2048, 1000, "float32", "cpu", kv_cache_dtype="float16")
    assert fingerprint(plain) != fingerprint(half)


def test_no_one_call_for_a_pool_the_kernels_do_not_read(llama_dir):
    engine = engine_for(llama_dir, kv_cache_dtype="bfloat16")
    assert engine.runner.lean.native is None and engine.runner.lean.layers[0].store is None
    library = getattr(engine.runner.backend, "library", None)
    assert library is None or native_layers.NativeLayers.build(engine.runner.lean, library, 4, torch.bfloat16) is None
