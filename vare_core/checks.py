"""Number checks shared by every input validator (configs, CLI values, metadata read from files).

    if not is_integer(rank, minimum=1):
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")

Python's bool is an int (True == 1), so a checkbox or a JSON `true` would pass an isinstance
check; these refuse bools. Each caller keeps its own message: it knows the input's name and fix.
"""
from __future__ import annotations

import math
import numbers


def is_integer(value, minimum: int | None = None, maximum: int | None = None) -> bool:
    """An int (not a bool) within [minimum, maximum] where given."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return (minimum is None or value >= minimum) and (maximum is None or value <= maximum)


def is_real(value) -> bool:
    """A real number (int, float, numpy scalar; not a bool), possibly inf or nan."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


def is_finite_number(value) -> bool:
    """A real number that is neither inf nor nan."""
    return is_real(value) and math.isfinite(value)
