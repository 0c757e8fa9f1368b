"""Checks of values a user typed, shared by the entry points that parse them themselves (no MindSpore)."""
from __future__ import annotations

import math


def whole_number(value) -> int:
    """`value` as an int when it names a whole number (3, 3.0, "3", "3.0"); ValueError otherwise (2.5, nan, inf,
    a boolean, "x"). The caller words the error with the value's name."""
    if isinstance(value, bool):
        raise ValueError(value)
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(value) from None
    if not math.isfinite(f) or not f.is_integer():
        raise ValueError(value)
    return int(f)
