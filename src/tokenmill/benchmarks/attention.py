"""Decode attention alone: the compiled kernel against the torch ops, over a pool laid out as the engine lays it out.

    python -m tokenmill.benchmarks.attention [--sequences 64] [--min-len 256] [--max-len 384] [--layers 30]

Each sequence's blocks are scattered over a pool of `--layers` layers (SmolLM2's shape by default:
3 kv heads, 3 query heads each, head size 64, 16-token blocks), and one timed step runs every layer
once, as a decode step does, so keys and values come from memory rather than from cache. The same
step runs on the pool as float16 too (`--kv-cache-dtype float16`), where the kernels take it. Reports
ms per step for each, best and median of `--repeat` steps taken in turn, and how far their outputs are apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tokenmill.engine import native
from tokenmill.engine.attention import VALUE_CHUNK, NativeAttention, StepContext, TorchAttention, Workspace, visibility


def layout(args: argparse.Namespace) -> tuple[torch.Tensor, StepContext]:
    """A random pool [layers, 2, KVH, NB + 1, BS, D], and the step context of one generated position per sequence."""
    gen = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.sequences,), generator=gen)
    width = -(-args.max_len // VALUE_CHUNK) * VALUE_CHUNK // args.block_size
    num_blocks = args.sequences * width
    pool = torch.randn(args.layers, 2, args.kv_heads, num_blocks + 1, args.block_size, args.head_dim, generator=gen)
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((args.sequences, width), num_blocks, dtype=torch.long)  # padding points at the last block
    for b, n in enumerate(lens.tolist()):
        need = -(-n // args.block_size)
        tables[b, :need] = order[b * width : b * width + need]
    bias = visibility(lens - 1, width * args.block_size, torch.float32)[:, None, :]
    step = StepContext(pool, torch.zeros(0, dtype=torch.long), args.sequences, tables, bias, lens, workspace=Workspace(torch.float32, torch.device("cpu")))
    return pool, step


def time_step(backend, query: torch.Tensor, pool: torch.Tensor, step: StepContext) -> tuple[float, torch.Tensor]:
    """ms for one step (every layer once), and the last layer's output."""
    scale = query.shape[-1] ** -0.5
    start = time.perf_counter()
    for layer in range(pool.shape[0]):
        step.memo.clear()
        out = backend._decode(query, pool[layer], step, scale)
    return (time.perf_counter() - start) * 1000, out


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as cache:
        library = native.load_paged_attention(Path(cache))
        if library is None:
            print("tokenmill: error: the kernel could not be compiled (is g++ installed?)", file=sys.stderr)
            return 1
        pool, step = layout(args)
        query = torch.randn(args.kv_heads * args.group, args.sequences, args.head_dim, generator=torch.Generator().manual_seed(args.seed + 1))
        runs = {"torch ops": (TorchAttention(), pool), "compiled kernel": (NativeAttention(library), pool)}
        if hasattr(library, "paged_decode_f16"):
            runs["compiled kernel, float16 pool"] = (NativeAttention(library), pool.half())
        outs = {name: time_step(backend, query, kv, step)[1] for name, (backend, kv) in runs.items()}  # untimed first steps
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeat):  # in turn, so a drifting machine weighs on each alike
            for name, (backend, kv) in runs.items():
                times[name].append(time_step(backend, query, kv, step)[0])
    print(
        f"{args.sequences} sequences of {args.min_len}-{args.max_len} keys, {args.layers} layers, {args.kv_heads} kv heads x {args.group} queries,"
        f" head size {args.head_dim}, {torch.get_num_threads()} threads"
    )
    print("| backend | best ms/step | median ms/step |\n|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {min(ms):.1f} | {statistics.median(ms):.1f} |")
    if "compiled kernel, float16 pool" in outs:
        diff = (outs["compiled kernel, float16 pool"] - outs["compiled kernel"]).abs().max().item()
        print(f"largest difference the float16 pool makes to the kernel's output: {diff:.2e}")
    diff = (outs["torch ops"] - outs["compiled kernel"]).abs().max().item()
    print(f"largest difference of the torch ops and the kernel (float32 pool) between them: {diff:.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.attention", description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=64, help="generated positions in the step")
    parser.add_argument("--min-len", type=int, default=256, help="fewest keys a sequence sees")
    parser.add_argument("--max-len", type=int, default=384, help="most keys a sequence sees")
    parser.add_argument("--layers", type=int, default=30, help="layers of the pool, each read once a step")
    parser.add_argument("--kv-heads", type=int, default=3, help="key/value heads")
    parser.add_argument("--group", type=int, default=3, help="query heads per key/value head")
    parser.add_argument("--head-dim", type=int, default=64, help="head size")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps")
    parser.add_argument("--seed", type=int, default=0, help="seeds the pool, the tables and the queries")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
