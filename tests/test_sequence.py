"""Per-sequence text handling on a hand-made byte vocabulary: stop strings, hold-back, flush."""

from tokenmill.engine.sequence import PromptGroup, Sequence
from tokenmill.sampling_params import Prompt, SamplingParams

VOCAB = {0: b"<eos>", 1: b"Hello", 2: b" wor", 3: b"ld", 4: b"\n\xe4", 5: b"\xbd\xa0", 6: b"\n", 7: b"EN", 8: b"D!"}


def decode(ids):
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", "replace")


def sequence(**params) -> Sequence:
    group = PromptGroup("r", 0, Prompt((1,), "Hello"), SamplingParams(**params), lambda i: decode([i]))
    group.prefilled = True
    return Sequence(0, group, decode)


def feed(seq: Sequence, tokens):
    sent = []
    for t in tokens:
        seq.append(t, -1.0, None, is_eos=t == 0)
        sent.append(seq.take_delta()[0])
        if seq.finished:
            break
    return sent


def test_a_stop_string_in_text_the_final_flush_releases_is_cut():
    seq = sequence(max_tokens=2, stop=("\n",))
    sent = feed(seq, [2, 4])  # " wor", then "\n" + half of 你: held back until the end
    assert "".join(sent) == " wor" and seq.finish_reason == "stop"


def test_a_split_character_is_never_sent_in_halves():
    seq = sequence(max_tokens=5)
    assert feed(seq, [4, 5, 3]) == ["", "\n你", "ld"]


def test_text_that_may_become_a_stop_string_is_held_back():
    seq = sequence(max_tokens=5, stop=("END!",))
    assert feed(seq, [2, 7, 8]) == [" wor", "", ""] and seq.text == " wor" and seq.finish_reason == "stop"


def test_held_back_text_is_released_when_it_cannot_match():
    seq = sequence(max_tokens=5, stop=("ENX",))
    assert feed(seq, [7, 3]) == ["", "ENld"]


def test_eos_ends_with_stop_and_adds_no_text():
    seq = sequence(max_tokens=5, logprobs=0)
    feed(seq, [1, 0])
    assert seq.text == "Hello" and seq.finish_reason == "stop" and len(seq.output_ids) == 2
