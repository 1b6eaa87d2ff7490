"""Hostile requests: every client error is a 4xx OpenAI error object, never a 5xx or a hang, and the
server answers normally afterwards. Then schemathesis, against the server's own /openapi.json."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

import httpx
import pytest

from tests.conftest import serve

MODEL = "tiny-llama"
LIMIT = 4 * 1024 * 1024  # the fixture's max_request_bytes
JSON = {"content-type": "application/json"}
ANY = object()  # any value is right


@pytest.fixture(scope="module")
def hostile(llama_dir):
    yield from serve(llama_dir, MODEL, max_request_bytes="4MiB")


def send(served, content, headers: dict | None = None, timeout: float = 60) -> httpx.Response:
    return httpx.post(served.url + "/v1/completions", content=content, headers=JSON if headers is None else headers, timeout=timeout)


def fields(members: str | bytes) -> bytes:
    """A body with model and prompt, then `members`: raw JSON, so that it can say what json.dumps will not."""
    raw = members.encode() if isinstance(members, str) else members
    return b'{"model":"tiny-llama","prompt":"x",' + raw + b"}"


def dumps(**overrides) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2, **overrides}).encode()


def assert_openai_error(response: httpx.Response, status, param=ANY, code=ANY) -> dict:
    """An OpenAI error object with `status` (one or a tuple), and `param` and `code` (one or a tuple) unless ANY."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, f"{response.status_code}: {response.text[:500]}"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    for key, want in (("param", param), ("code", code)):
        if want is not ANY:
            assert error[key] in (want if isinstance(want, tuple) else (want,)), f"{key}: {error}"
    return error


def assert_completion(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text[:500]
    body = response.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("stop", "length")


def assert_still_serving(served) -> None:
    """/health is 200, a small completion works, and the engine holds nothing."""
    assert httpx.get(served.url + "/health", timeout=5).status_code == 200
    assert_completion(httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=60))
    assert served.idle()


class Hostile(NamedTuple):
    """A body (made from the served server, when it is used), and what the server must answer."""

    body: Callable[[object], bytes | Iterator[bytes]]
    status: int | tuple[int, ...]
    param: object = None
    code: object = None
    headers: dict | None = None


def _at_limit(tail: bytes, size: int = LIMIT) -> bytes:
    """A body of exactly `size` bytes: a long prompt, then `tail`."""
    head = b'{"model":"tiny-llama","prompt":"'
    return head + b"a" * (size - len(head) - len(tail)) + tail


def _over_limit(served) -> bytes:
    body = _at_limit(b'"}') + b" "
    assert len(body) == LIMIT + 1
    return body


def _chunked_over_limit(served) -> Iterator[bytes]:
    yield b'{"model":"tiny-llama","prompt":"'
    for _ in range(6):
        yield b"a" * (1024 * 1024)
    yield b'"}'


def _deep(opening: bytes, leaf: bytes, closing: bytes, depth: int = 10_000) -> bytes:
    return b'{"model":"tiny-llama","prompt":' + opening * depth + leaf + closing * depth + b"}"


def _logit_bias(keys) -> bytes:
    return dumps(logit_bias={key: 1 for key in keys})


def _multipart(served) -> bytes:
    return (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny-llama\r\n--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n'
    )


NUMBERS = {
    "max_tokens_1e400": Hostile(lambda s: fields('"max_tokens":1e400'), 400, (None, "max_tokens")),
    "max_tokens_10**5000_as_digits": Hostile(lambda s: fields('"max_tokens":1' + "0" * 5000), 400, (None, "max_tokens")),
    "max_tokens_4300_digits": Hostile(lambda s: fields('"max_tokens":' + "9" * 4300), 400, (None, "max_tokens", "prompt"), (None, "context_length_exceeded")),
    "max_tokens_-1e308": Hostile(lambda s: fields('"max_tokens":-1e308'), 400, (None, "max_tokens")),
    "max_tokens_-10**100": Hostile(lambda s: fields('"max_tokens":-1' + "0" * 100), 400, "max_tokens"),
    "seed_2**64": Hostile(lambda s: fields(f'"max_tokens":2,"seed":{2**64}'), 400, "seed"),
    "seed_-2**63-1": Hostile(lambda s: fields(f'"max_tokens":2,"seed":{-(2**63) - 1}'), 400, "seed"),
    "best_of_1e400": Hostile(lambda s: fields('"best_of":1e400'), 400, (None, "best_of")),
    "top_k_2**64": Hostile(lambda s: fields(f'"top_k":{2**64}'), 400, "top_k"),
    **{
        f"{name}_{literal}": Hostile(lambda s, name=name, literal=literal: fields(f'"max_tokens":2,"{name}":{literal}'), 400, (None, name))
        for name in ("temperature", "top_p")
        for literal in ("NaN", "Infinity", "-Infinity")
    },
    "repetition_penalty_NaN": Hostile(lambda s: fields('"repetition_penalty":NaN'), 400, (None, "repetition_penalty")),
    "logit_bias_value_Infinity": Hostile(lambda s: fields('"logit_bias":{"1":Infinity}'), 400, (None, "logit_bias")),
}

