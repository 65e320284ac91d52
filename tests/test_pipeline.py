"""vare_core.generation.pipeline: VarPipeline (schedule_for, resolutions, free_scales / laid_out,
generate and generate_encoded with the model's defaults), check_compatible and the dtype / device
pickers. On the tiny random pipeline and the shipped embedded model (CPU)."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from vare_core.models import scales
from vare_core.embedded import spec
from vare_core.embedded.loader import load_embedded
from vare_core.generation.pipeline import check_compatible, pick_device, pick_dtype
from vare_core.testing import tiny_pipeline

PROMPTS = ["a red circle on a white background", "a striped blue square"]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def embedded():
    torch.set_num_threads(1)
    return load_embedded("cpu")


def same_bits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))


# ----------------------------------------------------------------------------- schedules

def test_schedule_for_without_a_size_is_a_copy_of_the_default(tiny):
    schedule = tiny.schedule_for()
    assert schedule == tiny.default_schedule and schedule is not tiny.default_schedule
    schedule.append((8, 8))
    assert tiny.schedule_for() == [(1, 1), (2, 2), (4, 4)]


def test_a_fixed_schedule_model_draws_only_its_own_resolution(tiny):
    assert tiny.resolutions() == [(32, 32)]
    assert tiny.schedule_for(32, 32) == tiny.default_schedule
    with pytest.raises(ValueError, match="resolution 64x64: the tiny model only draws 32x32"):
        tiny.schedule_for(64, 64)
    with pytest.raises(ValueError, match="resolution 32xNone: the tiny model only draws 32x32"):
        tiny.schedule_for(32, None)


@pytest.mark.parametrize("name", ["tiny", "embedded"])
def test_images_come_out_at_the_advertised_resolution(request, name):
    pipe = request.getfixturevalue(name)
    (height, width), = pipe.resolutions()
    images = pipe.generate(PROMPTS, seed=0).images
    assert images.shape == (2, height, width, 3)
    explicit = pipe.generate(PROMPTS, seed=0, height=height, width=width).images
    assert torch.equal(images, explicit)             # the resolution given is the default one


def test_a_free_size_model_follows_the_scale_table(tiny):
    free = dataclasses.replace(tiny, fixed_schedule=False)
    assert free.resolutions() == sorted(scales.all_image_sizes())
    for height, width in [(256, 256), (1024, 1024), free.resolutions()[0]]:
        assert free.schedule_for(height, width) == scales.schedule_for_image(height, width)[0]
    with pytest.raises(ValueError):
        free.schedule_for(1000, 1000)
    assert free.schedule_for() == tiny.default_schedule


def test_spatial_patchify_doubles_the_pixels_per_token(tiny):
    patchified = dataclasses.replace(tiny, spatial_patchify=True)
    assert patchified.resolutions() == [(64, 64)]


# ----------------------------------------------------------------------------- free scales

def test_embedded_free_scales_come_from_its_json(embedded):
    info = json.loads((spec.WEIGHTS_DIR / spec.INFO_FILE).read_text())
    free, n = embedded.free_scales, len(embedded.default_schedule)
    assert free == info.get("free_scales", 0) and 0 <= free < n
    settings = embedded.sampling_settings(cfg=4.0, tau=0.5)
    laid = settings.laid_out(n, free)
    assert laid.cfg == tuple([1.0] * free + [4.0] * (n - free)) and laid.tau == tuple([1.0] * free + [0.5] * (n - free))
    per_scale = embedded.sampling_settings(cfg=[2, 3, 4, 5, 6]).laid_out(n, free)
    assert per_scale.cfg == (2, 3, 4, 5, 6)                                  # per scale: as given


def test_without_free_scales_a_number_stays_a_number(tiny):
    assert tiny.free_scales == 0
    assert tiny.sampling_settings(cfg=4.0).laid_out(3, tiny.free_scales).cfg == 4.0


# ----------------------------------------------------------------------------- generate

def test_generate_returns_images_and_bits_of_the_default_schedule(embedded):
    result = embedded.generate(PROMPTS, seed=1)
    assert result.images.dtype == torch.float32
    assert 0 <= float(result.images.min()) and float(result.images.max()) <= 1
    assert float(result.images.std()) > 0.01                          # not a blank image
    for bits, (h, w) in zip(result.bits, embedded.default_schedule, strict=True):
        assert bits.shape == (2, h, w, embedded.model.cfg.bits)


def test_one_string_is_one_prompt(tiny):
    assert same_bits(tiny.generate("a red circle", seed=2), tiny.generate(["a red circle"], seed=2))


@pytest.mark.parametrize("prompts, index", [(["a red circle", "   "], 1), ([""], 0), ([None, "a red circle"], 0)])
def test_empty_prompts_are_refused_by_index(tiny, prompts, index):
    with pytest.raises(ValueError, match=f"prompt {index} is empty; write what the image should show"):
        tiny.generate(prompts)


def test_generate_is_generate_encoded_on_the_encoded_prompts(embedded):
    states, lens = embedded.encode_prompts(PROMPTS)
    neg_states, neg_lens = embedded.encode_prompts(["a yellow cross"] * 2)
    a = embedded.generate(PROMPTS, seed=3, negative_prompt="a yellow cross")
    b = embedded.generate_encoded(states, lens, negative_states=neg_states, negative_lens=neg_lens, seed=3)
    assert same_bits(a, b) and torch.equal(a.images, b.images)
    assert not same_bits(a, embedded.generate(PROMPTS, seed=3))          # the negative mattered


def test_unset_settings_take_the_models_defaults(embedded):
    d = embedded.defaults
    default = embedded.generate(PROMPTS, seed=4)
    spelled = embedded.generate(PROMPTS, seed=4, cfg=d["cfg"], tau=d["tau"], top_k=d.get("top_k", 0),
                                top_p=d["top_p"])
    assert same_bits(default, spelled)
    assert not same_bits(default, embedded.generate(PROMPTS, seed=4, cfg=d["cfg"] + 3))


def test_generate_forwards_callback_and_cancel(tiny):
    from vare_core.generation.sampler import SamplingCancelled
    steps = []
    tiny.generate(PROMPTS, seed=0, callback=steps.append)
    assert [s.index for s in steps] == [0, 1, 2]
    with pytest.raises(SamplingCancelled):
        tiny.generate(PROMPTS, seed=0, cancel=lambda: True)


def test_pipeline_properties(tiny, embedded):
    assert tiny.device == embedded.device == torch.device("cpu")
    assert embedded.name == "embedded" and embedded.preset == "embedded" and embedded.family == "embedded"
    assert tiny.preset == "custom"                     # no Infinity preset has its sizes
    assert not tiny.low_vram and not embedded.low_vram
    assert embedded.default_schedule == [tuple(s) for s in spec.SCHEDULE]


def test_text_encoder_offloaded_is_a_no_op_on_the_cpu(tiny):
    with tiny.text_encoder_offloaded():
        assert tiny.offload_text_encoder is False
        states, _ = tiny.encode_prompts(["a red circle"])
    assert states.device.type == "cpu" and tiny.offload_text_encoder is False


# ----------------------------------------------------------------------------- check_compatible

def test_parts_of_one_pipeline_are_compatible(tiny, embedded):
    for pipe in (tiny, embedded):
        check_compatible(pipe.model, pipe.vae, pipe.text_encoder)


def test_a_vae_with_other_bits_is_named(tiny):
    vae = SimpleNamespace(config=SimpleNamespace(bits=8))
    with pytest.raises(ValueError, match="m.pth predicts 16 bits per token but v.pth has 8"):
        check_compatible(tiny.model, vae, tiny.text_encoder, "m.pth", "v.pth", "t5")
    patchify_vae = SimpleNamespace(config=SimpleNamespace(bits=4))        # 4 x 4 bits: 8B layout
    check_compatible(tiny.model, patchify_vae, tiny.text_encoder)


def test_a_text_encoder_of_another_width_is_named(tiny):
    encoder = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(d_model=2048)))
    with pytest.raises(ValueError, match="t5 gives 2048-wide states but m.pth expects 32"):
        check_compatible(tiny.model, tiny.vae, encoder, "m.pth", "v.pth", "t5")


# ----------------------------------------------------------------------------- pickers

def test_dtype_names_and_their_errors():
    cpu = torch.device("cpu")
    assert pick_dtype("fp32", cpu) == torch.float32
    assert pick_dtype("fp16", cpu) == torch.float16
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    assert pick_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype 'fp8': choose auto, fp32, fp16 or bf16"):
        pick_dtype("fp8", cpu)


def test_device_picker():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")

