"""`tokenmill bench ceiling`: how fast one decode step could be here, from its matmuls alone.

    tokenmill bench ceiling [--model DIR] [--rows 1 16 64] [--repeat 5]

For each M in --rows, every matmul module of the model (nn.Linear, lm_head included, and GPT-2's
Conv1D, which computes the same x @ W + b) runs alone on a random [M, in_features] float32 input;
their times summed are one step's matmul time. Each sweep calls every module once, in model order, so
weights leave the cache between uses as in a real step; each module's best of --repeat sweeps counts
(after one untimed sweep), so a busy machine's hiccup in one module does not spoil the rest.
Attention, norms, the embedding lookup and sampling are left out: a real step is slower.
tok/s = M / step time. At batch 1 a step must also read every weight once; the memory floor is
weight bytes / the machine's copy rate. Torch keeps its default thread count.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for annotations only; each function imports torch when it runs
    import torch

COPY_MIB = 256


def matmul_modules(model) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, module, in_features) for every nn.Linear and Conv1D, in model order."""
    import torch
    from transformers.pytorch_utils import Conv1D

    found: list[tuple[str, torch.nn.Module, int]] = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            found.append((name, module, module.in_features))
        elif isinstance(module, Conv1D):  # weight is [in, out]
            found.append((name, module, module.weight.shape[0]))
    return found


def weight_bytes(modules: list[tuple[str, torch.nn.Module, int]]) -> int:
    """Bytes of the matmul weights and biases, each tensor once (a tied lm_head shares the embedding's)."""
    tensors = {p.data_ptr(): p for _, m, _ in modules for p in m.parameters(recurse=False)}
    return sum(p.numel() * p.element_size() for p in tensors.values())


def sweep(modules: list[tuple[str, torch.nn.Module, int]], inputs: dict) -> dict[str, float]:
    """Each module once, on its input, timed alone: seconds by module name."""
    times = {}
    for name, module, features in modules:
        started = time.perf_counter()
        module(inputs[features])
        times[name] = time.perf_counter() - started
    return times


def step_times(modules: list[tuple[str, torch.nn.Module, int]], rows: int, repeat: int) -> dict[str, float]:
    """Each module's fastest time over `repeat` sweeps at M = rows (after one untimed sweep)."""
    import torch

    inputs = {f: torch.randn(rows, f) for f in {features for _, _, features in modules}}
    with torch.inference_mode():
        sweep(modules, inputs)
        sweeps = [sweep(modules, inputs) for _ in range(repeat)]
    return {name: min(times[name] for times in sweeps) for name in sweeps[0]}


def by_kind(times: dict[str, float]) -> dict[str, float]:
    """Milliseconds per kind of module, layer numbers folded (model.layers.*.mlp.up_proj)."""
    kinds: dict[str, float] = {}
    for name, seconds in times.items():
        kind = re.sub(r"\.\d+\.", ".*.", name)
        kinds[kind] = kinds.get(kind, 0.0) + seconds * 1e3
    return kinds


def copy_rate(mib: int, repeat: int) -> float:
    """Bytes/s of dst.copy_(src) on float32 tensors of `mib` MiB, counting bytes read plus bytes written."""
    import torch

    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best


def measure(path: str, rows: list[int], repeat: int, copy_mib: int = COPY_MIB) -> dict:
    """Everything the command reports, as a dict."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    modules = matmul_modules(model)
    weights = weight_bytes(modules)
    steps = {m: step_times(modules, m, repeat) for m in rows}
    rate = copy_rate(copy_mib, repeat)
    return {
        "model": path,
        "parameters": sum(p.numel() for p in model.parameters()),
        "matmul_modules": len(modules),
        "matmul_weight_bytes": weights,
        "torch_threads": torch.get_num_threads(),
        "repeat": repeat,
        "rows": [{"m": m, "step_ms": sum(t.values()) * 1e3, "tok_s": m / sum(t.values()), "by_kind_ms": by_kind(t)} for m, t in steps.items()],
        "copy": {"mib": copy_mib, "bytes_per_s": rate, "counts": "bytes read + bytes written"},
        "floor_batch1": {"step_ms": weights / rate * 1e3, "tok_s": rate / weights},
    }


def format_report(r: dict) -> str:
    """A Markdown table of the ceiling per M, then the copy rate and the batch-1 memory floor."""
    lines = [
        f"model: {r['model']}: {r['parameters'] / 1e6:.1f}M parameters, {r['matmul_modules']} matmul modules"
        f" (lm_head included), {r['matmul_weight_bytes'] / 1e6:.1f} MB of float32 matmul weights;"
        f" torch threads: {r['torch_threads']}, best of {r['repeat']}",
        "",
        "| rows M | matmul ms/step | tok/s (M / step) | lm_head ms |",
        "|---|---|---|---|",
    ]
    for row in r["rows"]:
        head = row["by_kind_ms"].get("lm_head")
        lines.append(f"| {row['m']} | {row['step_ms']:.2f} | {row['tok_s']:.1f} | {'-' if head is None else f'{head:.2f}'} |")
    c, f = r["copy"], r["floor_batch1"]
    lines += [
        "",
        f"copy rate: {c['bytes_per_s'] / 1e9:.1f} GB/s (dst.copy_(src), {c['mib']} MiB float32, best of {r['repeat']}; bytes read + bytes written per second)",
        f"memory floor at batch 1: {r['matmul_weight_bytes'] / 1e6:.1f} MB of weights at that rate ="
        f" {f['step_ms']:.2f} ms/step, at most {f['tok_s']:.1f} tok/s",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """bench ceiling's options."""
    parser.add_argument("--model", default=None, help="a transformers model directory (default: the cached default model)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64], help="batch sizes M (tokens per step)")
    parser.add_argument("--repeat", type=int, default=5, help="timed sweeps per M; the best counts")
    parser.add_argument("--copy-mib", type=int, default=COPY_MIB, help="size of the tensor the copy rate is measured on")
    parser.add_argument("--result-json", default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    """bench ceiling: measure, print, write the JSON."""
    from tokenmill.benchmarks.metrics import write_json
    from tokenmill.models.cache import ModelCache, default_home
    from tokenmill.models.sources import resolve

    path = resolve(args.model, ModelCache(default_home())).path
    report = measure(path, args.rows, args.repeat, args.copy_mib)
    print(format_report(report))
    if args.result_json:
        write_json(args.result_json, {"options": vars(args), **report})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.ceiling", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
