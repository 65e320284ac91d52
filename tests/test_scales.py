"""vare_core.models.scales: the official Infinity resolution table and the token layout."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vare_core.models import scales

# Numbers read from the official table: FoundationVision/Infinity,
# infinity/utils/dynamic_resolution.py at commit 4c27bbb54a9918847a2fe56b0fbe31a8523791a1
# (`ratio2hws`, presets = first 7 / 10 / 12 / 13 scales, pixel = last scale * vae_stride 16).
# Last (h, w) of each preset, per tall template; the wide templates swap h and w.
OFFICIAL_LAST_SCALE = {
    #        0.06M     0.25M     0.60M      1M
    1.000: [(16, 16), (32, 32), (48, 48), (64, 64)],
    1.250: [(20, 16), (35, 28), (55, 44), (70, 56)],
    1.333: [(20, 15), (36, 27), (60, 45), (72, 54)],
    1.500: [(21, 14), (39, 26), (63, 42), (78, 52)],
    1.750: [(21, 12), (42, 24), (70, 40), (84, 48)],
    2.000: [(22, 11), (46, 23), (74, 37), (90, 45)],
    2.500: [(25, 10), (50, 20), (80, 32), (100, 40)],
    3.000: [(27, 9), (54, 18), (90, 30), (111, 37)],
}
# Two full official lists with irregular entries (11x6 at 1.75; 111x37 at 3.0).
OFFICIAL_1_75 = [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20),
                 (42, 24), (56, 32), (70, 40), (84, 48)]
OFFICIAL_3_0 = [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15),
                (54, 18), (72, 24), (90, 30), (111, 37)]
# Official inverse keys are int(1/r*1000)/1000, in this dict order.
OFFICIAL_TEMPLATE_ORDER = (1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5,
                           0.4, 3.0, 0.333)


def test_templates_are_the_official_keys_in_order():
    assert scales.ASPECT_RATIOS == OFFICIAL_TEMPLATE_ORDER
    assert scales.PRESETS == ("0.06M", "0.25M", "0.60M", "1M")


def test_square_schedules_and_token_totals():
    full = [(s, s) for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)]
    assert scales.scale_schedule() == full
    assert scales.scale_schedule(1.0, "0.06M") == full[:7]
    assert scales.scale_schedule(1.0, "0.25M") == full[:10]
    assert scales.scale_schedule(1.0, "0.60M") == full[:12]
    totals = [scales.token_offsets(scales.scale_schedule(1.0, p))[-1] for p in scales.PRESETS]
    assert totals == [521, 2521, 6425, 10521]
    assert [scales.image_size(1.0, p) for p in scales.PRESETS] == [
        (256, 256), (512, 512), (768, 768), (1024, 1024)]


def test_matches_golden_schedule_json(golden):
    info = json.loads((golden / "schedule.json").read_text())
    schedule = scales.scale_schedule(1.0, "0.06M")
    assert schedule == [(h, w) for _, h, w in info["scale_schedule_used_(t,h,w)"]]
    assert scales.token_counts(schedule) == info["tokens_per_scale"]
    assert scales.token_offsets(schedule) == info["token_offsets"]
    assert tuple(info["official_entry_pixel"]) == scales.image_size(1.0, "0.06M")
    assert scales.rope_reference_grid(schedule) == (64, 64)


@pytest.mark.parametrize("ratio", sorted(OFFICIAL_LAST_SCALE))
def test_every_entry_matches_official_numbers(ratio):
    inverse = int(1 / ratio * 1000) / 1000
    for preset, n_scales, (h, w) in zip(scales.PRESETS, (7, 10, 12, 13), OFFICIAL_LAST_SCALE[ratio]):
        tall = scales.scale_schedule(ratio, preset)
        assert len(tall) == n_scales and tall[-1] == (h, w)
        assert scales.image_size(ratio, preset) == (16 * h, 16 * w)
        assert tall == scales.scale_schedule(ratio, "1M")[:n_scales]
        wide = scales.scale_schedule(inverse, preset)
        assert wide == [(b, a) for a, b in tall]
        assert scales.image_size(inverse, preset) == (16 * w, 16 * h)


def test_full_irregular_lists():
    assert scales.scale_schedule(1.75) == OFFICIAL_1_75
    assert scales.scale_schedule(3.0) == OFFICIAL_3_0
    assert scales.scale_schedule(0.333) == [(w, h) for h, w in OFFICIAL_3_0]
    assert scales.image_size(3.0, "1M") == (1776, 592)


def test_table_invariants_like_the_official_assert():
    for ratio in scales.ASPECT_RATIOS:
        for preset in scales.PRESETS:
            schedule = scales.scale_schedule(ratio, preset)
            h, w = schedule[-1]
            assert abs(h / w - ratio) < 0.01  # the official table asserts this
            assert schedule[:2] == [(1, 1), (2, 2)]
            areas = scales.token_counts(schedule)
            assert areas == sorted(areas) and len(set(areas)) == len(areas)


def test_ratio_names_template_within_tolerance():
    assert scales.scale_schedule(4 / 3, "0.06M") == scales.scale_schedule(1.333, "0.06M")
    assert scales.scale_schedule(2 / 3) == scales.scale_schedule(0.666)
    with pytest.raises(ValueError, match="nearest_ratio"):
        scales.scale_schedule(1.1)
    with pytest.raises(ValueError, match="positive"):
        scales.scale_schedule(-1.0)
    with pytest.raises(ValueError, match="0.06M, 0.25M, 0.60M, 1M"):
        scales.scale_schedule(1.0, "2M")


def test_nearest_ratio_examples_and_ties():
    assert scales.nearest_ratio(1.0) == 1.0
    assert scales.nearest_ratio(1.125) == 1.0  # exact tie with 1.25: the earlier template wins
    assert scales.nearest_ratio(1024 / 768) == 1.333
    assert scales.nearest_ratio(768 / 1024) == 0.75
    assert scales.nearest_ratio(10.0) == 3.0
    assert scales.nearest_ratio(0.01) == 0.333
    for bad in (0, -1.0, math.nan, math.inf, "1.0", True):
        with pytest.raises(ValueError, match="h_div_w"):
            scales.nearest_ratio(bad)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0.05, max_value=20, allow_nan=False))
def test_nearest_ratio_equals_official_argmin(h_div_w):
    templates = np.array(OFFICIAL_TEMPLATE_ORDER)
    expected = templates[np.argmin(np.abs(h_div_w - templates))]
    assert scales.nearest_ratio(h_div_w) == expected


def test_schedule_for_image_round_trips_every_entry():
    seen = set()
    for ratio in scales.ASPECT_RATIOS:
        for preset in scales.PRESETS:
            height, width = scales.image_size(ratio, preset)
            schedule, got_ratio, got_preset = scales.schedule_for_image(height, width)
            assert (got_ratio, got_preset) == (ratio, preset)
            assert schedule == scales.scale_schedule(ratio, preset)
            seen.add((height, width))
    assert len(seen) == 60  # every entry has its own pixel size


def test_schedule_for_image_refuses_other_sizes_with_the_valid_list():
    with pytest.raises(ValueError) as info:
        scales.schedule_for_image(1024, 768)
    message = str(info.value)
    assert "1024x768" in message and "1152x864 (1M)" in message and "256x256" in message
    with pytest.raises(ValueError, match="height"):
        scales.schedule_for_image(0, 256)
    with pytest.raises(ValueError, match="width"):
        scales.schedule_for_image(256, 256.0)


def test_rope_reference_grid():
    for ratio in scales.ASPECT_RATIOS:
        final_1m = scales.scale_schedule(ratio, "1M")[-1]
        for preset in scales.PRESETS:
            assert scales.rope_reference_grid(scales.scale_schedule(ratio, preset)) == final_1m
    # A custom schedule (small embedded model) is normalised to its own last scale.
    assert scales.rope_reference_grid([(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)]) == (8, 8)


def test_token_layout_and_schedule_validation():
    schedule = [(1, 1), (2, 3), (4, 5)]
    assert scales.token_counts(schedule) == [1, 6, 20]
    assert scales.token_offsets(schedule) == [0, 1, 7, 27]
    with pytest.raises(ValueError, match=r"\(h, w\) pairs"):
        scales.token_counts([(1, 1, 1), (1, 2, 2)])
    for bad in ([], [(0, 1)], [(1, 1.5)], ["ab"], [3]):
        with pytest.raises(ValueError, match="scale schedule"):
            scales.token_offsets(bad)


def test_vae_schedule_doubles_with_patchify():
    schedule = scales.scale_schedule(1.0, "1M")
    assert scales.vae_schedule(schedule, patchify=False) == schedule
    doubled = scales.vae_schedule(schedule, patchify=True)
    assert doubled[-1] == (128, 128) and doubled[0] == (2, 2)
    # Patch-8 VAE on the doubled grid gives the same pixels as patch 16 on the plain one.
    assert (doubled[-1][0] * 8, doubled[-1][1] * 8) == scales.image_size(1.0, "1M")
