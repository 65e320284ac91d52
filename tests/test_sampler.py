"""vare_core.generation.sampler: next-scale sampling on the tiny random pipeline (vare_core.testing).
filter_logits' top-k / top-p rules, sample()'s outputs and their consistency (bits -> summed
codes -> images), seeds, the classifier-free-guidance mixing of the conditional and null
branches, per-scale cfg / tau, the callback and cancel hooks, spatial patchify, decode_images."""
import pytest
import torch

from vare_core.models.bsq_quant import codes_from_bits, unpatchify_tokens, upsample_codes
from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
from vare_core.generation.sampler import (SampleResult, SamplingCancelled, SamplingSettings, ScaleStep,
                                          decode_images, filter_logits, sample)
from vare_core.testing import tiny_pipeline

PROMPTS = ["a red circle", "a blue square on a white background"]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def text(tiny):
    return tiny.encode_prompts(PROMPTS)


def run(pipe, text, seed=0, cfg=3.0, tau=1.0, top_k=0, top_p=0.0, **kwargs) -> SampleResult:
    states, lens = text
    settings = SamplingSettings(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p)
    return sample(pipe.model, pipe.vae, states, lens, pipe.default_schedule, settings,
                  generator=torch.Generator().manual_seed(seed), **kwargs)


def logits_per_scale(pipe, text, **kwargs) -> list[torch.Tensor]:
    steps = []
    run(pipe, text, callback=steps.append, decode=False, **kwargs)
    return [step.logits for step in steps]


def summed_from_bits(bits: list[torch.Tensor], size) -> torch.Tensor:
    return sum(upsample_codes(codes_from_bits(b), size) for b in bits)


# ----------------------------------------------------------------------------- filter_logits

def test_top_k_1_keeps_only_the_larger_logit():
    logits = torch.randn(5, 7, 2)
    out = filter_logits(logits, top_k=1)
    best = logits.argmax(-1, keepdim=True)
    assert torch.equal(out.gather(-1, best), logits.gather(-1, best))
    assert torch.isinf(out.gather(-1, 1 - best)).all() and (out.gather(-1, 1 - best) < 0).all()


@pytest.mark.parametrize("top_k, top_p", [(0, 0.0), (2, 0.0), (5, 0.0), (0, 1.0), (0, -0.5)])
def test_filters_that_keep_everything_change_nothing(top_k, top_p):
    logits = torch.randn(4, 3, 2)
    assert torch.equal(filter_logits(logits, top_k=top_k, top_p=top_p), logits)


def test_top_p_removes_the_less_likely_value_only_when_its_probability_is_small():
    # p(value 1) from near 0 to near 1
    p1 = torch.tensor([0.01, 0.02, 0.04, 0.2, 0.5, 0.8, 0.96, 0.98, 0.99])
    logits = torch.stack([torch.zeros_like(p1), torch.log(p1 / (1 - p1))], -1)
    top_p = 0.97
    out = filter_logits(logits, top_p=top_p)
    probs = logits.softmax(-1)
    less_likely = probs.min(-1).values
    removed = torch.isinf(out).any(-1)
    assert torch.equal(removed, less_likely <= 1 - top_p + 1e-6)
    assert removed.any() and not removed.all()
    assert not torch.isinf(out.gather(-1, probs.argmax(-1, keepdim=True))).any()   # never the likelier
    assert torch.isfinite(out).any(-1).all()                                      # one value always left


def test_filter_logits_does_not_modify_its_input():
    logits = torch.randn(3, 2)
    copy = logits.clone()
    filter_logits(logits, top_k=1, top_p=0.9)
    assert torch.equal(logits, copy)


# ----------------------------------------------------------------------------- outputs

def test_sample_returns_bits_codes_and_images_of_the_schedule(tiny, text):
    result = run(tiny, text)
    schedule, bits = tiny.default_schedule, tiny.model.cfg.bits
    assert len(result.bits) == len(schedule)
    for drawn, (h, w) in zip(result.bits, schedule):
        assert drawn.shape == (2, h, w, bits) and drawn.dtype == torch.int64
        assert set(drawn.unique().tolist()) <= {0, 1}
    final = schedule[-1]
    assert result.summed_codes.shape == (2, bits, *final) and result.summed_codes.dtype == torch.float32
    side = final[0] * tiny.vae.config.patch_size
    assert result.images.shape == (2, side, side, 3) and result.images.dtype == torch.float32
    assert result.images.min() >= 0 and result.images.max() <= 1


