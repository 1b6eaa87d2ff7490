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


# --- tool_choice 'auto': the model chooses text or calls, written Hermes-style and read back out ---


@pytest.fixture(scope="module")
def hermes(hermes_llama_dir):
    yield from serve(hermes_llama_dir, "tiny-hermes")


def call_token(served) -> str:
    """<tool_call>'s id, for a logit_bias that makes the random model begin a call."""
    return str(served.engine.tokenizer.encode("<tool_call>", False)[0])


def check_calls(message: dict, tools: list[dict]) -> None:
    """Every call names one of the tools, and its arguments follow that tool's schema."""
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"const": {}}) for t in tools}
    for call in message["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_auto_answers_in_text_when_the_model_writes_no_call(hermes):
    for seed in range(3):
        raw = post(hermes, {"tools": [WEATHER, TIME], "seed": seed, "max_tokens": 12}).json()
        choice = strictly(ChatCompletion, raw).choices[0]
        assert isinstance(choice.message.content, str) and choice.message.tool_calls is None or choice.finish_reason == "tool_calls"


def test_auto_constrains_a_call_once_the_model_begins_one(hermes):
    bias = {call_token(hermes): 100}
    for extra in ({"temperature": 0}, {"seed": 1}, {"seed": 2, "tool_choice": "auto"}):
        raw = post(hermes, {"tools": [WEATHER, TIME, NOTHING], "logit_bias": bias, "parallel_tool_calls": False, "max_tokens": 60, **extra}).json()
        choice = strictly(ChatCompletion, raw).choices[0]
        if choice.finish_reason == "length":  # cut short inside the call: its text is content, as written
            assert choice.message.tool_calls is None and choice.message.content.startswith("<tool_call>\n{")
            continue
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_calls(raw["choices"][0]["message"], [WEATHER, TIME, NOTHING])


def test_auto_makes_several_calls_when_parallel(hermes):
    newline = str(hermes.engine.tokenizer.encode("\n", False)[0])  # after a call: another one rather than the end
    bias = {call_token(hermes): 100, newline: 50}
    raw = post(hermes, {"tools": [WEATHER, TIME, NOTHING], "logit_bias": bias, "temperature": 0, "max_tokens": 120}).json()
    message = strictly(ChatCompletion, raw).choices[0].message
    assert message.tool_calls and len(message.tool_calls) >= 2 and len({c.id for c in message.tool_calls}) == len(message.tool_calls)
    check_calls(raw["choices"][0]["message"], [WEATHER, TIME, NOTHING])
    assert raw["choices"][0]["finish_reason"] in ("tool_calls", "length")


def test_auto_streamed_equals_whole(hermes):
    bias = {call_token(hermes): 100}
    for body in (
        {"seed": 4, "n": 2, "max_tokens": 30},
        {"seed": 5, "n": 2, "logit_bias": bias, "parallel_tool_calls": False, "max_tokens": 60},
        {"temperature": 0, "logit_bias": bias, "max_tokens": 100},
        {
            "seed": 6,
            "max_tokens": 20,
            "echo": True,
            "messages": [*ASK, {"role": "assistant", "content": "Let me see"}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    ):
        body = {"tools": [WEATHER, TIME, NOTHING], **body}
        whole = post(hermes, body).json()
        response = httpx.post(hermes.url + "/v1/chat/completions", json={"model": hermes.model, "messages": ASK, **body, "stream": True}, timeout=120)
        chunks = [c for c in events(response) if c != "[DONE]"]
        for c in whole["choices"]:
            mine = [k["choices"][0] for k in chunks if k["choices"][0]["index"] == c["index"]]
            content = "".join(k["delta"].get("content") or "" for k in mine)
            assert content == (c["message"]["content"] or "")
            if body.get("echo"):
                assert content.startswith("Let me see")
            calls = [t for k in mine for t in k["delta"].get("tool_calls") or []]
            assert [t["index"] for t in calls] == list(range(len(calls)))
            assert [(t["function"]["name"], t["function"]["arguments"]) for t in calls] == [
                (t["function"]["name"], t["function"]["arguments"]) for t in c["message"].get("tool_calls") or []
            ]
            assert mine[-1]["finish_reason"] == c["finish_reason"] and all(k["finish_reason"] is None for k in mine[:-1])


def test_the_next_turn_renders_the_calls_and_results_back(hermes):
    first = post(hermes, {"tools": [WEATHER], "logit_bias": {call_token(hermes): 100}, "parallel_tool_calls": False, "temperature": 0, "max_tokens": 60}).json()
    message = first["choices"][0]["message"]
    assert first["choices"][0]["finish_reason"] == "tool_calls", first
    turn = [*ASK, message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"}]
    second = post(hermes, {"messages": turn, "tools": [WEATHER], "max_tokens": 5})
    assert second.status_code == 200, second.text
    call = message["tool_calls"][0]["function"]
    expected = hermes.engine.tokenizer.render_chat(
        [
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": call["name"], "arguments": json.loads(call["arguments"])}}],
            },
            {"role": "tool", "content": "sunny"},
        ],
        tools=[WEATHER],
    )
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' in expected
    assert second.json()["usage"]["prompt_tokens"] == len(hermes.engine.tokenizer.encode(expected, False))


def test_auto_needs_a_parser(hermes_llama_dir):
    for served in serve(hermes_llama_dir, "tiny-hermes-no-parser", tool_call_parser="none"):
        assert_error(post(served, {"tools": [WEATHER]}), 400, "tool_choice", "unsupported_parameter")
        assert post(served, {"tools": [WEATHER], "tool_choice": "required"}).status_code == 200


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Just text.", "Just text.", []),
        ("a < b <tool", "a < b <tool", []),  # held back while it may still open a call, then content
        ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "", [("f", '{"x": 1}')]),
        (
            'Let me look.\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {"s": "é"}}\n</tool_call>\n',
            "Let me look.\n",
            [("f", "{}"), ("g", '{"s": "é"}')],
        ),
        ('<tool_call>\n{"name": "f", "argu', '<tool_call>\n{"name": "f", "argu', []),  # cut short: content, as written
        ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ],
)
def test_hermes_calls_split_the_same_whatever_the_pieces(text, content, calls):
    import random

    from tokenmill.server.tool_calls import HermesCalls

    for seed in range(20):
        cuts = sorted(random.Random(seed).sample(range(1, len(text)), min(len(text) - 1, seed % 7)))
        parser, got, made = HermesCalls(), "", []
        for piece in [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]:
            out, new = parser.feed(piece)
            got, made = got + out, made + new
        got += parser.finish()
        assert (got, made) == (content, calls)


