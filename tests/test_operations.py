"""Operating the server: admission, limits, timeouts, stalled readers, metrics, logs, keys, CORS."""

import asyncio
import json
import logging
import socket
import time

import httpx
import pytest

from tests.conftest import serve
from tests.test_api import assert_error, events, post


@pytest.fixture(scope="module")
def one_seat(llama_dir):
    """One sequence at a time, two requests waiting at most."""
    yield from serve(llama_dir, "tiny-llama", engine_options={"max_num_seqs": 1}, max_queued_requests=2)


@pytest.fixture(scope="module")
def timed(long_llama_dir):
    """Requests may run 1 s; a stream unread for 1 s is aborted."""
    yield from serve(long_llama_dir, "tiny-long", request_timeout=1.0, stream_stall_timeout=1.0)


@pytest.fixture(scope="module")
def stalling(long_llama_dir):
    """A stream unread for 1 s is aborted."""
    yield from serve(long_llama_dir, "tiny-long", stream_stall_timeout=1.0)


@pytest.fixture(scope="module")
def keyed(llama_dir):
    """Two keys (a comma list), metrics behind them, CORS for one origin."""
    yield from serve(llama_dir, "tiny-llama", api_key="sk-one,sk-two", protect_metrics=True, allowed_origins="https://app.example")


def long_body(served, **extra):
    return {"model": served.model, "prompt": "x", "max_tokens": 6000, "ignore_eos": True, **extra}


@pytest.mark.slow
def test_a_flood_past_the_queue_gets_429s_and_the_admitted_all_finish(one_seat):
    body = {"model": one_seat.model, "prompt": "def", "max_tokens": 100, "ignore_eos": True}

    async def flood():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(one_seat.url + "/v1/completions", json=body) for _ in range(20)])

    responses = asyncio.run(flood())
    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert len(served) + len(refused) == 20 and 1 <= len(served) <= 3, [r.status_code for r in responses]
    for r in refused:
        assert_error(r, 429, None, "rate_limit_exceeded", type="requests")
        assert r.headers["retry-after"] == "1"
    assert all(r.json()["usage"]["completion_tokens"] == 100 for r in served)
    assert one_seat.idle()
    assert post(one_seat, body).status_code == 200  # the queue is open again


def test_a_newcomer_is_not_starved_by_a_request_holding_every_seat(llama_dir):
    from tokenmill.config import EngineConfig
    from tokenmill.engine.loader import build_engine
    from tokenmill.sampling_params import Prompt, SamplingParams

    engine, _ = build_engine(EngineConfig(model=str(llama_dir), max_num_seqs=4), str(llama_dir), "tiny")
    big = SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.0)
    engine.add_request("big", [Prompt((5, 6, 7)), Prompt((8, 9)), Prompt((10,)), Prompt((11, 12))], big)
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 4
    engine.add_request("small", [Prompt((13, 14))], SamplingParams(max_tokens=5, temperature=0.0))
    steps = 0
    while True:
        steps += 1
        outputs = {o.request_id: o for o in engine.step()}
        if "small" in outputs and outputs["small"].completion_tokens:
            break
    assert steps == 1  # seats full: the big request gave one back at once
    while engine.has_unfinished():
        engine.step()
    assert engine.scheduler.preemptions >= 1 and engine.blocks.num_free == engine.blocks.num_blocks


def test_a_request_over_its_time_limit_ends_with_a_408_and_frees_its_blocks(timed):
    started = time.monotonic()
    response = post(timed, long_body(timed))
    assert_error(response, 408, None, "request_timeout", type="server_error")
    assert time.monotonic() - started < 5
    assert timed.idle()


def test_a_stream_over_its_time_limit_ends_with_an_error_event_and_done(timed):
    response = post(timed, long_body(timed, stream=True))
    data = events(response)
    assert data[-1] == "[DONE]" and data[-2]["error"]["code"] == "request_timeout"
    assert len(data) > 3  # it streamed tokens before the limit
    assert timed.idle()


def test_a_stream_nobody_reads_pauses_then_is_aborted_and_freed(stalling):
    from tokenmill.engine.async_engine import MAX_UNREAD

    timed = stalling
    request = json.dumps(long_body(timed, stream=True, n=16, logprobs=5)).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(timed.url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(request), request))
    inner = timed.engine.engine
    deadline = time.time() + 20
    while not inner._paused and time.time() < deadline:
        time.sleep(0.01)
    assert inner._paused, "the unread stream was never paused"
    assert inner.num_active() == 0  # its blocks went back while it waits
    box = next(iter(timed.engine._outboxes.values()))
    assert box.queue.qsize() <= MAX_UNREAD
    assert timed.idle(timeout=5)  # after the stall timeout it is aborted
    sock.settimeout(10)
    received = b""
    while not received.endswith(b"\r\n0\r\n\r\n"):  # the end of a chunked body
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    sock.close()
    last_events = received.rsplit(b"data: {", 1)[-1]
    assert b"was not read" in last_events and b'"code":"request_timeout"' in last_events
    assert b"data: [DONE]" in last_events


