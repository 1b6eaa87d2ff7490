"""POST /tokenize and /detokenize, in vLLM's shapes, against real servers."""

import httpx
import pytest

from tests.conftest import serve
from tests.test_api import assert_error

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]


@pytest.fixture(scope="module")
def chat(chat_llama_dir):
    yield from serve(chat_llama_dir, "tiny-chat")


@pytest.fixture(scope="module")
def bos(bos_llama_dir):
    yield from serve(bos_llama_dir, "tiny-bos", api_key="sk-tok")


def call(served, route, body):
    headers = {"Authorization": f"Bearer {served.api_key}"} if served.api_key else {}
    return httpx.post(served.url + route, json=body, headers=headers, timeout=30)


def test_a_text_prompt_counts_as_the_completions_endpoint_counts_it(bos):
    out = call(bos, "/tokenize", {"model": bos.model, "prompt": "import os"}).json()
    usage = call(bos, "/v1/completions", {"model": bos.model, "prompt": "import os", "max_tokens": 1}).json()["usage"]
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"} and out["token_strs"] is None
    assert out["count"] == len(out["tokens"]) == usage["prompt_tokens"] and out["max_model_len"] == bos.engine.info.max_model_len
    bare = call(bos, "/tokenize", {"prompt": "import os", "add_special_tokens": False}).json()  # model may be left out, as in vLLM
    assert out["tokens"] == [bos.engine.tokenizer.bos_token_id, *bare["tokens"]]
    strs = call(bos, "/tokenize", {"prompt": "import os", "add_special_tokens": False, "return_token_strs": True}).json()["token_strs"]
    assert "".join(strs) == "import os"


def test_messages_count_as_the_chat_endpoint_counts_them(chat):
    out = call(chat, "/tokenize", {"model": chat.model, "messages": QUESTION}).json()
    usage = call(chat, "/v1/chat/completions", {"model": chat.model, "messages": QUESTION, "max_tokens": 1}).json()["usage"]
    assert out["count"] == usage["prompt_tokens"]
    without = call(chat, "/tokenize", {"messages": QUESTION, "add_generation_prompt": False}).json()
    assert without["tokens"] == out["tokens"][: without["count"]] and without["count"] < out["count"]


def test_detokenize_reads_ids_back(chat):
    ids = call(chat, "/tokenize", {"prompt": "def f(x):\n    return x"}).json()["tokens"]
    assert call(chat, "/detokenize", {"model": chat.model, "tokens": ids}).json() == {"prompt": "def f(x):\n    return x"}
    assert call(chat, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    "route, body, status, param, code",
    [
        ("/tokenize", {"model": "other", "prompt": "x"}, 404, "model", "model_not_found"),
        ("/tokenize", {"prompt": "x", "colour": 1}, 400, "colour", None),
        ("/tokenize", {"prompt": 5}, 400, "prompt", None),
        ("/tokenize", {}, 400, "prompt", None),
        ("/tokenize", {"messages": []}, 400, "messages", None),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
        ("/tokenize", {"messages": [{"role": "user", "content": "RAISE"}]}, 400, "messages", None),
        ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens", None),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens", None),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens", None),
        ("/detokenize", {"tokens": [1], "model": "other"}, 404, "model", "model_not_found"),
    ],
)
def test_mistakes_are_openai_errors(chat, route, body, status, param, code):
    assert_error(call(chat, route, body), status, param, code)


def test_a_model_without_a_template_cannot_tokenize_messages(llama):
    assert_error(call(llama, "/tokenize", {"messages": QUESTION}), 400, "messages", "no_chat_template")


def test_the_key_is_required(bos):
    for route, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        assert_error(httpx.post(bos.url + route, json=body), 401, None, "invalid_api_key", "authentication_error")


def test_tokenizer_info_serves_a_remote_tokenizer(chat):
    info = httpx.get(chat.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["chat_template"] == chat.engine.tokenizer.chat_template
    assert info["model_max_length"] == chat.engine.info.max_model_len and info["vocab_size"] == chat.engine.tokenizer.vocab_size
    eos = call(chat, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [chat.engine.tokenizer.eos_token_id]
