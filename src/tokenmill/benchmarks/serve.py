"""`tokenmill bench serve`: streamed load on any OpenAI-compatible /v1/completions server.

    tokenmill bench serve --base-url http://127.0.0.1:8000 --tokenizer DIR --num-prompts 64 --max-concurrency 16

Works against tokenmill, vLLM and llama.cpp's llama-server. Every request streams (greedy,
`ignore_eos`, `max_tokens` = --output-len, usage in the last chunk), and is timed chunk by chunk:
TTFT, inter-token latency, time per output token, end-to-end latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenmill.benchmarks import workload
from tokenmill.benchmarks.metrics import RequestResult, format_summary, progress_printer, stats_ms, summarize, write_json


@dataclass(frozen=True)
class ServeOptions:
    """One load test: where, what, how many, how fast."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id of GET /v1/models
    num_prompts: int = 64
    input_len: int = 256
    output_len: int = 128
    max_concurrency: int | None = None  # None: every request at once
    request_rate: float = math.inf  # requests/s, Poisson arrivals
    prompt_format: str = "ids"
    tokenizer: str | None = None
    vocab_size: int | None = None
    seed: int = 0
    warmup: int = 1
    long_prompt_len: int | None = None
    long_prompt_at: float = 0.0
    long_prompt_output_len: int | None = None  # None: --output-len
    api_key: str | None = None
    result_json: str | None = None
    structured_fraction: float = 0.0  # this share of the requests carry a JSON schema (structured_outputs)
    schema: str | None = None  # a JSON schema file for them (default: SCHEMA)


# A structured workload's default schema: a small record, bounded so that its outputs end.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def constrained(index: int, fraction: float) -> bool:
    """Whether request `index` carries the schema: spread evenly, `fraction` of them in all."""
    return int((index + 1) * fraction) > int(index * fraction)


class SSEDecoder:
    """Server-sent events, one line at a time: data lines joined, comments (pings) and other fields skipped."""

    def __init__(self):
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line; return an event's data when a blank line ends it."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        field, _, value = line.partition(":")
        if field == "data":  # a line starting with ":" has field "" and is a comment
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The pending event's data, if any (also for a stream that ends without a blank line)."""
        data, self._data = self._data, []
        return "\n".join(data) if data else None


def sse_events(lines: Iterable[str]) -> list[str]:
    """Every event's data in a finished stream of lines."""
    decoder = SSEDecoder()
    events = [data for data in map(decoder.feed, lines) if data is not None]
    last = decoder.flush()
    return events + ([last] if last is not None else [])


async def _aevents(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    decoder = SSEDecoder()
    async for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    last = decoder.flush()
    if last is not None:
        yield last


def _error_text(event: dict) -> str:
    error = event["error"]
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


async def read_stream(lines: AsyncIterator[str], result: RequestResult, started: float) -> None:
    """Time each chunk that brings text; take the token counts from the usage chunk when there is one."""
    usage = None
    async for data in _aevents(lines):
        if data.strip() == "[DONE]":
            result.ok = True
            break
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            result.error = f"not JSON: {data[:100]!r}"
            return
        if event.get("error"):
            result.error = _error_text(event)
            return
        if "".join(c.get("text") or "" for c in event.get("choices") or []):
            result.token_times.append(time.perf_counter() - started)
        usage = event.get("usage") or usage
    if not result.ok:
        result.error = "the stream ended without data: [DONE]"
    result.output_tokens = usage["completion_tokens"] if usage else len(result.token_times)
    result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens) if usage else result.prompt_tokens


async def send(client, url: str, body: dict, run_start: float) -> RequestResult:
    """One streamed completion, timed from the moment it is sent."""
    prompt = body["prompt"]
    result = RequestResult(prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
    started = time.perf_counter()
    result.sent = started - run_start
    try:
        async with client.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read()).decode(errors='replace')[:300]}"
            else:
                await read_stream(_decoded(response.content), result, started)
            result.latency = time.perf_counter() - started
            await response.read()  # the rest of the body: the server sees its whole answer go out
    except Exception as exc:  # whatever a server does wrong is that request's failure, not the run's
        result.error = f"{type(exc).__name__}: {exc}"
    result.ok = result.ok and not result.error
    return result


async def _decoded(lines: AsyncIterator[bytes]) -> AsyncIterator[str]:
    async for line in lines:
        yield line.decode()


