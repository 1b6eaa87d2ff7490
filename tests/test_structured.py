"""Structured outputs: JSON schemas, regexes, choices and GBNF grammars enforced while sampling, on both endpoints."""

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from tests.conftest import serve
from tests.test_api import assert_error, events

# Bounded where a random-weight model would otherwise write forever (strings, integers, arrays),
# so that most outputs complete; every one that completes must validate.
SCHEMAS = [
    {"type": "boolean"},
    {"type": "null"},
    {"type": "integer", "minimum": 0, "maximum": 99},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"type": "string", "maxLength": 6},
    {"type": "string", "minLength": 2, "maxLength": 4},
    {"type": "string", "pattern": "^[a-c]{1,3}$"},
    {"type": "string", "format": "date"},
    {"type": "array", "items": {"type": "null"}, "maxItems": 2},
    {"type": "string", "format": "email", "maxLength": 20},
    {"type": "string", "format": "ipv4"},
    {"type": "string", "format": "uuid"},
    {"enum": ["red", "green", "blue"]},
    {"enum": [1, "one", None, True]},
    {"const": "fixed"},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 5}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"], "additionalProperties": False}
        },
        "required": ["point"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]},
    {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
    {"oneOf": [{"const": "x"}, {"const": "y"}]},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"enum": [3, 4]}}, "required": ["kind", "legs"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": [], "additionalProperties": False},
    {"$defs": {"flag": {"type": "boolean"}}, "type": "object", "properties": {"f": {"$ref": "#/$defs/flag"}}, "required": ["f"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"level": {"type": "integer", "minimum": 1, "maximum": 3}, "on": {"type": "boolean"}},
        "required": ["level", "on"],
        "additionalProperties": False,
    },
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"const": 1}], "items": False},
    {
        "type": "object",
        "properties": {
            "list": {
                "type": "array",
                "items": {"type": "object", "properties": {"v": {"type": "boolean"}}, "required": ["v"], "additionalProperties": False},
                "maxItems": 2,
            }
        },
        "required": ["list"],
        "additionalProperties": False,
    },
    {"type": "number", "enum": [0.5, 1.5]},
]


@pytest.fixture(scope="module")
def chat(chat_llama_dir):
    yield from serve(chat_llama_dir, "tiny-chat")


def complete(served, body: dict) -> dict:
    response = httpx.post(served.url + "/v1/completions", json={"model": served.model, "prompt": "x", **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def post_all(served, route: str, bodies: list[dict]) -> list[dict]:
    """The bodies sent at once (batched by the engine), answers in order."""

    async def send():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(served.url + route, json={"model": served.model, **b}) for b in bodies))

    answers = asyncio.run(send())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
    return [a.json() for a in answers]


def check_schemas(served, schemas, body: dict, min_complete: float) -> None:
    """Every schema, greedy and sampled: each output that completes validates; most complete."""
    bodies = [{**body, "structured_outputs": {"json": s}, **extra} for s in schemas for extra in ({"temperature": 0}, {"seed": 7, "temperature": 1})]
    answers = post_all(served, "/v1/completions", bodies)
    complete = 0
    for sent, answer in zip(bodies, answers, strict=True):
        choice = answer["choices"][0]
        if choice["finish_reason"] == "stop":
            complete += 1
            jsonschema.validate(json.loads(choice["text"]), sent["structured_outputs"]["json"], format_checker=jsonschema.FormatChecker())
    assert complete >= min_complete * len(bodies), f"only {complete} of {len(bodies)} outputs completed"


def test_at_least_thirty_schemas_validate(chat):
    assert len(SCHEMAS) >= 30
    check_schemas(chat, SCHEMAS, {"prompt": "x", "max_tokens": 48}, min_complete=0.8)


def test_regex_choice_and_grammar(chat):
    out = complete(chat, {"max_tokens": 20, "seed": 3, "guided_regex": "[0-9]{4}-[0-9]{2}-[0-9]{2}"})["choices"][0]
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", out["text"]) and out["finish_reason"] == "stop"
    for field in ({"guided_choice": ["alpha", "beta gamma"]}, {"structured_outputs": {"choice": ["alpha", "beta gamma"]}}):
        texts = {complete(chat, {"max_tokens": 10, "seed": s, **field})["choices"][0]["text"] for s in range(6)}
        assert texts <= {"alpha", "beta gamma"}
    grammar = 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "yes"'
    for s in range(4):
        out = complete(chat, {"max_tokens": 30, "seed": s, "structured_outputs": {"grammar": grammar}})["choices"][0]
        if out["finish_reason"] == "stop":
            assert re.fullmatch(r"\((?:[a-c]|yes)(?:,(?:[a-c]|yes))*\)", out["text"]), out["text"]


