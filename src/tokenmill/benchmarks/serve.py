"""Output tokens/s of a tokenmill server against transformers `generate`, same prompts, one run.

    python -m tokenmill.benchmarks.serve [--model DIR] [--concurrency 1 16] [--prompt-tokens 256] [--output-tokens 64]

Prompts are random token ids (fixed seed), greedy, no early stop (`ignore_eos`). The baseline runs
`model.generate` in this process with the batch size equal to the concurrency; tokenmill runs as a
real server in a subprocess, sent that many requests at once over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts, avoiding the first 100 ids (special tokens live there)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(count)]


def baseline(path: str, batch: list[list[int]], output_tokens: int) -> float:
    """transformers generate, greedy, static batch: output tokens per second."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(batch)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_tokens,
                       min_new_tokens=output_tokens, do_sample=False, pad_token_id=0)
    return len(batch) * output_tokens / (time.perf_counter() - started)


async def served(url: str, model: str, batch: list[list[int]], output_tokens: int) -> float:
    """tokenmill over HTTP, all requests at once: output tokens per second."""
    import httpx

    body = {"model": model, "max_tokens": output_tokens, "temperature": 0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=3600) as client:
        started = time.perf_counter()
        replies = await asyncio.gather(*(client.post(url + "/v1/completions", json={**body, "prompt": p}) for p in batch))
        seconds = time.perf_counter() - started
    return sum(r.json()["usage"]["completion_tokens"] for r in replies) / seconds


def start_server(path: str, port: int) -> subprocess.Popen:
    """`tokenmill serve` in a subprocess; returns once /health answers."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "tokenmill", "serve", "--model", path, "--port", str(port),
                             "--served-model-name", "bench", "--log-level", "warning"])
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the cached default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    from tokenmill.models.cache import ModelCache, default_home
    from tokenmill.models.sources import resolve

    path = args.model or resolve(None, ModelCache(default_home())).path
    vocab = AutoConfig.from_pretrained(path).vocab_size
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = {"transformers generate (static batch)": [], "tokenmill serve": []}
    server = start_server(path, port)
    try:
        asyncio.run(served(f"http://127.0.0.1:{port}", "bench", prompts(1, 8, vocab, seed=99), 4))  # warm-up
        for c in args.concurrency:
            batch = prompts(c, args.prompt_tokens, vocab)
            rows["tokenmill serve"].append(asyncio.run(served(f"http://127.0.0.1:{port}", "bench", batch, args.output_tokens)))
    finally:
        server.terminate()
        server.wait()
    for c in args.concurrency:
        rows["transformers generate (static batch)"].append(baseline(path, prompts(c, args.prompt_tokens, vocab), args.output_tokens))
    print(f"model: {path}, {os.cpu_count()} CPUs, {args.prompt_tokens} prompt / {args.output_tokens} output tokens, greedy\n")
    print("| output tokens/s | " + " | ".join(f"concurrency {c}" for c in args.concurrency) + " |")
    print("|---|" + "---|" * len(args.concurrency))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")


if __name__ == "__main__":
    main()
