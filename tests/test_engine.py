"""The engine without HTTP: greedy equals transformers, seeds, n/best_of, echo scoring, stop, abort."""

import platform
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenmill.config import EngineConfig
from tokenmill.engine import host_memory
from tokenmill.engine.engine import stacked
from tokenmill.engine.loader import load_engine
from tokenmill.outputs import Logprobs
from tokenmill.sampling_params import Prompt, SamplingParams


@pytest.fixture(scope="module")
def engine(llama_dir):
    return load_engine(EngineConfig(model=str(llama_dir)), str(llama_dir), "tiny").engine


def prompt(engine, text):
    return Prompt(tuple(engine.tokenizer.encode(text)), text)


def run(engine, request_id, prompts, params, others=()):
    """Step until `request_id` finishes; return its choices as (text, logprobs, finish) by index."""
    engine.add_request(request_id, prompts, params)
    for other_id, other_prompts, other_params in others:
        engine.add_request(other_id, other_prompts, other_params)
    texts, logprobs, finish = {}, {}, {}
    while True:
        outputs = {o.request_id: o for o in engine.step()}
        out = outputs.get(request_id)
        for d in out.choices if out else []:
            texts[d.index] = texts.get(d.index, "") + d.text
            logprobs.setdefault(d.index, Logprobs()).extend(d.logprobs or Logprobs())
            finish[d.index] = d.finish_reason or finish.get(d.index)
        if out and out.finished:
            break
    for other_id, _, _ in others:
        engine.abort(other_id)
    return [(texts[i], logprobs[i], finish[i]) for i in sorted(texts)], out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_equals_model_generate(kind, llama_dir, gpt2_dir):
    path = llama_dir if kind == "llama" else gpt2_dir
    engine = load_engine(EngineConfig(model=str(path)), str(path), "tiny").engine
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for text in ["def main():\n    ", "import os", "x"]:
        ids = tok(text, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
        [(got, _, _)], _ = run(engine, "g", [prompt(engine, text)], SamplingParams(max_tokens=24, temperature=0.0))
        assert got == tok.decode(ref, skip_special_tokens=True)


def test_seed_reproduces_whatever_else_runs(engine):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234)
    alone, _ = run(engine, "a", [prompt(engine, "class A:")], params)
    others = [(f"o{i}", [prompt(engine, "import sys")], SamplingParams(max_tokens=30, temperature=1.2)) for i in range(3)]
    crowded, _ = run(engine, "b", [prompt(engine, "class A:")], params, others)
    assert alone == crowded
    other_seed, _ = run(engine, "c", [prompt(engine, "class A:")], SamplingParams(max_tokens=20, seed=99))
    assert other_seed != alone


def test_unseeded_requests_differ(engine):
    params = SamplingParams(max_tokens=20, temperature=1.0)
    first, _ = run(engine, "a", [prompt(engine, "class A:")], params)
    second, _ = run(engine, "b", [prompt(engine, "class A:")], params)
    assert first != second


def test_n_choices_are_indexed_prompt_major(engine):
    params = SamplingParams(max_tokens=5, n=2, seed=3)
    choices, out = run(engine, "n", [prompt(engine, "a"), prompt(engine, "for i in range(10):")], params)
    assert len(choices) == 4
    alone, _ = run(engine, "n1", [prompt(engine, "for i in range(10):")], params)
    assert choices[2:] == alone  # prompt 1's choices are indices 2 and 3
    assert out.completion_tokens == 20 and choices[0] != choices[1]


def test_best_of_returns_the_n_most_likely_candidates(engine):
    seeded = dict(max_tokens=6, seed=11, logprobs=0, ignore_eos=True)
    all_four, _ = run(engine, "all", [prompt(engine, "for")], SamplingParams(n=4, best_of=4, **seeded))
    mean = lambda c: sum(c[1].token_logprobs) / len(c[1].token_logprobs)  # noqa: E731
    ranked = sorted(all_four, key=mean, reverse=True)
    best, out = run(engine, "best", [prompt(engine, "for")], SamplingParams(n=2, best_of=4, **seeded))
    assert [c[0] for c in best] == [c[0] for c in ranked[:2]]
    assert out.completion_tokens == 24  # every candidate's tokens were generated


def test_echo_with_zero_max_tokens_scores_the_prompt(engine, llama_dir):
    text = "def add(a, b):\n    return a + b"
    [(got, lp, finish)], out = run(engine, "s", [prompt(engine, text)], SamplingParams(max_tokens=0, echo=True, logprobs=1))
    assert got == text and finish == "length" and out.completion_tokens == 0
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = engine.tokenizer.encode(text)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    expected = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp.tokens) == text
    assert [text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens, strict=True)] == [True] * len(ids)
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])


def test_zero_max_tokens_without_echo_is_empty(engine):
    [(text, _, finish)], out = run(engine, "z", [prompt(engine, "abc")], SamplingParams(max_tokens=0))
    assert (text, finish, out.completion_tokens) == ("", "length", 0)


def test_stop_string_across_tokens_cuts_the_text(engine):
    greedy = SamplingParams(max_tokens=30, temperature=0.0, logprobs=0)
    [(full, lp, _)], _ = run(engine, "f", [prompt(engine, "def")], greedy)
    boundary = lp.text_offset[5]
    stop = full[boundary - 2 : boundary + 2]  # spans two tokens
    assert full.find(stop) == boundary - 2
    [(cut, cut_lp, finish)], _ = run(engine, "s", [prompt(engine, "def")], SamplingParams(max_tokens=30, temperature=0.0, logprobs=0, stop=(stop, "zzzz")))
    assert cut == full[: boundary - 2] and finish == "stop"
    assert all(o < len(cut) for o in cut_lp.text_offset)