def request_body(model: str, prompt, max_tokens: int) -> dict:
    """What every request sends: streamed, greedy, never stopping early."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def make_client(api_key: str | None):
    """An aiohttp session with no pool limit (queueing belongs to the server), no read timeout, a connection per request.

    aiohttp, not httpx: reading ~1,000 stream chunks a second, httpx's client took 3.7 s of CPU
    for a c64 run of the 27M llama and aiohttp 1.7 s, CPU the server under test shares on 2 cores.
    A fresh connection each time: llama-server closes idle ones, which aiohttp's pool would reuse.
    """
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    return aiohttp.ClientSession(headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=None, connect=30.0))


async def first_model(client, base_url: str) -> str:
    """The first id GET /v1/models lists."""
    async with client.get(base_url + "/v1/models", raise_for_status=True) as response:
        return (await response.json())["data"][0]["id"]


def long_prompt_report(long: RequestResult, others: list[RequestResult]) -> dict:
    """The long request, and the other streams' token gaps while it waited for its first token and otherwise."""
    end = long.sent + (long.ttft if long.ttft is not None else long.latency)
    during: list[float] = []
    outside: list[float] = []
    for r in (r for r in others if r.ok):
        times = [r.sent + t for t in r.token_times]
        for a, b in itertools.pairwise(times):
            (during if a < end and b > long.sent else outside).append(b - a)
    return {
        "ok": long.ok,
        "error": long.error,
        "prompt_tokens": long.prompt_tokens,
        "sent_s": long.sent,
        "ttft_ms": long.ttft * 1e3 if long.ttft is not None else None,
        "latency_ms": long.latency * 1e3,
        "others_itl_ms_during": stats_ms(during),
        "others_itl_ms_outside": stats_ms(outside),
        "others_gaps_during": len(during),
    }


class Workload:
    """The prompts of one run: measured, warm-up, and the optional long one."""

    def __init__(self, options: ServeOptions):
        tokenizer = workload.load_tokenizer(options.tokenizer) if options.tokenizer else None
        if options.prompt_format == "text" and tokenizer is None:
            raise ValueError("--prompt-format text needs --tokenizer DIR")
        vocab = options.vocab_size or (workload.tokenizer_vocab(options.tokenizer, tokenizer) if tokenizer and options.tokenizer else None)
        if vocab is None:
            raise ValueError("--prompt-format ids needs --vocab-size N or --tokenizer DIR (the model's vocabulary)")
        pool = workload.id_pool(vocab, tokenizer)
        text = tokenizer if options.prompt_format == "text" else None
        rng = random.Random(options.seed)
        self.prompts = workload.prompts(rng, pool, options.num_prompts, options.input_len, text)
        self.long = workload.prompts(rng, pool, 1, options.long_prompt_len, text)[0] if options.long_prompt_len else None
        self.warmup = workload.prompts(random.Random(f"warmup {options.seed}"), pool, options.warmup, options.input_len, text)


class LoadRun:
    """One load test against one server: the warm-up, then the timed requests and the long one."""

    def __init__(self, client, url: str, model: str, options: ServeOptions):
        self.client, self.url, self.model, self.options = client, url, model, options
        self.schema = SCHEMA if options.schema is None else json.loads(Path(options.schema).read_text())

    def body(self, prompt, max_tokens: int | None = None, index: int = 0) -> dict:
        """Request `index`'s body; with a structured workload, some carry the schema (and end when it completes)."""
        body = request_body(self.model, prompt, max_tokens or self.options.output_len)
        if constrained(index, self.options.structured_fraction):
            body["structured_outputs"] = {"json": self.schema}
        return body

    async def warm_up(self, prompts: list) -> None:
        """Untimed requests, all at once within max_concurrency."""
        warm = dataclasses.replace(self.options, request_rate=math.inf)
        await self.send_all([self.body(p, index=i) for i, p in enumerate(prompts)], warm, time.perf_counter(), lambda r: None)

    async def timed(self, prompts: Workload, on_done: Callable[[RequestResult], None]):
        """The measured requests, and the long one at its time: (results, long result or None, seconds)."""
        run_start = time.perf_counter()
        long_task = None
        if prompts.long is not None:
            body = self.body(prompts.long, self.options.long_prompt_output_len)
            long_task = asyncio.create_task(self._send_at(body, self.options.long_prompt_at, run_start))
        results = await self.send_all([self.body(p, index=i) for i, p in enumerate(prompts.prompts)], self.options, run_start, on_done)
        long = await long_task if long_task else None
        return results, long, time.perf_counter() - run_start

    async def send_all(self, bodies: list[dict], options: ServeOptions, run_start: float, on_done: Callable[[RequestResult], None]) -> list[RequestResult]:
        """Send `bodies` at Poisson arrival times (or all at once), at most max_concurrency in flight."""
        gate = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else contextlib.nullcontext()
        arrivals = random.Random(f"arrivals {options.seed}")

        async def one(body: dict) -> RequestResult:
            async with gate:
                result = await send(self.client, self.url, body, run_start)
            on_done(result)
            return result

        tasks = []
        for body in bodies:
            tasks.append(asyncio.create_task(one(body)))
            if math.isfinite(options.request_rate):
                await asyncio.sleep(arrivals.expovariate(options.request_rate))
        return list(await asyncio.gather(*tasks))

    async def _send_at(self, body: dict, at: float, run_start: float) -> RequestResult:
        """The long prompt: sent `at` seconds into the run, outside the concurrency limit."""
        await asyncio.sleep(max(0.0, run_start + at - time.perf_counter()))
        return await send(self.client, self.url, body, run_start)


def counter(progress: Callable[[int, int], None] | None) -> Callable[[RequestResult], None]:
    """Count finished and failed requests for a progress display."""
    counts = [0, 0]

    def done(result: RequestResult) -> None:
        counts[0] += 1
        counts[1] += not result.ok
        if progress:
            progress(*counts)

    return done


