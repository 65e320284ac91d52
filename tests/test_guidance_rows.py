"""When every scale left is drawn at cfg 1, the unconditional rows leave the batch and the KV
caches (cond * 1 + uncond * 0 needs no uncond): the same bits, less work."""
import torch

from vare_core.models.infinity import Infinity
from vare_core.testing import tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green cross"]


def _rows_and_cache_bytes(pipe, monkeypatch, cfg):
    seen = []
    forward_scale = Infinity.forward_scale

    def recording(self, state, k, x_scale=None, **kwargs):
        seen.append((state.cond.shape[0], state.cache_bytes))
        return forward_scale(self, state, k, x_scale, **kwargs)
    monkeypatch.setattr(Infinity, "forward_scale", recording)
    result = pipe.generate(PROMPTS, seed=4, cfg=cfg)
    monkeypatch.undo()
    return seen, result


def test_unguided_late_scales_drop_the_unconditional_rows(monkeypatch):
    pipe = tiny_pipeline(seed=0, depth=2)
    seen, late_off = _rows_and_cache_bytes(pipe, monkeypatch, "4,1,1")
    assert [rows for rows, _ in seen] == [6, 3, 3]
    # all 6 rows cached for the one guided scale (1 token), then the 3 that stay for all 21
    assert seen[1][1] * 6 * 1 == seen[0][1] * 3 * 21
    seen, guided = _rows_and_cache_bytes(pipe, monkeypatch, "4,4,4")
    assert [rows for rows, _ in seen] == [6, 6, 6]
    assert seen[0][1] == seen[1][1] == seen[2][1]                  # one cache for the whole run
    assert max(b for _, b in seen) > max(b for _, b in _rows_and_cache_bytes(pipe, monkeypatch, "4,1,1")[0])
    seen, middle_off = _rows_and_cache_bytes(pipe, monkeypatch, "4,1,4")   # guided again later: kept
    assert [rows for rows, _ in seen] == [6, 6, 6]


def test_the_bits_are_those_of_computing_and_discarding_them(monkeypatch):
    pipe = tiny_pipeline(seed=0, depth=2)
    _, dropped = _rows_and_cache_bytes(pipe, monkeypatch, "4,1,1")
    # the same cfg with a last scale at 1 + 1e-12 keeps the rows (still guided) and draws as before
    _, kept = _rows_and_cache_bytes(pipe, monkeypatch, [4.0, 1.0, 1.0 + 1e-12])
    assert all(torch.equal(a, b) for a, b in zip(dropped.bits, kept.bits))