def test_logprobs_agree_with_text(engine):
    [(text, lp, _)], _ = run(engine, "l", [prompt(engine, "if x:")], SamplingParams(max_tokens=12, logprobs=3, seed=5, ignore_eos=True))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and token in top and len(top) <= 4


def test_abort_frees_everything(engine):
    # unseeded sampling: an end token drawn in the first two steps (~1% of runs on the tiny model) would finish a candidate early
    engine.add_request("x", [prompt(engine, "a")], SamplingParams(max_tokens=50, n=3, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.num_active() == 3
    engine.abort("x")
    assert engine.num_active() == 0 and not engine.has_unfinished()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_echo_logprobs_of_every_prompt_in_a_batch(engine):
    texts = ["first prompt here", "second one"]
    choices, _ = run(engine, "e", [prompt(engine, t) for t in texts], SamplingParams(max_tokens=2, echo=True, logprobs=1, temperature=0.0))
    for (text, lp, _), source in zip(choices, texts, strict=True):
        n_prompt = len(engine.tokenizer.encode(source))
        assert text.startswith(source) and len(lp) == n_prompt + 2
        assert lp.token_logprobs[0] is None and "".join(lp.tokens[:n_prompt]) == source


@pytest.fixture(scope="module")
def bos_engine(bos_llama_dir):
    return load_engine(EngineConfig(model=str(bos_llama_dir)), str(bos_llama_dir), "bos").engine


def test_echo_leaves_out_the_bos_the_tokenizer_added(bos_engine):
    tok = bos_engine.tokenizer
    ids = tok.encode("import os")
    assert tok.added_prefix == 1 and ids[0] == 0
    p = Prompt(tuple(ids), "import os", skip=tok.added_prefix)
    [(text, lp, _)], out = run(bos_engine, "b", [p], SamplingParams(max_tokens=0, echo=True, logprobs=1))
    assert text == "import os" and "".join(lp.tokens) == "import os"
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is not None  # scored given the BOS before it
    assert out.prompt_tokens == len(ids)


def test_padding_ids_past_the_vocabulary_are_never_sampled(bos_engine):
    vocab = bos_engine.tokenizer.vocab_size
    assert bos_engine.runner.model.config.vocab_size == vocab + 40
    params = SamplingParams(max_tokens=8, logit_bias={vocab + 5: 100.0}, logprobs=5, seed=1)
    [(text, lp, _)], _ = run(bos_engine, "p", [prompt(bos_engine, "x")], params)
    assert len(lp) == 8 and all(len(top) <= 6 for top in lp.top_logprobs)


def test_a_sentencepiece_style_tokenizer_works_through_the_hf_path(metaspace_llama_dir):
    engine = load_engine(EngineConfig(model=str(metaspace_llama_dir)), str(metaspace_llama_dir), "sp").engine
    assert engine.tokenizer.name == "huggingface" and engine.tokenizer.token_bytes is None
    tok = AutoTokenizer.from_pretrained(metaspace_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(metaspace_llama_dir, dtype=torch.float32).eval()
    text = "def main(self, value):"
    ids = tok(text, return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
    [(got, lp, _)], _ = run(engine, "sp", [prompt(engine, text)], SamplingParams(max_tokens=20, temperature=0.0, logprobs=0))
    full = tok.decode(torch.cat([ids[0], ref]), skip_special_tokens=True)
    assert text + got == full  # deltas keep the spaces a word-initial piece carries
    assert lp.text_offset == sorted(lp.text_offset)
    [(echoed, _, _)], _ = run(engine, "e", [prompt(engine, text)], SamplingParams(max_tokens=0, echo=True, logprobs=0))
    assert echoed == text


def test_grammar_masks_are_computed_during_the_forward(engine, monkeypatch):
    """Each constrained row's mask is made on the mask thread while the model runs, and changes nothing."""
    import threading

    from tokenmill.engine.engine import Engine
    from tokenmill.sampling_params import GrammarSpec

    params = SamplingParams(max_tokens=30, temperature=1.0, seed=3, n=2, best_of=3, grammar=GrammarSpec("regex", "[a-f]{3,12}( [0-9]{1,4})?"))
    made_on: list[str] = []
    compute = Engine._masks

    def recording(self, seqs, vocab):
        made_on.append(threading.current_thread().name)
        return compute(self, seqs, vocab)

    monkeypatch.setattr(Engine, "_masks", recording)
    ahead, _ = run(engine, "ahead", [prompt(engine, "x = ")], params)
    assert made_on and set(made_on) == {"tokenmill-masks"}, made_on
    monkeypatch.setattr(Engine, "_masks_ahead", lambda self, plan: None)
    made_on.clear()
    late, _ = run(engine, "late", [prompt(engine, "x = ")], params)
    assert set(made_on) == {threading.current_thread().name}
    assert ahead == late
    assert all(re.fullmatch("[a-f]{3,12}( [0-9]{1,4})?", text) for text, _, finish in ahead if finish == "stop")


def test_a_steps_logit_rows_reach_the_sampler_as_a_view_or_a_copy():
    logits = torch.randn(5, 11)
    view = stacked([logits[i] for i in range(1, 4)])
    assert torch.equal(view, logits[1:4]) and view.data_ptr() == logits[1].data_ptr()  # consecutive: no copy
    copy = stacked([logits[3], logits[1]])
    assert torch.equal(copy, logits[[3, 1]]) and copy.data_ptr() != logits[3].data_ptr()
    assert stacked([logits[0], torch.randn(5, 11)[1]]).shape == (2, 11)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_allocator_keeps_large_freed_blocks_on_glibc():
    assert host_memory.keep_freed_memory()