def test_json_object_and_response_format_on_chat(chat):
    messages = [{"role": "user", "content": "A JSON object, please."}]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"], "additionalProperties": False}
    for fmt in (
        {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}},
        {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": False}},
    ):
        reply = post_all(chat, "/v1/chat/completions", [{"messages": messages, "max_tokens": 40, "seed": 1, "response_format": fmt}])[0]
        if reply["choices"][0]["finish_reason"] == "stop":
            jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), schema)
    reply = post_all(chat, "/v1/chat/completions", [{"messages": messages, "max_tokens": 40, "temperature": 0, "response_format": {"type": "json_object"}}])[0]
    assert reply["choices"][0]["message"]["content"].startswith("{")
    out = complete(chat, {"max_tokens": 40, "temperature": 0, "structured_outputs": {"json_object": True}})["choices"][0]["text"]
    assert out.startswith("{")


def test_a_completed_grammar_ends_the_output_even_with_ignore_eos(chat):
    out = complete(chat, {"max_tokens": 50, "ignore_eos": True, "guided_choice": ["done"]})
    assert out["choices"][0]["text"] == "done" and out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] <= 4


def test_max_tokens_before_the_end_gives_length_and_the_partial_text(chat):
    out = complete(chat, {"max_tokens": 3, "temperature": 0, "guided_regex": "a{20}"})["choices"][0]
    assert out["finish_reason"] == "length" and re.fullmatch("a+", out["text"]) and len(out["text"]) < 20


def test_streaming_n_logprobs_and_stop_work_with_constraints(chat):
    body = {"max_tokens": 30, "seed": 11, "n": 2, "logprobs": 2, "structured_outputs": {"json": SCHEMAS[19]}}
    whole = complete(chat, body)
    response = httpx.post(chat.url + "/v1/completions", json={"model": chat.model, "prompt": "x", **body, "stream": True}, timeout=120)
    chunks = [c for c in events(response) if c != "[DONE]"]
    for choice in whole["choices"]:
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == choice["index"]) == choice["text"]
        assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"])
    stopped = complete(chat, {**body, "n": 1, "stop": [":"]})["choices"][0]
    assert ":" not in stopped["text"] and stopped["finish_reason"] == "stop"
    best = complete(chat, {**body, "n": 1, "best_of": 3})["choices"][0]
    if best["finish_reason"] == "stop":
        jsonschema.validate(json.loads(best["text"]), SCHEMAS[19])


def test_logprobs_stay_the_models_own(chat):
    """The mask changes what may be drawn, not what the model thinks of what was drawn."""
    tokenizer = chat.engine.tokenizer
    prompt = tokenizer.encode("x")
    constrained = complete(chat, {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 0, "guided_choice": ["import"]})["choices"][0]
    [token] = tokenizer.encode(constrained["logprobs"]["tokens"][0], False)
    scored = complete(chat, {"prompt": [*prompt, token], "max_tokens": 0, "echo": True, "logprobs": 0})["choices"][0]
    assert "import".startswith(constrained["text"])
    assert constrained["logprobs"]["token_logprobs"][0] == pytest.approx(scored["logprobs"]["token_logprobs"][-1], abs=1e-5)


def test_unconstrained_requests_are_unchanged_beside_constrained_ones(chat):
    plain = [{"prompt": p, "max_tokens": 12, "temperature": 0} for p in ("def", "import", "class")]
    alone = [a["choices"][0]["text"] for a in post_all(chat, "/v1/completions", plain)]
    mixed = plain + [{"prompt": "x", "max_tokens": 12, "seed": i, "structured_outputs": {"json": SCHEMAS[19]}} for i in range(5)]
    together = [a["choices"][0]["text"] for a in post_all(chat, "/v1/completions", mixed)[:3]]
    assert together == alone


@pytest.mark.parametrize(
    "body, param",
    [
        ({"guided_regex": "[a-"}, "guided_regex"),
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": [1, 2]}, "guided_json"),
        ({"guided_grammar": "root ::= undefined"}, "guided_grammar"),
        ({"guided_grammar": 'root ::= "a'}, "guided_grammar"),
        ({"guided_grammar": ""}, "guided_grammar"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", ""]}, "guided_choice"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"yaml": "x"}}, "structured_outputs.yaml"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ],
)
def test_a_constraint_that_cannot_be_enforced_is_a_400(chat, body, param):
    response = httpx.post(chat.url + "/v1/completions", json={"model": chat.model, "prompt": "x", **body}, timeout=60)
    assert_error(response, 400, param)
    assert chat.idle()


@pytest.mark.parametrize(
    "fmt, param",
    [
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x", "colour": 1}}, "response_format.json_schema.colour"),
        ({"type": "text", "extra": 1}, "response_format.extra"),
        ({"type": "json_object"}, None),
    ],
)
def test_chat_response_format_mistakes_are_400s(chat, fmt, param):
    body = {"model": chat.model, "messages": [{"role": "user", "content": "x"}], "response_format": fmt, "max_tokens": 2}
    if param is None:  # valid, but combined with a second constraint it is not
        body["guided_regex"] = "a"
        param = "guided_regex"
    assert_error(httpx.post(chat.url + "/v1/chat/completions", json=body, timeout=60), 400, param)


def test_compiled_grammars_are_cached_by_their_text(chat):
    from tokenmill.sampling_params import GrammarSpec

    compiler = chat.engine.tokenizer.grammars
    spec = GrammarSpec("regex", "[0-9]{3}")
    assert compiler.compile(spec) is compiler.compile(GrammarSpec("regex", "[0-9]{3}"))
