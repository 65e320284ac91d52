"""vare_core.models.presets: named configs (preset_config / preset_name), the config read back
from a checkpoint's tensor shapes (detect_infinity_config), the official <-> our key layout, and
build_infinity's strict load (dtype policy, errors that name the bad keys). Small configs only;
the full-size key lists are checked against the official ones in test_infinity_golden.py."""
import pytest
import torch

from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
from vare_core.models.presets import (PRESETS, build_infinity, detect_infinity_config,
                                      from_official_keys, preset_config, preset_name, to_official_keys)

SMALL_CONFIGS = [
    InfinityConfig(depth=2, embed_dim=64, num_heads=2, bits=16, text_channels=32, text_maxlen=8,
                   block_chunks=1, num_levels=3),
    InfinityConfig(depth=4, embed_dim=64, num_heads=4, bits=8, text_channels=48, text_maxlen=5,
                   block_chunks=2, mlp_ratio=8.0, num_levels=6),
    InfinityConfig(depth=6, embed_dim=96, num_heads=3, bits=12, text_channels=16, text_maxlen=11,
                   block_chunks=3, mlp_ratio=2.6667, num_levels=4),
]
SIZE_FIELDS = ("depth", "embed_dim", "num_heads", "bits", "text_channels", "text_maxlen",
               "num_levels", "mlp_hidden")


def sizes(cfg: InfinityConfig) -> tuple:
    return tuple(getattr(cfg, name) for name in SIZE_FIELDS)


def meta_state_dict(cfg: InfinityConfig) -> dict:
    with torch.device("meta"):
        return Infinity(cfg).state_dict()


@pytest.fixture(scope="module")
def small_model() -> Infinity:
    torch.manual_seed(0)
    model = init_weights(Infinity(SMALL_CONFIGS[1]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


# ----------------------------------------------------------------------------- named presets

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_named_back_by_preset_name(name):
    cfg = preset_config(name)
    assert isinstance(cfg, InfinityConfig)
    assert preset_name(cfg) == name
    assert cfg.depth % cfg.block_chunks == 0 and cfg.embed_dim % cfg.num_heads == 0


def test_preset_config_returns_a_fresh_config_each_time():
    a = preset_config("infinity_2b")
    a.depth = 3
    assert preset_config("infinity_2b").depth != 3


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'infinity_20b'.*infinity_2b.*infinity_8b"):
        preset_config("infinity_20b")


def test_other_sizes_are_custom():
    assert preset_name(SMALL_CONFIGS[0]) == "custom"
    two_b = preset_config("infinity_2b")
    two_b.bits = 16
    assert preset_name(two_b) == "custom"


# ----------------------------------------------------------------------------- key layouts

def test_official_layout_round_trips_a_real_state_dict():
    cfg = SMALL_CONFIGS[2]                                   # 6 blocks in 3 chunks of 2
    ours = meta_state_dict(cfg)
    official = to_official_keys(ours, cfg.blocks_per_chunk)
    assert not any(k.startswith("blocks.") for k in official)
    assert "block_chunks.2.module.1.ffn.fc1.weight" in official        # the last block
    assert "block_chunks.1.module.0.sa.mat_qkv.weight" in official     # block 2
    assert len(official) == len(ours)
    back = from_official_keys(official)
    assert list(back) == list(ours)
    assert all(back[k] is ours[k] for k in ours)                        # values untouched


# ----------------------------------------------------------------------------- detection

@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=lambda c: f"d{c.depth}w{c.embed_dim}c{c.block_chunks}")
def test_detection_recovers_the_config_from_official_keys(cfg):
    official = to_official_keys(meta_state_dict(cfg), cfg.blocks_per_chunk)
    detected = detect_infinity_config(official)
    assert sizes(detected) == sizes(cfg)
    assert detected.block_chunks == cfg.block_chunks


@pytest.mark.parametrize("cfg", SMALL_CONFIGS, ids=lambda c: f"d{c.depth}w{c.embed_dim}c{c.block_chunks}")
def test_detection_recovers_the_config_from_our_keys(cfg):
    detected = detect_infinity_config(meta_state_dict(cfg))
    assert sizes(detected) == sizes(cfg)
    assert detected.block_chunks == 1                                     # not in our key names
    assert detect_infinity_config(meta_state_dict(cfg), block_chunks=cfg.block_chunks).block_chunks == cfg.block_chunks


def test_detection_applies_overrides():
    cfg = SMALL_CONFIGS[0]
    detected = detect_infinity_config(meta_state_dict(cfg), ca_bf16_rounding=True, cond_drop_rate=0.0,
                                      lvl_embed_every_chunk=True)
    assert detected.ca_bf16_rounding and detected.lvl_embed_every_chunk and detected.cond_drop_rate == 0.0
    assert sizes(detected) == sizes(cfg)


@pytest.mark.parametrize("key", ["pos_start", "word_embed.weight", "text_norm.weight", "cfg_uncond",
                                 "lvl_embed.weight"])
def test_detection_names_a_missing_required_tensor(key):
    state = meta_state_dict(SMALL_CONFIGS[0])
    del state[key]
    with pytest.raises(ValueError, match=rf"not an Infinity transformer checkpoint: missing \['{key}'\]"):
        detect_infinity_config(state)


def test_detection_refuses_a_checkpoint_without_blocks():
    state = {k: v for k, v in meta_state_dict(SMALL_CONFIGS[0]).items() if not k.startswith("blocks.")}
    with pytest.raises(ValueError, match="no transformer blocks"):
        detect_infinity_config(state)


def test_detection_refuses_an_ffn_width_no_config_can_express():
    state = meta_state_dict(SMALL_CONFIGS[0])
    state["blocks.0.ffn.fc1.weight"] = torch.empty(300, 64, device="meta")    # not a multiple of 256
    with pytest.raises(ValueError, match="FFN width 300"):
        detect_infinity_config(state)


# ----------------------------------------------------------------------------- build_infinity

@pytest.mark.parametrize("layout", ["official", "ours"])
def test_build_infinity_loads_every_tensor_exactly(small_model, layout):
    state = small_model.state_dict()
    source = to_official_keys(state, small_model.cfg.blocks_per_chunk) if layout == "official" else state
    rebuilt = build_infinity(source)
    assert not rebuilt.training
    assert sizes(rebuilt.cfg) == sizes(small_model.cfg)
    rebuilt_state = rebuilt.state_dict()
    assert rebuilt_state.keys() == state.keys()
    assert all(torch.equal(rebuilt_state[k], state[k]) for k in state)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 4, small_model.cfg.text_channels, generator=g)
    x = torch.randn(1, 4, small_model.cfg.bits, generator=g)
    with torch.no_grad():
        a = small_model(small_model.encode_condition(text, torch.tensor([4])), x, [(1, 1), (2, 2)])
        b = rebuilt(rebuilt.encode_condition(text, torch.tensor([4])), x, [(1, 1), (2, 2)])
    assert torch.equal(a, b)


