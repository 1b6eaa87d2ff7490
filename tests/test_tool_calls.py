"""Chat tool calls forced by tool_choice ('required' or a named function): the call's arguments follow its schema."""

import json

import httpx
import jsonschema
import pytest
from openai.types.chat import ChatCompletion

from tests.conftest import serve
from tests.test_api import assert_error, events
from tests.test_chat import strictly

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"], "additionalProperties": False},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False},
    },
}
NOTHING = {"type": "function", "function": {"name": "ping"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def chat(chat_llama_dir):
    yield from serve(chat_llama_dir, "tiny-chat-tools")


def post(served, body):
    return httpx.post(served.url + "/v1/chat/completions", json={"model": served.model, "messages": ASK, "max_tokens": 40, **body}, timeout=120)


def test_a_named_function_is_called_with_valid_arguments(chat):
    for extra in ({"temperature": 0}, {"seed": 5}):
        raw = post(chat, {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, **extra}).json()
        reply = strictly(ChatCompletion, raw)
        choice = reply.choices[0]
        [call] = choice.message.tool_calls
        assert choice.message.content is None and call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        if choice.finish_reason == "tool_calls":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        else:
            assert choice.finish_reason == "length"


def test_required_chooses_one_of_the_tools(chat):
    seen = set()
    for seed in range(6):
        choice = post(chat, {"tools": [WEATHER, TIME, NOTHING], "tool_choice": "required", "seed": seed}).json()["choices"][0]
        if choice["finish_reason"] != "tool_calls":
            continue
        [call] = choice["message"]["tool_calls"]
        schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"], "ping": {"const": {}}}
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        seen.add(call["function"]["name"])
    assert seen, "no call completed"


def test_tools_reach_the_template_and_none_answers_in_text(llama_dir, tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text(
        "{% for t in tools or [] %}tool {{ t.function.name }}: {{ t.function.description }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    )
    for served in serve(llama_dir, "tiny-tools-template", engine_options={"chat_template": str(template)}):
        plain = post(served, {"max_tokens": 1}).json()["usage"]["prompt_tokens"]
        answer = post(served, {"max_tokens": 1, "tools": [WEATHER], "tool_choice": "none"}).json()
        assert answer["choices"][0]["message"].get("tool_calls") is None and isinstance(answer["choices"][0]["message"]["content"], str)
        added = served.engine.tokenizer.encode("tool get_weather: The weather in a city.\n", False)
        assert answer["usage"]["prompt_tokens"] == plain + len(added)


def test_a_streamed_call_equals_the_whole_one(chat):
    for tools, choice in (([WEATHER], {"type": "function", "function": {"name": "get_weather"}}), ([WEATHER, TIME], "required")):
        body = {"tools": tools, "tool_choice": choice, "seed": 3, "n": 2}
        whole = post(chat, body).json()
        chunks = [
            c
            for c in events(
                httpx.post(
                    chat.url + "/v1/chat/completions", json={"model": chat.model, "messages": ASK, "max_tokens": 40, **body, "stream": True}, timeout=120
                )
            )
            if c != "[DONE]"
        ]
        for c in whole["choices"]:
            mine = [k["choices"][0] for k in chunks if k["choices"][0]["index"] == c["index"]]
            calls = [t for k in mine for t in k["delta"].get("tool_calls") or []]
            assert calls[0]["id"].startswith("call_") and all(t.get("id") in (None, calls[0]["id"]) for t in calls)  # one call, one id
            assert calls[0]["function"]["name"] == c["message"]["tool_calls"][0]["function"]["name"]
            assert "".join(t["function"].get("arguments", "") for t in calls) == c["message"]["tool_calls"][0]["function"]["arguments"]
            assert mine[-1]["finish_reason"] == c["finish_reason"] and all(k["finish_reason"] is None for k in mine[:-1])


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"tools": [WEATHER]}, 400, "tool_choice", "unsupported_parameter"),
        ({"tools": [WEATHER], "tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter"),
        ({"tool_choice": "required"}, 400, "tool_choice", None),
        ({"parallel_tool_calls": False}, 400, "parallel_tool_calls", None),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400, "tool_choice", None),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, 400, "tools", None),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}], "tool_choice": "required"}, 400, "tools", "unsupported_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"}, 400, "tools.function.name", None),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, 400, "response_format", None),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}], "tool_choice": "required"}, 400, "tool_choice", None),
    ],
)
def test_tool_mistakes_are_400s(chat, body, status, param, code):
    assert_error(post(chat, body), status, param, code)