async def benchmark(options: ServeOptions, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run one load test; return the options, the summary, the long prompt's report and every request."""
    base = options.base_url.rstrip("/").removesuffix("/v1")
    prompts = Workload(options)
    async with make_client(options.api_key) as client:
        model = options.model or await first_model(client, base)
        load = LoadRun(client, base + "/v1/completions", model, options)
        await load.warm_up(prompts.warmup)
        results, long, duration = await load.timed(prompts, counter(progress))
    rate = options.request_rate if math.isfinite(options.request_rate) else None  # JSON has no Infinity
    return {
        "options": {**dataclasses.asdict(options), "model": model, "base_url": base, "request_rate": rate},
        "summary": summarize(results, duration),
        "long_prompt": long_prompt_report(long, results) if long else None,
        "requests": [r.to_json() for r in results] + ([{**long.to_json(), "long_prompt": True}] if long else []),
    }


def format_long_prompt(report: dict, length: int) -> str:
    """The long prompt's lines: its own times, and the other streams' gaps during its prefill and otherwise."""

    def row(label: str, s: dict) -> str:
        values = ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in s.items())
        return f"{label:<44}{values}"

    ttft = "-" if report["ttft_ms"] is None else f"{report['ttft_ms']:.2f}"
    return "\n".join(
        [
            f" Long prompt ({length} tokens) ".center(60, "-"),
            f"{'Sent at (s):':<44}{report['sent_s']:.2f}",
            f"{'Its TTFT / latency (ms):':<44}{ttft} / {report['latency_ms']:.2f}" + ("" if report["ok"] else f"  FAILED: {report['error']}"),
            row(f"Others' ITL until its 1st token ({report['others_gaps_during']}) (ms):", report["others_itl_ms_during"]),
            row("Others' ITL otherwise (ms):", report["others_itl_ms_outside"]),
            "=" * 60,
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """bench serve's options."""
    d = ServeOptions()
    parser.add_argument("--base-url", default=d.base_url, help="the server (with or without /v1)")
    parser.add_argument("--model", default=None, help="the model name to send (default: the first id of GET /v1/models)")
    parser.add_argument("--num-prompts", type=int, default=d.num_prompts, help="measured requests")
    parser.add_argument("--input-len", type=int, default=d.input_len, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=d.output_len, help="max_tokens of every request (ignore_eos)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: all at once)")
    parser.add_argument("--request-rate", type=float, default=d.request_rate, help="requests/s, Poisson arrivals (default: inf)")
    parser.add_argument(
        "--prompt-format",
        choices=("ids", "text"),
        default=d.prompt_format,
        help="ids: random token ids as a list of ints; text: random ids decoded with --tokenizer",
    )
    parser.add_argument("--tokenizer", default=None, help="a model directory whose tokenizer (and vocabulary size) to use")
    parser.add_argument("--vocab-size", type=int, default=None, help="draw ids below this (default: from --tokenizer)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds the random prompts and arrival times")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed requests shaped like the workload, first")
    parser.add_argument("--long-prompt-len", type=int, default=None, help="add ONE request with a prompt this long ...")
    parser.add_argument("--long-prompt-at", type=float, default=d.long_prompt_at, help="... sent this many seconds into the run")
    parser.add_argument("--long-prompt-output-len", type=int, default=None, help="its max_tokens (default: --output-len)")
    parser.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    parser.add_argument(
        "--structured-fraction",
        type=float,
        default=d.structured_fraction,
        help="this share of the requests carry a JSON schema as structured_outputs and end when it completes",
    )
    parser.add_argument("--schema", default=None, help="a JSON schema file for them (default: a small bounded record)")
    parser.add_argument("--result-json", default=None, help="write options, summary and every request's timings here")


def headline(o: dict) -> str:
    """One line saying what was measured."""
    rate = "all at once" if o["request_rate"] is None else f"{o['request_rate']} req/s (Poisson)"
    return (
        f"{o['base_url']}  model {o['model']}  {o['num_prompts']} prompts x {o['input_len']} tokens ({o['prompt_format']})"
        f" -> {o['output_len']} tokens, concurrency {o['max_concurrency'] or 'unlimited'}, arrivals {rate}"
    )


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    """ServeOptions from parsed options of the same names."""
    return ServeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)})


def run(args: argparse.Namespace) -> int:
    """bench serve: run, print the summary, write the JSON."""
    import aiohttp

    options = options_from_args(args)
    try:
        report = asyncio.run(benchmark(options, progress_printer(options.num_prompts)))
    except (ValueError, OSError, LookupError, aiohttp.ClientError) as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 1
    print(headline(report["options"]))
    print(format_summary("Serving Benchmark Result", report["summary"]))
    if report["long_prompt"]:
        assert options.long_prompt_len is not None  # a long prompt is sent only when its length is given
        print(format_long_prompt(report["long_prompt"], options.long_prompt_len))
    if options.result_json:
        write_json(options.result_json, report)
    return 0 if report["summary"]["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
