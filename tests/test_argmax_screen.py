"""The lm_head's argmax screen (engine/linear.py's ArgmaxScreen, csrc/matmul.cpp's screened_logits): a greedy row's token
is the float32 lm_head's first argmax, from the exact logits of the few columns a bfloat16 pass leaves."""

import pytest
import torch

from tests.test_batching import alone, engine_for, together
from tokenmill.engine import native
from tokenmill.engine.linear import ArgmaxScreen, PackedLinear
from tokenmill.sampling_params import Prompt, SamplingParams


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    lib = native.load_matmul(tmp_path_factory.mktemp("kernels"))
    if lib is None or lib.matmul_panel_width() == 0 or lib.screen_width() == 0:
        pytest.skip("no C++ compiler, or a CPU without AVX512-BF16")
    return lib


def tiles_or_skip(kernel, tiles: bool) -> bool:
    if tiles and not kernel.screen_tiles():
        pytest.skip("no AMX tiles on this CPU (or the kernel does not grant them)")
    return tiles


def rows_and_head(out_features: int, in_features: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A head with two equal columns (an exact tie) and rows that put that tie on top, plus random rows."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    weight[7] = weight[3]
    x = torch.randn(rows, in_features, generator=gen) * 3
    x[0] = weight[3] * 40
    return x, weight


@pytest.mark.parametrize("tiles", [True, False])
@pytest.mark.parametrize(("out_features", "in_features", "rows"), [(5000, 576, 64), (4999, 575, 13), (1000, 64, 1), (300, 33, 40)])
def test_the_screened_argmax_is_the_heads_and_its_candidates_have_the_heads_bits(kernel, tiles, out_features, in_features, rows):
    x, weight = rows_and_head(out_features, in_features, rows, out_features)
    head = PackedLinear(weight, None, kernel)
    screen = ArgmaxScreen(weight, head, kernel, tiles_or_skip(kernel, tiles))
    full = head(x)
    for limit in (out_features, out_features - 10):
        screened, fallback = screen(x, limit)
        assert fallback == []
        want = full.clone()
        want[:, limit:] = float("-inf")
        kept = screened > float("-inf")
        assert torch.equal(screened.argmax(dim=1), want.argmax(dim=1))
        assert torch.equal(screened[kept], want[kept])  # the candidates' logits are the head's own bits
        assert kept.sum(dim=1).max() < out_features // 10  # and the screen left few of them
        assert screened[0, 3] == screened[0, 7] and screened.argmax(dim=1)[0] == 3  # a tie goes to the first


@pytest.mark.parametrize("tiles", [True, False])
def test_rows_the_screen_cannot_settle_are_left_to_the_head(kernel, tiles):
    """Non-finite inputs, logits that could overflow and all-tied rows are flagged, the other rows screened as usual."""
    x, weight = rows_and_head(5000, 64, 6, 1)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    x[3] = 1e30
    x[4] = 0.0  # every logit 0: all 5,000 columns tie, more than a thread's list holds
    head = PackedLinear(weight, None, kernel)
    screened, fallback = ArgmaxScreen(weight, head, kernel, tiles_or_skip(kernel, tiles))(x, 5000)
    assert fallback == [1, 2, 3, 4]
    full = head(x)
    assert torch.equal(screened[[0, 5]].argmax(dim=1), full[[0, 5]].argmax(dim=1))


def greedy_requests(vocab: int) -> list[tuple[list[Prompt], SamplingParams]]:
    """Greedy requests without logprobs (screened) beside ones the screen must leave alone: logprobs, min_tokens, n = 2."""
    gen = torch.Generator().manual_seed(3)
    requests = []
    for i in range(12):
        ids = tuple(torch.randint(1, vocab, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).tolist())
        knobs: dict = {"logprobs": 2} if i % 4 == 1 else {"min_tokens": 5} if i % 4 == 2 else {"n": 2} if i % 4 == 3 else {}
        requests.append(([Prompt(ids)], SamplingParams(max_tokens=12 + i, temperature=0.0, ignore_eos=i % 2 == 0, **knobs)))
    return requests


def test_greedy_requests_give_the_same_outputs_screened_or_not_alone_or_together(llama_dir):
    screened, plain = engine_for(llama_dir, argmax_screen="on"), engine_for(llama_dir, argmax_screen="off")
    screen = screened.runner.lean.screen if screened.runner.lean is not None else None
    if screen is None:
        pytest.skip("no compiled matmul with a screen on this machine")
    calls = []

    def counted(x, limit):  # counts the rows the screen takes, to show that the test screens
        calls.append(x.shape[0])
        return screen(x, limit)

    screened.runner.lean.screen = counted
    requests = greedy_requests(screened.tokenizer.vocab_size)
    want = alone(plain, requests)
    assert together(screened, requests) == want
    assert alone(screened, requests) == want
    assert sum(calls) > 100
