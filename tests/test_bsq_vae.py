"""BSQ VAE: parity with the official golden tensors, checkpoint keys, quantiser and patchify."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vare_core.models.bsq_quant import (
    codes_from_bits,
    next_scale_input,
    patchify_tokens,
    quantize_multiscale,
    residual_quantize,
    summed_codes_from_bits,
    teacher_forcing_inputs,
    unpatchify_tokens,
    upsample_codes,
)
from vare_core.models.scales import vae_schedule
from vare_core.models.bsq_vae import BSQVAE, VAEConfig, build_vae, detect_vae_config, normalize_vae_keys

SCHEDULE = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]
OFFSETS = [0, 1, 5, 21, 57, 121, 265, 521]
D32 = VAEConfig()  # the 2B model's VAE
D56 = VAEConfig(bits=14, patch_size=8, channel_mult=(1, 2, 4, 4))  # the 8B model's VAE


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The golden files were made with one thread; small convolutions are also faster that way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def golden_vae(golden):
    return build_vae(load_file(golden / "vae.safetensors"))


@pytest.fixture(scope="module")
def vae_io(golden):
    return load_file(golden / "vae_io.safetensors")


def golden_images(vae_io):
    img = vae_io["image_uint8_rgb"].permute(0, 3, 1, 2).float() / 255
    return img.add(img).add_(-1)


def split_tokens(tokens, schedule, offsets):
    B, d = tokens.shape[0], tokens.shape[-1]
    return [tokens[:, offsets[k]:offsets[k + 1]].reshape(B, h, w, d) for k, (h, w) in enumerate(schedule)]


# ---------------------------------------------------------------- golden parity

def test_golden_config_detected(golden_vae):
    assert golden_vae.config == VAEConfig(bits=16, patch_size=16, base_channels=24,
                                          channel_mult=(1, 1, 1, 1, 2), num_res_blocks=1)
    assert sum(p.numel() for p in golden_vae.parameters()) == 488_251
    assert not golden_vae.training and not any(p.requires_grad for p in golden_vae.parameters())


def test_golden_encode(golden_vae, vae_io):
    with torch.no_grad():
        features = golden_vae.encode_features(golden_images(vae_io))
        pyramid = residual_quantize(features, SCHEDULE)
    assert (features - vae_io["raw_features"]).abs().max() <= 1e-4
    for k, bits in enumerate(pyramid.bits):
        assert bits.dtype == torch.int64
        assert torch.equal(bits, vae_io[f"enc.bits.s{k}"][:, 0].long()), f"bits differ at scale {k}"
        assert (pyramid.codes[k] - vae_io[f"enc.quantized.s{k}"][:, :, 0]).abs().max() <= 1e-6
    assert (pyramid.summed_codes - vae_io["z"]).abs().max() <= 1e-6
    gt_BL = torch.cat([b.flatten(1, 2) for b in pyramid.bits], dim=1)
    assert torch.equal(gt_BL, vae_io["bsc.gt_BL"].long())
    # encode_bits is the same pipeline in one call
    with torch.no_grad():
        bits = golden_vae.encode_bits(golden_images(vae_io), SCHEDULE)
    assert all(torch.equal(a, b) for a, b in zip(bits, pyramid.bits))


def test_golden_codes_inputs_and_decode(golden_vae, vae_io):
    bits = [vae_io[f"enc.bits.s{k}"][:, 0].long() for k in range(len(SCHEDULE))]
    summed = summed_codes_from_bits(bits, (16, 16))
    assert (summed - vae_io["summed_codes_from_bits"][:, :, 0]).abs().max() <= 1e-6
    x = teacher_forcing_inputs(bits, SCHEDULE)
    assert x.shape == (2, 520, 16)
    assert (x - vae_io["bsc.x_BLC_wo_prefix"]).abs().max() <= 1e-6
    with torch.no_grad():
        recon = golden_vae.decode(vae_io["z"])
    assert recon.shape == (2, 3, 256, 256)
    assert (recon - vae_io["recon"]).abs().max() <= 1e-4


def test_golden_sample_decode(golden, golden_vae):
    sample = load_file(golden / "sample_d1.safetensors")
    bits = split_tokens(sample["bits"], SCHEDULE, OFFSETS)
    assert (summed_codes_from_bits(bits, (16, 16)) - sample["summed_codes"]).abs().max() <= 1e-6
    x = teacher_forcing_inputs(bits, SCHEDULE)
    assert (x - sample["x_BLC_wo_prefix_generated"]).abs().max() <= 1e-6
    # the sampler's own loop: one next-scale input at a time from the running sum
    summed = torch.zeros(2, 16, 16, 16)
    for k in range(len(SCHEDULE) - 1):
        summed = summed + upsample_codes(codes_from_bits(bits[k]), (16, 16))
        step = next_scale_input(summed, SCHEDULE[k + 1])
        assert torch.equal(step, x[:, OFFSETS[k + 1] - 1:OFFSETS[k + 2] - 1])
    with torch.no_grad():
        image = golden_vae.decode(sample["summed_codes"])
    assert (image - sample["image_decoded"]).abs().max() <= 1e-4


# ---------------------------------------------------------------- checkpoint keys and loading

def official_meta_state_dict(golden, name):
    shapes = json.loads((golden / "keys" / name).read_text())["vae"]
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("name,config", [("keys_2b.json", D32), ("keys_8b.json", D56)])
def test_real_checkpoint_keys_and_shapes(golden, name, config):
    official = official_meta_state_dict(golden, name)
    with torch.device("meta"):
        ours = BSQVAE(config).state_dict()
    normalized = normalize_vae_keys(official)
    assert len(normalized) == len(official) - 2  # the two mask buffers are dropped
    assert set(normalized) == set(ours)
    assert all(tuple(normalized[k].shape) == tuple(ours[k].shape) for k in ours)
    assert detect_vae_config(official) == config
    vae = build_vae(official)  # meta tensors in, meta model out: checks the strict load path
    assert vae.config == config


def test_d32_parameter_count():
    with torch.device("meta"):
        vae = BSQVAE(D32)
    assert 105e6 < sum(p.numel() for p in vae.parameters()) < 115e6  # "110 M params"


def test_unwrapped_keys_and_pth_dict_load_the_same(golden, golden_vae):
    sd = load_file(golden / "vae.safetensors")
    unwrapped = normalize_vae_keys(sd)
    assert "encoder.conv_in.weight" in unwrapped and "decoder.up.1.upsample.conv.weight" in unwrapped
    assert "encoder.down.0.downsample.conv.weight" in unwrapped
    assert normalize_vae_keys(unwrapped).keys() == unwrapped.keys()  # idempotent
    double = build_vae(sd, dtype=torch.float64)
    assert double.decoder.conv_out.weight.dtype == torch.float64
    with torch.no_grad():
        assert double.decode(torch.zeros(1, 16, 1, 1)).dtype == torch.float64
    for source in (unwrapped, {"vae": sd}):
        vae = build_vae(source)
        for (k, a), b in zip(vae.state_dict().items(), golden_vae.state_dict().values()):
            assert torch.equal(a, b), k


def test_build_vae_names_missing_and_unexpected_keys(golden):
    sd = load_file(golden / "vae.safetensors")
    del sd["decoder.up.2.block.1.conv2.conv.weight"]
    sd["decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        build_vae(sd)
    message = str(err.value)
    assert "decoder.up.2.block.1.conv2.weight" in message and "decoder.extra.weight" in message
    assert "1 missing" in message and "'bits': 16" in message


def test_build_vae_rejects_wrong_shapes_and_foreign_dicts(golden):
    sd = load_file(golden / "vae.safetensors")
    sd["decoder.conv_out.conv.weight"] = torch.zeros(3, 24, 1, 1)
    with pytest.raises(ValueError, match="wrong shapes.*decoder.conv_out.weight"):
        build_vae(sd)
    with pytest.raises(ValueError, match="not a BSQ VAE"):
        build_vae({"model.weight": torch.zeros(1)})


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        VAEConfig(patch_size=12)
    with pytest.raises(ValueError, match="levels"):
        VAEConfig(patch_size=32)  # 5 levels allow at most 4 downsamples
    with pytest.raises(ValueError, match="multiple of 32 or 24"):
        VAEConfig(base_channels=40)


# ---------------------------------------------------------------- behaviour on small random models

def tiny_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(bits=8, patch_size=4, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)
    config.update(overrides)
    return BSQVAE(VAEConfig(**config)).eval()


def test_deterministic_non_square_round_trip():
    vae = tiny_vae()
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    schedule = [(1, 1), (2, 3), (4, 6), (8, 12)]
    with torch.no_grad():
        bits_a = vae.encode_bits(images, schedule)
        bits_b = vae.encode_bits(images, schedule)
        summed = summed_codes_from_bits(bits_a, schedule[-1])
        image_a, image_b = vae.decode(summed), vae.decode(summed)
    assert [tuple(b.shape) for b in bits_a] == [(2, h, w, 8) for h, w in schedule]
    assert all(torch.equal(a, b) for a, b in zip(bits_a, bits_b))
    assert torch.equal(image_a, image_b) and image_a.shape == (2, 3, 32, 48)
    assert torch.equal(vae.decode(summed), image_a)  # the autograd path (no in-place ops) agrees
    assert image_a.abs().max() <= 1
    pyramid = residual_quantize(vae.encode_features(images).detach(), schedule)
    assert torch.allclose(summed, pyramid.summed_codes, atol=1e-6)
    assert teacher_forcing_inputs(bits_a, schedule).shape == (2, 6 + 24 + 96, 8)


def test_bad_inputs_raise():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vae.encode_features(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        vae.decode(torch.zeros(1, 7, 4, 4))
    with pytest.raises(ValueError, match="larger than the latent"):
        quantize_multiscale(torch.randn(1, 8, 4, 4), [(1, 1), (8, 8)])
    with pytest.raises(ValueError, match="scale 1"):
        teacher_forcing_inputs([torch.zeros(1, 1, 1, 8, dtype=torch.long)] * 2, [(1, 1), (2, 2)])


def test_quantiser_codes_and_zero_bits():
    d = 32
    features = torch.randn(2, d, 4, 4)
    features[0, :, 0, 0] = 0.0  # an exactly-zero token quantises to all-zero bits
    pyramid = residual_quantize(features, [(1, 1), (2, 2), (4, 4)])
    first = residual_quantize(features, [(4, 4)])
    assert torch.all(first.bits[0][0, 0, 0] == 0)
    assert torch.equal(first.bits[0], (features.permute(0, 2, 3, 1) > 0).long())
    codes = codes_from_bits(first.bits[0])
    assert torch.allclose(codes.abs(), torch.full_like(codes, d**-0.5))
    assert torch.allclose(codes, first.codes[0], atol=1e-7)
    # every scale's codes have unit norm per token, and the last scale sees the full grid
    for c in pyramid.codes:
        assert torch.allclose(c.norm(dim=1), torch.ones(()), atol=1e-6)


# ---------------------------------------------------------------- 8B spatial patchify

def test_patchify_matches_pixel_unshuffle_and_round_trips():
    grid = torch.randint(0, 2, (2, 6, 8, 14))
    tokens = patchify_tokens(grid)
    assert tokens.shape == (2, 3, 4, 56) and tokens.dtype == grid.dtype
    official = F.pixel_unshuffle(grid.permute(0, 3, 1, 2).float(), 2).permute(0, 2, 3, 1)
    assert torch.equal(tokens.float(), official)
    assert torch.equal(unpatchify_tokens(tokens), grid)
    # channel c*4 + i*2 + j of token (y, x) is VAE cell (2y+i, 2x+j), channel c
    assert tokens[1, 2, 3, 5 * 4 + 1 * 2 + 0] == grid[1, 5, 6, 5]
    with pytest.raises(ValueError):
        patchify_tokens(torch.zeros(1, 3, 4, 2))


def test_patchified_tokens_for_an_8b_like_vae():
    vae = tiny_vae(bits=14, patch_size=4)  # transformer patch 8, VAE patch 4 -> 56-bit tokens
    transformer_schedule = [(1, 1), (2, 2), (3, 4)]
    schedule = vae_schedule(transformer_schedule, patchify=True)
    assert schedule == [(2, 2), (4, 4), (6, 8)]
    images = torch.rand(1, 3, 24, 32) * 2 - 1
    with torch.no_grad():
        bits = vae.encode_bits(images, schedule)  # quantised at the VAE's resolution, 14 bits
        image = vae.decode(summed_codes_from_bits(bits, schedule[-1]))
    assert image.shape == (1, 3, 24, 32)
    labels = torch.cat([patchify_tokens(b).flatten(1, 2) for b in bits], dim=1)
    assert labels.shape == (1, 1 + 4 + 12, 56)
    x = teacher_forcing_inputs(bits, schedule, spatial_patchify=True)
    assert x.shape == (1, 4 + 12, 56)
    # the official construction: resize at the VAE size, pixel_unshuffle, flatten
    summed = upsample_codes(codes_from_bits(bits[0]), schedule[-1])
    first = F.pixel_unshuffle(upsample_codes(summed, schedule[1]), 2).flatten(2).transpose(1, 2)
    assert torch.equal(x[:, :4], first)
    # sampled 56-bit tokens go back to VAE bits exactly
    assert all(torch.equal(unpatchify_tokens(patchify_tokens(b)), b) for b in bits)
