"""Incremental detokenizer with the real SmolLM2 tokenizer; the oracle is tokenizer.decode of all the ids."""
from __future__ import annotations

import random

import pytest

from afdserve.engine.detokenizer import IncrementalDetokenizer
from afdserve.engine.sampling_params import SamplingParams
from afdserve.engine.tokenizer import Tokenizer

FFFD = "\ufffd"
TEXTS = [
    "Hello 😀 world 你好世界 🎉🎉 naïve",
    "日本語のテキスト🇯🇵 and 한국어 테스트",
    "👨‍👩‍👧 family, 👍🏽 thumbs, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math ∑€",
    "😀",
]


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer(smollm2_dir)


def feed(tok: Tokenizer, ids: list[int], prompt: str = "Say:", **params):
    """Feeds ids one at a time; returns (the stop string or None, stream deltas, the detokenizer)."""
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), SamplingParams(**params))
    deltas, stop = [], None
    for token_id in ids:
        stop = detok.update([token_id])
        if stop is not None:
            break
        deltas.append(detok.stream_delta(finished=False))
    deltas.append(detok.stream_delta(finished=True))
    return stop, deltas, detok


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("stop", [[], ["<never>"]])
def test_multibyte_text_one_token_at_a_time(tok, text, stop):
    ids = tok.encode(text, add_special_tokens=False)
    assert any(FFFD in tok.decode([i]) for i in ids), "the text should split characters across tokens"
    found, deltas, detok = feed(tok, ids, stop=stop)
    assert found is None
    assert not any(FFFD in d for d in deltas)
    assert "".join(deltas) == detok.output_text == tok.decode(ids) == text


def test_random_multibyte_texts(tok):
    rng = random.Random(0)
    alphabet = list("ab Z,.\n") + list("éßø你好界語테") + ["😀", "🎉", "👍🏽", "🇯🇵", "𝔘", "€"]
    for _ in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 25)))
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 8)))
        ids = tok.encode(text, add_special_tokens=False)
        _, deltas, detok = feed(tok, ids, prompt=prompt, stop=["<never>"])
        assert not any(FFFD in d for d in deltas)
        assert "".join(deltas) == detok.output_text == tok.decode(ids)


def test_several_tokens_per_update_and_special_tokens(tok):
    ids = tok.encode("Hi 😀 there", add_special_tokens=False)
    end = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(end) == 1 and end[0] in tok.special_ids
    seq = ids + end + ids
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, tok.encode("Q:"), SamplingParams(skip_special_tokens=skip))
        for i in range(0, len(seq), 3):
            assert detok.update(seq[i:i + 3]) is None
        assert detok.output_text == tok.decode(seq, skip_special_tokens=skip)
        assert ("<|im_end|>" in detok.output_text) is not skip


def token_texts(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def test_stop_string_spanning_two_tokens(tok):
    ids = tok.encode("Hello world, how are you?", add_special_tokens=False)
    assert token_texts(tok, ids)[:2] == ["Hello", " world"]
    stop, deltas, detok = feed(tok, ids, stop=["lo wo"])
    assert stop == "lo wo"
    assert detok.output_text == "Hel"
    assert "".join(deltas) == "Hel"
    assert detok.token_ids[-1] == ids[1], "found on the token that completes it"


def test_stop_string_at_the_very_start(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    stop, deltas, detok = feed(tok, ids, stop=["He"])
    assert stop == "He" and detok.output_text == "" and "".join(deltas) == ""


def test_stop_string_is_a_whole_multibyte_character(tok):
    text = "ok 🎉 done"
    ids = tok.encode(text, add_special_tokens=False)
    stop, deltas, detok = feed(tok, ids, stop=["🎉"])
    assert stop == "🎉" and detok.output_text == "ok " and "".join(deltas) == "ok "


def test_earliest_stop_string_wins(tok):
    ids = tok.encode("Hello world, how are you?", add_special_tokens=False)
    stop, _, detok = feed(tok, ids, stop=["world", "o w"])
    assert stop == "o w" and detok.output_text == "Hell"


def test_stop_string_never_streamed_in_part(tok):
    text = "The quick brown fox jumps over the lazy dog again and again"
    ids = tok.encode(text, add_special_tokens=False)
    for stop_str in ["lazy dog", "x jumps", "again and", " over the"]:
        stop, deltas, detok = feed(tok, ids, stop=[stop_str, "zzzzzzzzzz"])
        expected = text[:text.index(stop_str)]
        assert stop == stop_str and detok.output_text == expected
        streamed = ""
        for d in deltas:
            streamed += d
            assert expected.startswith(streamed), "text after the cut must never be handed out"
        assert streamed == expected


def test_stream_delta_holds_back_a_possible_stop_prefix(tok):
    detok = IncrementalDetokenizer(tok, tok.encode("x"), SamplingParams(stop=["STOP"]))
    detok.update(tok.encode("abcde ST", add_special_tokens=False))
    streamed = detok.stream_delta(finished=False)
    assert "abcde ST".startswith(streamed) and len(streamed) <= len("abcde "), "' ST' may begin 'STOP'"
    assert detok.update(tok.encode("OP and more", add_special_tokens=False)) == "STOP"
    streamed += detok.stream_delta(finished=True)
    assert streamed == detok.output_text == "abcde "
    plain = IncrementalDetokenizer(tok, tok.encode("x"), SamplingParams())
    plain.update(tok.encode("abcdef", add_special_tokens=False))
    assert plain.stream_delta(finished=False) == "abcdef", "without stop strings nothing is held back"
    assert plain.stream_delta(finished=True) == ""


def test_stop_string_waits_for_min_tokens(tok):
    ids = tok.encode("Hi. Yes. No.", add_special_tokens=False)
    assert token_texts(tok, ids) == ["Hi", ".", " Yes", ".", " No", "."]
    for min_tokens, expected in [(0, "Hi"), (2, "Hi"), (3, "Hi. Yes"), (4, "Hi. Yes"), (5, "Hi. Yes. No")]:
        stop, deltas, detok = feed(tok, ids, stop=["."], min_tokens=min_tokens)
        assert stop == "." and detok.output_text == "".join(deltas) == expected, min_tokens
    # A stop string that spans the min_tokens-th token counts.
    stop, _, detok = feed(tok, ids, stop=["Yes."], min_tokens=4)
    assert stop == "Yes." and detok.output_text == "Hi. "


def test_decoding_window_stays_small(tok):
    """Each step decodes a few recent tokens, not the whole output."""
    lengths = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode("word 😀 " * 60, add_special_tokens=False)
    detok = IncrementalDetokenizer(Spy(), tok.encode("Q:"), SamplingParams())
    for i in ids:
        detok.update([i])
    assert detok.output_text == tok.decode(ids)
    assert max(lengths) <= 12