def test_a_client_that_leaves_a_waiting_request_logs_one_line_and_no_traceback(llama, caplog):
    caplog.set_level(logging.INFO)
    body = {"model": llama.model, "prompt": "x", "max_tokens": 230, "ignore_eos": True, "n": 128}  # 1.6-1.9 s of work, well past the client's 0.3 s
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(llama.url + "/v1/completions", json=body, timeout=0.3)
    assert llama.idle()
    time.sleep(0.1)
    lines = [r for r in caplog.records if r.name == "tokenmill.requests" and r.fields.get("status") == 499]
    assert len(lines) == 1 and lines[0].fields["client"] == "left"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_stream_read_to_its_end_is_not_logged_as_left_and_one_cut_short_is(llama, caplog):
    caplog.set_level(logging.INFO)
    body = {"model": llama.model, "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", llama.url + "/v1/completions", json={**body, "max_tokens": 3}, headers={"X-Request-Id": "whole"}) as response:
        assert b"data: [DONE]" in response.read()
    with httpx.stream("POST", llama.url + "/v1/completions", json=body, headers={"X-Request-Id": "cut"}) as response:
        next(response.iter_lines())  # one event, then the connection closes
    assert llama.idle()
    time.sleep(0.1)
    fields = {r.fields["request_id"]: r.fields for r in caplog.records if r.name == "tokenmill.requests"}
    assert "client" not in fields["whole"] and fields["cut"]["client"] == "left"


