"""Where an engine step's time goes in a closed loop's steady state: the linears, each compiled kernel, sampling, the rest.

    python -m tokenmill.benchmarks.breakdown --model DIR [--concurrency 1 16 64] [--input-len 256] [--output-len 128]

For each concurrency N: N requests in the engine, each replaced by a new one as it finishes; once N
have finished (the first burst of prompts is over), the steps until N more finish are timed. Every
linear, compiled kernel call and sampling call is timed where it is made. The linears run at the
rows and the speed they would run at alone, so their share of the wall time is the step's fraction
of its matmul ceiling. Where the engine runs every layer in one compiled call (engine/native_layers.py),
the loop goes on for four such parts, ABBA: A timed part by part through the Python loop (the same
kernels on the same rows), B as the engine runs, whole. (Alternating step by step was tried: at c1 one
step in 129 is a 256-row prompt, so whichever kind drew those came out ~25% slower.)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any
from unittest import mock

from tokenmill.benchmarks import workload
from tokenmill.config import EngineConfig, add_options

KERNELS = ("paged_decode", "paged_prefill", "rope_store", "add_rms_norm")


class Timer:
    """Seconds spent in each named part."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, function: Callable) -> Callable:
        """function, timed under `name`."""

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


class TimedLibrary:
    """A compiled kernel library whose kernels are timed; anything else passes through."""

    def __init__(self, library: Any, timer: Timer):
        self._library = library
        for name in KERNELS:
            if hasattr(library, name):
                setattr(self, name, timer.wrap(name, getattr(library, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._library, name)


def instrument(engine: Any, timer: Timer, stack: ExitStack) -> None:
    """Time the engine's model runs, linears, kernels and sampling (undone when `stack` closes)."""
    from tokenmill.engine import engine as engine_module
    from tokenmill.engine import llama_forward

    runner = engine.runner
    stack.enter_context(mock.patch.object(runner, "execute", timer.wrap("model", runner.execute)))
    stack.enter_context(mock.patch.object(engine_module, "sample", timer.wrap("sampling", engine_module.sample)))
    if getattr(runner.backend, "library", None) is not None:
        stack.enter_context(mock.patch.object(runner.backend, "library", TimedLibrary(runner.backend.library, timer)))
    lean = runner.lean
    if lean is not None and lean.native is not None:  # the one compiled call has no parts to time: the Python loop's calls do
        stack.enter_context(mock.patch.object(lean, "native", None))
    if lean is None:  # transformers' modules: every matmul layer's forward (nn.Linear, GPT-2's Conv1D)
        import torch

        for module in runner.model.modules():
            if type(module) is torch.nn.Linear or type(module).__name__ == "Conv1D":
                stack.enter_context(mock.patch.object(module, "forward", timer.wrap("linears", module.forward)))
        return
    stack.enter_context(mock.patch.object(llama_forward.Projection, "__call__", timer.wrap("linears", llama_forward.Projection.__call__)))
    if lean.kernel is not None:
        ops = TimedLibrary(lean.kernel, timer)
        for holder in [lean, *[part for layer in lean.layers for part in (layer, layer.norm1, layer.norm2)], lean.norm]:
            if holder.kernel is not None:
                stack.enter_context(mock.patch.object(holder, "kernel", ops))


Measured = tuple[Timer, int, float]  # the timer of the measured steps (empty where not instrumented), their count and wall seconds


def steady_state(engine: Any, concurrency: int, args: argparse.Namespace, vocab: int, kinds: tuple[bool, ...] = (True,)) -> list[Measured]:
    """Run the closed loop; after its first burst, one measured part per kind, one after another (True: every part
    timed, through the Python loop; False: nothing instrumented, the layers as the engine runs them)."""
    # other prompts than the last run's: no cache hits
    add = workload.request_adder(engine, f"{args.seed}:{concurrency}", vocab, args.input_len, args.output_len, f"c{concurrency}")

    def until_finished(count: int) -> int:
        steps = finished = 0
        while finished < count:
            for out in engine.step():
                if out.finished:
                    finished += 1
                    add()
            steps += 1
        return steps

    for _ in range(concurrency):
        add()
    until_finished(concurrency)
    measured = []
    for timed in kinds:
        timer = Timer()
        with ExitStack() as stack:
            if timed:
                instrument(engine, timer, stack)
            start = time.perf_counter()
            steps = until_finished(concurrency)
            measured.append((timer, steps, time.perf_counter() - start))
    for request_id in list(engine.request_ids()):
        engine.abort(request_id)
    return measured


def both_ways(engine: Any, concurrency: int, args: argparse.Namespace, vocab: int) -> tuple[Measured, Measured]:
    """Where the engine runs its layers in one compiled call: two parts of the loop timed part by part through the Python
    loop and two as the engine runs, in the order ABBA (the machine's speed drifts); each kind's two added up."""
    first, plain1, plain2, last = steady_state(engine, concurrency, args, vocab, (True, False, False, True))
    timer = first[0]
    for part, seconds in last[0].seconds.items():
        timer.seconds[part] += seconds
    return (timer, first[1] + last[1], first[2] + last[2]), (Timer(), plain1[1] + plain2[1], plain1[2] + plain2[2])


def table(rows: dict[int, Measured], output_len: int, native: dict[int, Measured] | None = None) -> str:
    """One column per concurrency: ms per step and share of the wall time of each part (native: the one-call loops)."""
    parts = ["linears", *KERNELS, "sampling"]
    head = "| part | " + " | ".join(f"c{c} ms/step (share)" for c in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]
    passes = 2 if native else 1  # both_ways adds up two passes of each kind
    lines.append("| whole step | " + " | ".join(_rate(c, *(native or rows)[c][1:], output_len, passes) for c in rows) + " |")
    if native:  # the parts below are shares of the Python loop's step; the linears' also of the engine's own
        share = [rows[c][0].seconds["linears"] / rows[c][1] / (native[c][2] / native[c][1]) for c in rows]
        lines.append("| linears' share of the whole step | " + " | ".join(f"{x:.0%}" for x in share) + " |")
        cells = [_rate(c, n, s, output_len, passes) for c, (_, n, s) in rows.items()]
        lines.append("| whole step, layers in Python (the parts below) | " + " | ".join(cells) + " |")
    timed = {part for timer, _, _ in rows.values() for part, seconds in timer.seconds.items() if seconds}
    for part in [p for p in parts if p in timed] + ["rest of the model run", "engine outside the model"]:
        cells = []
        for timer, steps, seconds in rows.values():
            t = timer.seconds
            if part == "rest of the model run":
                value = t["model"] - sum(t[p] for p in parts if p != "sampling")
            elif part == "engine outside the model":
                value = seconds - t["model"] - t["sampling"]
            else:
                value = t.get(part, 0.0)
            cells.append(f"{value / steps * 1000:.2f} ({value / seconds:.0%})")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rate(concurrency: int, steps: int, seconds: float, output_len: int, passes: int) -> str:
    """ms per step (output tok/s: a pass of the loop makes about concurrency x output_len tokens)."""
    return f"{seconds / steps * 1000:.2f} ({passes * concurrency * output_len / seconds:.1f} out tok/s)"


def run(args: argparse.Namespace) -> int:
    from tokenmill.benchmarks.offline import load_for

    loaded = load_for(args)
    if loaded is None:
        return 1
    _, engine, path, vocab = loaded
    rows, native = {}, {}
    for c in args.concurrency:
        if engine.runner.lean is not None and engine.runner.lean.native is not None:
            rows[c], native[c] = both_ways(engine, c, args, vocab)
        else:
            rows[c] = steady_state(engine, c, args, vocab)[0]
    print(f"{path}: {args.input_len} random ids -> {args.output_len} tokens, greedy, ignore_eos; steady state of a closed loop")
    print(table(rows, args.output_len, native))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.breakdown", description=__doc__.splitlines()[0])
    add_options(parser, EngineConfig)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="requests kept in the engine")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens of every request (ignore_eos)")
    parser.add_argument("--vocab-size", type=int, default=None, help="draw ids below this (default: the model's config.json)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
