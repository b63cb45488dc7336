"""Incremental detokenization: the text a request streams, token by token, is exactly what the
tokenizer's own decode of the whole output gives; multi-byte characters split across tokens are held
back until complete; stop sequences end the text before them, even across tokens."""

from __future__ import annotations

import random

import pytest

from adapterserve.server.engine.text import TextTracker
from tests.helpers.tiny_model import build_tiny_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "Ça va? 日本語 🙂 naïve café — done",
    'JSON {"key": 1}\n\ndef add(a, b): return a + b',
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _stream(tracker: TextTracker, ids: list[int]) -> list[str]:
    return [tracker.push(i) for i in ids] + [tracker.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_whole_decode(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    tracker = TextTracker(tokenizer, (), frozenset())
    assert tracker._stream is not None  # the fast path is the one under test
    assert "".join(_stream(tracker, ids)) == tokenizer.decode(ids, skip_special_tokens=True) == text


def test_random_ids_including_special_tokens(tokenizer):
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        tracker = TextTracker(tokenizer, (), frozenset())
        assert "".join(_stream(tracker, ids)) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_an_incomplete_character_is_never_released(tokenizer):
    ids = tokenizer("🙂")["input_ids"]
    assert len(ids) > 1  # the emoji's four bytes span several byte-level tokens
    tracker = TextTracker(tokenizer, (), frozenset())
    pieces = [tracker.push(i) for i in ids]
    assert all(p == "" for p in pieces[:-1]) and pieces[-1] == "🙂"


def test_stop_sequence_across_tokens(tokenizer):
    ids = tokenizer("Paris. The capital of Italy")["input_ids"]
    tracker = TextTracker(tokenizer, ("The cap",), frozenset())
    released = ""
    for i in ids:
        released += tracker.push(i)
        if tracker.stopped:
            break
    assert tracker.stopped and released == "Paris. "
    assert tracker.flush() == ""


def test_eos_is_not_text(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tracker = TextTracker(tokenizer, (), frozenset({eos}))
    ids = tokenizer("Rome")["input_ids"]
    assert "".join(_stream(tracker, [*ids, eos])) == "Rome" and eos not in tracker.ids


def test_the_whole_decode_fallback_gives_the_same_text(tokenizer):
    ids = tokenizer(TEXTS[1])["input_ids"]
    tracker = TextTracker(tokenizer, ("naïve",), frozenset())
    tracker._stream = None  # as for a tokenizer the stream cannot reproduce
    fast = TextTracker(tokenizer, ("naïve",), frozenset())
    assert _stream(tracker, ids) == _stream(fast, ids)