STRUCTURE = {
    "prompt_10000_nested_arrays": Hostile(lambda s: _deep(b"[", b"1", b"]"), 400, (None, "prompt")),
    "prompt_10000_nested_objects": Hostile(lambda s: _deep(b'{"a":', b"1", b"}"), 400, (None, "prompt")),
    "prompt_10000_unclosed_arrays": Hostile(lambda s: _deep(b"[", b"", b""), 400, (None, "prompt")),
    "stop_10000_nested_arrays": Hostile(lambda s: fields(b'"stop":' + b"[" * 10_000 + b"]" * 10_000), 400, (None, "stop")),
    "prompt_object": Hostile(lambda s: dumps(prompt={"a": 1}), 400, "prompt"),
    "prompt_ids_and_text": Hostile(lambda s: dumps(prompt=[1, "a"]), 400, "prompt"),
    "prompt_float_ids": Hostile(lambda s: dumps(prompt=[1, 2.0]), 400, "prompt"),
    "prompt_bool_ids": Hostile(lambda s: dumps(prompt=[1, True]), 400, "prompt"),
    "empty_body": Hostile(lambda s: b"", 400),
    "whitespace_body": Hostile(lambda s: b" \r\n\t ", 400),
    "json_array_body": Hostile(lambda s: b'[{"model":"tiny-llama","prompt":"x"}]', 400),
    "json_null_body": Hostile(lambda s: b"null", 400),
    "json_string_body": Hostile(lambda s: b'"tiny-llama"', 400),
    "json_number_body": Hostile(lambda s: b"1e400", 400),
    "trailing_garbage": Hostile(lambda s: dumps() + b"}{", 400),
    "utf16_body": Hostile(lambda s: dumps().decode().encode("utf-16"), 400),
    "unknown_field": Hostile(lambda s: dumps(foo=1), 400, "foo"),
    "unknown_field_in_stream_options": Hostile(lambda s: dumps(stream=True, stream_options={"foo": 1}), 400, "stream_options.foo"),
    "unknown_field_named_123": Hostile(lambda s: dumps(**{"123": 1}), 400, "123"),
    "unknown_field_named_str": Hostile(lambda s: dumps(str=1), 400, "str"),
    "unknown_stream_option_named_int": Hostile(lambda s: dumps(stream=True, stream_options={"int": 1}), 400, "stream_options.int"),
    "100k_unknown_fields": Hostile(lambda s: dumps(**{f"f{i}": i for i in range(100_000)}), 400, ANY),
}

TEXT = {
    "invalid_utf8_in_prompt": Hostile(lambda s: b'{"model":"tiny-llama","prompt":"\xff\xfe\xc3"}', 400, (None, "prompt")),
    "invalid_utf8_in_a_key": Hostile(lambda s: b'{"model":"tiny-llama","prompt":"x","\xc0\xaf":1}', 400, ANY),
    "lone_high_surrogate_in_stop": Hostile(lambda s: fields('"max_tokens":2,"stop":"\\ud800"'), 400, (None, "stop")),
    "lone_low_surrogate_in_suffix": Hostile(lambda s: fields('"max_tokens":2,"suffix":"\\udc00x"'), 400, (None, "suffix")),
    "lone_surrogate_as_logit_bias_key": Hostile(lambda s: fields('"max_tokens":2,"logit_bias":{"\\ud83d":1}'), 400, (None, "logit_bias")),
    "raw_control_character": Hostile(lambda s: b'{"model":"tiny-llama","prompt":"a\x01b"}', 400, (None, "prompt")),
    "escaped_nul_is_text": Hostile(lambda s: dumps(prompt="a\u0000b", stop="\u0000"), 200),
}