def test_summed_codes_are_the_upsampled_sum_of_the_drawn_bits_and_decode_to_the_images(tiny, text):
    result = run(tiny, text, seed=4)
    final = tiny.default_schedule[-1]
    torch.testing.assert_close(result.summed_codes, summed_from_bits(result.bits, final))
    assert torch.equal(result.images, decode_images(tiny.vae, result.summed_codes))


def test_same_seed_same_bits_another_seed_other_bits(tiny, text):
    first, second, other = run(tiny, text, seed=1), run(tiny, text, seed=1), run(tiny, text, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first.bits, second.bits))
    assert torch.equal(first.images, second.images)
    assert any(not torch.equal(a, b) for a, b in zip(first.bits, other.bits))


def test_without_a_generator_the_global_seed_decides(tiny, text):
    states, lens = text
    torch.manual_seed(5)
    a = sample(tiny.model, tiny.vae, states, lens, tiny.default_schedule, decode=False)
    torch.manual_seed(5)
    b = sample(tiny.model, tiny.vae, states, lens, tiny.default_schedule, decode=False)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


def test_decode_false_draws_the_same_bits_without_images(tiny, text):
    decoded, skipped = run(tiny, text, seed=3), run(tiny, text, seed=3, decode=False)
    assert skipped.images is None
    assert all(torch.equal(a, b) for a, b in zip(decoded.bits, skipped.bits))
    assert torch.equal(decoded.summed_codes, skipped.summed_codes)


def test_greedy_top_k_draws_the_same_bits_whatever_the_seed(tiny, text):
    a, b = run(tiny, text, seed=0, top_k=1), run(tiny, text, seed=99, top_k=1)
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    # and the greedy bit is the likelier value of the logits the callback saw
    steps = []
    run(tiny, text, seed=7, top_k=1, callback=steps.append, decode=False)
    for step in steps:
        greedy = step.logits.view(*step.bits.shape, 2).argmax(-1)
        assert torch.equal(step.bits, greedy)


def test_every_image_of_a_batch_is_its_own_prompt(tiny, text):
    """Swapping the prompts of a greedy batch swaps the images."""
    states, lens = text
    swapped = (states.flip(0), lens.flip(0))
    a, b = run(tiny, text, top_k=1), run(tiny, swapped, top_k=1)
    assert all(torch.equal(x, y.flip(0)) for x, y in zip(a.bits, b.bits))
    assert not torch.equal(a.bits[-1][0], a.bits[-1][1])


# ----------------------------------------------------------------------------- guidance

def test_guidance_mixes_the_conditional_and_null_logits_linearly(tiny, text):
    """Scale 0 reads no drawn bits, so its logits at cfg c are c * cond + (1 - c) * null, with
    cond the logits at cfg 1 (no guidance pass at all) and null the logits at cfg 0."""
    cond = logits_per_scale(tiny, text, cfg=1.0)[0]
    null = logits_per_scale(tiny, text, cfg=0.0)[0]
    for c in (3.0, -2.0, 7.5):
        torch.testing.assert_close(logits_per_scale(tiny, text, cfg=c)[0], c * cond + (1 - c) * null,
                                   atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cond, null)


def test_cfg_1_runs_only_the_conditional_branch(tiny, text, monkeypatch):
    batches = []
    real = tiny.model.encode_condition

    def spy(states, lens, *args, **kwargs):
        batches.append(states.shape[0])
        return real(states, lens, *args, **kwargs)
    monkeypatch.setattr(tiny.model, "encode_condition", spy)
    run(tiny, text, cfg=1.0, decode=False)
    run(tiny, text, cfg=[1.0, 1.0, 2.0], decode=False)
    assert batches == [2, 4]           # unguided: one half; any guided scale: both halves


def test_tau_divides_the_logits(tiny, text):
    at_1 = logits_per_scale(tiny, text, tau=1.0)[0]
    at_half = logits_per_scale(tiny, text, tau=0.5)[0]
    torch.testing.assert_close(at_half, 2 * at_1)


