"""Client-side checks of numeric request fields, so a value the wire cannot carry is an SDK error.

Protobuf raises a bare `ValueError`/`TypeError` for a negative number in an unsigned field, a float
in an integer field or a number past the field's width; those would escape a caller that catches
`AdapterServeError`. These checks raise `InvalidArgument` naming the field instead. Range rules the
server owns (max_new_tokens up to the server's limit, temperature up to 100, ...) stay on the server:
it answers INVALID_ARGUMENT with the limit's name.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from adapterserve.errors import InvalidArgument

UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
FLOAT32_MAX = 3.4028234663852886e38


def check_uint(field: str, value: object, maximum: int = UINT32_MAX) -> int:
    """`value` as an int if it is an integer in 0..maximum; else InvalidArgument naming `field`."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InvalidArgument(f"{field}: expected an integer, got {value!r}")
    number = int(value)
    if not 0 <= number <= maximum:
        raise InvalidArgument(f"{field}: {number} is outside 0..{maximum}")
    return number


def check_float(field: str, value: object) -> float:
    """`value` as a float if it is a finite number a 32-bit float can hold; else InvalidArgument."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidArgument(f"{field}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise InvalidArgument(f"{field}: {number!r} is not a finite 32-bit float")
    return number