def test_request_ids_are_the_clients_or_the_completions(llama):
    given = httpx.post(llama.url + "/v1/completions", json={"model": llama.model, "prompt": "a", "max_tokens": 2}, headers={"X-Request-Id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    own = post(llama, {"model": llama.model, "prompt": "a", "max_tokens": 2})
    assert own.headers["x-request-id"] == own.json()["id"]
    streamed = post(llama, {"model": llama.model, "prompt": "a", "max_tokens": 2, "stream": True})
    assert streamed.headers["x-request-id"] == events(streamed)[0]["id"]


def test_metrics_count_requests_tokens_latencies_and_cache_hits(llama):
    prompt = "def main(): return 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12"
    for _ in range(2):
        assert post(llama, {"model": llama.model, "prompt": prompt, "max_tokens": 4}).status_code == 200
    assert llama.idle()
    text = httpx.get(llama.url + "/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values['tokenmill_requests_total{route="/v1/completions",status="200"}'] >= 2
    assert values["tokenmill_prompt_tokens_total"] > 0 and values["tokenmill_generation_tokens_total"] >= 8
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "queue_time_seconds", "e2e_request_latency_seconds"):
        assert values[f"tokenmill_{histogram}_count"] >= 2, histogram
    assert values["tokenmill_requests_running"] == 0 and values["tokenmill_requests_waiting"] == 0
    assert values["tokenmill_kv_cache_usage_ratio"] == 0.0  # cached blocks nobody holds count as free
    assert values["tokenmill_prefix_cache_hit_tokens_total"] > 0 and "tokenmill_preemptions_total" in values


def test_request_log_lines_carry_the_request_and_never_the_key_or_prompt(gpt2, caplog):
    caplog.set_level(logging.INFO)
    # ignore_eos: at temperature 1 the tiny model (1k tokens, near uniform) drew its end token within 3 tokens in CI once
    response = post(gpt2, {"model": gpt2.model, "prompt": "secret prompt text", "max_tokens": 3, "ignore_eos": True})
    assert response.status_code == 200
    time.sleep(0.1)
    lines = [r for r in caplog.records if r.name == "tokenmill.requests"]
    assert len(lines) == 1
    fields = lines[0].fields
    assert fields["request_id"] == response.json()["id"] and fields["status"] == 200
    assert fields["prompt_tokens"] == response.json()["usage"]["prompt_tokens"] and fields["completion_tokens"] == 3
    assert "ttft" in fields and fields["seconds"] > 0
    assert gpt2.api_key not in caplog.text and "secret prompt" not in caplog.text


def test_json_log_lines_are_one_object_each():
    from tokenmill.logs import JSONFormatter

    record = logging.LogRecord("tokenmill.requests", logging.INFO, __file__, 1, "POST %s", ("/v1/completions",), None)
    record.fields = {"request_id": "cmpl-1", "status": 200}
    line = JSONFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line and entry["message"] == "POST /v1/completions"
    assert entry["level"] == "info" and entry["request_id"] == "cmpl-1" and entry["status"] == 200


def test_every_key_of_several_is_accepted_and_the_docs_sit_behind_them(keyed):
    body = {"model": keyed.model, "prompt": "a", "max_tokens": 1}
    for key in ("sk-one", "sk-two"):
        ok = httpx.post(keyed.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert_error(
        httpx.post(keyed.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-one,sk-two"}),
        401,
        None,
        "invalid_api_key",
        "authentication_error",
    )
    for path in ("/openapi.json", "/docs", "/redoc", "/metrics"):
        assert_error(httpx.get(keyed.url + path), 401, None, "invalid_api_key", "authentication_error")
        assert httpx.get(keyed.url + path, headers={"Authorization": "Bearer sk-two"}).status_code == 200
    assert httpx.get(keyed.url + "/health").status_code == 200


def test_metrics_and_docs_are_open_without_a_key_and_describe_the_request(llama):
    assert httpx.get(llama.url + "/metrics").status_code == 200
    spec = httpx.get(llama.url + "/openapi.json").json()
    operation = spec["paths"]["/v1/completions"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request_schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"model", "prompt", "best_of", "logit_bias", "stream_options"} <= set(request_schema["properties"])
    assert {"200", "400", "413", "429", "503"} <= set(operation["responses"])
    assert "$defs" not in json.dumps(spec)


def test_cors_is_off_unless_origins_are_given(llama, keyed):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(llama.url + "/v1/completions", headers=preflight).headers
    allowed = httpx.options(keyed.url + "/v1/completions", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(keyed.url + "/v1/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_api_keys_come_from_flags_comma_lists_a_file_or_the_environment(tmp_path, monkeypatch):
    from tokenmill.config import api_keys_from

    keys = tmp_path / "keys"
    keys.write_text("sk-file-1\n\n# a comment\nsk-file-2\n")
    assert api_keys_from(["sk-a,sk-b", "sk-c"], str(keys)) == ("sk-a", "sk-b", "sk-c", "sk-file-1", "sk-file-2")
    monkeypatch.setenv("TOKENMILL_API_KEY", "sk-env")
    assert api_keys_from([], None) == ("sk-env",)
    assert api_keys_from(["sk-flag"], None) == ("sk-flag",)
    with pytest.raises(ValueError, match="api-key-file"):
        api_keys_from([], str(tmp_path / "missing"))


def test_nan_logits_fail_only_their_request(llama_dir, monkeypatch):
    import torch

    from tokenmill.config import EngineConfig
    from tokenmill.engine.loader import build_engine
    from tokenmill.sampling_params import Prompt, SamplingParams

    engine, _ = build_engine(EngineConfig(model=str(llama_dir)), str(llama_dir), "tiny")
    params = SamplingParams(max_tokens=6, temperature=0.0)

    def run(requests):
        outputs = {}
        for rid, ids in requests:
            engine.add_request(rid, [Prompt(ids)], params)
        while engine.has_unfinished():
            for o in engine.step():
                outputs.setdefault(o.request_id, []).append(o)
        return outputs

    alone = run([("good", (5, 6, 7))])
    execute = engine.runner.execute

    def poisoned(works):
        results = execute(works)
        return [torch.full_like(r, float("nan")) if r is not None and w.token_ids[:1] == [99] else r for w, r in zip(works, results, strict=True)]

    monkeypatch.setattr(engine.runner, "execute", poisoned)
    together = run([("bad", (99, 98)), ("good", (5, 6, 7))])
    assert together["bad"][-1].error and together["bad"][-1].finished
    text = lambda outs: "".join(c.text for o in outs for c in o.choices)  # noqa: E731
    assert text(together["good"]) == text(alone["good"]) and not together["good"][-1].error
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("fault", ["sampling", "detokenizing"])
def test_an_exception_in_one_requests_sampling_or_detokenizing_fails_it_alone(llama_dir, monkeypatch, fault):
    from tokenmill.config import EngineConfig
    from tokenmill.engine import engine as engine_module
    from tokenmill.engine.loader import build_engine
    from tokenmill.engine.sequence import Sequence
    from tokenmill.sampling_params import Prompt, SamplingParams

    engine, _ = build_engine(EngineConfig(model=str(llama_dir)), str(llama_dir), "tiny")

    def run(requests):
        outputs = {}
        for rid, seed in requests:
            engine.add_request(rid, [Prompt((5, 6, 7))], SamplingParams(max_tokens=6, temperature=0.7, seed=seed))
        while engine.has_unfinished():
            for o in engine.step():
                outputs.setdefault(o.request_id, []).append(o)
        return outputs

    alone = run([("good", 1)])
    sample, append = engine_module.sample, Sequence.append

    def failing_sample(logits, rows, allowed=None):
        if any(r.params.seed == 666 for r in rows):
            raise RuntimeError("a row this sampler cannot take")
        return sample(logits, rows, allowed)

    def failing_append(seq, *args):
        if seq.params.seed == 666:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a token this detokenizer cannot take")
        return append(seq, *args)

    if fault == "sampling":
        monkeypatch.setattr(engine_module, "sample", failing_sample)
    else:
        monkeypatch.setattr(Sequence, "append", failing_append)
    together = run([("bad", 666), ("good", 1)])
    assert together["bad"][-1].error and together["bad"][-1].finished
    text = lambda outs: "".join(c.text for o in outs for c in o.choices)  # noqa: E731
    assert text(together["good"]) == text(alone["good"]) and not together["good"][-1].error
    assert engine.blocks.num_free == engine.blocks.num_blocks
