"""Fast sampling (generation/speed.py, models/kv_cache.py): every knob off is the exact sampler
bit for bit; each knob really removes work (rows out of the batch, tokens out of the blocks,
tokens out of the caches); settings are checked with messages naming them."""
import math

import pytest
import torch

from vare_core.generation.sampler import SamplingSettings
from vare_core.generation.speed import speed_plan
from vare_core.models.infinity import Block, Infinity
from vare_core.models.kv_cache import KVCache, most_attended, pivotal_tokens
from vare_core.testing import tiny_pipeline

PROMPTS = ["a red circle", "a blue square", "a green cross"]
SCHEDULE = ((1, 1), (2, 2), (4, 4), (6, 6))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0, depth=2, schedule=SCHEDULE)


def _generate(pipe, **knobs):
    return pipe.generate(PROMPTS, seed=3, settings=pipe.sampling_settings(**knobs))


def _bits_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


def _recorded(pipe, monkeypatch, **knobs):
    """Per scale: (rows in the batch, tokens through the blocks, cache bytes after the scale)."""
    seen = []
    forward_scale, block_forward = Infinity.forward_scale, Block.forward

    def scale(self, state, k, x_scale=None, **kwargs):
        seen.append({"rows": state.cond.shape[0]})
        logits = forward_scale(self, state, k, x_scale, **kwargs)
        seen[-1]["cache"] = state.cache_bytes
        return logits

    def block(self, x, *args, **kwargs):
        seen[-1]["tokens"] = x.shape[1]
        return block_forward(self, x, *args, **kwargs)
    monkeypatch.setattr(Infinity, "forward_scale", scale)
    monkeypatch.setattr(Block, "forward", block)
    result = _generate(pipe, **knobs)
    monkeypatch.undo()
    return seen, result


def test_every_knob_off_gives_the_exact_bits(pipe):
    exact = _generate(pipe)
    off = _generate(pipe, unguided_scales=0, pruned_scales=0, keep_share=1.0, kv_budget=1.0)
    assert _bits_equal(exact, off) and torch.equal(exact.images, off.images)
    assert not _bits_equal(exact, _generate(pipe, speed="fast"))


def test_unguided_scales_take_the_unconditional_rows_out_of_batch_and_caches(pipe, monkeypatch):
    exact, _ = _recorded(pipe, monkeypatch)
    seen, fast = _recorded(pipe, monkeypatch, unguided_scales=2)
    batch = len(PROMPTS)
    assert [s["rows"] for s in exact] == [2 * batch] * 4
    assert [s["rows"] for s in seen] == [2 * batch, 2 * batch, batch, batch]
    assert seen[2]["cache"] * 2 == exact[2]["cache"]              # half the rows cached
    # the same bits as cfg 1 written on those scales by hand
    by_hand = pipe.generate(PROMPTS, seed=3, cfg="3,3,1,1")
    assert _bits_equal(fast, by_hand)


def test_pruned_scales_compute_only_the_kept_share(pipe, monkeypatch):
    seen, _ = _recorded(pipe, monkeypatch, pruned_scales=2, keep_share=(0.5, 0.25))
    tokens = [h * w for h, w in SCHEDULE]
    assert [s["tokens"] for s in seen] == [tokens[0], tokens[1], math.ceil(0.5 * 16), math.ceil(0.25 * 36)]
    exact, _ = _recorded(pipe, monkeypatch)
    assert [s["tokens"] for s in exact] == tokens
    # only computed tokens are cached: the buffers shrink by the tokens carried, not computed
    per_token = exact[0]["cache"] // sum(tokens)
    assert seen[0]["cache"] == per_token * (sum(tokens) - (16 - 8) - (36 - 9))


def test_pruned_scale_keeps_the_computed_tokens_logits_shape(pipe):
    result = _generate(pipe, pruned_scales=1, keep_share=0.3)
    assert [tuple(b.shape[1:3]) for b in result.bits] == list(SCHEDULE)
    assert result.images.shape[0] == len(PROMPTS) and bool(torch.isfinite(result.images).all())


def test_kv_budget_bounds_the_cache_between_scales(pipe, monkeypatch):
    exact, _ = _recorded(pipe, monkeypatch)
    budget = 0.2
    seen, _ = _recorded(pipe, monkeypatch, kv_budget=budget)
    total = sum(h * w for h, w in SCHEDULE)
    model = pipe.model
    per_token = 2 * 2 * len(PROMPTS) * model.cfg.embed_dim * 4 * len(model.blocks)   # k+v, 2 rows, fp32
    kept = math.ceil(budget * total)
    assert max(s["cache"] for s in seen) <= kept * per_token
    assert max(s["cache"] for s in seen) <= 0.25 * max(s["cache"] for s in exact)
    assert seen[-1]["cache"] == seen[-2]["cache"]                   # the last scale adds nothing


def test_fast_speed_uses_the_family_defaults_and_a_knob_given_wins(pipe):
    fast = dict(unguided_scales=1, pruned_scales=1, keep_share=0.5, kv_budget=0.5)
    plan = speed_plan(SamplingSettings(speed="fast"), SCHEDULE, fast)
    assert plan.unguided_from == 3 and plan.keep_shares == (1.0, 1.0, 1.0, 0.5)
    assert plan.kv_budget == math.ceil(0.5 * 57)
    plan = speed_plan(SamplingSettings(speed="fast", kv_budget=1.0, pruned_scales=0), SCHEDULE, fast)
    assert plan.kv_budget is None and not plan.prunes and plan.unguided_from == 3
    plan = speed_plan(SamplingSettings(unguided_scales=1), SCHEDULE, fast)      # exact + one knob
    assert plan.unguided_from == 3 and not plan.prunes and plan.kv_budget is None
    # a Concept Guard's scales stay guided and whole
    plan = speed_plan(SamplingSettings(unguided_scales=3, pruned_scales=3, keep_share=0.5), SCHEDULE, untouched=2)
    assert plan.unguided_from == 2 and plan.keep_shares == (1.0, 1.0, 0.5, 0.5)
    plan = speed_plan(SamplingSettings(pruned_scales=2, keep_share=0.5), SCHEDULE, untouched=4)
    assert plan.unguided_from == 4 and not plan.prunes


