"""vare_core.models.rope: the 2-D rotary position tables (rope_table) and their application to
q / k (apply_rope). Properties only: rotations, a shared coordinate frame for every scale,
relative positions, fp32 maths whatever the input dtype. (The official table itself is compared
in test_infinity_golden.py.)"""
import math

import pytest
import torch

from vare_core.models import scales
from vare_core.models.rope import apply_rope, rope_table

SCHEDULE = [(1, 1), (2, 2), (4, 4)]


def random_qk(length: int, head_dim: int, heads: int = 2, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, length, head_dim, generator=g),
            torch.randn(batch, heads, length, head_dim, generator=g))


def angles(table) -> torch.Tensor:
    cos, sin = table
    return torch.atan2(sin, cos)


@pytest.mark.parametrize("head_dim", [8, 16, 40])
def test_table_has_one_row_per_token_and_half_a_head_of_unit_pairs(head_dim):
    cos, sin = rope_table(SCHEDULE, head_dim)
    tokens = sum(h * w for h, w in SCHEDULE)
    assert cos.shape == sin.shape == (tokens, head_dim // 2)
    assert cos.dtype == sin.dtype == torch.float32
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones_like(cos))


def test_apply_rope_is_a_rotation_of_every_pair():
    cos, sin = rope_table(SCHEDULE, 16)
    q, k = random_qk(cos.shape[0], 16)
    q_rot, k_rot = apply_rope(q, k, (cos, sin))
    assert q_rot.shape == q.shape and k_rot.shape == k.shape
    for x, x_rot in ((q, q_rot), (k, k_rot)):
        pair_norm = x.unflatten(-1, (-1, 2)).norm(dim=-1)
        torch.testing.assert_close(x_rot.unflatten(-1, (-1, 2)).norm(dim=-1), pair_norm)
    # the inverse rotation (sin -> -sin) gives the inputs back
    q_back, k_back = apply_rope(q_rot, k_rot, (cos, -sin))
    torch.testing.assert_close(q_back, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_back, k, atol=1e-5, rtol=1e-5)


def test_first_token_of_every_scale_sits_at_the_origin_and_is_not_rotated():
    cos, sin = rope_table(SCHEDULE, 16)
    q, k = random_qk(cos.shape[0], 16)
    q_rot, k_rot = apply_rope(q, k, (cos, sin))
    for offset in scales.token_offsets(SCHEDULE)[:-1]:        # token (row 0, col 0) of each scale
        assert torch.equal(cos[offset], torch.ones(8)) and torch.equal(sin[offset], torch.zeros(8))
        assert torch.equal(q_rot[:, :, offset], q[:, :, offset])
        assert torch.equal(k_rot[:, :, offset], k[:, :, offset])


def test_first_half_of_the_pairs_encodes_the_row_and_second_half_the_column():
    h, w = 4, 4
    a = angles(rope_table([(h, w)], 16)).view(h, w, 8)
    row_part, col_part = a[..., :4], a[..., 4:]
    assert torch.equal(row_part, row_part[:, :1].expand_as(row_part))   # same row, same angles
    assert torch.equal(col_part, col_part[:1].expand_as(col_part))      # same column, same angles
    assert not torch.equal(row_part[0], row_part[1])
    assert not torch.equal(col_part[:, 0], col_part[:, 1])


def test_every_scale_shares_the_coordinate_frame_of_the_reference_grid():
    """Token (r, c) of a 2x2 scale in a 4x4-grid schedule takes the rotation of token (2r, 2c)
    of the 4x4 scale."""
    cos, sin = rope_table(SCHEDULE, 16)
    offsets = scales.token_offsets(SCHEDULE)
    small = slice(offsets[1], offsets[2])
    large_cos, large_sin = cos[offsets[2]:].view(4, 4, -1), sin[offsets[2]:].view(4, 4, -1)
    assert torch.equal(cos[small].view(2, 2, -1), large_cos[::2, ::2])
    assert torch.equal(sin[small].view(2, 2, -1), large_sin[::2, ::2])


def test_default_grid_is_the_schedules_reference_grid():
    schedule = scales.scale_schedule(1.0, "0.06M")
    grid = scales.rope_reference_grid(schedule)
    default, explicit = rope_table(schedule, 8), rope_table(schedule, 8, grid=grid)
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])
    other = rope_table(schedule, 8, grid=schedule[-1])       # a different frame changes the table
    assert not torch.equal(default[0], other[0])


def test_a_smaller_preset_is_a_prefix_of_the_1m_table():
    """0.06M and 1M share their reference grid (the 1M final grid), so the tokens of the
    smaller schedule get exactly the rotations they have in the larger one."""
    small, full = scales.scale_schedule(1.0, "0.06M"), scales.scale_schedule(1.0, "1M")
    cos_s, sin_s = rope_table(small, 8)
    cos_f, sin_f = rope_table(full, 8)
    n = cos_s.shape[0]
    assert torch.equal(cos_s, cos_f[:n]) and torch.equal(sin_s, sin_f[:n])