def test_which_templates_render_tools(hermes_llama_dir, chat_llama_dir):
    from transformers import AutoTokenizer

    from tokenmill.tokenizer import Tokenizer, _reads_variable

    assert Tokenizer(AutoTokenizer.from_pretrained(hermes_llama_dir)).renders_tools
    assert not Tokenizer(AutoTokenizer.from_pretrained(chat_llama_dir)).renders_tools
    assert not _reads_variable("{% set tools = [] %}{{ tools }}", "tools")
    assert _reads_variable("{% generation %}{{ x }}{% endgeneration %}{{ tools }}", "tools")  # transformers' own tag: by the word


def test_a_call_written_as_text_is_constrained_from_its_opening(chat_llama_dir):
    """Where <tool_call> is no token of its own, the grammar's lazy opening ends at its text, and the call is forced from there."""
    from transformers import AutoTokenizer

    from tokenmill.grammars import GrammarCompiler
    from tokenmill.sampling_params import GrammarSpec
    from tokenmill.server.chat_protocol import FunctionDefinition
    from tokenmill.server.structured import named_calls

    hf = AutoTokenizer.from_pretrained(chat_llama_dir)
    compiler = GrammarCompiler(hf, len(hf))
    functions = [FunctionDefinition(**WEATHER["function"])]
    spec = GrammarSpec("hermes_tools", json.dumps({"calls": named_calls(functions), "parallel": False}))
    assert "lead[lazy]" in compiler.compile(spec)
    free = compiler.matcher(spec)
    assert free.consume_tokens(hf.encode("Any text < at all")) and free.is_accepting()
    call = compiler.matcher(spec)
    assert call.consume_tokens(hf.encode("Sure. <tool_call>")) and not call.is_accepting()
    assert call.compute_ff_bytes() == b'\n{"name": "get_weather", "arguments": {"city": "'
    assert not compiler.matcher(spec).consume_tokens(hf.encode("<tool_call>\nhello"))