def test_build_infinity_casts_to_the_dtype_but_keeps_fp32_parameters(small_model):
    model = build_infinity(small_model.state_dict(), dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        expected = torch.float32 if name.startswith(Infinity.FP32_PARAMETERS) else torch.bfloat16
        assert tensor.dtype == expected, name
    assert model.head.weight.dtype == torch.float32 and model.blocks[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    kept = build_infinity(small_model.state_dict())               # dtype None: the file's dtypes
    assert all(t.dtype == torch.float32 for t in kept.state_dict().values())


def test_build_infinity_names_a_single_missing_key_and_the_source(small_model):
    state = dict(small_model.state_dict())
    del state["blocks.3.ca.mat_kv.weight"]
    with pytest.raises(ValueError) as err:
        build_infinity(state, source="damaged.pth")
    message = str(err.value)
    assert message.startswith("damaged.pth does not match")
    assert "missing ['blocks.3.ca.mat_kv.weight'] (1)" in message
    assert "unexpected [] (0)" in message


def test_build_infinity_names_unexpected_keys_and_wrong_shapes(small_model):
    state = dict(small_model.state_dict())
    state["blocks.0.extra.weight"] = torch.zeros(2)
    state["head.bias"] = torch.zeros(5)
    with pytest.raises(ValueError) as err:
        build_infinity(state, source="mixed.safetensors")
    message = str(err.value)
    assert "unexpected ['blocks.0.extra.weight'] (1)" in message
    assert f"head.bias: file (5,) vs model ({2 * small_model.cfg.bits},)" in message


def test_build_infinity_lists_at_most_five_missing_keys(small_model):
    state = {k: v for k, v in small_model.state_dict().items() if not k.startswith("blocks.1.")}
    state.update({k: v for k, v in small_model.state_dict().items() if k.startswith("blocks.1.sa.scale")})
    with pytest.raises(ValueError, match=r"missing \[.*\]\.\.\. \(\d+\)") as err:
        build_infinity(state, source="cut.pth")
    assert str(err.value).count("blocks.1.") == 5


def test_build_infinity_prefixes_detection_errors_with_the_source():
    state = meta_state_dict(SMALL_CONFIGS[0])
    del state["cfg_uncond"]
    with pytest.raises(ValueError, match=r"^model\.pth: not an Infinity transformer checkpoint"):
        build_infinity(state, source="model.pth")


def test_build_infinity_passes_overrides_to_the_model(small_model):
    model = build_infinity(small_model.state_dict(), ca_bf16_rounding=True)
    assert model.cfg.ca_bf16_rounding and all(block.ca.bf16_rounding for block in model.blocks)
