"""`tokenmill bench offline`: the engine alone, in this process, no HTTP: what the server costs on top.

    tokenmill bench offline [--model DIR] --num-prompts 64 --input-len 256 --output-len 128 [--max-concurrency N]

Same random-id prompts, greedy, `ignore_eos`, and the same summary as `bench serve`. TTFT counts from
`add_request` to the step that brings a request's first token; ITL is the time between steps that
bring it tokens. Engine options (`--max-model-len`, `--dtype`, ...) are the server's.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections import deque
from typing import Any

from tokenmill.benchmarks import workload
from tokenmill.benchmarks.metrics import RequestResult, format_summary, progress_printer, summarize, write_json
from tokenmill.config import EngineConfig, add_options, from_args


class Driver:
    """Keeps up to max_concurrency requests in an engine, steps it until done, times what each step brings."""

    def __init__(self, engine, params, max_concurrency: int | None, prefix: str):
        self.engine, self.params, self.limit, self.prefix = engine, params, max_concurrency, prefix
        self.results: dict[str, RequestResult] = {}
        self.running: set[str] = set()
        self.counts = [0, 0]  # finished, failed

    def run(self, prompts: list[list[int]], progress=None) -> tuple[list[RequestResult], float]:
        """All prompts through the engine: (results in prompt order, seconds)."""
        waiting = deque(enumerate(prompts))
        start = time.perf_counter()
        while waiting or self.engine.has_unfinished():
            self._admit(waiting, start)
            outputs = self.engine.step()
            now = time.perf_counter() - start
            for out in outputs:
                self._record(out, now, progress)
        return list(self.results.values()), time.perf_counter() - start

    def _admit(self, waiting: deque, start: float) -> None:
        from tokenmill.sampling_params import Prompt

        while waiting and (self.limit is None or len(self.running) < self.limit):
            i, ids = waiting.popleft()
            request_id = f"{self.prefix}-{i}"
            self.results[request_id] = RequestResult(sent=time.perf_counter() - start, prompt_tokens=len(ids))
            self.running.add(request_id)
            params = self.params[i] if isinstance(self.params, list) else self.params  # one for all, or one per prompt
            self.engine.add_request(request_id, [Prompt(token_ids=tuple(ids))], params)

    def _record(self, out, now: float, progress) -> None:
        result = self.results[out.request_id]
        if out.completion_tokens > result.output_tokens:
            result.token_times.append(now - result.sent)
            result.output_tokens = out.completion_tokens
        if out.finished and out.request_id in self.running:
            self.running.discard(out.request_id)
            result.error = getattr(out, "error", None) or ""
            result.ok = not result.error
            result.latency = now - result.sent
            self.counts[0] += 1
            self.counts[1] += not result.ok
            if progress:
                progress(*self.counts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's options (from EngineConfig, so new ones appear here too), then the workload's."""
    add_options(parser, EngineConfig)
    parser.add_argument("--num-prompts", type=int, default=64, help="measured requests")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens of every request (ignore_eos)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in the engine at most (default: all at once)")
    parser.add_argument("--vocab-size", type=int, default=None, help="draw ids below this (default: the model's config.json)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests shaped like the workload, first")
    parser.add_argument("--result-json", default=None, help="write options, summary and every request's timings here")


def load(config: EngineConfig):
    """The engine (not its thread) and the model directory it came from."""
    from tokenmill.engine.loader import build_engine
    from tokenmill.models.cache import ModelCache, default_home
    from tokenmill.models.sources import resolve

    path = resolve(config.model, ModelCache(default_home())).path
    return build_engine(config, path, "bench")[0], path  # built and run in this thread, as a server's is


def load_for(args: argparse.Namespace) -> tuple[EngineConfig, Any, str, int] | None:
    """(config, engine, model directory, vocabulary the prompts draw from) of the options; None, said on stderr, if it fails."""
    from tokenmill.engine.loader import ModelLoadError
    from tokenmill.models.sources import FetchError

    try:
        config = from_args(EngineConfig, args)
        engine, path = load(config)
        vocab = args.vocab_size or workload.config_vocab(path)
        if vocab is None:
            raise ValueError(f"{path} has no config.json with vocab_size: pass --vocab-size")
    except (ValueError, FetchError, ModelLoadError) as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return None
    return config, engine, path, vocab


def run(args: argparse.Namespace) -> int:
    """bench offline: load, warm up, run, print the summary, write the JSON."""
    loaded = load_for(args)
    if loaded is None:
        return 1
    config, engine, path, vocab = loaded
    results, duration = measure(engine, args, vocab)
    summary = summarize(results, duration)
    print(
        f"engine in-process: {path}  {args.num_prompts} prompts x {args.input_len} random ids -> {args.output_len} tokens,"
        f" concurrency {args.max_concurrency or 'all at once'}"
    )
    print(format_summary("Offline Engine Benchmark Result", summary))
    if args.result_json:
        options = {**vars(args), "engine": dataclasses.asdict(config), "model_path": path}
        write_json(args.result_json, {"options": options, "summary": summary, "requests": [r.to_json() for r in results]})
    return 0 if summary["completed"] else 1


def measure(engine, args: argparse.Namespace, vocab: int) -> tuple[list[RequestResult], float]:
    """The warm-up requests (untimed), then the measured ones: (results, seconds)."""
    from tokenmill.sampling_params import SamplingParams

    rng, pool = random.Random(args.seed), workload.id_pool(vocab)
    prompts = workload.id_prompts(rng, pool, args.num_prompts, args.input_len)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    Driver(engine, params, args.max_concurrency, "warmup").run(workload.id_prompts(rng, pool, args.warmup, args.input_len))
    return Driver(engine, params, args.max_concurrency, "bench").run(prompts, progress_printer(len(prompts)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.offline", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
