"""The sampler, knob by knob, against the formulas it implements."""

import math

import pytest
import torch

from tokenmill.engine.sampler import (
    SamplingRow,
    apply_logit_bias,
    apply_penalties,
    first_argmax,
    prompt_logprobs,
    sample,
    truncate,
)
from tokenmill.sampling_params import SamplingParams


def row(output_ids=(), prompt_ids=(), seed=0, eos=(), **params):
    gen = torch.Generator().manual_seed(seed)
    return SamplingRow(SamplingParams(**params), tuple(prompt_ids), list(output_ids), gen, tuple(eos))


def test_logit_bias_is_added():
    logits = torch.zeros(2, 5)
    out = apply_logit_bias(logits, [row(logit_bias={1: 3.0, 4: -100.0}), row()])
    assert out.tolist() == [[0, 3, 0, 0, -100], [0, 0, 0, 0, 0]]


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    r = row(output_ids=[2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25)
    counts = [0, 0, 2, 1]
    expected = [logit - c * 0.25 - (c > 0) * 0.5 for logit, c in zip([1.0, 2.0, 3.0, 4.0], counts, strict=True)]
    assert apply_penalties(logits, [r])[0].tolist() == pytest.approx(expected)


def test_penalties_count_generated_tokens_only():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    r = row(prompt_ids=[0, 1], output_ids=[], presence_penalty=2.0)
    assert apply_penalties(logits, [r]).tolist() == [[1.0, 1.0, 1.0]]


def test_negative_penalties_encourage_repetition():
    logits = torch.zeros(1, 3)
    r = row(output_ids=[1], presence_penalty=-1.0, frequency_penalty=-2.0)
    assert apply_penalties(logits, [r])[0].tolist() == [0.0, 3.0, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    r = row(prompt_ids=[0], output_ids=[1], repetition_penalty=2.0)
    assert apply_penalties(logits, [r])[0].tolist() == [1.0, -4.0, 2.0]


def test_temperature_zero_is_argmax_after_bias():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    out = sample(logits, [row(temperature=0.0, logit_bias={2: 10.0})])
    assert out.tokens == [2]


def test_reported_logprobs_are_the_models_own():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = sample(logits, [row(temperature=0.0, logit_bias={2: 10.0}, logprobs=2)])
    raw = torch.log_softmax(logits, -1)[0]
    assert out.logprobs[0] == pytest.approx(raw[2].item())
    assert out.top_ids[0] == [0, 1]
    assert out.top_logprobs[0] == pytest.approx(raw[:2].tolist())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_draws_follow_softmax_of_scaled_logits(temperature):
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    expected = torch.softmax(logits[0] / temperature, -1)
    r = row(temperature=temperature, seed=1)
    draws = [sample(logits, [r]).tokens[0] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=4).float() / len(draws)
    assert torch.allclose(freq, expected, atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = truncate(probs.log(), [row(top_p=0.7)])
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_top_p_zero_keeps_only_the_top_token():
    probs = torch.tensor([[0.2, 0.5, 0.3]])
    out = truncate(probs.log(), [row(top_p=0.0)])
    assert torch.isfinite(out[0]).tolist() == [False, True, False]


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = truncate(logits, [row(top_k=2)])
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False]


def test_top_p_one_changes_nothing():
    logits = torch.randn(3, 7)
    assert torch.equal(truncate(logits, [row(), row(), row()]), logits)


def test_a_seeded_row_draws_the_same_alone_or_in_a_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    alone = [sample(logits[1:2], [row(seed=7, temperature=1.0)]).tokens[0] for _ in range(1)]
    batch = sample(logits, [row(seed=1, temperature=0.7), row(seed=7), row(temperature=0.0)])
    assert batch.tokens[1] == alone[0]


def test_min_tokens_bans_eos_until_reached():
    logits = torch.tensor([[0.0, 10.0, 0.0]])
    assert sample(logits, [row(temperature=0.0, min_tokens=2, output_ids=[0], eos=(1,))]).tokens == [0]
    assert sample(logits, [row(temperature=0.0, min_tokens=2, output_ids=[0, 0], eos=(1,))]).tokens == [1]


def test_prompt_logprobs_match_direct_computation_across_chunks():
    torch.manual_seed(0)
    logits = torch.randn(300, 11)
    ids = torch.randint(0, 11, (300,)).tolist()
    got = prompt_logprobs(logits, ids, k=2)
    lp = torch.log_softmax(logits, -1)
    assert len(got) == 299
    for i in (0, 255, 256, 298):
        assert got[i][0] == pytest.approx(lp[i, ids[i + 1]].item())
        assert got[i][1] == lp[i].topk(2).indices.tolist()
    assert all(math.isfinite(g[0]) for g in got)


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 1e-46, 5e-324])  # the last two are 0 in float32
def test_a_tiny_temperature_is_as_good_as_greedy(temperature):
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0]])
    assert sample(logits, [row(temperature=temperature)]).tokens == [1]


@pytest.mark.parametrize("vocab", [7, 2048, 2049, 3072, 49152, 50257])
def test_first_argmax_is_torchs_argmax_with_ties_nan_and_infinities(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(12, vocab, generator=gen).round(decimals=1) * 3  # [12, V], many exact ties
    logits[1] = 0.0  # all tied: the first index
    logits[2] = float("-inf")  # all masked: index 0, as torch gives
    logits[3, vocab // 2] = float("nan")
    logits[4, -1] = float("nan")
    logits[4, 0] = float("nan")  # two NaNs: the first
    logits[5, -1] = 1e9  # the maximum in the last, overlapping window
    logits[6, vocab - 2 :] = 1e9  # tied at the end
    logits[7, 0] = float("inf")
    logits[8, : vocab // 2] = float("-inf")
    for x in logits, logits[:, : max(1, vocab - 5)]:  # the second a strided view
        index, top = first_argmax(x)
        assert torch.equal(index, x.argmax(dim=-1))
        torch.testing.assert_close(top, x.amax(dim=-1), rtol=0, atol=0, equal_nan=True)


def test_a_step_without_logprobs_draws_the_same_tokens_and_still_flags_nan_rows():
    logits = torch.randn(4, 3000, generator=torch.Generator().manual_seed(1))
    logits[2, 7] = float("nan")

    def rows(**first):  # fresh generators each time
        return [row(temperature=0, **first), row(temperature=0.8, seed=3), row(temperature=0), row(temperature=0.8, seed=4)]

    plain = sample(logits, rows())
    reported = sample(logits, rows(logprobs=0))
    assert plain.tokens == reported.tokens
    assert [math.isnan(v) for v in plain.logprobs] == [math.isnan(v) for v in reported.logprobs] == [False, False, True, False]
    assert plain.logprobs[0] == 0.0 and reported.logprobs[0] == torch.log_softmax(logits[0], -1).max().item()


def test_a_knob_that_makes_logits_infinite_is_no_nan_row():
    logits = torch.randn(2, 3000, generator=torch.Generator().manual_seed(2))
    rows = [row(temperature=0, output_ids=[5], repetition_penalty=5e-324), row(temperature=0, logit_bias={7: 100.0})]
    out = sample(logits, rows)
    assert out.tokens[1] == 7 and not any(math.isnan(v) for v in out.logprobs)
