"""The GPU check: ceilings, then tokenmill beside transformers on random-weight models of two real shapes.

    python -m tokenmill.benchmarks.gpu --out DIR [--tiny] [--shapes qwen2.5-0.5b llama-3.2-1b]

Models are built from the configurations of Qwen2.5-0.5B and Llama-3.2-1B with random bf16 weights
(with ignore_eos the speed does not depend on their values) and a small BPE of our own: prompts are
random ids, so the tokenizer only has to exist. Workloads: `fixed` (requests of 1,024 prompt / 128
output tokens), `mixed` (prompt and output lengths uniform in [100, 1024]) and `latency` (one request,
128 in / 256 out). Systems: tokenmill's engine in this process, tokenmill over HTTP (`fixed` only, all
requests at once), transformers `generate` on padded batches, and transformers' continuous batching
(`generate_batch`). Writes results.json and results.md under --out.

--tiny shrinks every model, workload, ceiling and generate_batch cache so that the whole script runs on a CPU in about a
minute: the dry run that keeps it from rotting between the rare sessions with a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

from tokenmill.benchmarks.metrics import summarize

# Facts from the models' published config.json (rope scaling left out: random weights, same speed).
SHAPES = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
    },
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 4096, "max_position_embeddings": 2048}


@dataclasses.dataclass(frozen=True)
class Workload:
    """Requests as (prompt length, output length) pairs."""

    name: str
    lengths: tuple[tuple[int, int], ...]


def workloads(tiny: bool, seed: int) -> list[Workload]:
    """fixed, mixed and latency, as the issue asks (divided by 16, 32 requests at most, with --tiny)."""
    rng = random.Random(seed)
    count, scale = (8, 16) if tiny else (256, 1)
    mixed = tuple((rng.randint(100, 1024) // scale, rng.randint(100, 1024) // scale) for _ in range(count))
    return [
        Workload("fixed", ((1024 // scale, 128 // scale),) * count),
        Workload("mixed", mixed),
        Workload("latency", ((128 // scale, 256 // scale),)),
    ]


def build_model(shape: str, path: Path, tiny: bool, dtype: torch.dtype) -> Path:
    """A random-weight model of the shape, saved with a small BPE tokenizer (1,000 tokens, trained on this file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    fields = dict(SHAPES[shape])
    if tiny:
        fields.update(TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    config = AutoConfig.for_model(str(fields.pop("model_type")), **fields, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([Path(__file__).read_text()], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def prompts(workload: Workload, seed: int) -> list[list[int]]:
    """Random ids below the tokenizer's 1,000 (any id costs the same)."""
    rng = random.Random(seed)
    return [[rng.randrange(1, 1000) for _ in range(n)] for n, _ in workload.lengths]


def ceilings(device: torch.device, tiny: bool) -> dict:
    """Copy rate (bytes read + written per second, device to device) and a bf16 matmul's FLOP/s."""
    size = (64 if tiny else 4096) * 2**20
    src = torch.empty(size // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy = _best(lambda: dst.copy_(src), device)
    n = 256 if tiny else 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    matmul = _best(lambda: a @ b, device)
    return {"copy_bytes_per_s": 2 * size / copy, "bf16_flop_per_s": 2 * n**3 / matmul}


def _best(fn, device: torch.device, repeat: int = 10) -> float:
    """Seconds of the fastest of `repeat` calls, after three untimed."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def tokenmill_offline(path: Path, workload: Workload, ids: list[list[int]], device: torch.device, dtype: str) -> dict:
    """tokenmill's engine in this process: start-up time, then every request at once."""
    from tokenmill.benchmarks.offline import Driver
    from tokenmill.config import EngineConfig
    from tokenmill.engine.loader import build_engine
    from tokenmill.sampling_params import SamplingParams

    started = time.perf_counter()
    engine, _ = build_engine(EngineConfig(model=str(path), device=device.type, dtype=dtype, max_num_batched_tokens=2048), str(path), "bench")
    startup = time.perf_counter() - started
    params = [SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True) for _, out in workload.lengths]
    Driver(engine, params[0], None, "warmup").run(ids[:1])
    _peak_reset(device)
    results, duration = Driver(engine, params, None, "bench").run(ids)
    return {"startup_s": startup, "peak_device_bytes": _peak(device), **summarize(results, duration)}


def tokenmill_http(path: Path, workload: Workload, device: torch.device, dtype: str, out: Path) -> dict:
    """tokenmill serve in its own process, `tokenmill bench serve` against it with every request at once."""
    from tokenmill.benchmarks.servers import Server, ServerSpec

    n, (prompt_len, output_len) = len(workload.lengths), workload.lengths[0]
    command = [sys.executable, "-m", "tokenmill", "serve", "--model", str(path), "--port", "{port}", "--served-model-name", "bench"]
    command += ["--device", device.type, "--dtype", dtype, "--max-num-batched-tokens", "2048", "--log-level", "warning"]
    with Server(ServerSpec(f"tokenmill-{path.name}", command, startup_s=600), out) as server:
        report = out / f"http-{path.name}.json"
        bench = [sys.executable, "-m", "tokenmill", "bench", "serve", "--base-url", server.url, "--model", "bench", "--vocab-size", "1000"]
        bench += ["--num-prompts", str(n), "--input-len", str(prompt_len), "--output-len", str(output_len), "--max-concurrency", str(n)]
        subprocess.run([*bench, "--result-json", str(report)], check=True, capture_output=True, timeout=1800)
        return json.loads(report.read_text())["summary"]


def transformers_padded(model, ids: list[list[int]], outputs: list[int], device: torch.device, batch: int) -> dict:
    """transformers `generate` on left-padded batches of `batch` requests; each batch runs to its longest output."""
    made, started = 0, time.perf_counter()
    for i in range(0, len(ids), batch):
        group, want = ids[i : i + batch], max(outputs[i : i + batch])
        width = max(len(p) for p in group)
        tokens = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        out = model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=want, min_new_tokens=want, do_sample=False, pad_token_id=0)
        made += (out.shape[1] - width) * len(group)
    _sync(device)
    duration = time.perf_counter() - started
    return {"duration": duration, "output_tokens": made, "output_throughput": made / duration}


def transformers_continuous(model, ids: list[list[int]], outputs: list[int], device: torch.device, tiny: bool) -> dict:
    """transformers' own continuous batching (`generate_batch`), every request at once, to the longest output (its warm-up included)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=-1, pad_token_id=0)
    options = _workload_sized_cache(ids, max(outputs)) if tiny else {}
    started = time.perf_counter()
    out = model.generate_batch(ids, config, **options)
    _sync(device)
    duration = time.perf_counter() - started
    made = sum(len(r.generated_tokens) for r in out.values())
    return {"duration": duration, "output_tokens": made, "output_throughput": made / duration}


def _workload_sized_cache(ids: list[list[int]], output_len: int) -> dict:
    """generate_batch's cache sized to the workload: by default it takes a share of free memory, which on a
    CPU costs the dry run seconds of zeroed gigabytes and attention masks for every request."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # a release without the setting sizes its cache itself
        return {}
    pages = len(ids) * ((max(len(p) for p in ids) + output_len + 255) // 256)
    return {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=pages + 1, max_batch_tokens=256)}


def run_shape(shape: str, args: argparse.Namespace, device: torch.device, ceiling: dict) -> dict:
    """Every system on every workload for one model shape; a system that fails records its error."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    path = build_model(shape, args.out / "models" / shape, args.tiny, dtype)
    model = cast(Any, AutoModelForCausalLM.from_pretrained(path, dtype=dtype)).to(device).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = _kv_bytes_per_token(model.config, dtype)
    rows: dict[str, dict] = {}
    for workload in workloads(args.tiny, args.seed):
        ids, outputs = prompts(workload, args.seed), [out for _, out in workload.lengths]
        row = rows[f"{workload.name} / tokenmill offline"] = _attempt(tokenmill_offline, path, workload, ids, device, dtype_name)
        if "output_throughput" in row:
            row["roofline_fraction"] = row["output_throughput"] / roofline(workload, weights, kv_per_token, ceiling["copy_bytes_per_s"])
        if workload.name == "fixed":
            rows[f"{workload.name} / tokenmill HTTP"] = _attempt(tokenmill_http, path, workload, device, dtype_name, args.out)
        rows[f"{workload.name} / transformers generate (padded)"] = _attempt(transformers_padded, model, ids, outputs, device, 64)
        rows[f"{workload.name} / transformers generate_batch"] = _attempt(transformers_continuous, model, ids, outputs, device, args.tiny)
    return {"weights_bytes": weights, "floor_ms_per_step_batch1": 1000 * weights / ceiling["copy_bytes_per_s"], "results": rows}


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one token over every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def roofline(workload: Workload, weights: int, kv_per_token: int, copy_rate: float, max_seqs: int = 256) -> float:
    """Output tok/s if every decode step only read the weights once and each running sequence's keys and values
    at the measured copy rate, every request running at once (up to max_seqs) at its mean context."""
    batch = min(len(workload.lengths), max_seqs)
    context = sum(prompt + out / 2 for prompt, out in workload.lengths) / len(workload.lengths)
    step = (weights + batch * context * kv_per_token) / copy_rate
    return batch / step


def _attempt(fn, *args) -> dict:
    """fn(*args): the system's numbers, or the error that stopped it (the rest of the check goes on)."""
    try:
        return fn(*args)
    except Exception as exc:  # one system's failure must not cost the whole GPU session
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def report(results: dict) -> str:
    """results.md: one table per shape."""
    lines = [f"device: {results['device']}; torch {results['torch']}, transformers {results['transformers']}; {results['date']}"]
    c = results["ceilings"]
    lines.append(f"ceilings: copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + written), bf16 matmul {c['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s")
    for shape, r in results["shapes"].items():
        lines += ["", f"### {shape}: {r['weights_bytes'] / 1e9:.2f} GB of weights, batch-1 floor {r['floor_ms_per_step_batch1']:.2f} ms/token", ""]
        lines += ["| workload / system | output tok/s | of the roofline | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | peak device MiB | start-up s |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for name, row in r["results"].items():
            if "error" in row:
                lines.append(f"| {name} | {row['error']} | | | | | |")
                continue
            ttft, itl = row.get("ttft_ms") or {}, row.get("itl_ms") or {}
            peak = f"{row['peak_device_bytes'] / 2**20:.0f}" if row.get("peak_device_bytes") else ""
            startup = f"{row['startup_s']:.1f}" if "startup_s" in row else ""
            fraction = f"{100 * row['roofline_fraction']:.0f} %" if "roofline_fraction" in row else ""
            lines.append(f"| {name} | {row['output_throughput']:.1f} | {fraction} | {_pair(ttft)} | {_pair(itl)} | {peak} | {startup} |")
    return "\n".join(lines) + "\n"


def _pair(stats: dict) -> str:
    return f"{stats['p50']:.1f} / {stats['p99']:.1f}" if stats.get("p50") is not None else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where results.json, results.md, the models and logs go")
    parser.add_argument("--tiny", action="store_true", help="tiny models and workloads: the CPU dry run")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="model shapes to run")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompts and the mixed lengths")
    args = parser.parse_args(argv)
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results: dict = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    results["ceilings"] = ceilings(device, args.tiny)
    results["shapes"] = {shape: run_shape(shape, args, device, results["ceilings"]) for shape in args.shapes}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
