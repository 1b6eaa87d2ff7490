"""Two versions of one compiled kernel library, A/B on the same engine forwards: replayed, alternated, bits compared.

    python -m tokenmill.benchmarks.kernel_ab --model DIR --library matmul --a A.cpp --b B.cpp [--concurrency 16 64]
    python -m tokenmill.benchmarks.kernel_ab --model DIR --library layers [--concurrency 1 16 64]

For each concurrency N, N requests run in a closed loop (as in `benchmarks.breakdown`). After the first
burst of prompts, the next decode-only step and the next step with prompt rows are each run again
`--rounds` times, A and B in turn (ABBA), with the same inputs over the same pool, and every run's logits
must equal the engine's own. On a machine whose speed drifts by tens of percent within minutes, only
alternated runs of one forward show a change of a few percent. Llama-family models on the CPU (the
forward that calls the compiled kernels). For `--library matmul` the weights are packed once for each
version, so two builds whose panels differ in width compare too. `--library layers` compares no sources:
A runs every layer through the Python loop, B in one compiled call (engine/native_layers.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tokenmill.benchmarks import workload
from tokenmill.config import EngineConfig, add_options

LIBRARIES = ("matmul", "paged_attention", "llama_ops")
LAYERS = "layers"  # not a library: the Python loop over the layers (A) against the one compiled call (B)


def swap(root: Any, old: Any, new: Any, seen: set[int] | None = None) -> None:
    """Point every attribute (or list item) under root's tokenmill objects that holds `old` at `new`."""
    seen = set() if seen is None else seen
    if id(root) in seen:
        return
    seen.add(id(root))
    if isinstance(root, list):
        children, put = list(enumerate(root)), root.__setitem__
    elif type(root).__module__.startswith("tokenmill.") or type(root).__module__ == __name__:  # not torch modules, tensors or libraries
        # (__name__: run as `python -m`, this module's Capture, which holds the forward during a replay, is __main__'s)
        children, put = list(getattr(root, "__dict__", {}).items()), lambda key, value: setattr(root, key, value)
    else:
        return
    for key, value in children:
        if value is old:
            put(key, new)
        else:
            swap(value, old, new, seen)


class Capture:
    """Stands in for the engine's forward: passes every call through, keeps the first of each kind once armed."""

    def __init__(self, forward: Any):
        self.forward, self.armed = forward, False
        self.calls: dict[str, tuple] = {}

    def __call__(self, ids, positions, keep, step, argmax=None):
        logits = self.forward(ids, positions, keep, step, argmax)
        kind = "prompt rows" if step.chunks else "decode only"
        if self.armed and kind not in self.calls:
            self.calls[kind] = (ids, positions, keep, step, argmax, logits.clone())
        return logits


def replay(forward: Any, call: tuple, use: Any, rounds: int) -> tuple[list[float], list[float]]:
    """One captured forward run `rounds` times with A and with B (ABBA): each one's seconds. Asserts the bits."""
    ids, positions, keep, step, argmax, want = call
    import torch

    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            use(k)
            start = time.perf_counter()
            got = forward(ids, positions, keep, step, argmax)
            times[k].append(time.perf_counter() - start)
            if not torch.equal(got, want):
                raise AssertionError(f"{'AB'[k]} gives other logits than the engine's own: the builds must give the same bits")
    return times


def library_swap(runner: Any, libraries: list[Any]) -> Any:
    """use(k): the runner calls libraries[k] from then on."""
    current = [libraries[0]]

    def use(k: int) -> None:
        if current[0] is not libraries[k]:
            swap(runner, current[0], libraries[k])
            current[0] = libraries[k]

    return use


