"""Request validation: OpenAI's types, defaults and bounds, each violation naming its parameter."""

import json

import pytest

from tokenmill.server.errors import APIError
from tokenmill.server.protocol import parse_request, to_sampling_params

BASE = {"model": "m", "prompt": "hi"}


def parse(**fields):
    return parse_request(json.dumps({**BASE, **fields}).encode())


def rejected(param, **fields) -> APIError:
    with pytest.raises(APIError) as info:
        parse(**fields)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    assert info.value.param == param, info.value.message
    return info.value


@pytest.mark.parametrize(
    "field, value",
    [
        ("best_of", -1),
        ("best_of", 21),
        ("best_of", 1.5),
        ("best_of", "2"),
        ("echo", "yes"),
        ("echo", 1),
        ("frequency_penalty", -2.01),
        ("frequency_penalty", 2.5),
        ("frequency_penalty", "0"),
        ("presence_penalty", -3),
        ("presence_penalty", 2.0001),
        ("logit_bias", {"1": 101}),
        ("logit_bias", {"1": -100.5}),
        ("logit_bias", {"a": 1}),
        ("logit_bias", {"1": "x"}),
        ("logit_bias", [1]),
        ("logit_bias", {"7": 0.5}),
        ("top_k", 2**31),
        ("top_k", -2),
        ("logprobs", -1),
        ("logprobs", 6),
        ("logprobs", True),
        ("max_tokens", -1),
        ("max_tokens", "16"),
        ("max_tokens", 1.0),
        ("n", 0),
        ("n", 129),
        ("seed", "1"),
        ("seed", 2**63),
        ("logit_bias", {"²": 1}),
        ("logit_bias", {"--5": 1}),
        ("logit_bias", {" 5": 1}),
        ("stop", []),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", 5),
        ("stop", [1]),
        ("stream", "true"),
        ("suffix", 3),
        ("temperature", -0.1),
        ("temperature", 2.1),
        ("temperature", "hot"),
        ("top_p", -0.5),
        ("top_p", 1.01),
        ("user", 5),
        ("model", 5),
    ],
)
def test_out_of_bounds_or_wrong_type(field, value):
    rejected(field, **{field: value})


@pytest.mark.parametrize("prompt", [5, [], [[]], [1, "a"], [["a"]], {"a": 1}, [1.5], [True]])
def test_bad_prompts(prompt):
    rejected("prompt", prompt=prompt)


@pytest.mark.parametrize(
    "prompt",
    ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]], None, ""],
)
def test_every_prompt_form(prompt):
    assert parse(prompt=prompt).prompt == prompt


def test_defaults_resolve_to_openais():
    p = to_sampling_params(parse())
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.best_of, p.logprobs, p.echo, p.stop) == (16, 1.0, 1.0, 1, 1, None, False, ())


def test_nulls_mean_defaults():
    fields = dict(
        max_tokens=None,
        temperature=None,
        top_p=None,
        n=None,
        best_of=None,
        echo=None,
        stop=None,
        frequency_penalty=None,
        presence_penalty=None,
        logit_bias=None,
        stream=None,
        suffix=None,
    )
    assert to_sampling_params(parse(**fields)) == to_sampling_params(parse())


def test_edges_are_accepted():
    parse(temperature=0, top_p=0, max_tokens=0, logprobs=5, n=128, frequency_penalty=-2, presence_penalty=2)
    parse(temperature=2, top_p=1, logprobs=0, n=1, best_of=20, frequency_penalty=2, presence_penalty=-2)
    parse(logit_bias={"0": -100, "5": 100, "7": 0}, seed=-(2**63), stop="\n", user="u")
    parse(seed=2**63 - 1, stop=["a", "b", "c", "d"], temperature=1)


def test_best_of_below_n():
    assert "best_of" in rejected("best_of", n=3, best_of=2).message


def test_best_of_above_n_cannot_stream():
    rejected("best_of", n=1, best_of=2, stream=True)
    assert parse(n=2, best_of=2, stream=True).stream


def test_stream_options_need_stream():
    rejected("stream_options", stream_options={"include_usage": True})
    assert parse(stream=True, stream_options={"include_usage": True}).include_usage


def test_stream_options_fields_are_checked():
    rejected("stream_options.include_usage", stream=True, stream_options={"include_usage": "yes"})


def test_unknown_fields_are_named():
    error = rejected("frobnicate", frobnicate=1)
    assert error.message == "Unrecognized request argument supplied: frobnicate"


def test_missing_required():
    with pytest.raises(APIError) as info:
        parse_request(b'{"prompt": "x"}')
    assert info.value.param == "model"
    with pytest.raises(APIError) as info:
        parse_request(b'{"model": "x"}')
    assert info.value.param == "prompt"


@pytest.mark.parametrize("body", [b"", b"{", b"[1,2]", b"null", b'"text"', b"\xff\xfe"])
def test_malformed_bodies(body):
    with pytest.raises(APIError) as info:
        parse_request(body)
    assert info.value.status == 400


def test_stop_string_becomes_a_tuple():
    assert to_sampling_params(parse(stop="\n")).stop == ("\n",)
    assert to_sampling_params(parse(stop=["a", "b"])).stop == ("a", "b")


def test_logit_bias_keys_become_ints():
    assert to_sampling_params(parse(logit_bias={"5": -100, "7": 2})).logit_bias == {5: -100.0, 7: 2.0}


def test_extensions_are_accepted():
    p = to_sampling_params(parse(ignore_eos=True, min_tokens=2, top_k=5, repetition_penalty=1.2))
    assert (p.ignore_eos, p.min_tokens, p.top_k, p.repetition_penalty) == (True, 2, 5, 1.2)


def test_echo_with_suffix_is_rejected():
    rejected("suffix", echo=True, suffix="x")


@pytest.mark.parametrize("body", [b"[1,2]", b"null", b'"text"', b"5"])
def test_a_body_that_is_not_an_object_says_so(body):
    with pytest.raises(APIError, match="must be a JSON object"):
        parse_request(body)


def test_an_unknown_nested_field_is_named_in_full():
    error = rejected("stream_options.extra", stream=True, stream_options={"extra": 1})
    assert error.message == "Unrecognized request argument supplied: stream_options.extra"
