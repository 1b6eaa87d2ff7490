"""Random prompts of a given length: token ids, or text decoded from random ids."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOW_IDS = 100  # special and control tokens usually sit at the start of a vocabulary
TEXT_ROUNDS = 10  # decode/encode rounds to reach a text prompt's length


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a model directory (transformers loads only here)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def config_vocab(path: str) -> int | None:
    """vocab_size from a model directory's config.json, if it has one."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("vocab_size")


def tokenizer_vocab(path: str, tokenizer) -> int:
    """Ids every layer accepts: the smaller of the model's vocabulary and the tokenizer's."""
    sizes = [n for n in (config_vocab(path), len(tokenizer)) if n]
    return min(sizes)


def id_pool(vocab: int, tokenizer=None) -> list[int]:
    """The ids prompts are drawn from: no low ids, no special tokens."""
    low = LOW_IDS if vocab > 2 * LOW_IDS else 0
    special = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    return [i for i in range(low, vocab) if i not in special]


def id_prompts(rng: random.Random, pool: list[int], count: int, length: int) -> list[list[int]]:
    """`count` prompts of exactly `length` random ids."""
    return [[rng.choice(pool) for _ in range(length)] for _ in range(count)]


def text_prompt(rng: random.Random, pool: list[int], tokenizer, length: int) -> str:
    """Text that encodes to about `length` tokens (decoded random ids rarely encode back 1:1)."""
    ids: list[int] = []
    for _ in range(TEXT_ROUNDS):
        ids += [rng.choice(pool) for _ in range(length - len(ids))]
        ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)
        if len(ids) >= length:
            break
    return tokenizer.decode(ids[:length])


def prompts(rng: random.Random, pool: list[int], count: int, length: int, tokenizer=None) -> list:
    """Id prompts, or text prompts when a tokenizer is given."""
    if tokenizer is None:
        return id_prompts(rng, pool, count, length)
    return [text_prompt(rng, pool, tokenizer, length) for _ in range(count)]


def request_adder(engine: Any, seed: str, vocab: int, input_len: int, output_len: int, prefix: str) -> Callable[[], None]:
    """add(): one more request into the engine (its id `prefix`-n): input_len random ids -> output_len tokens, greedy, ignore_eos."""
    from tokenmill.sampling_params import Prompt, SamplingParams

    rng, pool = random.Random(seed), id_pool(vocab)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    added = 0

    def add() -> None:
        nonlocal added
        engine.add_request(f"{prefix}-{added}", [Prompt(tuple(id_prompts(rng, pool, 1, input_len)[0]))], params)
        added += 1

    return add