SIZES = {
    "one_byte_over_the_limit": Hostile(_over_limit, 413, None, "request_too_large"),
    "exactly_at_the_limit_but_invalid_json": Hostile(lambda s: _at_limit(b'",}'), 400),
    "one_byte_under_the_limit_but_invalid_json": Hostile(lambda s: _at_limit(b'"', LIMIT - 1), 400),
    "at_the_limit_too_long_a_prompt": Hostile(lambda s: _at_limit(b'"}'), 400, "prompt", "context_length_exceeded"),
    "chunked_without_length_over_the_limit": Hostile(_chunked_over_limit, 413, None, "request_too_large"),
    "stop_string_of_1MB": Hostile(lambda s: dumps(stop="a" * 1_000_000), 200),
    "four_stop_strings_of_900KB": Hostile(lambda s: dumps(stop=[c * 900_000 for c in "abcd"]), 200),
    "stop_string_of_1MB_streamed": Hostile(lambda s: dumps(stop="a" * 1_000_000, stream=True), 200),
    "suffix_of_1MB": Hostile(lambda s: dumps(suffix="a" * 1_000_000), 400, "prompt", "context_length_exceeded"),
    "model_of_3MB": Hostile(lambda s: dumps(model="m" * 3_000_000), 404, "model", "model_not_found"),
}

IDS = {
    "negative_id": Hostile(lambda s: dumps(prompt=[1, -1]), 400, "prompt"),
    "negative_id_in_a_batch": Hostile(lambda s: dumps(prompt=[[1], [2, -3]]), 400, "prompt"),
    "id_equal_to_vocab_size": Hostile(lambda s: dumps(prompt=[1, s.engine.tokenizer.vocab_size]), 400, "prompt"),
    "id_2**63": Hostile(lambda s: dumps(prompt=[2**63]), 400, "prompt"),
    "id_of_4000_digits": Hostile(lambda s: fields(b'"prompt":[' + b"9" * 4000 + b"]"), 400, "prompt"),
    "id_out_of_range_with_a_suffix": Hostile(lambda s: dumps(prompt=[1, 10**6], suffix="y"), 400, "prompt"),
    "logit_bias_30k_keys_out_of_range": Hostile(lambda s: _logit_bias(str(i) for i in range(30_000)), 400, "logit_bias"),
    "logit_bias_30k_keys_not_ids": Hostile(lambda s: _logit_bias(f"t{i}" for i in range(30_000)), 400, "logit_bias"),
    "logit_bias_20k_spellings_of_valid_ids": Hostile(
        lambda s: _logit_bias(str(i).zfill(w) for i in range(1000) for w in range(1, 21)), (200, 400), "logit_bias"
    ),
    "logit_bias_negative_id": Hostile(lambda s: dumps(logit_bias={"-1": 5}), 400, "logit_bias"),
    "logit_bias_value_10**40": Hostile(lambda s: dumps(logit_bias={"1": 10**40}), 400, "logit_bias"),
}

