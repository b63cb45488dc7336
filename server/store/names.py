"""Adapter names: the only request-derived strings that ever reach the file system, checked here.

A name is 1..128 characters of letters, digits, '-', '_' and '.', starts with a letter or digit (so it
can never be '.', '..', a hidden/temporary store folder or look like a CLI option), and never contains
'..' or a path separator. A valid name is always a single, relative path component.
"""

from __future__ import annotations

import re

from adapterserve.server.errors import InvalidArgumentError

MAX_NAME_CHARS = 128
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = (
    "1 to 128 characters of letters, digits, '-', '_' and '.', starting with a letter or digit, without '..'"
)


def is_valid_name(name: object) -> bool:
    """True when `name` is a valid adapter name (see NAME_RULE)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def validate_name(name: object, field: str = "adapter name") -> str:
    """Return `name` unchanged if valid; else raise InvalidArgumentError naming the field and the rule."""
    if not is_valid_name(name):
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise InvalidArgumentError(f"{field} {shown} is invalid: {NAME_RULE}")
    return name  # type: ignore[return-value]
