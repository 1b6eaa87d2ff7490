"""tiktoken vs the Hugging Face tokenizer on the same text, in one run.

    python -m tokenmill.benchmarks.tokenizer [--model DIR] [--repeat 5]

Prints a Markdown table: the best of --repeat timings for each encoder on a large text (Python's
standard library sources) and on many short prompts, and whether the ids were identical.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import sysconfig
import time
from collections.abc import Callable

Encode = Callable[[str], list[int]]  # text -> token ids


def corpus() -> str:
    """About 4.7 MB of Python source, the same on every machine with this Python."""
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return "".join(open(p, encoding="utf-8").read() for p in paths)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of `repeat` runs, in seconds (the least disturbed by a noisy machine)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the cached default model, fetched if needed)")
    parser.add_argument("--repeat", type=int, default=5, help="timings per case; the best counts")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread each, a fair comparison
    from transformers import AutoTokenizer

    from tokenmill.models.cache import ModelCache, default_home
    from tokenmill.models.sources import resolve
    from tokenmill.tokenizer import Tokenizer

    path = args.model or resolve(None, ModelCache(default_home())).path
    hf = AutoTokenizer.from_pretrained(path)
    fast = Tokenizer(hf)
    assert fast.name == "tiktoken", "this tokenizer has no tiktoken form"
    text = corpus()
    prompts = [text[i : i + 120] for i in range(0, 120 * 2000, 120)]
    cases: dict[str, Callable[[Encode], list]] = {
        f"{len(text) / 1e6:.1f} MB of Python source, one call": lambda enc: enc(text),
        "2,000 prompts of 120 characters, one call each": lambda enc: [enc(p) for p in prompts],
    }
    encoders: dict[str, Encode] = {"Hugging Face (transformers)": lambda t: hf.encode(t), "tiktoken (tokenmill)": fast.encode}
    print(f"model: {path}\n\n| text | encoder | best of {args.repeat} | tokens/s | same ids |\n|---|---|---|---|---|")
    for label, case in cases.items():
        reference = case(encoders["Hugging Face (transformers)"])
        tokens = len(reference) if isinstance(reference[0], int) else sum(map(len, reference))
        for name, enc in encoders.items():
            seconds = best_time(functools.partial(case, enc), args.repeat)
            same = case(enc) == reference
            print(f"| {label} | {name} | {seconds * 1e3:.0f} ms | {tokens / seconds / 1e6:.2f} M | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
