"""The benchmarks run end to end on tiny models, so they cannot rot: bench serve, offline, ceiling, compare's table."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill import cli
from tokenmill.benchmarks import compare, metrics
from tokenmill.benchmarks.metrics import RequestResult
from tokenmill.benchmarks.serve import ServeOptions, benchmark, long_prompt_report, sse_events


def test_sse_parser_skips_pings_and_joins_data_lines():
    lines = [
        ": ping",
        "",
        'data: {"a": 1}',
        "",
        ":another comment",
        "event: x",
        "data:{",
        'data: "b": 2}',
        "",
        "data: [DONE]",
    ]  # the last event has no blank line after it
    assert sse_events(lines) == ['{"a": 1}', '{\n"b": 2}', "[DONE]"]


def test_bench_serve_streams_and_times_every_request(llama, tmp_path, capsys):
    out = tmp_path / "serve.json"
    code = cli.main(
        [
            "bench",
            "serve",
            "--base-url",
            llama.url,
            "--tokenizer",
            str(llama.model_dir),
            "--num-prompts",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--max-concurrency",
            "2",
            "--prompt-format",
            "ids",
            "--result-json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    s = report["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"], s["total_input_tokens"]) == (4, 0, 16, 32)
    assert report["options"]["model"] == llama.model  # the first id of GET /v1/models
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "latency_ms"):
        assert all(v > 0 for v in s[key].values()), key
    assert s["output_throughput"] > 0 and len(report["requests"]) == 4
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_bench_serve_text_prompts_poisson_arrivals_and_one_long_prompt(llama):
    options = ServeOptions(
        base_url=llama.url + "/v1",
        num_prompts=3,
        input_len=8,
        output_len=4,
        request_rate=50.0,
        prompt_format="text",
        tokenizer=str(llama.model_dir),
        warmup=0,
        long_prompt_len=64,
        long_prompt_at=0.0,
        long_prompt_output_len=2,
    )
    report = asyncio.run(benchmark(options))
    assert report["summary"]["completed"] == 3
    assert all(abs(r["prompt_tokens"] - 8) <= 1 for r in report["requests"][:3])  # text re-tokenizes to about as many
    long = report["long_prompt"]
    assert long["ok"] and abs(long["prompt_tokens"] - 64) <= 1 and long["ttft_ms"] > 0
    assert report["requests"][-1]["long_prompt"] and report["requests"][1]["sent"] > 0


def test_long_prompt_report_splits_the_others_gaps_at_its_first_token():
    long = RequestResult(ok=True, sent=1.0, latency=2.0, token_times=[0.5, 1.0])  # waits from 1.0 s to 1.5 s
    other = RequestResult(ok=True, sent=0.0, latency=1.8, token_times=[0.2, 0.9, 1.6, 1.8])
    report = long_prompt_report(long, [other])
    assert report["others_gaps_during"] == 1 and round(report["others_itl_ms_during"]["max"]) == 700
    assert round(report["others_itl_ms_outside"]["max"]) == 700 and report["ttft_ms"] == 500


def test_bench_serve_reports_a_failed_request(llama):
    options = ServeOptions(base_url=llama.url, model="no-such-model", num_prompts=2, input_len=4, output_len=2, vocab_size=1000, warmup=0)
    s = asyncio.run(benchmark(options))["summary"]
    assert (s["completed"], s["failed"]) == (0, 2) and s["errors"][0].startswith("HTTP 404")


def test_bench_offline_runs_the_engine_in_process(llama_dir, tmp_path, capsys):
    out = tmp_path / "offline.json"
    code = cli.main(
        [
            "bench",
            "offline",
            "--model",
            str(llama_dir),
            "--num-prompts",
            "3",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--max-concurrency",
            "2",
            "--result-json",
            str(out),
        ]
    )
    assert code == 0
    s = json.loads(out.read_text())["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (3, 0, 12)
    assert s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p50"] > 0 and s["output_throughput"] > 0
    assert "Offline Engine Benchmark Result" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # the own forward, and transformers' modules
def test_the_breakdown_times_every_part_of_a_step(kind, llama_dir, gpt2_dir, capsys):
    from tokenmill.benchmarks import breakdown

    model = {"llama": llama_dir, "gpt2": gpt2_dir}[kind]
    assert breakdown.main(["--model", str(model), "--concurrency", "1", "3", "--input-len", "8", "--output-len", "4"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "c1 ms/step (share)" in rows["part"] and "c3 ms/step (share)" in rows["part"]
    for part in ("whole step", "linears", "sampling", "rest of the model run", "engine outside the model"):
        assert part in rows
    linears = [float(cell.split(" (")[0]) for cell in rows["linears"].strip("| ").split(" | ")[1:]]
    assert len(linears) == 2 and all(ms > 0 for ms in linears)
    if kind == "llama" and shutil.which("g++"):  # the engine runs its layers in one compiled call: timed apart, with the linears' share of it
        assert "whole step, layers in Python (the parts below)" in rows
        shares = [float(cell.rstrip("%")) for cell in rows["linears' share of the whole step"].strip("| ").split(" | ")[1:]]
        assert len(shares) == 2 and all(0 < share for share in shares)
        alone = [float(cell) for cell in rows["linears alone at the step's rows (the matmul ceiling)"].strip("| ").split(" | ")[1:]]
        assert len(alone) == 2 and all(ms > 0 for ms in alone)  # replayed at the one call's own rows


@pytest.mark.parametrize("library", ["matmul", "paged_attention", "llama_ops"])
def test_the_kernel_ab_replays_both_kinds_of_step_with_each_build(library, llama_dir, tmp_path, capsys):
    from importlib import resources

    from tokenmill.benchmarks import kernel_ab

    source = resources.files("tokenmill.engine").joinpath(f"csrc/{library}.cpp")
    args = ["--model", str(llama_dir), "--library", library, "--a", str(source), "--b", str(source), "--kernel-cache", str(tmp_path)]
    assert kernel_ab.main([*args, "--concurrency", "2", "--rounds", "2", "--input-len", "8", "--output-len", "4"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| c2")]
    assert sorted(row[1] for row in rows) == ["decode only", "prompt rows"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)


def test_the_kernel_ab_repacks_the_weights_for_a_matmul_of_another_panel_width(llama_dir, tmp_path, capsys):
    from importlib import resources

    from tokenmill.benchmarks import kernel_ab
    from tokenmill.engine import native

    shipped = resources.files("tokenmill.engine").joinpath("csrc/matmul.cpp").read_text()
    tiles = {"MR = 8, NV = 3;": "MR = 8, NV = 2;", "MR = 6, NV = 2;": "MR = 4, NV = 3;"}  # AVX-512's and AVX2's: same bits
    assert all(tile in shipped for tile in tiles)
    other = shipped
    for tile, narrower in tiles.items():
        other = other.replace(tile, narrower)
    (tmp_path / "a.cpp").write_text(shipped)
    (tmp_path / "b.cpp").write_text(other)
    a, b = (native.load("matmul", tmp_path, source) for source in (shipped, other))
    if a is None or a.matmul_panel_width() == 0:
        pytest.skip("no C++ compiler, or a CPU without vector FMA")
    assert a.matmul_panel_width() != b.matmul_panel_width()
    args = ["--model", str(llama_dir), "--library", "matmul", "--a", str(tmp_path / "a.cpp"), "--b", str(tmp_path / "b.cpp"), "--kernel-cache", str(tmp_path)]
    assert kernel_ab.main([*args, "--concurrency", "2", "--rounds", "2", "--input-len", "8", "--output-len", "4"]) == 0  # the bits held
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| c2")]
    assert sorted(row[1] for row in rows) == ["decode only", "prompt rows"]


def test_the_kernel_ab_replays_the_layers_through_python_and_in_one_call(llama_dir, capsys):
    from tokenmill.benchmarks import kernel_ab

    if not shutil.which("g++"):
        pytest.skip("no C++ compiler: no compiled layers")
    args = ["--model", str(llama_dir), "--library", "layers", "--concurrency", "2", "--rounds", "2", "--input-len", "8", "--output-len", "4"]
    assert kernel_ab.main(args) == 0  # every replay's logits equal the engine's own, both ways
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| c2")]
    assert sorted(row[1] for row in rows) == ["decode only", "prompt rows"]


def test_the_kernel_ab_refuses_a_build_with_other_bits(llama_dir, tmp_path):
    from importlib import resources

    from tokenmill.benchmarks import kernel_ab

    shipped = resources.files("tokenmill.engine").joinpath("csrc/matmul.cpp")
    exact = "memcpy(row, out, sizeof(float) * cols);"
    assert exact in shipped.read_text()  # where the variant below changes the last bit of the outputs
    other = tmp_path / "other.cpp"
    other.write_text(shipped.read_text().replace(exact, "for (int64_t j = 0; j < cols; j++) row[j] = out[j] * 1.0000001f;"))
    args = ["--model", str(llama_dir), "--library", "matmul", "--a", str(shipped), "--b", str(other), "--kernel-cache", str(tmp_path)]
    with pytest.raises(AssertionError, match="other logits"):
        kernel_ab.main([*args, "--concurrency", "2", "--rounds", "2", "--input-len", "8", "--output-len", "4"])


def test_the_kernel_ab_run_as_a_module_swaps_the_attention_kernels_it_replays(llama_dir, tmp_path):
    """Run as `python -m`, its own classes live in __main__: the swap must still reach the forward its capture holds."""
    from importlib import resources

    if not shutil.which("g++"):
        pytest.skip("no C++ compiler: no compiled attention")
    shipped = resources.files("tokenmill.engine").joinpath("csrc/paged_attention.cpp")
    exact = "= acc[p][g][j] * scale;"
    assert shipped.read_text().count(exact) == 1  # the attention kernels' scores: the variant moves their last bits
    other = tmp_path / "other.cpp"
    other.write_text(shipped.read_text().replace(exact, "= acc[p][g][j] * (scale * 1.0000001f);"))
    args = ["--model", str(llama_dir), "--library", "paged_attention", "--a", str(shipped), "--b", str(other), "--kernel-cache", str(tmp_path)]
    args += ["--concurrency", "2", "--rounds", "2", "--input-len", "8", "--output-len", "4"]
    done = subprocess.run([sys.executable, "-m", "tokenmill.benchmarks.kernel_ab", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "other logits" in done.stderr, done.stdout + done.stderr[-2000:]


def test_bench_ceiling_times_every_matmul(llama_dir, tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    code = cli.main(["bench", "ceiling", "--model", str(llama_dir), "--rows", "1", "16", "--repeat", "2", "--copy-mib", "16", "--result-json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["matmul_modules"] == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert [r["m"] for r in report["rows"]] == [1, 16] and all(r["tok_s"] > 0 for r in report["rows"])
    assert report["floor_batch1"]["tok_s"] > 0
    assert "| 16 |" in capsys.readouterr().out


def test_compare_table_has_a_row_per_system_and_ratios():
    def system(tok_s: float) -> dict:
        summary = {"output_throughput": tok_s, "failed": 0, "ttft_ms": {"p99": 120.0}, "itl_ms": {"p99": 30.0}}
        return {
            "runs": {
                1: {"summary": summary, "memory_mib": {"start": 1, "peak": 600, "end": 2}},
                16: {"summary": summary, "memory_mib": {"start": 1, "peak": 700, "end": 2}},
            }
        }

    text = compare.table({"tokenmill": system(40.0), "vLLM (CPU)": system(80.0), "llama.cpp": {"error": "x"}}, [1, 16], False)
    lines = text.splitlines()
    assert len(lines) == 5 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| vLLM (CPU) | 80.0 | 80.0 | 120 | 30 | 700 | 0.50x / 0.50x |" in text
    assert "| llama.cpp | failed to start |" in text


def test_rounds_merge_sums_counts_averages_the_rest_and_flags_all():
    rounds = [
        {"completed": 4, "failed": 0, "prompt_tokens": 2000, "output_throughput": 30.0, "itl_ms": {"p99": 10.0}, "errors": [], "ok": True, "error": None},
        {"completed": 4, "failed": 1, "prompt_tokens": 2000, "output_throughput": 20.0, "itl_ms": {"p99": None}, "errors": ["x"], "ok": False, "error": "x"},
    ]
    assert compare.merge(rounds) == {
        "completed": 8,
        "failed": 1,
        "prompt_tokens": 2000,
        "output_throughput": 25.0,
        "itl_ms": {"p99": 10.0},
        "errors": ["x"],
        "ok": False,
        "error": "x",
    }


def test_percentiles_interpolate_like_numpy():
    assert metrics.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert metrics.percentile([5.0], 99) == 5.0
    assert metrics.stats_ms([])["p99"] is None


@pytest.mark.slow  # starts `python -m tokenmill serve` in a subprocess: ~8 s
def test_compare_serves_tokenmill_and_samples_its_memory(llama_dir, tmp_path, capsys):
    code = compare.main(
        ["--model", str(llama_dir), "--concurrency", "1", "2", "--num-prompts", "2", "--input-len", "8", "--output-len", "4", "--log-dir", str(tmp_path)]
    )
    assert code == 0
    report = json.loads((tmp_path / "compare.json").read_text())
    runs = report["systems"]["tokenmill"]["runs"]
    assert [runs[c]["summary"]["completed"] for c in ("1", "2")] == [2, 2]
    assert 0 < runs["2"]["memory_mib"]["start"] <= runs["2"]["memory_mib"]["peak"]
    out = capsys.readouterr().out
    assert "| tokenmill | " in out and "1.00x / 1.00x" in out


def test_a_structured_workload_constrains_the_share_asked_for(llama, tmp_path):
    from tokenmill.benchmarks.serve import constrained

    assert [constrained(i, 0.5) for i in range(6)] == [False, True, False, True, False, True]
    assert not any(constrained(i, 0.0) for i in range(6)) and all(constrained(i, 1.0) for i in range(6))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"enum": ["yes", "no"]}))
    out = tmp_path / "serve.json"
    args = ["bench", "serve", "--base-url", llama.url, "--vocab-size", "900", "--num-prompts", "4", "--input-len", "8", "--output-len", "6"]
    assert cli.main([*args, "--structured-fraction", "0.5", "--schema", str(schema), "--result-json", str(out)]) == 0
    report = json.loads(out.read_text())
    tokens = [r["output_tokens"] for r in report["requests"]]
    assert report["summary"]["failed"] == 0 and sorted(tokens)[:2] != [6, 6] and max(tokens) == 6  # the constrained ones end with their enum


def test_grammar_library_comparison_runs(llama_dir, capsys):
    from tokenmill.benchmarks import grammar_libraries

    assert grammar_libraries.main(["--model", str(llama_dir)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| llguidance")]
    assert len(rows) == 1
    accepted, total = rows[0].rstrip(" |").rsplit("| ", 1)[1].split(" of ")
    assert accepted == total  # the valid output is accepted whole


@pytest.mark.slow  # two `python -m tokenmill serve` subprocesses up at once: ~20 s
def test_compare_rounds_alternate_the_systems(llama_dir, tmp_path, capsys):
    repo = Path(__file__).resolve().parents[1]
    args = ["--model", str(llama_dir), "--concurrency", "2", "--num-prompts", "2", "--input-len", "8", "--output-len", "4"]
    code = compare.main([*args, "--rounds", "2", "--baseline-src", str(repo), "--log-dir", str(tmp_path)])
    assert code == 0
    systems = json.loads((tmp_path / "compare.json").read_text())["systems"]
    ours, other = systems["tokenmill"], next(r for name, r in systems.items() if name != "tokenmill")
    a, b = ([run["started_at"] for run in r["runs"]["2"]["rounds"]] for r in (ours, other))
    assert a[0] < b[0] < b[1] < a[1]  # A B, then B A
    assert ours["runs"]["2"]["summary"]["completed"] == 4  # both rounds' requests
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tokenmill")]
    assert len(rows) == 4 and sum(line.count(" / ") == 1 for line in rows) == 2  # the table's rows, then each round's figures
