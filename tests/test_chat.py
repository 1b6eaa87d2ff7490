"""POST /v1/chat/completions end to end: a real server on a tiny chat model, the official SDK, and httpx."""

import asyncio
import functools
import json
from collections import Counter

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel
from transformers import AutoTokenizer

from tests.conftest import fail_next_step, serve
from tests.test_api import assert_error, events

QUESTION = [{"role": "user", "content": "def main():"}]


@pytest.fixture(scope="module")
def chat(chat_llama_dir):
    yield from serve(chat_llama_dir, "tiny-chat")


def post(served, body, **kwargs):
    headers = {"Authorization": f"Bearer {served.api_key}"} if served.api_key else {}
    return httpx.post(served.url + "/v1/chat/completions", json={"model": served.model, **body}, headers=headers, timeout=60, **kwargs)


def strictly(model: type[BaseModel], raw: dict) -> BaseModel:
    """Parse with the SDK's type in strict mode, and find no field the type does not declare."""
    parsed = model.model_validate(raw, strict=True)
    _no_extra(parsed)
    return parsed


def _no_extra(value) -> None:
    if isinstance(value, BaseModel):
        assert not value.model_extra, f"{type(value).__name__} has undeclared fields {value.model_extra}"
        for name in type(value).model_fields:
            _no_extra(getattr(value, name))
    elif isinstance(value, list):
        for item in value:
            _no_extra(item)


def stream(served, body) -> list:
    """The parsed chunks of a streamed reply, each checked against the SDK's chunk type; [DONE] last."""
    response = post(served, {**body, "stream": True})
    assert response.status_code == 200, response.text
    chunks = events(response)
    assert chunks[-1] == "[DONE]" and "[DONE]" not in chunks[:-1]
    for chunk in chunks[:-1]:
        strictly(ChatCompletionChunk, chunk)
    return chunks[:-1]


def streamed(chunks, index: int) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"] and c["choices"][0]["index"] == index)


def template_ids(served, messages, **kwargs) -> list[int]:
    """What transformers' own apply_chat_template makes of a conversation."""
    hf = AutoTokenizer.from_pretrained(served.model_dir)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=kwargs.pop("add_generation_prompt", True), **kwargs)
    return hf.encode(text, add_special_tokens=False)


def test_sdk_chat_completion_has_openais_shape(chat):
    out = chat.client().chat.completions.create(model=chat.model, messages=QUESTION, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and len(out.id) > len("chatcmpl-") + 16
    assert out.model == chat.model and out.system_fingerprint.startswith("fp_") and out.created > 0
    [choice] = out.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.refusal is None
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    assert out.usage.completion_tokens <= 8 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_raw_json_parses_strictly_as_the_sdk_types(chat):
    raw = post(chat, {"messages": QUESTION, "max_tokens": 6, "n": 2, "logprobs": True, "top_logprobs": 3, "seed": 1}).json()
    strictly(ChatCompletion, raw)
    assert list(raw) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert [c["index"] for c in raw["choices"]] == [0, 1]
    assert all(set(c) == {"index", "message", "logprobs", "finish_reason"} for c in raw["choices"])
    assert set(raw["choices"][0]["message"]) == {"role", "content", "refusal"}


def test_the_prompt_is_the_models_chat_template(chat):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again", "name": "ann"},
    ]
    out = post(chat, {"messages": messages, "max_tokens": 1}).json()
    assert out["usage"]["prompt_tokens"] == len(template_ids(chat, messages))


def test_developer_is_read_as_system_and_text_parts_join_with_newlines(chat):
    as_system = post(chat, {"messages": [{"role": "system", "content": "a\nb"}, *QUESTION], "max_tokens": 4, "temperature": 0}).json()
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    as_developer = post(chat, {"messages": [{"role": "developer", "content": parts}, *QUESTION], "max_tokens": 4, "temperature": 0}).json()
    assert as_developer["usage"] == as_system["usage"]
    assert as_developer["choices"][0]["message"] == as_system["choices"][0]["message"]