def test_per_scale_settings_apply_to_their_own_scale(tiny, text):
    """Scale 0 of cfg [2, 5, 5] / tau [1, 0.5, 0.5] is scale 0 of cfg 2 / tau 1 exactly (the same
    bits are drawn there); the later scales are guided differently."""
    plain = logits_per_scale(tiny, text, cfg=2.0, tau=1.0)
    listed = logits_per_scale(tiny, text, cfg=[2.0, 5.0, 5.0], tau=[1.0, 0.5, 0.5])
    assert torch.equal(plain[0], listed[0])
    assert not torch.allclose(plain[1], listed[1])
    texted = logits_per_scale(tiny, text, cfg="2,5,5", tau="1,0.5,0.5")     # the text form
    assert all(torch.equal(a, b) for a, b in zip(listed, texted))


def test_a_negative_equal_to_the_null_condition_reproduces_the_default(tiny, text):
    states, lens = text
    null = tiny.model.null_text(lens, states.shape[1])
    default = run(tiny, text, seed=6)
    explicit = run(tiny, text, seed=6, negative_states=null, negative_lens=lens)
    assert all(torch.equal(a, b) for a, b in zip(default.bits, explicit.bits))
    other_states, other_lens = tiny.encode_prompts(["a green triangle on black"] * 2)
    negative = run(tiny, text, seed=6, negative_states=other_states, negative_lens=other_lens)
    assert any(not torch.equal(a, b) for a, b in zip(default.bits, negative.bits))


