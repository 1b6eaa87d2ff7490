"""Compile time and per-step mask cost of llguidance and (when installed) xgrammar, on one model's vocabulary.

    python -m tokenmill.benchmarks.grammar_libraries --model ~/.cache/tokenmill/models/SmolLM2-135M-Instruct

Each library compiles the same JSON schema and is walked through the tokens of one valid output,
timing the mask of every step. xgrammar is not a dependency: `pip install xgrammar` to compare.
"""

from __future__ import annotations

import argparse
import json
import time

from tokenmill.benchmarks.serve import SCHEMA  # the structured workload's record

OUTPUT = '{"name":"Ada Lovelace","age":36,"tags":["math","poetry","engines"]}'


def walk(fill, accept, ids: list[int]) -> tuple[list[float], int]:
    """Mask times per step along `ids`, and how many tokens were accepted before one was refused."""
    times = []
    for n, token in enumerate(ids):
        started = time.perf_counter()
        fill()
        times.append(time.perf_counter() - started)
        if not accept(token):
            return times, n
    return times, len(ids)


def llguidance_row(hf, ids: list[int]) -> str:
    import llguidance
    import llguidance.hf
    import torch

    started = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf)
    vocab_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    compile_s = time.perf_counter() - started
    mask = torch.zeros((1, (tokenizer.vocab_size + 31) // 32), dtype=torch.int32)
    times, accepted = walk(lambda: matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4), matcher.consume_token, ids)
    return _row("llguidance", vocab_s, compile_s, times, accepted, len(ids))


def xgrammar_row(hf, ids: list[int]) -> str:
    try:
        import xgrammar
    except ImportError:
        return "| xgrammar | not installed | | | |"
    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
    compiler = xgrammar.GrammarCompiler(info)
    vocab_s = time.perf_counter() - started
    started = time.perf_counter()
    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")))
    compile_s = time.perf_counter() - started
    mask = xgrammar.allocate_token_bitmask(1, len(hf))
    times, accepted = walk(lambda: matcher.fill_next_token_bitmask(mask), matcher.accept_token, ids)
    return _row("xgrammar", vocab_s, compile_s, times, accepted, len(ids))


def _row(name: str, vocab_s: float, compile_s: float, times: list[float], accepted: int, total: int) -> str:
    mean = sum(times) / len(times) * 1e3
    return f"| {name} | {vocab_s * 1e3:.0f} ms | {compile_s * 1e3:.1f} ms | {mean:.3f} ms (max {max(times) * 1e3:.3f}) | {accepted} of {total} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory (its tokenizer is used)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(args.model)
    ids = hf.encode(OUTPUT, add_special_tokens=False)
    print("| library | vocabulary, once | compile the schema | mask per step, mean | valid output's tokens accepted |\n|---|---|---|---|---|")
    print(llguidance_row(hf, ids))
    print(xgrammar_row(hf, ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
