"""Every example in examples/ runs against a served tiny model, so none can rot (the docker lines excepted)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import serve
from tests.test_lm_eval import tasks  # noqa: F401 - the local lm-eval tasks, as a fixture

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def served(chat_llama_dir):
    yield from serve(chat_llama_dir, "tiny-chat-examples")


def run(served, script: str, **env) -> str:
    """Run one example against the server; it must succeed. Returns what it printed."""
    path = EXAMPLES / script
    command = [sys.executable, str(path)] if script.endswith(".py") else ["bash", str(path)]
    bin_dir = str(Path(sys.executable).parent)  # tokenmill and lm_eval, as installed beside this Python
    environment = {**os.environ, "BASE": served.url, "MODEL": served.model, "PATH": bin_dir + os.pathsep + os.environ["PATH"], **env}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=EXAMPLES.parent)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize("script", ["openai_sdk.py", "async_sdk.py", "streaming.py", "chat.py"])
def test_python_examples(served, script):
    assert run(served, script).strip()


def test_curl_examples(served):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = run(served, "curl.sh")
    assert '"object":"text_completion"' in out and "data: [DONE]" in out and '"object":"chat.completion"' in out
    assert '"token_logprobs":[null,' in out and '"param":"temperature"' in out


@pytest.mark.slow
def test_benchmark_example(served, tmp_path):
    result = tmp_path / "bench.json"
    vocab = str(served.engine.tokenizer.vocab_size)
    run(served, "bench.sh", VOCAB_SIZE=vocab, NUM_PROMPTS="4", INPUT_LEN="16", OUTPUT_LEN="4", CONCURRENCY="2", RESULT_JSON=str(result))
    summary = json.loads(result.read_text())["summary"]
    assert summary["completed"] == 4 and summary["failed"] == 0


@pytest.mark.slow
def test_lm_eval_example(served, tasks):  # noqa: F811 - the fixture imported above
    out = run(served, "lm_eval.sh", TASKS="tm_choices", INCLUDE_PATH=str(tasks), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    assert "tm_choices" in out and "acc" in out


@pytest.mark.slow
def test_the_gpu_check_dry_runs_on_the_cpu(tmp_path):
    """examples/gpu_check.sh with TINY=1: every system on every workload of both shapes, on tiny models, so the script cannot rot."""
    environment = {**os.environ, "TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(EXAMPLES / "gpu_check.sh")], capture_output=True, text=True, timeout=900, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["shapes"]) == {"qwen2.5-0.5b", "llama-3.2-1b"}
    for shape in results["shapes"].values():
        rows = shape["results"]
        assert len(rows) == 10  # 3 workloads x 3 systems, and HTTP on the fixed one
        assert all("error" not in row and row["output_throughput"] > 0 for row in rows.values()), rows
    assert "| fixed / tokenmill HTTP |" in (tmp_path / "results.md").read_text()
    assert "passed" in (tmp_path / "gpu-tests.txt").read_text() or "skipped" in (tmp_path / "gpu-tests.txt").read_text()
