"""Per-request timings and the summary every benchmark prints: throughput, TTFT, TPOT, ITL."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TextIO

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What one request did; times in seconds, token times counted from when it was sent."""

    ok: bool = False
    error: str = ""
    sent: float = 0.0  # since the run began
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)  # each chunk (or step) that brought text

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def tpot(self) -> float | None:
        """(latency - TTFT) / (output tokens - 1): the mean time per token after the first."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return {**asdict(self), "ttft": self.ttft, "tpot": self.tpot}


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile with linear interpolation (numpy's default), without numpy."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stats_ms(values: list[float]) -> dict[str, float | None]:
    """Mean, percentiles and max of seconds, in milliseconds (None when there is nothing to measure)."""
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None}
    ms = [v * 1e3 for v in values]
    return {"mean": sum(ms) / len(ms), **{f"p{p}": percentile(ms, p) for p in PERCENTILES}, "max": max(ms)}


def summarize(results: list[RequestResult], duration: float) -> dict:
    """Counts, throughput and latency statistics of the requests of one run."""
    done = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in done)
    output = sum(r.output_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": output / duration if duration else 0.0,
        "total_token_throughput": (prompt + output) / duration if duration else 0.0,
        "ttft_ms": stats_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": stats_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": stats_ms([gap for r in done for gap in r.itl]),
        "latency_ms": stats_ms([r.latency for r in done]),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_summary(title: str, summary: dict) -> str:
    """The summary as an aligned block a person can read."""
    lines = [
        f" {title} ".center(60, "="),
        f"{'Completed requests:':<44}{summary['completed']}",
        f"{'Failed requests:':<44}{summary['failed']}",
        f"{'Duration (s):':<44}{summary['duration_s']:.2f}",
        f"{'Total input tokens:':<44}{summary['total_input_tokens']}",
        f"{'Total output tokens:':<44}{summary['total_output_tokens']}",
        f"{'Request throughput (req/s):':<44}{summary['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':<44}{summary['output_throughput']:.2f}",
        f"{'Total token throughput (tok/s):':<44}{summary['total_token_throughput']:.2f}",
    ]
    for key, name in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st)"),
        ("itl_ms", "Inter-token Latency"),
        ("latency_ms", "End-to-end Latency"),
    ):
        lines.append(f" {name} ".center(60, "-"))
        lines += [
            f"{label + ' (ms):':<44}{_ms(value)}" for label, value in [("Mean", summary[key]["mean"])] + [(f"P{p}", summary[key][f"p{p}"]) for p in PERCENTILES]
        ]
    lines += [f"error: {e}" for e in summary["errors"]]
    return "\n".join(lines + ["=" * 60])


def progress_printer(total: int, stream: TextIO = sys.stderr) -> Callable[[int, int], None]:
    """A counter on one line of a terminal; in a log, a line every tenth of the run."""
    step = max(1, total // 10)

    def show(done: int, failed: int) -> None:
        text = f"requests done {done}/{total}" + (f", {failed} failed" if failed else "")
        if stream.isatty():
            stream.write("\r" + text + ("\n" if done == total else ""))
        elif done % step == 0 or done == total:
            stream.write(text + "\n")
        stream.flush()

    return show


def write_json(path: str, payload: dict) -> None:
    """Write a result file, indented for people and diffs."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
