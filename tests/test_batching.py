"""Continuous batching: a request's tokens and logprobs are the same alone or in any crowd.

Checked with chunked prompts, prefix-cache hits and preemption, on llama, qwen2 and gpt2 (fp32, CPU).
"""

import random
import shutil

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.attention import NativeAttention, TorchAttention
from tokenmill.engine.loader import load_engine
from tokenmill.outputs import Logprobs
from tokenmill.sampling_params import Prompt, SamplingParams


def engine_for(path, **options):
    return load_engine(EngineConfig(model=str(path), **options), str(path), "tiny").engine


def mixed_requests(count: int, vocab: int, seed: int = 0) -> list[tuple[list[Prompt], SamplingParams]]:
    """Prompts of 1-120 tokens (some sharing a 40-token prefix), 1-40 output tokens, greedy or seeded."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, vocab) for _ in range(40)]
    requests = []
    for i in range(count):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 120))]
        if i % 5 == 0:
            ids = shared + ids[:30]
        knobs = {"temperature": 0.0} if i % 2 else {"temperature": rng.choice([0.7, 1.0, 1.3]), "seed": i, "top_p": rng.choice([1.0, 0.9])}
        if i % 7 == 3:
            knobs.update(n=2, best_of=3, seed=i, temperature=1.0)
        if i % 6 == 1:
            knobs.update(presence_penalty=0.5, frequency_penalty=0.3, logit_bias={5: 2.0})
        params = SamplingParams(max_tokens=rng.randint(1, 40), logprobs=2, ignore_eos=i % 3 == 0, **knobs)
        requests.append(([Prompt(tuple(ids))], params))
    return requests


def collect(engine, requests, ids) -> dict[str, list]:
    """Run the requests to the end; per request, each choice's (text, logprobs)."""
    for rid, (prompts, params) in zip(ids, requests, strict=True):
        engine.add_request(rid, prompts, params)
    texts: dict[str, dict[int, list]] = {rid: {} for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            for d in out.choices:
                text, lp = texts[out.request_id].setdefault(d.index, ["", Logprobs()])
                texts[out.request_id][d.index] = [text + d.text, lp]
                lp.extend(d.logprobs or Logprobs())
    return {rid: [(c[0], c[1].tokens, c[1].token_logprobs, c[1].top_logprobs) for _, c in sorted(texts[rid].items())] for rid in ids}


def alone(engine, requests) -> dict[str, list]:
    results = {}
    for i, request in enumerate(requests):
        results |= collect(engine, [request], [f"r{i}"])
    return results


def together(engine, requests) -> dict[str, list]:
    return collect(engine, requests, [f"r{i}" for i in range(len(requests))])


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def model_dir(request, llama_dir, qwen2_dir, gpt2_dir):
    return {"llama": llama_dir, "qwen2": qwen2_dir, "gpt2": gpt2_dir}[request.param]


@pytest.fixture(scope="module")
def solo_results(model_dir):
    engine = engine_for(model_dir, no_prefix_caching=True)
    requests = mixed_requests(40, engine.tokenizer.vocab_size)
    return requests, alone(engine, requests), engine.runner.shape.bytes_per_token


def test_forty_mixed_requests_batched_equal_each_alone(model_dir, solo_results):
    requests, solo, _ = solo_results
    engine = engine_for(model_dir, max_num_batched_tokens=64)  # prompts are chunked beside decodes
    crowd = together(engine, requests)
    assert crowd == solo
    assert engine.blocks.hit_tokens > 0  # the shared prefixes were served from the cache
    assert engine.blocks.num_free == engine.blocks.num_blocks
    if shutil.which("g++") or shutil.which("c++"):  # generated positions ran through the compiled kernel
        assert isinstance(engine.runner.backend, NativeAttention)


def test_the_torch_attention_path_is_batch_invariant_too(llama_dir):
    """--attention torch (and machines with no compiler): the same promise, on the gather-and-matmul recipes."""
    engine = engine_for(llama_dir, attention="torch", max_num_batched_tokens=64)
    assert type(engine.runner.backend) is TorchAttention
    requests = mixed_requests(16, engine.tokenizer.vocab_size, seed=1)
    assert together(engine, requests) == alone(engine, requests)


def test_a_pool_small_enough_to_preempt_gives_the_same_outputs(model_dir, solo_results):
    requests, solo, bytes_per_token = solo_results
    # room for 200 tokens: the longest request (160) fits alone, a few together do not
    engine = engine_for(model_dir, kv_cache_memory=str(200 * bytes_per_token), block_size=4)
    crowd = together(engine, requests)
    assert engine.scheduler.preemptions > 0
    assert crowd == solo
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_shared_prefix_is_a_counted_cache_hit_with_the_same_output(llama_dir):
    cold = engine_for(llama_dir, no_prefix_caching=True)
    warm = engine_for(llama_dir)
    rng = random.Random(3)
    prefix = [rng.randrange(1, 900) for _ in range(50)]
    first, second = ([Prompt(tuple(prefix + tail))] for tail in ([7, 8, 9], [10, 11]))
    params = SamplingParams(max_tokens=12, logprobs=3, seed=4)
    collect(warm, [(first, params)], ["a"])
    before = warm.blocks.hit_tokens
    got = collect(warm, [(second, params)], ["b"])
    assert warm.blocks.hit_tokens - before == 48  # three full blocks of 16
    assert got == collect(cold, [(second, params)], ["b"])


@pytest.mark.parametrize("attention", ["auto", "torch"])
def test_the_next_turn_finds_the_generated_blocks_where_the_kernels_agree(llama_dir, attention):
    """The compiled kernels compute a generated position as they would a prompt one, so its full blocks are cached too
    and a prompt that goes on from a completion finds them; the torch recipes differ, so there only prompt blocks are."""
    warm, cold = engine_for(llama_dir, attention=attention), engine_for(llama_dir, attention=attention, no_prefix_caching=True)
    native = isinstance(warm.runner.backend, NativeAttention)
    assert warm.runner.generated_as_prompt == native and native == (attention == "auto" and bool(shutil.which("g++") or shutil.which("c++")))
    prompt = tuple(random.Random(6).randrange(1, 900) for _ in range(30))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2)
    warm.add_request("first", [Prompt(prompt)], params)
    group = warm._requests["first"][0]
    while warm.has_unfinished():
        warm.step()
    turn = [Prompt(prompt + tuple(group.sequences[0].output_ids) + (11, 12))]
    before = warm.blocks.hit_tokens
    got = collect(warm, [(turn, params)], ["next"])
    # positions 0-63 (4 blocks of 16; 30 prompt tokens, then generated ones) against the prompt's one full block
    assert warm.blocks.hit_tokens - before == (64 if native else 16)
    assert got == collect(cold, [(turn, params)], ["next"])


