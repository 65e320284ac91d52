"""2-D rotary position embedding for the self-attention of every block.

Half of each head's rotation pairs encode the token's row, half its column. Positions are
normalised to a reference grid (the final grid of the 1M schedule of the same aspect ratio,
"STAR style"), so a 16x16 scale uses rows 0, 4, 8, ... of a 64x64 grid: every scale of a
schedule shares one coordinate frame. Pairs are adjacent elements (2i, 2i+1).
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=64)
@torch.inference_mode(False)   # cached tables must stay usable by a later training pass
def _rope_cpu(schedule: tuple, head_dim: int, grid: tuple[int, int], base: float):
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64) / half))
    ref_h, ref_w = grid
    angles = []
    for h, w in schedule:
        # float32 product then round-half-even, as the official table is indexed.
        rows = (torch.arange(h) * (ref_h / h)).round()
        cols = (torch.arange(w) * (ref_w / w)).round()
        row_ang = torch.outer(rows, inv_freq)[:, None, :].expand(h, w, -1)
        col_ang = torch.outer(cols, inv_freq)[None, :, :].expand(h, w, -1)
        angles.append(torch.cat([row_ang, col_ang], dim=-1).reshape(h * w, -1))
    angles = torch.cat(angles, dim=0)
    return torch.cos(angles), torch.sin(angles)


def rope_table(scale_schedule, head_dim: int, grid: tuple[int, int] | None = None,
               device=None, base: float = 10000.0):
    """(cos, sin), each (L, head_dim/2) float32, for every token of the schedule in order."""
    schedule = tuple((int(h), int(w)) for h, w in scale_schedule)
    if grid is None:
        from .scales import rope_reference_grid
        grid = rope_reference_grid(schedule)
    cos, sin = _rope_cpu(schedule, head_dim, tuple(grid), base)
    return cos.to(device), sin.to(device)


def clear_cache() -> None:
    """Forget the cached tables (rope_table builds them again on first use): before training
    in a process that sampled under torch.inference_mode, whose tensors cannot enter autograd."""
    _rope_cpu.cache_clear()


def rotor(rope) -> torch.Tensor:
    """The (cos, sin) rows as unit complex numbers (L, head_dim/2): a pair (2i, 2i+1) of q or k
    read as one complex number rotates by one multiplication. Built once per scale (sampling)
    or pass (training) and shared by every block."""
    if torch.is_tensor(rope) and rope.is_complex():
        return rope
    cos, sin = rope
    return torch.complex(cos.float(), sin.float())


def rotate(x: torch.Tensor, rope, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, H, L, head_dim) rotated by its tokens' rows of `rope` ((cos, sin) or a rotor);
    fp32 maths, the result in x's dtype. `out` (fp32, x's shape, e.g. a slice of a key cache)
    receives the rotated values instead of a new tensor."""
    turn = rotor(rope)
    if torch.compiler.is_compiling():          # compiled graphs: real arithmetic, no complex views
        pairs = x.float().unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        cos, sin = turn.real, turn.imag
        rotated = torch.stack([cos * even - sin * odd, sin * even + cos * odd], dim=-1).flatten(-2)
        return rotated.to(x.dtype) if out is None else out.copy_(rotated)
    pairs = x.float()
    if pairs.stride(-1) != 1 or any(stride % 2 for stride in pairs.stride()[:-1]) or pairs.storage_offset() % 2:
        pairs = pairs.contiguous()         # view_as_complex needs (real, imag) side by side
    pairs = torch.view_as_complex(pairs.unflatten(-1, (-1, 2)))
    if out is not None:
        torch.mul(pairs, turn, out=torch.view_as_complex(out.unflatten(-1, (-1, 2))))
        return out
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q, k (B, H, L, head_dim) by the (cos, sin) rows of their tokens; fp32 math."""
    turn = rotor(rope)
    return rotate(q, turn), rotate(k, turn)
