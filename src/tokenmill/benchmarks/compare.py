"""Side by side: tokenmill, an older tokenmill, vLLM (CPU) and llama.cpp, same load.

    python -m tokenmill.benchmarks.compare --model DIR [--concurrency 1 16] [--tokenmill-args "..."]
        [--baseline-src OLD_TREE] [--vllm-python PY] [--llama-server BIN --gguf FILE] [--transformers] [--long-prompt]
        [--rounds N]

Each system is started, waited for (GET /health), loaded with `bench serve`'s client in this process
(random-id prompts, greedy, ignore_eos, streamed) at each concurrency, and stopped before the next one
starts. Its resident memory (the process and its children) is sampled every 0.5 s during each run.
With --rounds N (N >= 2) every system is started at once instead, and each workload runs N times, the
systems in turn in alternating order (A B C, C B A, ...), the others paused (SIGSTOP) meanwhile, each
round on new prompts: on a machine whose speed drifts within minutes, a drift that is linear over a
workload's rounds then weighs on every system alike. Prints one Markdown table and writes everything
as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tokenmill.benchmarks import workload
from tokenmill.benchmarks.metrics import write_json
from tokenmill.benchmarks.servers import MemorySampler, Server, ServerError, ServerSpec

TOKENMILL = "tokenmill"
LONG_PROMPT_LEN = 2000
LONG_PROMPT_OUTPUT = 32  # 2,000 + 32 tokens fit vLLM's --max-model-len 2048
LONG_CONCURRENCY = 16
MIN_PROMPTS = 8
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "OMP_NUM_THREADS": "2",
}


def tokenmill_spec(name: str, model: str, extra: list[str], env: dict[str, str] | None = None) -> ServerSpec:
    """`python -m tokenmill serve` on {port}, served as "bench"."""
    return ServerSpec(
        name,
        [sys.executable, "-m", "tokenmill", "serve", "--model", model, "--port", "{port}", "--served-model-name", "bench", "--log-level", "warning", *extra],
        env or {},
    )


def git_label(tree: str) -> str:
    """A source tree's short commit, or its folder name."""
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or Path(tree).name


def specs(args: argparse.Namespace) -> tuple[list[ServerSpec], list[str]]:
    """The systems to run, in order, and a note for each one skipped."""
    chosen = [tokenmill_spec(TOKENMILL, args.model, shlex.split(args.tokenmill_args))]
    notes = []
    if args.baseline_src:
        chosen.append(tokenmill_spec(f"tokenmill {git_label(args.baseline_src)}", args.model, [], {"PYTHONPATH": str(Path(args.baseline_src) / "src")}))
    else:
        notes.append("older tokenmill skipped (no --baseline-src)")
    if args.vllm_python:
        chosen.append(
            ServerSpec(
                "vLLM (CPU)",
                [
                    args.vllm_python,
                    "-m",
                    "vllm.entrypoints.openai.api_server",
                    "--model",
                    args.model,
                    "--served-model-name",
                    "bench",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "{port}",
                    "--dtype",
                    "float32",
                    "--max-model-len",
                    "2048",
                ],
                VLLM_ENV,
                startup_s=600,
            )
        )
    else:
        notes.append("vLLM skipped (no --vllm-python)")
    if args.llama_server and args.gguf:
        chosen.append(llama_spec(args))
    else:
        notes.append("llama.cpp skipped (needs --llama-server and --gguf)")
    return chosen, notes


def llama_spec(args: argparse.Namespace) -> ServerSpec:
    """llama-server with one slot per concurrent request (and one for the long prompt), 2,048 tokens each."""
    slots = max(args.concurrency) + (1 if args.long_prompt else 0)
    return ServerSpec(
        "llama.cpp",
        [
            args.llama_server,
            "-m",
            args.gguf,
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "-np",
            str(slots),
            "-c",
            str(slots * 2048),
            "--cont-batching",
            "-t",
            "2",
        ],
    )


def prompts_for(args: argparse.Namespace, concurrency: int) -> int:
    """--num-prompts, or twice the concurrency (two waves) but at least MIN_PROMPTS."""
    return args.num_prompts or max(2 * concurrency, MIN_PROMPTS)


