"""vare_core.generation.per_scale: a cfg / tau typed as one number or one per scale, parsed,
checked and laid out over a model's scales."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vare_core.generation import per_scale


@pytest.mark.parametrize("value, expected", [
    (3, [3.0] * 4),
    (0.5, [0.5] * 4),
    ("4", [4.0] * 4),
    ("3,3,4,4", [3.0, 3.0, 4.0, 4.0]),
    ("[3, 3, 4, 4.5]", [3.0, 3.0, 4.0, 4.5]),
    (" 1 2 3 4 ", [1.0, 2.0, 3.0, 4.0]),
    ("[2]", [2.0] * 4),
    ([1, 2, 3, 4], [1.0, 2.0, 3.0, 4.0]),
    ((1.5,), [1.5] * 4),
])
def test_parse_per_scale_good(value, expected):
    assert per_scale.parse_per_scale(value, 4, "cfg") == expected


@pytest.mark.parametrize("value, fragment", [
    ("3,3", "got 2 values for 4 scales"),
    ("3,x,4,4", "'x' is not a number"),
    ("", "no numbers"),
    ("[]", "no numbers"),
    ("nan", "finite"),
    (math.inf, "finite"),
    (True, "boolean"),
    (None, "NoneType"),
    ([1, "2", 3, 4], "every entry"),
])
def test_parse_per_scale_bad(value, fragment):
    with pytest.raises(ValueError) as info:
        per_scale.parse_per_scale(value, 4, "tau")
    message = str(info.value)
    assert message.startswith("tau:") and fragment in message
    assert repr(value) in message and "4 comma-separated numbers" in message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=13),
       st.sampled_from([",", ", ", " "]), st.booleans())
def test_parse_per_scale_text_round_trip(values, separator, brackets):
    text = separator.join(repr(v) for v in values)
    text = f"[{text}]" if brackets else text
    parsed = per_scale.parse_per_scale(text, len(values), "cfg")
    assert parsed == [float(v) for v in values]
    if len(values) > 1:
        with pytest.raises(ValueError, match="cfg"):
            per_scale.parse_per_scale(text, len(values) + 1, "cfg")


def test_one_number_stays_one_number_and_lists_are_per_scale():
    assert per_scale.parse_setting("4", 5, "cfg") == 4.0
    assert per_scale.parse_setting(4, 5, "cfg") == 4.0
    assert per_scale.parse_setting("1,4,4,4,4", 5, "cfg") == [1.0, 4.0, 4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="cfg"):
        per_scale.parse_setting("1,4", 5, "cfg")


def test_free_scales_lay_one_number_out_with_the_first_scales_unguided():
    assert per_scale.with_free_scales(4.0, 5, 1) == [1.0, 4.0, 4.0, 4.0, 4.0]
    assert per_scale.with_free_scales(0.5, 3, 2) == [1.0, 1.0, 0.5]
    assert per_scale.with_free_scales(4.0, 5, 0) == 4.0                 # a model without free scales
    assert per_scale.with_free_scales([2, 3, 4], 3, 1) == [2, 3, 4]     # a per-scale list as given
