"""--model-impl: llama and qwen2 run through tokenmill's own forward, with the transformers path's numbers bit for bit."""

import random
import shutil
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.test_batching import engine_for, mixed_requests, together
from tokenmill.engine import llama_forward, native_layers
from tokenmill.sampling_params import Prompt, SamplingParams


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lean_dir(request, llama_dir, qwen2_dir):
    return {"llama": llama_dir, "qwen2": qwen2_dir}[request.param]


def scoring_requests(vocab: int) -> list:
    """Prompts scored with echo and max_tokens 0 (how lm-evaluation-harness asks), some chunked."""
    rng = random.Random(7)
    params = SamplingParams(max_tokens=0, echo=True, logprobs=3)
    return [([Prompt(tuple(rng.randrange(1, vocab) for _ in range(length)))], params) for length in (2, 17, 90)]


@pytest.mark.parametrize("attention", ["auto", "torch"])  # auto: RoPE, the K/V write and RMSNorm compiled, where g++ is found
def test_the_own_forward_equals_transformers_bit_for_bit(lean_dir, attention):
    lean = engine_for(lean_dir, max_num_batched_tokens=64, attention=attention)
    stock = engine_for(lean_dir, max_num_batched_tokens=64, attention=attention, model_impl="transformers")
    assert lean.runner.lean is not None and stock.runner.lean is None
    compiled = attention == "auto" and bool(shutil.which("g++") or shutil.which("c++"))
    assert (lean.runner.lean.kernel is not None) == compiled
    assert (lean.runner.lean.norm_lanes in (16, 8)) == compiled  # the compiled norm gives torch's bits here, so it is used
    silu = compiled and native_layers.silu_lanes(lean.runner.lean.kernel)[0] > 0  # the compiled silu gives torch's bits here
    assert (lean.runner.lean.native is not None) == silu  # and then every layer runs in one compiled call
    requests = mixed_requests(16, lean.tokenizer.vocab_size, seed=2) + scoring_requests(lean.tokenizer.vocab_size)
    assert together(lean, requests) == together(stock, requests)  # texts, tokens, logprobs and top logprobs, exactly


def test_gpt2_and_unknown_layers_go_through_transformers(gpt2_dir):
    assert engine_for(gpt2_dir).runner.lean is None
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    assert llama_forward.fits(LlamaForCausalLM(config))
    gelu = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "hidden_act": "gelu"}))
    assert not llama_forward.fits(gelu)  # an activation the own forward does not reproduce


def test_rotate_equals_transformers_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = torch.randn(5, 4, 16), torch.randn(5, 2, 16), torch.randn(5, 1, 16), torch.randn(5, 1, 16)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos.transpose(0, 1), sin.transpose(0, 1))
    got = llama_forward.rotate(torch.cat([q, k], dim=1), cos, sin)
    assert torch.equal(got[:, :4], want_q[0].transpose(0, 1)) and torch.equal(got[:, 4:], want_k[0].transpose(0, 1))


def test_unpacked_projections_share_their_weights_with_the_modules():
    """Off a float32 CPU (bf16, CUDA) the fused q/k/v and gate/up weights are the modules' own memory, not a copy."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    )
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 32)
    want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    forward = llama_forward.LlamaForward(model, packed=False)
    qkv = forward.layers[0].qkv
    assert attn.k_proj.weight.data_ptr() == qkv.weight[32:].data_ptr()
    assert torch.allclose(qkv(x), want, atol=1e-6) and torch.allclose(attn.k_proj(x), want[:, 32:48], atol=1e-6)


def test_the_compiled_norm_is_torchs_bit_for_bit_at_one_vector_width_only(tmp_path):
    """add_rms_norm reproduces the order of torch's sum at the width torch runs here; the other width is caught by the check."""
    from tokenmill.engine import native

    ops = native.load_llama_ops(tmp_path)
    if ops is None:
        pytest.skip("no C++ compiler")
    lanes = llama_forward.norm_lanes(ops, 576, 1e-5)
    assert lanes in (16, 8)
    gen = torch.Generator().manual_seed(1)
    module = types.SimpleNamespace(weight=torch.randn(960, generator=gen), variance_epsilon=1e-6)
    for rows in (1, 7, 300):  # one row (no threads), and enough rows to split over threads
        x, delta = torch.randn(rows, 960, generator=gen) * 3, torch.randn(rows, 960, generator=gen)
        want_x, got_x, other_x = x.clone(), x.clone(), x.clone()
        want = llama_forward.RMSNorm(module)(want_x, delta)
        assert torch.equal(llama_forward.RMSNorm(module, ops, lanes)(got_x, delta), want) and torch.equal(got_x, want_x)
        other = llama_forward.RMSNorm(module, ops, 24 - lanes)(other_x, delta)
        assert torch.equal(other_x, want_x) and (rows < 300 or not torch.equal(other, want))  # the sum's order shows in the bits
        assert torch.equal(llama_forward.RMSNorm(module, ops, lanes)(want_x.clone()), llama_forward.RMSNorm(module)(want_x.clone()))


def test_small_matmul_computes_the_linear_of_1_to_4_rows(tmp_path):
    """The compiled matrix-vector loop that --no-batch-invariance gives steps of a few rows: F.linear's numbers, other roundings."""
    from tokenmill.engine import native

    ops = native.load_llama_ops(tmp_path)
    if ops is None:
        pytest.skip("no C++ compiler")
    gen = torch.Generator().manual_seed(3)
    for out_features, in_features, bias in [(960, 576, False), (37, 21, True), (5, 16, False), (3072, 1536, True)]:
        lin = torch.nn.Linear(in_features, out_features, bias=bias)
        projection = llama_forward.Projection([lin], packed=True, small=ops)
        for rows in (1, 2, 3, 4, 5):
            x = torch.randn(rows, in_features, generator=gen)
            assert torch.allclose(projection(x), lin(x), rtol=1e-5, atol=1e-5)
        assert ops.small_matmul(0, 0, 0, 0, 5, out_features, in_features, 1) == -1  # 5 rows: the packed GEMM's


def test_without_batch_invariance_few_rows_take_small_matmul_and_agree_with_transformers(llama_dir):
    """--no-batch-invariance: a lone sequence's steps run through small_matmul, within float rounding of the stock forward."""
    fast = engine_for(llama_dir, no_batch_invariance=True)
    stock = engine_for(llama_dir, model_impl="transformers")
    if fast.runner.lean is None or fast.runner.lean.kernel is None:
        pytest.skip("no C++ compiler")
    assert fast.runner.lean.lm_head.small is not None and engine_for(llama_dir).runner.lean.lm_head.small is None
    params = SamplingParams(max_tokens=3, temperature=0.0, echo=True, logprobs=1, ignore_eos=True)
    ids = tuple(random.Random(5).randrange(1, fast.tokenizer.vocab_size) for _ in range(3))  # 3 prompt rows, then steps of 1
    (_, got_tokens, got, _), (_, want_tokens, want, _) = (together(engine, [([Prompt(ids)], params)])["r0"][0] for engine in (fast, stock))
    assert got_tokens == want_tokens and len(got) == 6 and got[0] is None and want[0] is None
    assert all(abs(a - b) < 1e-4 for a, b in zip(got[1:], want[1:], strict=True))