@pytest.mark.parametrize("knobs, words", [
    ({"speed": "turbo"}, "speed must be one of exact, fast"),
    ({"unguided_scales": -1}, "unguided_scales"),
    ({"pruned_scales": 1.5}, "pruned_scales"),
    ({"keep_share": 0.0}, "keep_share must be above 0"),
    ({"keep_share": "0.5,1.5"}, "keep_share must be above 0"),
    ({"keep_share": "half"}, "keep_share 'half' is not a share"),
    ({"pruned_scales": 1, "keep_share": (0.5, 0.4)}, "2 values for 1 pruned scales"),
    ({"kv_budget": 0}, "kv_budget"),
    ({"kv_budget": float("nan")}, "kv_budget"),
])
def test_bad_settings_are_refused_by_name(knobs, words):
    with pytest.raises(ValueError, match=words):
        SamplingSettings(**knobs)


def test_keep_share_count_must_match_the_pruned_scales():
    with pytest.raises(ValueError, match="one per pruned scale"):
        speed_plan(SamplingSettings(pruned_scales=2, keep_share=(0.5, 0.4, 0.3)), SCHEDULE)


def test_pivotal_tokens_are_where_a_token_differs_from_its_neighbours_shared_by_an_images_rows():
    x = torch.zeros(4, 16, 3)                 # 2 images of 4x4 tokens, 2 rows each
    x[0, 5] = 5.0                             # image 0: one bright token at (1, 1)
    x[1, 10:12] = 1.0                         # image 1: a flat patch, its edge at (2, 2)-(2, 3)
    x[1, 14:16] = 1.0
    x[2:] = torch.randn(2, 16, 3)             # the second rows' own values do not choose
    keep = pivotal_tokens(x, (4, 4), 1 / 16, rows=2)
    assert keep[0].tolist() == [5] and torch.equal(keep[:2], keep[2:])
    # a flat field has nothing to recompute: the bright token beats all of a uniform image
    flat = torch.ones(1, 16, 3)
    flat[0, 0] = 2.0
    assert pivotal_tokens(flat, (4, 4), 1 / 16, rows=1).tolist() == [[0]]
    # the share is kept exactly
    assert pivotal_tokens(x, (4, 4), 0.5, rows=2).shape == (4, 8)


def test_a_budgeted_cache_keeps_the_keys_the_queries_attend_to():
    keys = torch.nn.functional.normalize(torch.randn(1, 1, 10, 8), dim=-1)
    queries = 20 * keys[:, :, [3, 7]]                     # attend sharply to keys 3 and 7
    assert most_attended(queries, keys, 2).tolist() == [[[3, 7]]]
    cache = KVCache.empty(1, 1, 0, 8, "cpu", torch.float32, budget=2)
    k_slot, v_slot = cache.reserve(10)
    k_slot.copy_(keys)
    v_slot.copy_(torch.arange(10.0).view(1, 1, 10, 1).expand(1, 1, 10, 8))
    cache.commit(10, queries)
    assert cache.filled == 2 and cache.v[0, 0, :, 0].tolist() == [3.0, 7.0]


def test_cli_flags_become_settings_and_bad_ones_name_the_flag():
    import argparse

    from vare_core.cli.common import CliError, add_sampling_args, sampling_kwargs
    parser = argparse.ArgumentParser()
    add_sampling_args(parser)
    args = parser.parse_args(["--speed", "fast", "--keep-share", "0.5,0.3", "--pruned-scales", "2"])
    assert sampling_kwargs(args, 4) == {"speed": "fast", "pruned_scales": 2, "keep_share": (0.5, 0.3)}
    assert sampling_kwargs(parser.parse_args([]), 4) == {}
    with pytest.raises(CliError, match="--kv-budget must be"):
        sampling_kwargs(parser.parse_args(["--kv-budget", "2"]), 4)
    with pytest.raises(CliError, match="--unguided-scales must be"):
        sampling_kwargs(parser.parse_args(["--unguided-scales", "-2"]), 4)


def test_compiled_blocks_draw_the_same_bits():
    """The compile switch captures each block (cache writes included) as one graph; the
    aot_eager backend runs that graph without a C++ compiler, so the bits must not move (the
    inductor backend is timed by bench/gpu_check.py on a GPU)."""
    from vare_core.models.compiled import compile_blocks, is_compiled
    pipe = tiny_pipeline(seed=1, depth=1, schedule=((1, 1), (2, 2), (4, 4)))
    eager = pipe.generate(PROMPTS[:2], seed=5)
    compile_blocks(pipe.model, "default", backend="aot_eager")
    try:
        assert is_compiled(pipe.model)
        compiled = pipe.generate(PROMPTS[:2], seed=5)
    finally:
        compile_blocks(pipe.model, "off")
    assert not is_compiled(pipe.model)
    assert _bits_equal(eager, compiled) and torch.equal(eager.images, compiled.images)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_blocks(pipe.model, "fastest")