def test_angles_grow_linearly_with_position_at_geometric_frequencies():
    width, head_dim, base = 8, 16, 10000.0
    a = angles(rope_table([(1, width)], head_dim, grid=(1, width), base=base))  # cols 0..7, row 0
    col = a[:, head_dim // 4:].double()                                        # the column pairs
    n_freq = col.shape[1]
    # the first frequency is 1 rad per position: angles 0, 1, 2, 3 (within (-pi, pi])
    torch.testing.assert_close(col[:4, 0], torch.arange(4, dtype=torch.float64), atol=1e-6, rtol=0)
    # successive frequencies shrink by base^(-2 / (head_dim / 2)) (read off at column 1)
    ratio = col[1, 1:] / col[1, :-1]
    expected = base ** (-2 / (head_dim / 2))
    torch.testing.assert_close(ratio, torch.full((n_freq - 1,), expected, dtype=torch.float64),
                               atol=1e-6, rtol=1e-5)
    # the lowest frequency is not wrapped on 8 columns: angle(c) = c * angle(1)
    torch.testing.assert_close(col[:, -1], torch.arange(width, dtype=torch.float64) * col[1, -1],
                               atol=1e-6, rtol=1e-5)


def test_another_base_gives_other_frequencies():
    a = rope_table([(4, 4)], 16, base=10000.0)
    b = rope_table([(4, 4)], 16, base=100.0)
    assert not torch.equal(a[1], b[1])


def test_scores_depend_only_on_the_offset_between_query_and_key():
    """With one q vector and one k vector placed at every position of a grid, the rotated score
    q_i . k_j is a function of (row_i - row_j, col_i - col_j) only."""
    h, w, head_dim = 4, 5, 16
    cos, sin = rope_table([(h, w)], head_dim, grid=(h, w))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(head_dim, generator=g).expand(1, 1, h * w, head_dim)
    k = torch.randn(head_dim, generator=g).expand(1, 1, h * w, head_dim)
    q_rot, k_rot = apply_rope(q, k, (cos, sin))                 # fp32 maths (tables are fp32)
    scores = (q_rot[0, 0].double() @ k_rot[0, 0].double().T).view(h, w, h, w)
    by_offset = {}
    for r1 in range(h):
        for c1 in range(w):
            for r2 in range(h):
                for c2 in range(w):
                    by_offset.setdefault((r1 - r2, c1 - c2), []).append(float(scores[r1, c1, r2, c2]))
    assert len(by_offset) == (2 * h - 1) * (2 * w - 1)
    for offset, values in by_offset.items():
        assert max(values) - min(values) < 1e-5, offset
    # and it really depends on the offset
    assert abs(by_offset[(0, 0)][0] - by_offset[(1, 2)][0]) > 1e-3


def test_half_precision_inputs_keep_their_dtype_and_are_rotated_in_fp32():
    cos, sin = rope_table(SCHEDULE, 16)
    q, k = random_qk(cos.shape[0], 16)
    q16, k16 = q.to(torch.bfloat16), k.to(torch.bfloat16)
    q_rot, k_rot = apply_rope(q16, k16, (cos, sin))
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    ref_q, ref_k = apply_rope(q16.float(), k16.float(), (cos, sin))   # fp32 maths, one final rounding
    assert torch.equal(q_rot, ref_q.to(torch.bfloat16))
    assert torch.equal(k_rot, ref_k.to(torch.bfloat16))


def test_tables_made_under_inference_mode_serve_a_later_training_pass():
    schedule = [(1, 1), (3, 3), (5, 5)]           # a schedule no other test caches
    with torch.inference_mode():
        cos, sin = rope_table(schedule, 24)
    assert not cos.is_inference() and not sin.is_inference()
    q = torch.randn(1, 1, cos.shape[0], 24, requires_grad=True)
    q_rot, _ = apply_rope(q, q.detach(), rope_table(schedule, 24))
    q_rot.square().sum().backward()
    # a rotation: d|Rq|^2/dq = 2q
    torch.testing.assert_close(q.grad, 2 * q.detach(), atol=1e-5, rtol=1e-5)


def test_device_argument_places_the_table():
    cos, sin = rope_table(SCHEDULE, 16, device="meta")
    assert cos.device.type == sin.device.type == "meta"
    assert cos.shape == (21, 8)


def test_positions_are_rounded_onto_the_reference_grid():
    """A 3-wide scale on a 4-wide grid sits at columns round(c * 4/3) = 0, 1, 3 (half-even)."""
    ref = angles(rope_table([(1, 4)], 16, grid=(1, 4)))[:, 4:]
    odd = angles(rope_table([(1, 3)], 16, grid=(1, 4)))[:, 4:]
    expected_cols = [round(c * 4 / 3) for c in range(3)]
    assert expected_cols == [0, 1, 3]
    torch.testing.assert_close(odd, ref[expected_cols])
    assert math.isclose(float(odd[2, 0]), math.remainder(3.0, 2 * math.pi), abs_tol=1e-6)
