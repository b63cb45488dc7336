"""Exact match and token F1 as documented: whitespace-insensitive, case- and punctuation-sensitive EM."""

from __future__ import annotations

import pytest

from adapterserve.training.metrics import exact_match, score, token_f1


def test_exact_match_ignores_surrounding_and_repeated_whitespace_only():
    assert exact_match("  positive\n", "positive") == 1.0
    assert exact_match("a  b", "a b") == 1.0
    assert exact_match("Positive", "positive") == 0.0
    assert exact_match('{"age": 3}', '{"age":3}') == 0.0


def test_token_f1_partial_overlap():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # pred: the, cat (2 of 2 correct), ref: the, cat, sat, down -> P = 1, R = 0.5
    assert token_f1("the cat", "the cat sat down") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0


def test_score_averages_and_checks_lengths():
    m = score(["a", "b"], ["a", "c"], "peft")
    assert (m.exact_match, m.token_f1, m.examples, m.backend) == (0.5, 0.5, 2, "peft")
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"], "peft")