def computed_through(engine, prompt: tuple[int, ...], max_tokens: int, upto: int):
    """A greedy sequence of the prompt, stepped until its first `upto` positions are in the pool (it still runs)."""
    engine.add_request("x", [Prompt(prompt)], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    seq = engine._requests["x"][0].sequences[0]
    while seq.num_computed < upto:
        engine.step()
    return seq


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="the compiled kernels need a compiler")
def test_generated_keys_and_values_are_the_bits_a_prompt_chunk_writes(model_dir):
    """What lets generated blocks into the prefix cache and a preempted sequence recompute them as a chunk."""
    alone, chunked = engine_for(model_dir, no_prefix_caching=True), engine_for(model_dir, no_prefix_caching=True)
    assert alone.runner.generated_as_prompt and chunked.runner.generated_as_prompt
    prompt = tuple(random.Random(7).randrange(1, 200) for _ in range(40))
    generated = computed_through(alone, prompt, 80, 112)  # positions 40-111 computed one per step
    again = computed_through(chunked, prompt + tuple(generated.output_ids[:72]), 4, 112)  # all 112 as prompt chunks
    for mine, theirs in zip(generated.table.blocks[:7], again.table.blocks[:7], strict=True):
        assert torch.equal(alone.runner.kv[:, :, :, mine], chunked.runner.kv[:, :, :, theirs])


def test_after_a_burst_with_aborts_every_block_is_free(llama_dir):
    engine = engine_for(llama_dir, max_num_batched_tokens=48)
    requests = mixed_requests(20, engine.tokenizer.vocab_size, seed=1)
    for i, (prompts, params) in enumerate(requests):
        engine.add_request(f"r{i}", prompts, params)
    for _ in range(4):
        engine.step()
    for i in range(0, 20, 2):
        engine.abort(f"r{i}")
    while engine.has_unfinished():
        engine.step()
    assert engine.num_active() == 0 and not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_chunked_scoring_equals_one_chunk(llama_dir):
    text_ids = tuple(random.Random(5).randrange(1, 900) for _ in range(100))
    params = SamplingParams(max_tokens=0, echo=True, logprobs=2)
    whole = collect(engine_for(llama_dir), [([Prompt(text_ids)], params)], ["s"])
    chunked = collect(engine_for(llama_dir, max_num_batched_tokens=16), [([Prompt(text_ids)], params)], ["s"])
    assert whole == chunked


def test_a_failed_step_frees_the_blocks_of_the_requests_it_fails(llama_dir, monkeypatch):
    engine = engine_for(llama_dir)
    real = engine.runner.execute
    engine.add_request("survivor", [Prompt(tuple(range(1, 30)))], SamplingParams(max_tokens=30, temperature=0.0))
    engine.step()

    def execute(works):
        if any(w.prefill for w in works):
            raise MemoryError("simulated")
        return real(works)

    monkeypatch.setattr(engine.runner, "execute", execute)
    engine.add_request("victim", [Prompt(tuple(range(1, 40)))], SamplingParams(max_tokens=5))
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs["victim"].error and outputs["victim"].finished
    assert not outputs["survivor"].error
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks and engine.num_active() == 0
