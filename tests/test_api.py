"""End to end: a real server on 127.0.0.1, driven by the official openai SDK and by httpx."""

import asyncio
import json
import logging
import socket
import time

import httpx
import openai
import pytest
from openai.types import Completion

from tests.conftest import fail_next_step, serve


def post(served, body, **kwargs):
    headers = {"Authorization": f"Bearer {served.api_key}"} if served.api_key else {}
    return httpx.post(served.url + "/v1/completions", json=body, headers=headers, timeout=60, **kwargs)


def events(response) -> list:
    """The data lines of an SSE response, JSON-decoded except [DONE]; no other kind of line is sent."""
    out = []
    for line in response.text.splitlines():
        assert not line or line.startswith("data: "), f"a stream carried {line!r}: only data lines, as OpenAI sends"
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(chunks, index=0):
    return "".join(c["choices"][0]["text"] for c in chunks if c != "[DONE]" and c["choices"] and c["choices"][0]["index"] == index)


def assert_error(response, status, param=None, code=None, type="invalid_request_error"):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type and body["error"]["message"]
    assert body["error"]["param"] == param and body["error"]["code"] == code
    return body["error"]


def test_sdk_completion_has_openais_shape(llama):
    out = llama.client().completions.create(model=llama.model, prompt="def main():", max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == llama.model
    assert out.system_fingerprint.startswith("fp_") and out.created > 0
    assert len(out.choices) == 1 and out.choices[0].index == 0 and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 8 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_raw_json_validates_against_the_sdk_type(llama):
    body = {"model": llama.model, "prompt": ["a", "b"], "max_tokens": 4, "n": 2, "logprobs": 2, "stop": "\n"}
    raw = post(llama, body).json()
    Completion.model_validate(raw)
    assert list(raw) == ["id", "object", "created", "model", "system_fingerprint", "choices", "usage"]
    assert [c["index"] for c in raw["choices"]] == [0, 1, 2, 3]
    assert all(set(c) == {"text", "index", "logprobs", "finish_reason"} for c in raw["choices"])


def test_echo_logprobs_first_entry_is_null_as_openai_sends_it(llama):
    # OpenAI returns null for the first prompt token; the SDK's generated type says `float`,
    # so this one entry is the exception to strict validation, and the SDK itself parses it.
    raw = post(llama, {"model": llama.model, "prompt": "a b", "max_tokens": 2, "logprobs": 1, "echo": True}).json()
    lp = raw["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    Completion.model_validate(raw)


def test_stream_equals_non_stream_for_the_same_seed(llama):
    body = {"model": llama.model, "prompt": "import", "max_tokens": 24, "seed": 42, "logprobs": 1, "n": 2}
    whole = post(llama, body).json()
    chunks = events(post(llama, {**body, "stream": True}))
    assert chunks[-1] == "[DONE]"
    for i in range(2):
        assert streamed_text(chunks[:-1], i) == whole["choices"][i]["text"]
        streamed_tokens = [t for c in chunks[:-1] if c["choices"][0]["index"] == i for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
        assert streamed_tokens == whole["choices"][i]["logprobs"]["tokens"]
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks[:-1]}) == 1
    assert chunks[0]["id"].startswith("cmpl-") and chunks[0]["id"] != whole["id"]


def test_stream_finish_reason_only_on_the_last_chunk_of_each_choice(llama):
    chunks = events(post(llama, {"model": llama.model, "prompt": "x", "max_tokens": 6, "n": 2, "stream": True}))[:-1]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert [c["finish_reason"] is None for c in mine] == [True] * (len(mine) - 1) + [False]
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("options", [{}, {"include_usage": False}, {"include_usage": None}])
def test_stream_options_without_include_usage_send_no_usage(llama, options):
    body = {"model": llama.model, "prompt": "x", "max_tokens": 3, "stream": True, "stream_options": options}
    chunks = events(post(llama, body))
    assert chunks[-1] == "[DONE]" and all("usage" not in c and c["choices"] for c in chunks[:-1])


def test_a_stream_carrying_unicode_line_separators_keeps_each_event_on_one_line(llama):
    """U+2028, U+2029 and U+0085 in a chunk's text are escaped in its JSON: clients that split lines as str.splitlines()
    does (httpx's iter_lines) read every event whole, and the text comes back unchanged."""
    prompt = "a\u2028b\u2029c\x85d"
    body = {"model": llama.model, "prompt": prompt, "echo": True, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", llama.url + "/v1/completions", json=body, timeout=60) as response:
        lines = [line[len("data: ") :] for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]" and all(line != "[DONE]" for line in lines[:-1])
    chunks = [json.loads(line) for line in lines[:-1]]  # each line a whole event
    assert streamed_text(chunks).startswith(prompt)


def test_stream_include_usage(llama):
    # ignore_eos: sampled at temperature 1, the tiny model (~600 tokens, near uniform) draws its end token within 5 tokens about once in 120 runs
    body = {"model": llama.model, "prompt": "x", "max_tokens": 5, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks = events(post(llama, body))
    assert chunks[-1] == "[DONE]"
    *body_chunks, last = chunks[:-1]
    assert all(c["usage"] is None and c["choices"] for c in body_chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 5


def test_sdk_streaming(llama):
    stream = llama.client().completions.create(model=llama.model, prompt="for", max_tokens=10, stream=True, seed=3)
    text = "".join(c.choices[0].text for c in stream)
    whole = llama.client().completions.create(model=llama.model, prompt="for", max_tokens=10, seed=3)
    assert text == whole.choices[0].text


def test_stop_strings_never_leak_into_streams(llama):
    base = {"model": llama.model, "prompt": "def", "max_tokens": 30, "temperature": 0}
    full = post(llama, base).json()["choices"][0]["text"]
    stop = full[10:13]
    assert len(stop) == 3
    whole = post(llama, {**base, "stop": stop}).json()["choices"][0]
    chunks = events(post(llama, {**base, "stop": [stop], "stream": True}))
    assert whole["text"] == full[: full.find(stop)] == streamed_text(chunks[:-1])
    assert whole["finish_reason"] == "stop"
    assert all(stop not in c["choices"][0]["text"] for c in chunks[:-1])


def test_echo_prepends_the_prompt(llama):
    out = post(llama, {"model": llama.model, "prompt": "hello there", "max_tokens": 3, "echo": True, "temperature": 0}).json()
    plain = post(llama, {"model": llama.model, "prompt": "hello there", "max_tokens": 3, "temperature": 0}).json()
    assert out["choices"][0]["text"] == "hello there" + plain["choices"][0]["text"]


def test_echo_scoring_like_lm_eval(llama):
    tok = llama.engine.tokenizer
    ids = tok.encode("The quick brown fox")
    out = llama.client().completions.create(model=llama.model, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = out.choices[0].logprobs
    assert out.usage.completion_tokens == 0 and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert out.choices[0].text == "The quick brown fox"


def test_logprobs_are_finite_json(llama):
    body = {"model": llama.model, "prompt": "a", "max_tokens": 5, "logprobs": 5, "logit_bias": {"7": -100}, "seed": 1}
    response = post(llama, body)
    json.loads(response.text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    lp = response.json()["choices"][0]["logprobs"]
    assert all(1 <= len(top) <= 6 for top in lp["top_logprobs"])


def test_logit_bias_forces_a_token(llama):
    tok = llama.engine.tokenizer
    token = tok.encode(" return")[0]
    out = post(llama, {"model": llama.model, "prompt": "x", "max_tokens": 3, "logit_bias": {str(token): 100}}).json()
    assert out["choices"][0]["text"] == tok.decode([token]) * 3


def test_best_of_is_served(llama):
    out = post(llama, {"model": llama.model, "prompt": "x", "max_tokens": 4, "n": 2, "best_of": 3, "seed": 9}).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert out["usage"]["completion_tokens"] == 12


def test_suffix_on_a_fill_in_the_middle_model(llama):
    out = post(llama, {"model": llama.model, "prompt": "def f(x):\n", "suffix": "\n    return y", "max_tokens": 5})
    assert out.status_code == 200 and out.json()["choices"][0]["text"] is not None


def test_suffix_without_fim_tokens_is_a_400(gpt2):
    error = assert_error(post(gpt2, {"model": gpt2.model, "prompt": "a", "suffix": "b"}), 400, "suffix")
    assert "insert" in error["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": "1"}, "top_p"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logprobs": 6}, "logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"prompt": [1, 2, 10**9]}, "prompt"),
        ({"prompt": [[1, -1]]}, "prompt"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_client_mistakes_are_400s_naming_the_parameter(llama, body, param):
    assert_error(post(llama, {"model": llama.model, "prompt": "x", **body}), 400, param)


def test_malformed_json_is_a_400(llama):
    response = httpx.post(llama.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_a_huge_prompt_is_refused_before_it_is_tokenized(llama, monkeypatch):
    monkeypatch.setattr(llama.engine.tokenizer, "encode", lambda *a: pytest.fail("tokenized"))
    error = assert_error(post(llama, {"model": llama.model, "prompt": "def f(x): return x\n" * 100_000}), 400, "prompt", "context_length_exceeded")
    assert "1900000 characters, which is at least" in error["message"] and "256 tokens" in error["message"]


def test_error_messages_quote_a_client_value_briefly(llama):
    error = assert_error(post(llama, {"model": "m" * 1_000_000, "prompt": "x"}), 404, "model", "model_not_found")
    assert len(error["message"]) < 300 and "1000000 characters" in error["message"]


def test_head_answers_where_get_does_and_no_route_redirects(llama):
    assert httpx.head(llama.url + "/health").status_code == 200
    assert httpx.head(llama.url + "/v1/models").status_code == 200
    assert_error(httpx.post(llama.url + "/v1/completions/", json={"model": llama.model, "prompt": "x"}), 404)


def test_a_client_that_leaves_while_sending_its_body_is_not_an_error(llama, caplog):
    host, port = llama.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model"')
        time.sleep(0.2)
    time.sleep(0.3)
    assert post(llama, {"model": llama.model, "prompt": "x", "max_tokens": 2}).status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_unknown_model_is_a_404(llama):
    assert_error(post(llama, {"model": "gpt-nope", "prompt": "x"}), 404, "model", "model_not_found")


def test_prompt_too_long_for_the_context(llama):
    error = assert_error(post(llama, {"model": llama.model, "prompt": [1] * 250, "max_tokens": 10}), 400, "prompt", "context_length_exceeded")
    assert "256" in error["message"] and "260" in error["message"]


def test_a_short_prompt_over_the_context_is_counted_in_tokens(llama):
    error = assert_error(post(llama, {"model": llama.model, "prompt": "hello", "max_tokens": 10**6}), 400, "prompt", "context_length_exceeded")
    prompt_tokens = len(llama.engine.tokenizer.encode("hello"))
    assert f"({prompt_tokens} in your prompt; 1000000 for the completion)" in error["message"] and "characters" not in error["message"]


def test_too_long_is_refused_before_a_stream_starts(llama):
    response = post(llama, {"model": llama.model, "prompt": [1] * 300, "stream": True})
    assert_error(response, 400, "prompt", "context_length_exceeded")


def test_sdk_raises_openais_exceptions(llama):
    with pytest.raises(openai.BadRequestError) as info:
        llama.client().completions.create(model=llama.model, prompt="x", temperature=5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        llama.client().completions.create(model="nope", prompt="x")


def test_models_routes(llama):
    listing = httpx.get(llama.url + "/v1/models").json()
    assert listing["object"] == "list" and listing["data"][0]["id"] == llama.model
    assert listing["data"][0]["max_model_len"] == 256
    assert llama.client().models.retrieve(llama.model).id == llama.model
    assert_error(httpx.get(llama.url + "/v1/models/nope"), 404, "model", "model_not_found")
    assert httpx.get(llama.url + "/health").status_code == 200


def test_unknown_route_is_an_openai_404(llama):
    assert_error(httpx.get(llama.url + "/v1/chat/nothing"), 404)


def test_api_key_is_required(gpt2):
    no_key = httpx.post(gpt2.url + "/v1/completions", json={"model": gpt2.model, "prompt": "x"})
    assert assert_error(no_key, 401, None, "invalid_api_key", "authentication_error")["message"].startswith("You didn't provide an API key.")
    wrong = httpx.get(gpt2.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert assert_error(wrong, 401, None, "invalid_api_key", "authentication_error")["message"].startswith("Incorrect API key provided.")
    assert httpx.get(gpt2.url + "/health").status_code == 200
    assert gpt2.client().completions.create(model=gpt2.model, prompt="x", max_tokens=2).usage.completion_tokens <= 2
    wrong_client = openai.OpenAI(base_url=gpt2.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_client.completions.create(model=gpt2.model, prompt="x")


def test_concurrent_requests_match_their_solo_outputs(llama):
    bodies = [
        {"model": llama.model, "prompt": "def", "max_tokens": 20, "temperature": 0},
        {"model": llama.model, "prompt": "import", "max_tokens": 20, "seed": 5},
        {"model": llama.model, "prompt": "class", "max_tokens": 20, "seed": 6, "n": 2, "stop": "e"},
        {"model": llama.model, "prompt": "x", "max_tokens": 20, "seed": 7, "stream": True},
    ]

    def texts(response, body):
        if body.get("stream"):
            return [streamed_text(events(response)[:-1])]
        return [c["text"] for c in response.json()["choices"]]

    solo = [texts(post(llama, b), b) for b in bodies]

    async def together():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(llama.url + "/v1/completions", json=b) for b in bodies * 2))

    crowd = asyncio.run(together())
    assert [texts(r, b) for r, b in zip(crowd, bodies * 2, strict=True)] == solo * 2


def test_streaming_client_that_leaves_stops_its_generation(llama):
    body = {"model": llama.model, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", llama.url + "/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    assert llama.idle(timeout=5)


def test_waiting_client_that_leaves_stops_its_generation(llama):
    body = {"model": llama.model, "prompt": "x", "max_tokens": 230, "ignore_eos": True, "n": 128}  # 1.6-1.9 s of work, quiet (n=24: 0.4 s)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(llama.url + "/v1/completions", json=body, timeout=0.5)
    assert llama.idle(timeout=5)


def test_an_engine_failure_fails_its_request_not_the_server(llama, monkeypatch):
    fail_next_step(llama, monkeypatch)
    chunks = events(post(llama, {"model": llama.model, "prompt": "x", "max_tokens": 5, "stream": True}))
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["type"] == "server_error"
    assert post(llama, {"model": llama.model, "prompt": "x", "max_tokens": 5}).status_code == 200
    assert llama.idle()


def test_streams_carry_comment_pings_only_when_asked(llama_dir):
    body = {"model": "tiny-llama-pinged", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    for served in serve(llama_dir, "tiny-llama-pinged", sse_keepalive=0.01):
        lines = post(served, body).text.splitlines()
        assert any(line.startswith(": ping") for line in lines)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"


def test_no_ping_follows_done_even_when_one_is_due_before_the_stream_ends():
    """A stream whose generator lingers after its last event, pings every millisecond: only the end of the body follows [DONE]."""
    from tokenmill.server.api import _EventStream

    async def events():
        await asyncio.sleep(0.02)  # pings go out while the first event is computed
        yield {"data": "{}"}
        yield {"data": "[DONE]"}
        await asyncio.sleep(0.05)  # the generator's own cleanup, as ours awaits the engine's

    async def main() -> list[dict]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
        await _EventStream(events(), sep="\n", ping=0.001)(scope, receive, send)
        return sent

    bodies = [m.get("body", b"") for m in asyncio.run(main()) if m["type"] == "http.response.body"]
    assert bodies[-2:] == [b"data: [DONE]\n\n", b""]
    assert any(body.startswith(b": ping") for body in bodies)  # pings did go out, before the end


def test_a_short_request_finishes_while_a_long_one_streams(llama):
    long_body = {"model": llama.model, "prompt": "x", "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", llama.url + "/v1/completions", json=long_body, timeout=60) as long_response:
        lines = long_response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        short = post(llama, {"model": llama.model, "prompt": "y", "max_tokens": 3, "ignore_eos": True}).json()
        assert short["usage"]["completion_tokens"] == 3
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and len(rest) > 100  # the long one was still going


def test_a_lone_surrogate_is_refused_as_malformed_json(llama):
    # A lone surrogate escape is not text; the JSON parser refuses it and says where.
    body = b'{"model": "tiny-llama", "prompt": "bad \\ud800 surrogate"}'
    response = httpx.post(llama.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert "hex escape at line 1 column" in assert_error(response, 400)["message"]


def test_suffix_without_a_prompt_inserts_at_the_start(llama):
    out = post(llama, {"model": llama.model, "prompt": None, "suffix": "return x", "max_tokens": 2, "temperature": 0})
    assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] == 3 + len(llama.engine.tokenizer.encode("return x"))


def test_too_many_sequences_in_one_request_is_a_400(llama):
    error = assert_error(post(llama, {"model": llama.model, "prompt": ["a"] * 20, "best_of": 20, "n": 1}), 400, "prompt")
    assert "400 sequences" in error["message"]


def test_a_failed_prefill_fails_only_its_request(llama, monkeypatch):
    runner = llama.engine.engine.runner
    real = runner.execute

    def execute(works):
        if any(w.prefill and len(w.token_ids) == 7 for w in works):  # only the victim's prompt has 7 tokens
            raise MemoryError("simulated")
        return real(works)

    monkeypatch.setattr(runner, "execute", execute)
    long_body = {"model": llama.model, "prompt": "x", "max_tokens": 150, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", llama.url + "/v1/completions", json=long_body, timeout=60) as survivor:
        lines = survivor.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        victim = post(llama, {"model": llama.model, "prompt": [5] * 7, "max_tokens": 5})
        assert_error(victim, 500, type="server_error")
        assert "MemoryError" in victim.json()["error"]["message"]
        rest = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(line[len("data: ") :]) for line in rest[:-1]]
    assert rest[-1] == "data: [DONE]" and not any("error" in event for event in events)  # the key, not the text
    assert llama.idle()


def test_system_fingerprint_follows_model_dtype_and_version(monkeypatch):
    from dataclasses import replace

    from tokenmill.outputs import ModelInfo
    from tokenmill.server import responses

    info = ModelInfo("m", "/models/m", 2048, 1000, "float32", "cpu")
    base = responses.fingerprint(info)
    assert responses.fingerprint(replace(info, name="alias", device="cuda")) == base
    assert responses.fingerprint(replace(info, dtype="bfloat16")) != base
    assert responses.fingerprint(replace(info, source="/models/other")) != base
    monkeypatch.setattr(responses, "__version__", "9.9.9")
    assert responses.fingerprint(info) != base


def test_a_wrong_method_is_an_openai_error(llama):
    assert_error(httpx.get(llama.url + "/v1/completions"), 405)
    assert_error(httpx.delete(llama.url + "/v1/models"), 405)


def test_a_burst_where_half_the_clients_leave_frees_every_block(llama):
    body = {"model": llama.model, "max_tokens": 60, "ignore_eos": True, "stream": True}

    async def one(client, i):
        async with client.stream("POST", llama.url + "/v1/completions", json={**body, "prompt": f"def f{i}(x):"}) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if i % 2 and seen == 2:
                    return "left"  # leaving the block closes the connection mid-stream
            return "done"

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    assert asyncio.run(burst()) == ["done", "left"] * 6
    assert llama.idle(timeout=10)
