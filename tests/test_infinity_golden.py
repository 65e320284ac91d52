"""Parity of our Infinity transformer and sampler with the official implementation's numbers."""
import json

import pytest
import torch
from safetensors.torch import load_file

from vare_core.models.bsq_quant import teacher_forcing_inputs
from vare_core.models.bsq_vae import build_vae
from vare_core.models.infinity import Infinity
from vare_core.models.presets import (build_infinity, detect_infinity_config, preset_config,
                                      preset_name, to_official_keys)
from vare_core.models.rope import rope_table
from vare_core.generation.sampler import SamplingSettings, filter_logits, sample

SCHEDULE = [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)]
OFFSETS = [0, 1, 5, 21, 57, 121, 265, 521]


@pytest.fixture(scope="module")
def files(golden):
    return {
        "weights": load_file(golden / "transformer.safetensors"),
        "forward": load_file(golden / "transformer_forward.safetensors"),
        "vae": load_file(golden / "vae.safetensors"),
    }


def padded_text(forward, key="text.kv_compact"):
    """Official compact text (sum(lens), C) -> our padded (B, T, C) + lens."""
    lens = forward["text.lens"].long()
    compact = forward[key]
    out = torch.zeros(len(lens), int(lens.max()), compact.shape[1])
    start = 0
    for b, n in enumerate(lens.tolist()):
        out[b, :n] = compact[start:start + n]
        start += n
    return out, lens


def golden_bits(bits_flat):
    return [bits_flat[:, OFFSETS[k]:OFFSETS[k + 1]].reshape(bits_flat.shape[0], h, w, -1)
            for k, (h, w) in enumerate(SCHEDULE)]


def test_rope_table_matches_official(files):
    cos, sin = rope_table(SCHEDULE, 40)
    expected = files["forward"]["rope.cos_sin"]
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])


@pytest.mark.parametrize("bf16_ca, key, atol", [
    (False, "variant_fp32ca.logits", 1e-4),   # exact fp32 attention: the tight check
    (True, "logits", 3e-3),                   # official bf16 rounding inside cross-attention
])
def test_teacher_forced_logits(files, bf16_ca, key, atol):
    model = build_infinity(files["weights"], ca_bf16_rounding=bf16_ca)
    text, lens = padded_text(files["forward"])
    with torch.no_grad():
        logits = model(model.encode_condition(text, lens), files["forward"]["x_BLC_wo_prefix"], SCHEDULE)
    assert logits.shape == (2, 521, 32)
    assert (logits - files["forward"][key]).abs().max() <= atol


def test_intermediates_and_null_text(files):
    model = build_infinity(files["weights"], ca_bf16_rounding=True)
    fwd = files["forward"]
    text, lens = padded_text(fwd)
    with torch.no_grad():
        normed = model.text_norm(text)
        cond = model.encode_condition(text, lens)
        ca_src = torch.cat([cond.text[b, :n] for b, n in enumerate(lens.tolist())])
        assert (torch.cat([normed[b, :n] for b, n in enumerate(lens.tolist())]) - fwd["inter.text_norm_out"]).abs().max() < 1e-5
        assert (cond.cond - fwd["inter.cond_BD"]).abs().max() < 1e-5
        assert (ca_src - fwd["inter.ca_kv_compact"]).abs().max() < 1e-5
        assert (model.shared_ada_lin(cond.cond).view(2, 1, 6, -1) - fwd["inter.cond_BD_or_gss"]).abs().max() < 1e-5
        # The learned null condition, cut to each prompt's length, is the official uncond text.
        null = model.null_text(lens, text.shape[1])
        logits = model(model.encode_condition(null, lens), fwd["x_BLC_wo_prefix"], SCHEDULE)
    assert (logits - fwd["logits_uncond_text"]).abs().max() <= 3e-3