CONTENT_TYPES = {
    "form_urlencoded": Hostile(lambda s: b"model=tiny-llama&prompt=x", 400, None, None, {"content-type": "application/x-www-form-urlencoded"}),
    "multipart": Hostile(_multipart, 400, None, None, {"content-type": "multipart/form-data; boundary=b"}),
    "json_sent_as_text_plain": Hostile(lambda s: dumps(), (200, 415), None, None, {"content-type": "text/plain"}),
    "json_without_a_content_type": Hostile(lambda s: dumps(), (200, 415), None, None, {}),
    "gzip_encoded_garbage": Hostile(lambda s: b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", 400, None, None, {**JSON, "content-encoding": "gzip"}),
}

CASES = {**NUMBERS, **STRUCTURE, **TEXT, **SIZES, **IDS, **CONTENT_TYPES}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_hostile_body_is_answered_with_an_openai_error(hostile, case):
    """Each body gets its status (a 4xx error object, or a completion where it is valid); the server stays up."""
    content = case.body(hostile)
    response = send(hostile, content, case.headers)
    assert response.status_code < 500, response.text[:1000]
    if not isinstance(content, bytes):
        assert response.request.headers["transfer-encoding"] == "chunked" and "content-length" not in response.request.headers
    if response.status_code == 200:
        assert 200 in (case.status if isinstance(case.status, tuple) else (case.status,))
        if response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text
        else:
            assert_completion(response)
    else:
        assert_openai_error(response, case.status, case.param, case.code)
    assert_still_serving(hostile)


def test_a_declared_oversize_body_is_refused_before_it_is_sent(hostile):
    """Content-Length over the limit, with Expect: 100-continue: a 413 comes back without a byte of body sent."""
    host, port = hostile.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            f"Content-Length: {LIMIT + 1}\r\nConnection: close\r\n\r\n".encode()
        )
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), raw[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert_still_serving(hostile)


HUGE_VALUES = {
    "unknown_field_named_with_1MB": lambda: dumps(**{"k" * 1_000_000: 1}),
    "unknown_stream_option_named_with_1MB": lambda: dumps(stream=True, stream_options={"k" * 1_000_000: True}),
    "logit_bias_value_of_4000_digits": lambda: fields(b'"logit_bias":{"1":' + b"9" * 4000 + b"}"),
    "token_id_of_4000_digits": lambda: fields(b'"prompt":[' + b"9" * 4000 + b"]"),
    "max_tokens_of_4000_digits": lambda: fields(b'"max_tokens":' + b"9" * 4000),
    "logit_bias_key_of_1MB": lambda: dumps(logit_bias={"1" * 1_000_000: 1}),
}


@pytest.mark.parametrize("make", list(HUGE_VALUES.values()), ids=list(HUGE_VALUES))
def test_error_messages_quote_huge_values_briefly(hostile, make):
    """An error quotes a client's value clipped, as errors.clip does: never a megabyte echoed back."""
    response = send(hostile, make())
    error = assert_openai_error(response, 400)
    size, message, param = len(response.content), error["message"][:150], str(error["param"])[:60]
    assert size < 2000, f"a {size}-byte error: {message}... (param {param}...)"


POLLER = r"""
import json, socket, sys, time
port = int(sys.argv[1])
while True:
    start = time.time()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = b""
            while b"\r\n" not in head and (chunk := conn.recv(1024)):
                head += chunk
        status = head.split(b" ")[1].decode()
    except (OSError, IndexError) as exc:
        status = type(exc).__name__
    print(json.dumps([start, time.time() - start, status]), flush=True)
    time.sleep(0.02)
"""


def health_during(served, action: Callable[[], httpx.Response]) -> tuple[httpx.Response, list, float]:
    """action()'s response, the /health polls made while it ran, and its seconds.

    The polls come from another process: a thread here would share the server's GIL, and could not
    even send while the server held it.
    """
    poller = subprocess.Popen([sys.executable, "-c", POLLER, served.url.rsplit(":", 1)[1]], stdout=subprocess.PIPE, text=True)
    try:
        assert poller.stdout.readline().endswith("]\n")  # it polls
        start = time.time()
        response = action()
        seconds = time.time() - start
        time.sleep(0.2)
    finally:
        poller.terminate()
        out, _ = poller.communicate(timeout=30)
    polls = [json.loads(line) for line in out.splitlines() if line.endswith("]")]
    return response, [p for p in polls if p[0] < start + seconds and p[0] + p[1] > start], seconds


BIG_BODIES = {
    "1.5M_token_ids": (lambda: b'{"model":"tiny-llama","prompt":[' + b",".join([b"1"] * 1_500_000) + b"]}", "prompt", "context_length_exceeded"),
    "1.5M_ints_as_stop": (lambda: fields(b'"stop":[' + b",".join([b"1"] * 1_500_000) + b"]"), "stop", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("make, param, code", list(BIG_BODIES.values()), ids=list(BIG_BODIES))
def test_health_answers_within_a_second_while_a_big_body_is_parsed(hostile, make, param, code):
    """A few MB of JSON under the limit is refused with a 400, and /health keeps answering meanwhile."""
    body = make()
    assert len(body) < LIMIT
    response, polls, seconds = health_during(hostile, lambda: send(hostile, body, timeout=120))
    assert_openai_error(response, 400, param, code)
    assert polls or seconds < 0.2, "no /health poll overlapped the request"
    slowest = max((p[1] for p in polls), default=0.0)
    assert all(p[2] == "200" for p in polls), polls
    assert slowest < 1.0, f"/health took {slowest:.2f} s while the {len(body)}-byte body was handled ({seconds:.2f} s)"
    assert_still_serving(hostile)


def _bounded(spec: dict) -> dict:
    """The app's schema, with its sizes capped so that every generated case is cheap to serve."""
    request = spec["components"]["schemas"]["CompletionRequest"]
    props = request["properties"]
    props["model"] = {"type": "string", "enum": [MODEL]}  # mostly reach the engine; negative mode still sends others
    props["max_tokens"] = {"type": "integer", "minimum": 0, "maximum": 8}
    request["required"] = [*request["required"], "max_tokens"]
    for name, top in (("n", 2), ("best_of", 2), ("logprobs", 5)):
        next(b for b in props[name]["anyOf"] if b.get("type") == "integer")["maximum"] = top
    for name in ("prompt", "stop", "suffix", "user"):
        for branch in props[name]["anyOf"]:
            if branch.get("type") == "string":
                branch["maxLength"] = 48
            elif branch.get("type") == "array":
                branch.update(minItems=1, maxItems=3)
                inner = branch["items"]
                if inner["type"] == "array":
                    inner.update(minItems=1, maxItems=12)
                    inner = inner["items"]
                inner.update({"maxLength": 16} if inner["type"] == "string" else {"minimum": 0, "maximum": 999})
    next(b for b in props["logit_bias"]["anyOf"] if b.get("type") == "object")["maxProperties"] = 4
    return spec


def _ints(value):
    """Whole floats as ints: schemathesis writes integers as 5.0 at times (JSON Schema allows it; this API refuses it)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    return value


def _with_int_body(case):
    """The case, its body's whole floats made ints."""
    case.body = _ints(case.body)
    return case


def whole_streams(schema):
    """The schema, its calls reading every event of a stream: schemathesis 4.32 stops after 20 by default,
    which would cut a stream before its [DONE]."""
    if hasattr(schema.config, "max_stream_events"):  # older releases read streams to the end and have no such setting
        schema.config.max_stream_events = 1_000_000
    return schema


def check_response(case, response, statuses: Counter) -> None:
    """No 5xx; every 4xx is OpenAI's error object; a 200 from /v1/completions is a completion or its stream."""
    statuses[response.status_code] += 1
    try:
        curl = case.as_curl_command()
    except Exception:  # a body that cannot be shown as a command line
        curl = repr(case.body)[:1000]
    where = f"{case.method} {case.formatted_path} -> {response.status_code}\n{curl}\n{response.content[:1000]!r}"
    assert response.status_code < 500, where
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, where
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
    elif response.status_code == 200 and case.path == "/v1/completions":
        if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            assert not getattr(response, "stream_cut_short", False), f"the client stopped reading early: {where}"
            assert response.content.rstrip().endswith(b"data: [DONE]"), where
        else:
            assert json.loads(response.content)["object"] == "text_completion", where


def run_cases(strategy, examples: int, check: Callable) -> None:
    """Draw `examples` cases from a schemathesis strategy (no shrinking, no database) and check each."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        check(case)

    run()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(hostile):
    """Generated requests, valid and invalid per the served OpenAPI description: never a 5xx, errors as OpenAI's."""
    import schemathesis
    from schemathesis import GenerationMode

    spec = httpx.get(hostile.url + "/openapi.json", timeout=10).json()
    schema = whole_streams(schemathesis.openapi.from_dict(_bounded(spec)))
    completions = schema["/v1/completions"]["POST"]
    others = [schema[path]["GET"] for path in ("/health", "/v1/models", "/v1/models/{model_id}")]
    runs = [
        ("completions, valid", completions.as_strategy(GenerationMode.POSITIVE).map(_with_int_body), 100),
        ("completions, invalid", completions.as_strategy(GenerationMode.NEGATIVE), 60),
        ("other routes", others[0].as_strategy() | others[1].as_strategy() | others[2].as_strategy(), 15),
    ]
    for label, strategy, examples in runs:
        statuses: Counter = Counter()
        run_cases(strategy, examples, lambda case, statuses=statuses: check_response(case, case.call(base_url=hostile.url, timeout=60), statuses))
        assert statuses, label
        if label == "completions, valid":
            assert statuses[200] > 0, f"no generated request reached the engine: {statuses}"
    assert_still_serving(hostile)