def test_a_longer_negative_pads_the_prompt_without_changing_its_branch(tiny, text):
    states, lens = text
    neg_states, neg_lens = tiny.encode_prompts(["a green triangle on a black background with stripes"] * 2)
    assert neg_states.shape[1] > states.shape[1]
    cond = logits_per_scale(tiny, text, cfg=1.0)[0]
    negative = dict(negative_states=neg_states, negative_lens=neg_lens)
    null = logits_per_scale(tiny, text, cfg=0.0, **negative)[0]
    mixed = logits_per_scale(tiny, text, cfg=4.0, **negative)[0]
    torch.testing.assert_close(mixed, 4 * cond - 3 * null, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- hooks

def test_callback_sees_every_scale_in_order(tiny, text):
    steps: list[ScaleStep] = []
    result = run(tiny, text, seed=2, callback=steps.append)
    assert [s.index for s in steps] == [0, 1, 2] and {s.total for s in steps} == {3}
    for step, bits, (h, w) in zip(steps, result.bits, tiny.default_schedule):
        assert torch.equal(step.bits, bits)
        assert step.logits.shape == (2, h * w, 2 * tiny.model.cfg.bits)
        assert step.logits.dtype == torch.float32
    final = tiny.default_schedule[-1]
    for k, step in enumerate(steps):    # the running sum: decodable after every scale
        torch.testing.assert_close(step.summed_codes, summed_from_bits(result.bits[:k + 1], final))
    assert torch.equal(steps[-1].summed_codes, result.summed_codes)


def test_cancel_stops_before_the_next_scale(tiny, text):
    seen = []
    with pytest.raises(SamplingCancelled, match="before scale 3 of 3"):
        run(tiny, text, callback=seen.append, cancel=lambda: len(seen) == 2)
    assert len(seen) == 2
    with pytest.raises(SamplingCancelled, match="before scale 1 of 3"):
        run(tiny, text, cancel=lambda: True)
    assert issubclass(SamplingCancelled, RuntimeError)


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("tau", [0.0, -1.0, [1.0, 0.0, 1.0]])
def test_tau_must_be_positive_on_every_scale(tiny, text, tau):
    with pytest.raises(ValueError, match="tau must be > 0 on every scale"):
        run(tiny, text, tau=tau)


def test_a_per_scale_list_of_the_wrong_length_is_refused(tiny, text):
    with pytest.raises(ValueError, match="cfg.*2 values for 3 scales"):
        run(tiny, text, cfg=[3.0, 3.0])
    with pytest.raises(ValueError, match="tau.*4 values for 3 scales"):
        run(tiny, text, tau="1,1,1,1")


def test_settings_outside_their_range_are_refused(tiny, text):
    with pytest.raises(ValueError, match="cfg 1e\\+06 is outside"):
        run(tiny, text, cfg=1e6)


# ----------------------------------------------------------------------------- patchify, decode

def test_spatial_patchify_sums_codes_at_twice_the_schedule_size(tiny):
    """8B-style tokens hold a 2x2 block of VAE cells: 4 x 16 bits per token, codes at 2x."""
    torch.manual_seed(1)
    model = init_weights(Infinity(InfinityConfig(depth=1, embed_dim=64, num_heads=2, bits=64,
                                                 text_channels=32, text_maxlen=8, block_chunks=1,
                                                 num_levels=3, cond_drop_rate=0.0))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    states, lens = torch.randn(2, 5, 32), torch.tensor([5, 2])
    schedule = [(1, 1), (2, 2), (3, 3)]
    result = sample(model, tiny.vae, states, lens, schedule, SamplingSettings(cfg=2.0, tau=1.0),
                    spatial_patchify=True, generator=torch.Generator().manual_seed(0))
    assert [tuple(b.shape) for b in result.bits] == [(2, h, w, 64) for h, w in schedule]
    assert result.summed_codes.shape == (2, 16, 6, 6)
    expected = summed_from_bits([unpatchify_tokens(b) for b in result.bits], (6, 6))
    torch.testing.assert_close(result.summed_codes, expected)
    assert result.images.shape == (2, 6 * tiny.vae.config.patch_size, 6 * tiny.vae.config.patch_size, 3)


class _IdentityVAE(torch.nn.Module):
    """decode() returns its input: decode_images' arithmetic alone."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=dtype))

    def decode(self, codes):
        assert codes.dtype == self.anchor.dtype and codes.is_contiguous()
        return codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_images_maps_minus_one_one_to_zero_one_channels_last(dtype):
    codes = torch.linspace(-3, 3, 2 * 3 * 4 * 5).view(2, 3, 4, 5)
    images = decode_images(_IdentityVAE(dtype), codes)
    assert images.shape == (2, 4, 5, 3) and images.dtype == torch.float32
    expected = ((codes.to(dtype).float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    assert torch.equal(images, expected)
    assert images.min() == 0 and images.max() == 1


# ----------------------------------------------------------------------------- SamplingSettings

def test_settings_read_numbers_lists_and_text_alike():
    assert SamplingSettings(cfg="3,3,4").cfg == (3.0, 3.0, 4.0) == SamplingSettings(cfg=[3, 3, 4]).cfg
    assert SamplingSettings(cfg="4").cfg == 4.0 and SamplingSettings(tau=[0.5]).tau == 0.5
    assert SamplingSettings(cfg=[3, 4]) == SamplingSettings(cfg=(3.0, 4.0))     # equal and hashable
    assert len({SamplingSettings(), SamplingSettings()}) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"cfg": True}, "cfg"), ({"cfg": 1e6}, "outside"), ({"tau": 0}, "tau must be > 0"),
    ({"tau": "1,0,1"}, "tau must be > 0"), ({"top_k": -1}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"top_p": 1.5}, "top_p"), ({"top_p": float("nan")}, "top_p"), ({"cfg": "3,x"}, "cfg"),
])
def test_settings_refuse_bad_values_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kwargs)


def test_settings_replace_keeps_what_is_not_given():
    base = SamplingSettings(cfg=4.0, tau=0.5, top_p=0.9)
    assert base.replace(cfg=None, tau=1.0) == SamplingSettings(cfg=4.0, tau=1.0, top_p=0.9)
    assert base.replace() == base


def test_laid_out_frees_the_first_scales_of_one_number_only():
    settings = SamplingSettings(cfg=4.0, tau=0.5)
    assert settings.laid_out(4, 0) is settings
    laid = settings.laid_out(4, 1)
    assert laid.cfg == (1.0, 4.0, 4.0, 4.0) and laid.tau == (1.0, 0.5, 0.5, 0.5)
    listed = SamplingSettings(cfg=[2, 3, 4, 5]).laid_out(4, 1)
    assert listed.cfg == (2.0, 3.0, 4.0, 5.0) and listed.tau == (1.0, 0.5, 0.5, 0.5)


def test_per_scale_expands_one_number_and_checks_the_count():
    assert SamplingSettings(cfg=3.0, tau=0.5).per_scale(3) == ([3.0] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match="2 values for 3 scales"):
        SamplingSettings(cfg=[3, 4]).per_scale(3)