def test_tool_turns_render_through_the_template(chat):
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    out = post(chat, {"messages": messages, "max_tokens": 1})
    assert out.status_code == 200, out.text
    expected = [
        *messages[:1],
        {**messages[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": {"q": 1}}}]},
        messages[2],
    ]
    assert out.json()["usage"]["prompt_tokens"] == len(template_ids(chat, expected))


def test_stream_has_openais_chunk_sequence(chat):
    chunks = stream(chat, {"messages": QUESTION, "max_tokens": 12, "n": 2, "seed": 3})
    for index in (0, 1):
        mine = [c for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        assert all("role" not in c["choices"][0]["delta"] for c in mine[1:])
        assert [c["choices"][0]["finish_reason"] is not None for c in mine] == [False] * (len(mine) - 1) + [True]
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")


def test_stream_equals_non_stream_for_the_same_seed(chat):
    body = {"messages": QUESTION, "max_tokens": 20, "seed": 42, "n": 2, "logprobs": True, "top_logprobs": 2}
    whole = post(chat, body).json()
    chunks = stream(chat, body)
    for choice in whole["choices"]:
        i = choice["index"]
        assert streamed(chunks, i) == choice["message"]["content"]
        tokens = [t for c in chunks if c["choices"][0]["index"] == i and c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]]
        assert tokens == choice["logprobs"]["content"]
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["index"] == i][-1] == choice["finish_reason"]


def test_stream_include_usage(chat):
    chunks = stream(chat, {"messages": QUESTION, "max_tokens": 5, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + chunks[-1]["usage"]["completion_tokens"]


def test_sdk_streaming_and_async(chat):
    client = chat.client()
    parts = list(client.chat.completions.create(model=chat.model, messages=QUESTION, max_tokens=10, seed=9, stream=True))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)

    async def call():
        async with openai.AsyncOpenAI(base_url=chat.url + "/v1", api_key="none", max_retries=0) as aclient:
            return await aclient.chat.completions.create(model=chat.model, messages=QUESTION, max_tokens=10, seed=9)

    assert asyncio.run(call()).choices[0].message.content == text


def test_sdk_n_logprobs_stop_and_seed(chat):
    client = chat.client()
    kwargs = {"model": chat.model, "messages": QUESTION, "max_completion_tokens": 16, "n": 3, "seed": 5, "logprobs": True, "top_logprobs": 2}
    free = client.chat.completions.create(**kwargs)
    assert [c.index for c in free.choices] == [0, 1, 2] and free.usage.completion_tokens == sum(len(c.logprobs.content) for c in free.choices)
    assert all(len(t.top_logprobs) == 2 for c in free.choices for t in c.logprobs.content)
    assert client.chat.completions.create(**kwargs).choices == free.choices  # the same seed, the same replies
    stop = free.choices[0].message.content[2:4]
    stopped = client.chat.completions.create(**kwargs, stop=stop).choices[0]
    assert stopped.message.content == free.choices[0].message.content.split(stop)[0] and stopped.finish_reason == "stop"


def test_seeded_and_greedy_replies_repeat(chat):
    for extra in ({"seed": 11, "temperature": 1.5}, {"temperature": 0}):
        first, second = (post(chat, {"messages": QUESTION, "max_tokens": 16, **extra}).json() for _ in range(2))
        assert first["choices"] == second["choices"]


def test_logprobs_in_the_chat_shape(chat):
    raw = post(chat, {"messages": QUESTION, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 4}).json()
    content = raw["choices"][0]["logprobs"]["content"]
    assert raw["choices"][0]["logprobs"]["refusal"] is None and len(content) == raw["usage"]["completion_tokens"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 4  # exactly as many as asked; the chosen token is not added
        assert entry["top_logprobs"][0]["token"] == entry["token"] and entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted((t["logprob"] for t in entry["top_logprobs"]), reverse=True)
        for token in [entry, *entry["top_logprobs"]]:  # the bytes spell the token; a part of a character is named by its bytes
            raw_bytes = bytes(token["bytes"])
            if token["token"].startswith("bytes:"):
                assert token["token"] == "bytes:" + "".join(f"\\x{b:02x}" for b in raw_bytes)
            else:
                assert raw_bytes.decode("utf-8") == token["token"]
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace") == raw["choices"][0]["message"]["content"]


def test_logprobs_without_top_logprobs_has_empty_alternatives(chat):
    raw = post(chat, {"messages": QUESTION, "max_tokens": 3, "logprobs": True}).json()
    assert all(e["top_logprobs"] == [] for e in raw["choices"][0]["logprobs"]["content"])
    assert post(chat, {"messages": QUESTION, "max_tokens": 3, "logprobs": False}).json()["choices"][0]["logprobs"] is None


def test_stop_strings_never_reach_the_reply(chat):
    free = post(chat, {"messages": QUESTION, "max_tokens": 30, "temperature": 0}).json()["choices"][0]["message"]["content"]
    stop = free[5:8]
    assert len(stop) == 3
    body = {"messages": QUESTION, "max_tokens": 30, "temperature": 0, "stop": [stop]}
    whole = post(chat, body).json()["choices"][0]
    assert whole["message"]["content"] == free[: free.index(stop)] and whole["finish_reason"] == "stop"
    assert streamed(stream(chat, body), 0) == whole["message"]["content"]


def test_special_tokens_are_left_out_of_the_reply(chat):
    hf = AutoTokenizer.from_pretrained(chat.model_dir)
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    body = {"max_tokens": 3, "logit_bias": {str(im_end): 100}, "temperature": 0}
    reply = post(chat, {"messages": QUESTION, **body}).json()["choices"][0]
    assert reply["message"]["content"] == "" and reply["finish_reason"] == "length"
    text = httpx.post(chat.url + "/v1/completions", json={"model": chat.model, "prompt": "x", **body}).json()["choices"][0]["text"]
    assert text == "<|im_end|>" * 3  # the completions endpoint keeps them, as OpenAI's does


def test_without_a_limit_the_reply_may_run_to_the_end_of_the_context(chat):
    out = post(chat, {"messages": QUESTION, "ignore_eos": True, "temperature": 0}).json()
    assert out["usage"]["total_tokens"] == chat.engine.info.max_model_len and out["choices"][0]["finish_reason"] == "length"
    limited = post(chat, {"messages": QUESTION, "max_completion_tokens": 3, "ignore_eos": True}).json()
    assert limited["usage"]["completion_tokens"] == 3


def test_echo_and_continue_final_message(chat):
    messages = [*QUESTION, {"role": "assistant", "content": "    return"}]
    body = {"messages": messages, "max_tokens": 5, "temperature": 0, "add_generation_prompt": False, "continue_final_message": True}
    plain = post(chat, body).json()
    assert plain["usage"]["prompt_tokens"] == len(template_ids(chat, messages, add_generation_prompt=False, continue_final_message=True))
    echoed = post(chat, {**body, "echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == "    return" + plain["choices"][0]["message"]["content"]
    chunks = stream(chat, {**body, "echo": True})
    assert chunks[0]["choices"][0]["delta"]["content"] == "    return" and streamed(chunks, 0) == echoed["choices"][0]["message"]["content"]


def test_fields_for_openais_own_service_are_accepted(chat):
    body = {
        "messages": QUESTION,
        "max_tokens": 2,
        "store": True,
        "metadata": {"k": "v"},
        "service_tier": "auto",
        "user": "u1",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "tools": None,
        "stream_options": None,
        "chat_template_kwargs": {"extra_flag": True},
    }
    assert post(chat, body).status_code == 200


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"messages": []}, "messages", None),
        ({"messages": "hi"}, "messages", None),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None),
        ({"messages": [{"content": "x"}]}, "messages[0].role", None),
        ({"messages": [{"role": "user"}]}, "messages[0].content", None),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
        (
            {"messages": [*QUESTION, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[1].content[1]",
            None,
        ),
        ({"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages[0].colour", None),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", None),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content", None),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role", "unsupported_parameter"),
        ({"messages": ["hi"]}, "messages[0]", None),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice", "unsupported_parameter"),  # 'auto', the default
        ({"tool_choice": "none"}, "tool_choice", None),  # only with tools
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", None),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio", "unsupported_parameter"),
        ({"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_parameter"),
        ({"web_search_options": {}}, "web_search_options", "unsupported_parameter"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
        ({"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens", None),
        ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", "integer_below_min_value"),
        ({"top_logprobs": 2}, "top_logprobs", None),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        ({"logprobs": 2}, "logprobs", None),
        ({"n": 0}, "n", None),
        ({"n": 129}, "n", None),
        ({"temperature": 2.5}, "temperature", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"logit_bias": {"5": 101}}, "logit_bias", None),
        ({"logit_bias": {"999999": 1}}, "logit_bias", None),
        ({"stream_options": {"include_usage": True}}, "stream_options", None),
        ({"service_tier": "fastest"}, "service_tier", None),
        ({"continue_final_message": True}, "continue_final_message", None),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", None),
        ({"best_of": 2}, "best_of", None),
        ({"suffix": "x"}, "suffix", None),
    ],
)
def test_client_mistakes_are_400s_naming_the_parameter(chat, body, param, code):
    assert_error(post(chat, {"messages": QUESTION, **body}), 400, param, code)


def test_a_template_that_raises_is_a_400_with_its_message(chat):
    error = assert_error(post(chat, {"messages": [{"role": "user", "content": "RAISE"}]}), 400, "messages")
    assert "this template refuses RAISE" in error["message"]


def test_a_model_without_a_template_says_so(llama):
    error = assert_error(post(llama, {"messages": QUESTION}), 400, "messages", "no_chat_template")
    assert "--chat-template" in error["message"]


def test_chat_template_file_overrides_the_models(llama_dir, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    for served in serve(llama_dir, "tiny-llama-templated", engine_options={"chat_template": str(template)}):
        out = post(served, {"messages": QUESTION, "max_tokens": 2})
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["prompt_tokens"] == len(served.engine.tokenizer.encode("user: def main():\nassistant:", False))


def test_a_broken_template_file_stops_the_start(llama_dir, tmp_path):
    from tokenmill.config import EngineConfig
    from tokenmill.engine.loader import ModelLoadError, build_engine

    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}")
    with pytest.raises(ModelLoadError, match="not a valid Jinja template"):
        build_engine(EngineConfig(chat_template=str(template)), str(llama_dir), "x")
    with pytest.raises(ModelLoadError, match="--chat-template"):
        build_engine(EngineConfig(chat_template=str(tmp_path / "missing.jinja")), str(llama_dir), "x")


def test_too_long_counts_the_templated_prompt(chat):
    limit = chat.engine.info.max_model_len
    error = assert_error(post(chat, {"messages": [{"role": "user", "content": "x " * limit}]}), 400, "messages", "context_length_exceeded")
    assert f"maximum context length is {limit} tokens" in error["message"]
    fits = post(chat, {"messages": QUESTION, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert_error(post(chat, {"messages": QUESTION, "max_tokens": limit - fits + 1}), 400, "messages", "context_length_exceeded")
    assert post(chat, {"messages": QUESTION, "max_tokens": limit - fits, "stop": ["\n"]}).status_code == 200


def test_unknown_model_and_auth_answer_as_completions_do(chat, chat_llama_dir):
    assert_error(httpx.post(chat.url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": QUESTION}), 404, "model", "model_not_found")
    for served in serve(chat_llama_dir, "tiny-chat-keyed", api_key="sk-chat"):
        response = httpx.post(served.url + "/v1/chat/completions", json={"model": served.model, "messages": QUESTION})
        assert_error(response, 401, None, "invalid_api_key", type="authentication_error")
        with pytest.raises(openai.NotFoundError):
            served.client().chat.completions.create(model="other", messages=QUESTION)
        assert served.client().chat.completions.create(model=served.model, messages=QUESTION, max_tokens=2).choices


def test_malformed_bodies_are_400s(chat):
    for content in (b"", b"{not json", b"[1]"):
        assert_error(httpx.post(chat.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(chat.url + "/v1/chat/completions", json={"model": chat.model}), 400, "messages")


def test_an_engine_failure_after_the_200_is_an_error_event(chat, monkeypatch):
    fail_next_step(chat, monkeypatch)
    chunks = events(post(chat, {"messages": QUESTION, "max_tokens": 5, "stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["type"] == "server_error"
    fail_next_step(chat, monkeypatch)
    assert_error(post(chat, {"messages": QUESTION, "max_tokens": 5}), 500, type="server_error")
    assert post(chat, {"messages": QUESTION, "max_tokens": 5}).status_code == 200 and chat.idle()


def test_a_client_that_leaves_frees_its_work(chat):
    with httpx.stream(
        "POST", chat.url + "/v1/chat/completions", json={"model": chat.model, "messages": QUESTION, "stream": True, "ignore_eos": True}, timeout=30
    ) as response:
        next(response.iter_lines())
    assert chat.idle(10)


HOSTILE = {
    "100k_messages": ({"messages": [{"role": "user", "content": "x"}] * 100_000}, 400, "messages", "context_length_exceeded"),
    "a_message_of_3MB": ({"messages": [{"role": "user", "content": "ab" * 1_500_000}]}, 400, "messages", "context_length_exceeded"),
    "100k_text_parts": ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 100_000}]}, 400, "messages", "context_length_exceeded"),
    "content_nested_deeply": ({"messages": [{"role": "user", "content": [[[[["x"]]]]]}]}, 400, "messages[0].content[0]", None),
    "null_message": ({"messages": [None]}, 400, "messages[0]", None),
    "role_a_number": ({"messages": [{"role": 5, "content": "x"}]}, 400, "messages[0].role", None),
    "unknown_key_in_a_text_part": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "bold": True}]}]},
        400,
        "messages[0].content[0].bold",
        None,
    ),
    "text_part_without_text": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content[0].text", None),
    "tool_calls_not_a_list": ({"messages": [{"role": "assistant", "content": None, "tool_calls": {"id": "x"}}]}, 400, "messages[0].tool_calls", None),
    "malformed_tool_call": (
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": 1}}]}]},
        400,
        "messages[0].tool_calls[0]",
        None,
    ),
    "name_not_a_string": ({"messages": [{"role": "user", "content": "x", "name": ["a"]}]}, 400, "messages[0].name", None),
    "template_kwargs_not_an_object": ({"messages": QUESTION, "chat_template_kwargs": [1]}, 400, "chat_template_kwargs", None),
    "lone_surrogate_in_content": ({"messages": [{"role": "user", "content": "a\ud800"}]}, 400, ("messages", None), None),
}


@pytest.mark.parametrize("case", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_chat_bodies_are_openai_errors(chat, case):
    body, status, param, code = case
    content = json.dumps({"model": chat.model, "max_tokens": 2, **body}).encode()
    response = httpx.post(chat.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text[:500]
    error = response.json()["error"]
    assert error["param"] in (param if isinstance(param, tuple) else (param,)) and error["code"] == code, error
    assert post(chat, {"messages": QUESTION, "max_tokens": 2}).status_code == 200 and chat.idle()


def _bounded(spec: dict, model: str) -> dict:
    """The chat request's schema with its sizes capped, so that every generated case is cheap to serve."""
    schemas = spec["components"]["schemas"]
    props = schemas["ChatCompletionRequest"]["properties"]
    props["model"] = {"type": "string", "enum": [model]}
    props["max_completion_tokens"] = {"type": "integer", "minimum": 1, "maximum": 8}
    props.pop("max_tokens")
    props["messages"].update(maxItems=3)
    schemas["ChatCompletionRequest"]["required"].append("max_completion_tokens")
    for name, top in (("n", 2), ("top_logprobs", 5)):
        next(b for b in props[name]["anyOf"] if b.get("type") == "integer")["maximum"] = top
    for message in ("InstructionMessage", "UserMessage", "AssistantMessage", "ToolMessage", "TextPart"):
        for field in schemas[message]["properties"].values():
            for branch in field.get("anyOf", [field]):
                if branch.get("type") == "string":
                    branch["maxLength"] = 48
                elif branch.get("type") == "array":
                    branch["maxItems"] = 3
    return spec


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_in_chat(chat):
    """Generated chat requests, valid and invalid per the served OpenAPI description: never a 5xx."""
    import schemathesis
    from schemathesis import GenerationMode

    from tests.test_hostile import _with_int_body, check_response, run_cases, whole_streams

    spec = httpx.get(chat.url + "/openapi.json", timeout=10).json()
    operation = whole_streams(schemathesis.openapi.from_dict(_bounded(spec, chat.model)))["/v1/chat/completions"]["POST"]

    def check(case, statuses: Counter) -> None:
        response = case.call(base_url=chat.url, timeout=60)
        check_response(case, response, statuses)
        if response.status_code == 200:
            streamed = response.headers.get("content-type", [""])[0].startswith("text/event-stream")
            assert response.content.rstrip().endswith(b"data: [DONE]") if streamed else response.json()["object"] == "chat.completion"

    for mode, examples in ((GenerationMode.POSITIVE, 80), (GenerationMode.NEGATIVE, 60)):
        statuses: Counter = Counter()
        run_cases(operation.as_strategy(mode).map(_with_int_body), examples, functools.partial(check, statuses=statuses))
        if mode == GenerationMode.POSITIVE:
            assert statuses[200] > 0, f"no generated request reached the engine: {statuses}"
    assert post(chat, {"messages": QUESTION, "max_tokens": 2}).status_code == 200 and chat.idle()