def one_run(server: Server, args: argparse.Namespace, vocab: int, concurrency: int, seed: int, **extra) -> dict:
    """One workload against a running server, its memory sampled meanwhile."""
    from tokenmill.benchmarks.serve import ServeOptions, benchmark

    options = ServeOptions(
        base_url=server.url,
        model="bench",
        num_prompts=prompts_for(args, concurrency),
        input_len=args.input_len,
        output_len=args.output_len,
        max_concurrency=concurrency,
        vocab_size=vocab,
        seed=seed,
        **extra,
    )
    assert server.proc is not None  # a started server has its process
    started = time.time()
    with MemorySampler(server.proc.pid) as memory:
        report = asyncio.run(benchmark(options))
    s, long = report["summary"], report["long_prompt"]
    print(
        f"  {server.spec.name} c={concurrency}: {s['completed']}/{options.num_prompts} ok, {s['output_throughput']:.1f}"
        f" out tok/s, TTFT p99 {s['ttft_ms']['p99'] or 0:.0f} ms, peak {memory.result()['peak']:.0f} MiB"
        + ("" if long is None else f"; long prompt: {'ok' if long['ok'] else 'FAILED: ' + long['error']}"),
        file=sys.stderr,
    )
    return {"summary": s, "long_prompt": report["long_prompt"], "memory_mib": memory.result(), "started_at": started}


def long_prompt_run(server: Server, args: argparse.Namespace, vocab: int, at: float, seed: int) -> dict:
    """c16 with one long prompt sent `at` seconds in."""
    return one_run(
        server,
        args,
        vocab,
        LONG_CONCURRENCY,
        seed=seed,
        long_prompt_len=LONG_PROMPT_LEN,
        long_prompt_at=at,
        long_prompt_output_len=LONG_PROMPT_OUTPUT,
    )


COUNTS = {"completed", "failed", "total_input_tokens", "total_output_tokens", "others_gaps_during"}  # summed over rounds


def merge(values: list, key: str = "") -> object:
    """Several rounds' values as one: dicts key by key, COUNTS summed, other numbers (rates, latencies) averaged, flags all()."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, dict):
        return {k: merge([v.get(k) for v in present], k) for k in first}
    if isinstance(first, bool):
        return all(present)
    if isinstance(first, int | float):
        return sum(present) if key in COUNTS else sum(present) / len(present)
    if isinstance(first, list):
        return sorted({item for v in present for item in v})
    return first


def merged_run(runs: list[dict]) -> dict:
    """A workload's rounds as one run (see merge), its memory's start, peak and end over them, and the rounds."""
    if len(runs) == 1:  # one round is its own merge, its numbers kept as they were
        return {**runs[0], "rounds": runs}
    memory = [r["memory_mib"] for r in runs]
    return {
        "summary": merge([r["summary"] for r in runs]),
        "long_prompt": merge([r["long_prompt"] for r in runs]),
        "memory_mib": {"start": memory[0]["start"], "peak": max(m["peak"] for m in memory), "end": memory[-1]["end"]},
        "rounds": runs,
    }


def alternated(servers: dict[str, Server], rounds: int, run: Callable[[Server, int], dict]) -> dict[str, dict]:
    """run(server, round) for every round and server, the servers in turn, every other round in reverse.

    The servers not running are paused (SIGSTOP), so that no idle server's polling takes CPU from the one measured.
    """
    names = list(servers)
    done: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            servers[name].resume()
            try:
                done[name].append(run(servers[name], r))
            finally:
                servers[name].pause()
    return {name: merged_run(runs) for name, runs in done.items()}


def concurrency_run(args: argparse.Namespace, vocab: int, i: int) -> Callable[[Server, int], dict]:
    """run(server, round) of the i-th concurrency: new prompts each round, a warm-up request before a server's first run."""
    c = args.concurrency[i]
    return lambda server, r: one_run(server, args, vocab, c, seed=args.seed + i + 1000 * r, warmup=1 if i == 0 and r == 0 else 0)


