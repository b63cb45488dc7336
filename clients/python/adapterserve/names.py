"""Adapter names as the server accepts them, checked before an upload sends anything.

The rule is the server's (`adapterserve.server.store.names`, which stays the authority): 1 to 128
characters of letters, digits, '-', '_' and '.', starting with a letter or digit, without '..'.
"""

from __future__ import annotations

import re

from adapterserve.errors import AlreadyExists, InvalidArgument

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = (
    "1 to 128 characters of letters, digits, '-', '_' and '.', starting with a letter or digit, without '..'"
)


def check_adapter_name(name: object) -> str:
    """`name` if the server would accept it as an adapter name; else InvalidArgument saying why."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None or ".." in name:
        shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
        raise InvalidArgument(f"adapter name {shown} is invalid: {NAME_RULE}")
    return name


def name_taken(name: str) -> AlreadyExists:
    """The error for an upload to a name that is taken (the CLI adds how to overwrite)."""
    return AlreadyExists(f"adapter {name!r} already exists on the server")