def matmul_versions(forward: Any, shipped: Any, libraries: list[Any]) -> Any:
    """use(k): every packed linear of the forward (packed by `shipped`), and its layers' one compiled call, on libraries[k]
    with the weights packed for it: the versions may pack panels of different widths (a copy of the weights for each)."""
    import torch

    from tokenmill.engine.linear import PackedLinear, unpack
    from tokenmill.engine.llama_forward import SMALL_ROWS
    from tokenmill.engine.native_layers import NativeLayers

    projections = [p for layer in forward.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [forward.lm_head]
    halves = [p.packed.halves for p in projections]
    width = shipped.matmul_panel_width()
    weights = [unpack(p.packed.packed, p.packed.out_features, p.packed.in_features, width, h) for p, h in zip(projections, halves, strict=True)]
    attention, kv = forward.native.attention, torch.float16 if forward.native.kv_half else torch.float32
    versions = []
    for lib in libraries:
        for p, weight, h in zip(projections, weights, halves, strict=True):
            p.packed = PackedLinear(weight, p.bias, lib, halves=h)  # p.bias: the unpadded one
        versions.append(([p.packed for p in projections], NativeLayers.build(forward, attention, SMALL_ROWS, kv)))

    def use(k: int) -> None:
        packs, native = versions[k]
        for p, packed in zip(projections, packs, strict=True):
            p.packed = packed
        forward.native = native

    use(0)
    return use


def layers_switch(forward: Any) -> Any:
    """use(k): the forward runs its layers through the Python loop (0) or in one compiled call (1)."""
    native = forward.native

    def use(k: int) -> None:
        forward.native = native if k else None

    return use


def measure(engine: Any, use: Any, concurrency: int, args: argparse.Namespace, vocab: int) -> list[str]:
    """The table rows of one concurrency: each kind of step, A's and B's median ms, B / A. use(k): run version k from now."""
    runner = engine.runner
    forward = runner.lean
    add = workload.request_adder(engine, f"{args.seed}:{concurrency}", vocab, args.input_len, args.output_len, f"ab{concurrency}")
    capture = runner.lean = Capture(forward)
    rows = []
    try:
        for _ in range(concurrency):
            add()
        finished = 0
        while len(capture.calls) < 2 and finished < 3 * concurrency + 8:
            done = len(capture.calls)
            for out in engine.step():
                if out.finished:
                    finished += 1
                    add()
            capture.armed = finished >= concurrency  # past the first burst
            if len(capture.calls) > done:  # replay now, before later steps reuse its blocks
                kind = list(capture.calls)[-1]
                a, b = replay(forward, capture.calls[kind], use, args.rounds)
                ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
                rows.append(f"| c{concurrency} | {kind} | {capture.calls[kind][0].shape[0]} | {ma:.2f} | {mb:.2f} | {mb / ma:.3f} |")
                use(0)
    finally:
        runner.lean = forward
        use(0)
        for request_id in list(engine.request_ids()):
            engine.abort(request_id)
    return rows


def run(args: argparse.Namespace) -> int:
    from tokenmill.benchmarks.offline import load_for
    from tokenmill.engine import native

    loaded = load_for(args)
    if loaded is None:
        return 1
    _, engine, path, vocab = loaded
    if engine.runner.lean is None or engine.runner.lean.kernel is None:
        print(f"tokenmill: error: {path} does not run the compiled llama forward here (a llama-family model, float32, on the CPU)", file=sys.stderr)
        return 1
    if args.library == LAYERS:
        if engine.runner.lean.native is None:
            print("tokenmill: error: the engine does not run its layers in one compiled call here", file=sys.stderr)
            return 1
        print(f"{path}: A = every layer through the Python loop, B = in one compiled call; {args.rounds} runs each of one forward, ABBA, median ms")
        return _table(engine, layers_switch(engine.runner.lean), args, vocab)
    if args.a is None or args.b is None:
        print("tokenmill: error: --a and --b are required for a library", file=sys.stderr)
        return 1
    cache = Path(args.kernel_cache)
    libraries = [native.load(args.library, cache, Path(source).read_text()) for source in (args.a, args.b)]
    if any(lib is None for lib in libraries):
        print("tokenmill: error: a build failed (see the log)", file=sys.stderr)
        return 1
    packed = engine.runner.lean.lm_head.packed
    shipped = {"matmul": packed and packed.kernel, "paged_attention": getattr(engine.runner.backend, "library", None), "llama_ops": engine.runner.lean.kernel}
    if shipped[args.library] is None:
        print(f"tokenmill: error: the engine runs without the {args.library} library here", file=sys.stderr)
        return 1
    print(f"{path}: {args.library}, A = {args.a}, B = {args.b}; {args.rounds} runs each of one forward, ABBA, median ms")
    repacked = None  # for the matmul, the weights packed for each version (before the swap: they are read back by the shipped build's width)
    if args.library == "matmul" and engine.runner.lean.native is not None:
        repacked = matmul_versions(engine.runner.lean, shipped["matmul"], libraries)
    swap(engine.runner, shipped[args.library], libraries[0])
    return _table(engine, repacked or library_swap(engine.runner, libraries), args, vocab)


def _table(engine: Any, use: Any, args: argparse.Namespace, vocab: int) -> int:
    """Print the A/B table, a row per concurrency and kind of step."""
    print("| concurrency | step | rows | A | B | B / A |\n|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        print("\n".join(measure(engine, use, concurrency, args, vocab)), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.kernel_ab", description=__doc__.splitlines()[0])
    add_options(parser, EngineConfig)
    parser.add_argument(
        "--library", choices=[*LIBRARIES, LAYERS], required=True, help=f"which compiled library the sources are versions of ({LAYERS}: none, see above)"
    )
    parser.add_argument("--a", help="the C++ source of version A (for instance the shipped src/tokenmill/engine/csrc/<library>.cpp)")
    parser.add_argument("--b", help="the C++ source of version B")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64], help="requests kept in the engine")
    parser.add_argument("--rounds", type=int, default=30, help="runs of each captured forward with each version")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens of every request (ignore_eos)")
    parser.add_argument("--vocab-size", type=int, default=None, help="draw ids below this (default: the model's config.json)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    parser.add_argument("--kernel-cache", default="/tmp/tokenmill-kernel-ab", help="where the two builds go")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