def measure_rounds(servers: dict[str, Server], args: argparse.Namespace, vocab: int) -> dict[str, dict]:
    """Every workload args.rounds times over servers already up; the long prompt's moment from each one's c16 runs."""
    results: dict[str, dict] = {name: {"command": s.command, "runs": {}} for name, s in servers.items()}
    for i, c in enumerate(args.concurrency):
        for name, run in alternated(servers, args.rounds, concurrency_run(args, vocab, i)).items():
            results[name]["runs"][c] = run
    if args.long_prompt:
        if LONG_CONCURRENCY not in args.concurrency:
            plain = alternated(servers, args.rounds, lambda s, r: one_run(s, args, vocab, LONG_CONCURRENCY, seed=args.seed + 100 + 1000 * r))
        else:
            plain = {name: results[name]["runs"][LONG_CONCURRENCY] for name in servers}
        at = {name: run["summary"]["duration_s"] / 2 for name, run in plain.items()}
        loaded = alternated(servers, args.rounds, lambda s, r: long_prompt_run(s, args, vocab, at[s.spec.name], args.seed + 101 + 1000 * r))
        for name in servers:
            results[name]["long_prompt"] = {"at_s": at[name], "without": plain[name], "with": loaded[name]}
    return results


def run_together(chosen: list[ServerSpec], args: argparse.Namespace, vocab: int, log_dir: Path) -> dict[str, dict]:
    """Start the systems (a failed start recorded, not raised), measure them in alternated rounds, stop them."""
    failed: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for spec in chosen:
            server = Server(spec, log_dir)
            print(f"{spec.name}: starting {shlex.join(server.command)}", file=sys.stderr)
            try:
                servers[spec.name] = stack.enter_context(server)
                server.pause()  # until its turn: idle, it would still poll while the next one starts
            except ServerError as exc:
                print(f"{spec.name}: {exc}", file=sys.stderr)
                failed[spec.name] = {"command": spec.command, "error": str(exc).splitlines()[0]}
        measured = measure_rounds(servers, args, vocab) if servers else {}
    return {spec.name: measured.get(spec.name) or failed[spec.name] for spec in chosen}


def generate_baseline(args: argparse.Namespace, vocab: int) -> dict:
    """transformers `generate` in this process, one static batch per concurrency: output tok/s only."""
    import random

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    runs = {}
    for c in args.concurrency:
        ids = torch.tensor(workload.id_prompts(random.Random(args.seed), workload.id_pool(vocab), c, args.input_len))
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0
            )
        runs[c] = {"summary": {"output_throughput": c * args.output_len / (time.perf_counter() - started), "failed": 0}}
    return {"command": ["transformers generate (static batch, in-process)"], "runs": runs}


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _throughput(run: dict | None) -> str:
    if run is None:
        return "-"
    s = run["summary"]
    return _cell(s["output_throughput"]) + (f" ({s['failed']} failed)" if s["failed"] else "")


def _ratio(ours: dict, theirs: dict, c: int) -> str:
    mine, other = (r.get("runs", {}).get(c, {}).get("summary", {}).get("output_throughput") for r in (ours, theirs))
    return f"{mine / other:.2f}x" if mine and other else "-"


def table(results: dict[str, dict], concurrency: list[int], long_prompt: bool) -> str:
    """One Markdown table: a row per system, output tok/s per concurrency, the top concurrency's p99s, memory, ratios."""
    top = max(concurrency)
    head = [
        "system",
        *(f"out tok/s c{c}" for c in concurrency),
        f"TTFT p99 c{top} (ms)",
        f"ITL p99 c{top} (ms)",
        "peak RSS (MiB)",
        "tokenmill ÷ system (" + " / ".join(f"c{c}" for c in concurrency) + ")",
    ]
    if long_prompt:
        head.append(f"others' ITL p99 c{LONG_CONCURRENCY} (ms): without / with a {LONG_PROMPT_LEN}-token prompt")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        lines.append("| " + " | ".join([name, *_row(r, results.get(TOKENMILL, {}), concurrency, long_prompt)]) + " |")
    return "\n".join(lines)


