"""Where an engine step's time goes in a closed loop's steady state: the linears, each compiled kernel, sampling, the rest.

    python -m tokenmill.benchmarks.breakdown --model DIR [--concurrency 1 16 64] [--input-len 256] [--output-len 128]

For each concurrency N: N requests in the engine, each replaced by a new one as it finishes; once N
have finished (the first burst of prompts is over), the steps until N more finish are timed. Every
linear, compiled kernel call and sampling call is timed where it is made. The linears run at the
rows and the speed they would run at alone, so their share of the wall time is the step's fraction
of its matmul ceiling. Where the engine runs every layer in one compiled call (engine/native_layers.py),
the loop goes on for four such parts, ABBA: A timed part by part through the Python loop (the same
kernels on the same rows), B as the engine runs, whole. (Alternating step by step was tried: at c1 one
step in 129 is a 256-row prompt, so whichever kind drew those came out ~25% slower.) Between the two
B parts, every linear of the first B part's steps runs alone, twice, at the rows it ran at there
(the compiled matmul called directly, in model order): the matmul ceiling of those steps. Its share
of B's step is the linears' share; A's linears, timed inside the Python loop, run slower than alone
(the second thread wakes for each one), so A's share would overstate it.
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
            for variant in (name, name + "_f16"):  # a float16 pool's kernels count as the same part
                if hasattr(library, variant):
                    setattr(self, variant, timer.wrap(name, getattr(library, variant)))

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
        for holder in [lean, *[part for layer in lean.layers for part in (layer.norm1, layer.norm2)], lean.norm]:
            if holder.kernel is not None:
                stack.enter_context(mock.patch.object(holder, "kernel", ops))
    for layer in lean.layers:
        if layer.store is not None:
            stack.enter_context(mock.patch.object(layer, "store", timer.wrap("rope_store", layer.store)))


Measured = tuple[Timer, int, float]  # the timer of the measured steps (empty where not instrumented), their count and wall seconds


class Rows:
    """Stands in for the engine's forward: passes every call through and keeps each step's (rows, kept rows)."""

    def __init__(self, forward: Any):
        self.forward = forward
        self.steps: list[tuple[int, int]] = []

    def __call__(self, ids, positions, keep, step, argmax=None):
        self.steps.append((ids.shape[0], keep.shape[0]))
        return self.forward(ids, positions, keep, step, argmax)


def linears_alone(forward: Any, steps: list[tuple[int, int]]) -> float:
    """Seconds for every linear of `steps` ((rows, kept rows) each) alone, as the one compiled call runs them: the
    compiled matmul called directly, layer by layer in model order, on inputs of random numbers; the last layer's
    output projection and MLP, and the lm_head, at the kept rows."""
    import torch

    from tokenmill.engine.llama_forward import SMALL_ROWS

    projections = [p for layer in forward.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    most = max(rows for rows, _ in steps)
    x = torch.randn(most, max(p.packed.in_features for p in projections))
    out = torch.empty(most, max(p.packed.width for p in [*projections, forward.lm_head]))
    threads = torch.get_num_threads()

    def run(p: Any, rows: int, step_rows: int) -> None:
        bias = None if p.packed.bias is None else p.packed.bias.data_ptr()
        shape = (rows, p.packed.width, p.packed.in_features, threads)
        if p.small is not None and step_rows <= SMALL_ROWS:  # as the one call runs a few rows without batch invariance
            p.small.small_matmul(x.data_ptr(), p.weight.data_ptr(), bias, out.data_ptr(), *shape)
        else:
            p.packed.kernel.matmul(x.data_ptr(), p.packed.packed.data_ptr(), bias, out.data_ptr(), *shape)

    tail = len(projections) - 3  # the last layer's o, gate_up and down
    start = time.perf_counter()
    for rows, kept in steps:
        for i, p in enumerate(projections):
            run(p, kept if i >= tail else rows, rows)
        run(forward.lm_head, kept, kept)
    return time.perf_counter() - start


Part = Callable[[ExitStack], Timer]  # sets up one measured part of the loop (undone when the stack closes): its timer


def steady_state(engine: Any, concurrency: int, args: argparse.Namespace, vocab: int, parts: list[Part]) -> list[Measured]:
    """Run the closed loop; after its first burst, one measured part for each of `parts`, one after another."""
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
    for part in parts:
        with ExitStack() as stack:
            timer = part(stack)
            start = time.perf_counter()
            steps = until_finished(concurrency)
            measured.append((timer, steps, time.perf_counter() - start))
    for request_id in list(engine.request_ids()):
        engine.abort(request_id)
    return measured


def instrumented(engine: Any) -> Part:
    """A part with every part of a step timed (through the Python loop where the engine has the one call)."""

    def part(stack: ExitStack) -> Timer:
        timer = Timer()
        instrument(engine, timer, stack)
        return timer

    return part


def plain(stack: ExitStack) -> Timer:
    """A part as the engine runs, timed whole."""
    return Timer()


def both_ways(engine: Any, concurrency: int, args: argparse.Namespace, vocab: int) -> tuple[Measured, Measured]:
    """Where the engine runs its layers in one compiled call: two parts of the loop timed part by part through the Python
    loop (A) and two as the engine runs (B), ABBA (the machine's speed drifts), each kind's two added up; between the
    B parts, the first one's linears alone twice (B's timer holds them as "linears", both sweeps added up)."""
    runner = engine.runner
    forward = runner.lean
    ceiling = Timer()

    def recorded(stack: ExitStack) -> Timer:  # the first B part: its steps' rows are kept
        rows = Rows(forward)

        def sweeps() -> None:  # run when the part ends, before the second B part starts
            ceiling.seconds["linears"] = linears_alone(forward, rows.steps * 2)

        stack.enter_context(mock.patch.object(runner, "lean", rows))
        stack.callback(sweeps)
        return Timer()

    first, plain1, plain2, last = steady_state(engine, concurrency, args, vocab, [instrumented(engine), recorded, plain, instrumented(engine)])
    timer = first[0]
    for part, seconds in last[0].seconds.items():
        timer.seconds[part] += seconds
    # the ceiling's two sweeps ran plain1's steps twice: as many steps as the two B parts' in all, near enough
    ceiling.seconds["linears"] *= (plain1[1] + plain2[1]) / (2 * plain1[1])
    return (timer, first[1] + last[1], first[2] + last[2]), (ceiling, plain1[1] + plain2[1], plain1[2] + plain2[2])


def table(rows: dict[int, Measured], output_len: int, native: dict[int, Measured] | None = None) -> str:
    """One column per concurrency: ms per step and share of the wall time of each part (native: the one-call loops)."""
    parts = ["linears", *KERNELS, "sampling"]
    head = "| part | " + " | ".join(f"c{c} ms/step (share)" for c in rows) + " |"
    lines = [head, "|---|" + "---|" * len(rows)]
    passes = 2 if native else 1  # both_ways adds up two passes of each kind
    lines.append("| whole step | " + " | ".join(_rate(c, *(native or rows)[c][1:], output_len, passes) for c in rows) + " |")
    if native:  # the linears alone against the engine's own step; the parts below are shares of the Python loop's step
        alone = [native[c][0].seconds["linears"] / native[c][1] * 1000 for c in rows]
        lines.append("| linears alone at the step's rows (the matmul ceiling) | " + " | ".join(f"{ms:.2f}" for ms in alone) + " |")
        share = [native[c][0].seconds["linears"] / native[c][2] for c in rows]
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
            rows[c] = steady_state(engine, c, args, vocab, [instrumented(engine)])[0]
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
