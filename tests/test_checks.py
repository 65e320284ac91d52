"""vare_core.checks: the number checks every validator uses (bools are not numbers here)."""
import math

import numpy as np
import pytest

from vare_core.checks import is_finite_number, is_integer, is_real


@pytest.mark.parametrize("value, expected", [(0, True), (5, True), (-3, True), (True, False), (False, False),
                                             (2.0, False), ("2", False), (None, False)])
def test_is_integer_takes_ints_only(value, expected):
    assert is_integer(value) is expected


def test_is_integer_bounds_are_inclusive():
    assert is_integer(1, minimum=1) and not is_integer(0, minimum=1)
    assert is_integer(2, maximum=2) and not is_integer(3, maximum=2)
    assert is_integer(5, minimum=0, maximum=10) and not is_integer(-1, minimum=0, maximum=10)


@pytest.mark.parametrize("value, real, finite", [
    (1, True, True), (2.5, True, True), (np.float32(0.5), True, True), (math.inf, True, False),
    (math.nan, True, False), (True, False, False), ("1", False, False), (None, False, False),
    (1 + 2j, False, False),
])
def test_real_and_finite_numbers(value, real, finite):
    assert is_real(value) is real and is_finite_number(value) is finite
