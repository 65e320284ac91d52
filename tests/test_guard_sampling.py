"""The Concept Guard in the sampler and the pipeline: its rows join the batch on its scales only,
the caches shrink after them, it composes with adapters and leaves the base model alone."""
import pytest
import torch

from vare_core.erasure.adapters import apply_adapter
from vare_core.erasure.profile import erasure_profile
from vare_core.generation.guard import GuardSettings
from vare_core.models.infinity import Infinity
from vare_core.testing import tiny_pipeline

from test_adapter_safety import lora_adapter

PROMPTS = ["a red circle on a white background", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0, depth=3)


def _settings(pipe, **given):
    return erasure_profile(pipe).guard_settings([("circle", "square")], **given)


def _bits_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


def test_a_guard_that_selects_no_bit_draws_the_same_images(pipe):
    plain = pipe.generate(PROMPTS, seed=3)
    idle = pipe.guarded(_settings(pipe, bit_threshold=0.0)).generate(PROMPTS, seed=3)   # |d| < 0: never
    assert _bits_equal(plain, idle) and torch.equal(plain.images, idle.images)
    active = pipe.guarded(_settings(pipe, bit_threshold=100.0, warmup=0)).generate(PROMPTS, seed=3)
    assert not _bits_equal(plain, active)


def test_guard_rows_only_on_its_scales_and_the_caches_shrink_after(pipe, monkeypatch):
    seen = []
    forward_scale = Infinity.forward_scale

    def recording(self, state, k, x_scale=None, **kwargs):
        k_cache = state.self_kv[0].k
        seen.append((k, state.cond.shape[0], k_cache.shape[2], state.cache_bytes))
        return forward_scale(self, state, k, x_scale, **kwargs)
    monkeypatch.setattr(Infinity, "forward_scale", recording)
    batch, schedule = 2, pipe.default_schedule                       # 1x1, 2x2, 4x4
    pipe.guarded(_settings(pipe, scales=2, warmup=0)).generate(PROMPTS, seed=0, cfg=3.0)
    guarded_rows, plain_rows = batch * (2 + 2), batch * 2
    assert [(k, rows) for k, rows, _, _ in seen] == [(0, guarded_rows), (1, guarded_rows), (2, plain_rows)]
    first_two = sum(h * w for h, w in schedule[:2])
    total = sum(h * w for h, w in schedule)
    assert seen[0][2] == first_two and seen[2][2] == total       # guard rows never get cache for scale 3
    assert seen[2][3] < seen[0][3] * total / first_two * plain_rows / guarded_rows + 1
    seen.clear()
    pipe.generate(PROMPTS, seed=0, cfg=3.0)
    assert [rows for _, rows, _, _ in seen] == [plain_rows] * 3


def test_the_guard_reports_its_token_mask_per_scale(pipe):
    steps = []
    pipe.guarded(_settings(pipe, scales=2)).generate(PROMPTS, seed=0, callback=steps.append)
    (h0, w0), (h1, w1), _ = pipe.default_schedule
    assert steps[0].guard_mask.shape == (2, h0, w0) and steps[1].guard_mask.shape == (2, h1, w1)
    assert steps[0].guard_mask.dtype == torch.bool and steps[2].guard_mask is None


def test_guarded_is_a_copy_sharing_the_weights(pipe):
    guarded = pipe.guarded(_settings(pipe))
    assert pipe.guard is None and guarded.guard is not None
    assert guarded.model is pipe.model and guarded.vae is pipe.vae
    assert guarded.guarded(None).guard is None
    with pytest.raises(ValueError, match="GuardSettings"):
        pipe.guarded({"concepts": "circle"})


def test_the_guard_composes_with_an_adapter(pipe):
    adapter = lora_adapter(pipe, scale=0.3)
    settings = _settings(pipe, warmup=0, bit_threshold=100.0)
    both_ways = [apply_adapter(pipe.guarded(settings), adapter), apply_adapter(pipe, adapter).guarded(settings)]
    assert all(p.guard == settings for p in both_ways)
    images = [p.generate(PROMPTS, seed=1) for p in both_ways]
    assert _bits_equal(images[0], images[1])
    adapted_only = apply_adapter(pipe, adapter).generate(PROMPTS, seed=1)
    guarded_only = pipe.guarded(settings).generate(PROMPTS, seed=1)
    assert not _bits_equal(images[0], adapted_only) and not _bits_equal(images[0], guarded_only)


