"""Adapter names: only single, relative path components of a strict alphabet reach the file system."""

from __future__ import annotations

import pytest

from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.store.names import is_valid_name, validate_name


@pytest.mark.parametrize("name", ["a", "task-1", "Sentiment_v2.1", "0", "x" * 128, "a.b-c_d"])
def test_valid_names(name):
    assert validate_name(name) == name and is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "", ".", "..", "a..b", "../x", "a/b", "a\\b", "/abs", ".hidden", "-rf", "_x", "x" * 129,
        "a b", "a\x00b", "naïve", "a:b", "~root", "a\n", None, 3, b"bytes",
    ],
)  # fmt: skip
def test_invalid_names_are_refused_with_the_rule(name):
    assert not is_valid_name(name)
    with pytest.raises(InvalidArgumentError, match="is invalid: 1 to 128 characters"):
        validate_name(name)