def _row(r: dict, ours: dict, concurrency: list[int], long_prompt: bool) -> list[str]:
    runs, top = r.get("runs", {}), max(concurrency)
    if "error" in r:
        return ["failed to start"] + ["-"] * (len(concurrency) + 3 + long_prompt)
    last = runs[top]["summary"]
    peaks = [run["memory_mib"]["peak"] for run in runs.values() if "memory_mib" in run]
    cells = [_throughput(runs.get(c)) for c in concurrency]
    cells += [
        _cell(last.get("ttft_ms", {}).get("p99"), 0),
        _cell(last.get("itl_ms", {}).get("p99"), 0),
        _cell(max(peaks) if peaks else None, 0),
        " / ".join(_ratio(ours, r, c) for c in concurrency),
    ]
    if long_prompt:
        lp = r.get("long_prompt")
        cells.append(_long_cell(lp))
    return cells


def rounds_table(results: dict[str, dict], concurrency: list[int]) -> str:
    """Output tok/s of every round, a row per system, in the order the rounds ran."""
    head = ["system", *(f"out tok/s c{c}, round by round" for c in concurrency)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        runs = r.get("runs", {})
        cells = [" / ".join(_cell(x["summary"]["output_throughput"]) for x in runs[c]["rounds"]) if c in runs else "-" for c in concurrency]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def _long_cell(lp: dict | None) -> str:
    if lp is None:
        return "-"
    cell = " / ".join(_cell(lp[k]["summary"]["itl_ms"]["p99"], 0) for k in ("without", "with"))
    return cell + ("" if lp["with"]["long_prompt"]["ok"] else " (the long prompt failed)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """compare's options."""
    parser.add_argument("--model", default=None, help="a transformers model directory (default: the cached default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="concurrency levels, each a run")
    parser.add_argument("--num-prompts", type=int, default=None, help=f"per run (default: 2 x concurrency, at least {MIN_PROMPTS})")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random prompts")
    parser.add_argument("--tokenmill-args", default="", help='extra `tokenmill serve` options, one string: "--max-model-len 4096"')
    parser.add_argument("--baseline-src", default=None, help="another tokenmill source tree, served with PYTHONPATH=DIR/src")
    parser.add_argument("--vllm-python", default=None, help="the python of an environment with vLLM's CPU build")
    parser.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (with --gguf)")
    parser.add_argument("--gguf", default=None, help="the GGUF file llama-server serves (the same model)")
    parser.add_argument("--transformers", action="store_true", help="add transformers `generate`, a static batch, in-process")
    parser.add_argument("--long-prompt", action="store_true", help=f"also run c{LONG_CONCURRENCY} with one {LONG_PROMPT_LEN}-token prompt sent mid-run")
    parser.add_argument("--rounds", type=int, default=1, help="N >= 2: every system up at once, each workload N times, the systems in alternating order")
    parser.add_argument("--log-dir", default=None, help="servers' logs and compare.json (default: a new temporary folder)")
    parser.add_argument("--result-json", default=None, help="default: LOG_DIR/compare.json")


def run(args: argparse.Namespace) -> int:
    """compare: every system in turn, then the table and the JSON."""
    from tokenmill.models.cache import ModelCache, default_home
    from tokenmill.models.sources import resolve

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    args.model = resolve(args.model, ModelCache(default_home())).path
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tokenmill-compare-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    vocab = workload.tokenizer_vocab(args.model, workload.load_tokenizer(args.model))
    chosen, notes = specs(args)
    for note in notes + ([] if args.transformers else ["transformers generate skipped (no --transformers)"]):
        print(f"note: {note}", file=sys.stderr)
    if args.rounds > 1:
        results = run_together(chosen, args, vocab, log_dir)
    else:  # one system up at a time: each is its own single round
        results = {name: r for spec in chosen for name, r in run_together([spec], args, vocab, log_dir).items()}
    if args.transformers:
        results["transformers generate (static batch)"] = generate_baseline(args, vocab)
    print(
        f"model: {args.model}; {args.input_len} prompt ids -> {args.output_len} tokens, greedy, ignore_eos, streamed;"
        f" prompts per run: " + ", ".join(f"c{c}: {prompts_for(args, c)}" for c in args.concurrency) + "\n"
    )
    print(table(results, args.concurrency, args.long_prompt))
    if args.rounds > 1:
        print("\n" + rounds_table(results, args.concurrency))
    path = args.result_json or str(log_dir / "compare.json")
    write_json(path, {"options": vars(args), "systems": results})
    print(f"\nJSON and server logs: {path}, {log_dir}")
    return 0 if all("error" not in r for r in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