def test_sampling_fp32_cross_attention_matches_exactly(files, golden):
    """D1 with fp32 cross-attention: per-scale logits <= 1e-4 and identical bits."""
    ref = load_file(golden / "sample_d1_fp32ca.safetensors")
    model = build_infinity(files["weights"])
    vae = build_vae(files["vae"])
    text, lens = padded_text(files["forward"])
    raw = []
    original = model.forward_scale
    model.forward_scale = lambda state, k, x=None, **kw: raw.append(original(state, k, x, **kw)) or raw[-1]
    result = sample(model, vae, text, lens, SCHEDULE, SamplingSettings(cfg=3.0, tau=0.5),
                    generator=torch.Generator().manual_seed(42))
    assert (torch.cat(raw, 1) - ref["head_out_raw"]).abs().max() <= 1e-4
    bits = torch.cat([b.reshape(2, -1, 16) for b in result.bits], 1)
    assert torch.equal(bits, ref["bits"])
    assert torch.allclose(result.summed_codes, ref["summed_codes"], atol=1e-6)


def test_sampling_official_defaults_top_p(files, golden):
    """D2: cfg 4, tau 0.5, top_k 900, top_p 0.97, bf16 cross-attention as official."""
    ref = load_file(golden / "sample_d2.safetensors")
    model = build_infinity(files["weights"], ca_bf16_rounding=True)
    vae = build_vae(files["vae"])
    text, lens = padded_text(files["forward"])
    result = sample(model, vae, text, lens, SCHEDULE, SamplingSettings(cfg=4.0, tau=0.5, top_k=900, top_p=0.97),
                    generator=torch.Generator().manual_seed(0))
    bits = torch.cat([b.reshape(2, -1, 16) for b in result.bits], 1)
    assert torch.equal(bits, ref["bits"])
    assert result.images.shape == (2, 256, 256, 3)
    assert 0 <= result.images.min() and result.images.max() <= 1
    expected = ((vae.decode(ref["summed_codes"]).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    assert (result.images - expected).abs().max() <= 1e-4


def test_top_p_filter_matches_official(golden):
    ref = load_file(golden / "sample_d2.safetensors")
    filtered = filter_logits(ref["logits_cfg"].view(2, -1, 2), top_k=900, top_p=0.97).view(2, 521, 32)
    expected = ref["logits_cfg_after_topk_topp"]
    assert torch.equal(torch.isinf(filtered), torch.isinf(expected))
    assert int(torch.isinf(filtered).sum()) == 12223
    finite = ~torch.isinf(expected)
    assert torch.equal(filtered[finite], expected[finite])


def test_per_scale_logits_on_recorded_bits(files, golden):
    """D1 (official bf16 cross-attention): feed the recorded bits back scale by scale; the
    per-scale logits match, and the KV-cached pass equals the teacher-forced pass."""
    ref = load_file(golden / "sample_d1.safetensors")
    model = build_infinity(files["weights"], ca_bf16_rounding=True)
    text, lens = padded_text(files["forward"])
    bits = golden_bits(ref["bits"])
    x = teacher_forcing_inputs(bits, SCHEDULE)
    assert torch.equal(x, ref["x_BLC_wo_prefix_generated"])
    both = torch.cat([text, model.null_text(lens, text.shape[1])])
    with torch.no_grad():
        cond = model.encode_condition(both, torch.cat([lens, lens]))
        state = model.start_sampling(cond, SCHEDULE)
        x2 = torch.cat([x, x])
        raw = [model.forward_scale(state, 0)]
        for k in range(1, len(SCHEDULE)):
            raw.append(model.forward_scale(state, k, x2[:, OFFSETS[k] - 1:OFFSETS[k + 1] - 1]))
        raw = torch.cat(raw, 1)
        teacher = model(cond, x2, SCHEDULE)
    assert (raw - ref["head_out_raw"]).abs().max() <= 3e-3
    assert (raw - teacher).abs().max() <= 3e-3
    cfg_logits = (3 * raw[:2] + (1 - 3) * raw[2:]) / 0.5
    assert (cfg_logits - ref["logits_cfg"]).abs().max() <= 1e-2


def test_kv_cache_equals_teacher_forced_fp32(files):
    model = build_infinity(files["weights"])
    text, lens = padded_text(files["forward"])
    x = files["forward"]["x_BLC_wo_prefix"]
    with torch.no_grad():
        cond = model.encode_condition(text, lens)
        teacher = model(cond, x, SCHEDULE)
        state = model.start_sampling(cond, SCHEDULE)
        cached = [model.forward_scale(state, 0)]
        for k in range(1, len(SCHEDULE)):
            cached.append(model.forward_scale(state, k, x[:, OFFSETS[k] - 1:OFFSETS[k + 1] - 1]))
    assert (torch.cat(cached, 1) - teacher).abs().max() < 2e-5


def test_svare_variant_level_embedding(files, golden):
    """S-VARE's copy adds the level embedding before every chunk: reproduced by a switch."""
    ref = load_file(golden / "svare_variant.safetensors")
    model = build_infinity(files["weights"], ca_bf16_rounding=True, lvl_embed_every_chunk=True)
    text, lens = padded_text(files["forward"])
    with torch.no_grad():
        logits = model(model.encode_condition(text, lens), files["forward"]["x_BLC_wo_prefix"], SCHEDULE)
    assert (logits - ref["forward_logits"]).abs().max() <= 3e-3
    assert (logits - files["forward"]["logits"]).abs().max() > 0.1   # it really is different


@pytest.mark.parametrize("preset, n_keys", [("infinity_2b", 694), ("infinity_8b", 862)])
def test_presets_match_official_key_lists(golden, preset, n_keys):
    keys = json.loads((golden / "keys" / f"keys_{preset.split('_')[1]}.json").read_text())["model"]
    cfg = preset_config(preset)
    with torch.device("meta"):
        model = Infinity(cfg)
    ours = {k: list(v.shape) for k, v in to_official_keys(model.state_dict(), cfg.blocks_per_chunk).items()}
    assert len(keys) == n_keys
    assert ours == keys
    # and detection from those shapes gives the preset back
    meta_sd = {k: torch.empty(v, device="meta") for k, v in keys.items()}
    detected = detect_infinity_config(meta_sd)
    assert preset_name(detected) == preset
    assert (detected.depth, detected.block_chunks, detected.mlp_hidden) == (cfg.depth, cfg.block_chunks, cfg.mlp_hidden)


def _bit_probability_error(logits, reference):
    """(max, mean) |p(bit = 1) - p_ref(bit = 1)| over every bit of every token."""
    def p1(x):
        return torch.softmax(x.double().view(*x.shape[:-1], -1, 2), -1)[..., 1]
    diff = (p1(logits) - p1(reference)).abs()
    return float(diff.max()), float(diff.mean())


def test_bf16_numerics_at_or_below_the_official_bf16_path(files):
    """A bf16 model keeps its residual stream, AdaLN and head in fp32, as the official code does
    (blocks cast to bf16, autocast): its bit probabilities are no further from fp32's."""
    fwd = files["forward"]
    text, lens = padded_text(fwd)
    with torch.no_grad():
        ours = build_infinity(files["weights"], dtype=torch.bfloat16, ca_bf16_rounding=True)
        assert ours.blocks[0].ffn.fc1.weight.dtype == torch.bfloat16
        assert ours.head.weight.dtype == ours.shared_ada_lin[1].weight.dtype == torch.float32
        seen = []
        ours.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        our_error = _bit_probability_error(
            ours(ours.encode_condition(text.bfloat16(), lens), fwd["x_BLC_wo_prefix"], SCHEDULE), fwd["logits"])
        assert seen == [torch.float32]                       # the residual stream between blocks
        # The official scheme, emulated: only the blocks rounded to bf16, the rest fp32, autocast.
        official = build_infinity(files["weights"], ca_bf16_rounding=True)
        for param in official.blocks.parameters():
            param.data = param.data.bfloat16().float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            official_error = _bit_probability_error(
                official(official.encode_condition(text, lens), fwd["x_BLC_wo_prefix"], SCHEDULE), fwd["logits"])
    # measured: ours max 0.0108 / mean 0.00105, official 0.0109 / 0.00110; with a bf16 residual
    # stream (before) 0.0212 / 0.00204. On a CPU with native bf16 dot products (avx512_bf16) the
    # kernels round differently: ours max 0.0115 / mean 0.00105, official 0.0105 / 0.00111. The
    # max is one bit out of every token's, so it gets 25% slack; the mean is held exactly, and
    # the old bf16 residual stream (twice the error on both) still fails both.
    assert our_error[1] <= official_error[1] and our_error[0] <= official_error[0] * 1.25
    assert our_error[1] < 0.0015