def test_guard_settings_from_the_profile_and_their_errors(pipe):
    settings = erasure_profile(pipe).guard_settings([("circle", "square")], penalty=1.5)
    assert settings.penalty == 1.5 and settings.blocks == erasure_profile(pipe).guard["blocks"]
    assert erasure_profile("infinity").guard_settings([("nudity", "clothed")]) == \
        GuardSettings(concepts=(("nudity", "clothed"),))                     # the published values
    with pytest.raises(ValueError, match="unknown guard setting"):
        erasure_profile(pipe).guard_settings([("circle", "square")], strength=2)
    with pytest.raises(ValueError, match="blocks 0 to 2"):
        pipe.guarded(_settings(pipe, blocks=(5,))).generate(PROMPTS, seed=0)


def test_the_request_budget_and_the_plan_count_the_guard_rows(pipe):
    from vare_core.erasure.plan import plan_memory
    from vare_core.generation.budget import sampling_bytes
    from vare_core.models import scales
    from vare_core.models.presets import preset_config
    guarded = pipe.guarded(_settings(pipe, scales=2))
    assert sampling_bytes(guarded, 4, 16) > sampling_bytes(pipe, 4, 16)
    config, schedule = preset_config("infinity_2b"), scales.scale_schedule(1.0, "1M")
    guard = erasure_profile("infinity").guard_settings([("nudity", "clothed")])
    plain, with_guard = (plan_memory(config, schedule, sample_batch=1, guard=g).peak for g in (None, guard))
    # the guard's rows hold caches for its 8 scales only (about 9% of the tokens at 1024²)
    assert plain < with_guard < plain * 1.15


def test_the_guard_page_shows_the_profiles_settings():
    import os
    from pathlib import Path

    from vare_core.erasure.profile import guard_defaults_table
    doc = Path(__file__).resolve().parents[1] / "docs" / "guard.md"
    begin, end = "<!-- guard defaults: begin -->\n", "<!-- guard defaults: end -->"
    head, rest = doc.read_text().split(begin)
    shown, tail = rest.split(end)
    if os.environ.get("VARE_WRITE_DOCS"):
        doc.write_text(head + begin + guard_defaults_table() + end + tail)
        return
    assert shown == guard_defaults_table(), "docs/guard.md's settings table is stale: VARE_WRITE_DOCS=1 rewrites it"


def test_the_guard_takes_per_scale_cfg_and_tau(pipe):
    settings = _settings(pipe, warmup=0, bit_threshold=100.0)
    guarded = pipe.guarded(settings)
    per_scale = guarded.generate(PROMPTS, seed=2, cfg="1,3,5", tau="1,0.5,0.5")
    assert [tuple(b.shape[1:3]) for b in per_scale.bits] == [tuple(s) for s in pipe.default_schedule]
    assert not _bits_equal(per_scale, guarded.generate(PROMPTS, seed=2, cfg=3.0, tau=0.5))
    unguided = guarded.generate(PROMPTS, seed=2, cfg=1.0)      # no guidance: null rows only for the guard
    assert unguided.images.shape == per_scale.images.shape


def test_the_guard_is_prepared_once_per_pipeline(pipe, monkeypatch):
    from vare_core.generation import guard as guard_module
    calls = []
    prepare = guard_module.ConceptGuard.prepare.__func__

    def counting(cls, *args, **kwargs):
        calls.append(1)
        return prepare(cls, *args, **kwargs)
    monkeypatch.setattr(guard_module.ConceptGuard, "prepare", classmethod(counting))
    guarded = pipe.guarded(_settings(pipe))
    first = guarded.generate(PROMPTS, seed=0)
    again = guarded.generate(PROMPTS, seed=0)
    assert len(calls) == 1 and _bits_equal(first, again)
    adapted = apply_adapter(guarded, lora_adapter(pipe, scale=0.3))       # other weights: prepared anew
    adapted.generate(PROMPTS, seed=0)
    assert len(calls) == 2 and adapted._prepared_guard is not guarded._prepared_guard


def test_fast_knobs_leave_the_guards_scales_guided_and_whole():
    """Unguided, a guarded scale loses its push toward the anchor (the embedded model's circles
    came back at speed fast): the knobs only act after the guard's scales. The embedded model:
    random weights barely tell a prompt from the null condition, so cfg changes nothing there."""
    from vare_core.generation.pipeline import load_pipeline
    embedded = load_pipeline("embedded", device="cpu")
    guarded = embedded.guarded(_settings(embedded, scales=3))            # of 5 scales
    prompts = ["a red circle on a white background"] * 4
    exact = guarded.generate(prompts, seed=2, cfg=4.0)
    fast = guarded.generate(prompts, seed=2, cfg=4.0, unguided_scales=4, pruned_scales=4, keep_share=0.5)
    assert all(torch.equal(a, b) for a, b in zip(exact.bits[:3], fast.bits[:3]))   # the guard's, as exact
    assert not torch.equal(exact.bits[-1], fast.bits[-1])                           # the rest: fast
