"""T5 text encoder: golden parity (hidden states, token ids), folder loaders, half precision, errors."""
import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from vare_core.models.t5 import (T5Config, T5Encoder, T5WeightsError, load_t5_encoder, load_t5_state_dict,
                                 relative_position_bucket)
from vare_core.models.text_encoder import TextEncoder, build_word_level_tokenizer


@pytest.fixture(scope="module")
def t5_golden(golden):
    folder = golden / "t5"
    return dict(folder=folder,
                config=T5Config.from_hf_config(json.loads((folder / "tiny_t5_config.json").read_text())),
                weights=load_file(folder / "tiny_t5_encoder.safetensors"),
                io=load_file(folder / "tiny_t5_io.safetensors"),
                prompts=json.loads((folder / "tokenized_prompts.json").read_text()))


@pytest.fixture(scope="module")
def golden_encoder(t5_golden):
    folder = t5_golden["folder"]
    return TextEncoder.from_files(folder / "tiny_t5_encoder.safetensors", folder / "tokenizer.json",
                                  t5_golden["config"])


def make_folder(root, t5_golden, layout, weights=None):
    """A Hugging Face style folder: config.json + tokenizer.json + weights in `layout`."""
    folder = root / layout
    folder.mkdir()
    shutil.copy(t5_golden["folder"] / "tiny_t5_config.json", folder / "config.json")
    shutil.copy(t5_golden["folder"] / "tokenizer.json", folder / "tokenizer.json")
    weights = dict(t5_golden["weights"] if weights is None else weights)
    if layout == "safetensors":
        save_file(weights, folder / "model.safetensors")
    elif layout == "bin":
        torch.save(weights, folder / "pytorch_model.bin")
    elif layout in ("sharded", "sharded_bin"):
        keys = sorted(weights)
        ext, stem = (".safetensors", "model") if layout == "sharded" else (".bin", "pytorch_model")
        shards = {f"{stem}-00001-of-00002{ext}": keys[::2], f"{stem}-00002-of-00002{ext}": keys[1::2]}
        for name, shard_keys in shards.items():
            part = {k: weights[k] for k in shard_keys}
            save_file(part, folder / name) if ext == ".safetensors" else torch.save(part, folder / name)
        index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (folder / f"{stem}{ext}.index.json").write_text(json.dumps(index))
    return folder


def assert_matches_golden(states, lens, t5_golden, atol=1e-5):
    expected = t5_golden["io"]["last_hidden_state"]
    assert lens.tolist() == t5_golden["io"]["attention_mask"].sum(1).tolist()
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(states[b, :n].float(), expected[b, :n], atol=atol, rtol=0)


# ----------------------------------------------------------------------------- config + numerics

def test_config_from_hf_and_presets(t5_golden):
    cfg = t5_golden["config"]
    assert (cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads, cfg.vocab_size) == (32, 8, 64, 2, 4, 32128)
    assert cfg.gated and cfg.activation == "gelu_tanh" and cfg.layer_norm_epsilon == 1e-6
    assert T5Config.from_hf_config(cfg.to_hf_config()) == cfg
    relu = T5Config(d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4, vocab_size=10, gated=False, activation="relu")
    assert T5Config.from_hf_config(relu.to_hf_config()) == relu
    xl = T5Config.flan_t5_xl()
    assert (xl.d_model, xl.d_kv, xl.d_ff, xl.num_layers, xl.num_heads) == (2048, 64, 5120, 24, 32)
    with pytest.raises(ValueError, match="d_ff"):
        T5Config.from_hf_config({"d_model": 8, "d_kv": 2, "num_layers": 1, "num_heads": 4, "vocab_size": 10})
    with pytest.raises(ValueError, match="umt5"):
        T5Config.from_hf_config({**cfg.to_hf_config(), "model_type": "umt5"})


def test_relative_position_buckets():
    offsets = torch.tensor([0, -1, 1, -7, 7, -9, 9, -20, -50, -127, -1000, 1000])
    buckets = relative_position_bucket(offsets, num_buckets=32, max_distance=128)
    assert buckets.tolist() == [0, 1, 17, 7, 23, 8, 24, 10, 13, 15, 15, 31]


def test_hidden_states_match_golden(t5_golden):
    model = load_t5_encoder(t5_golden["folder"] / "tiny_t5_encoder.safetensors", t5_golden["config"])
    io = t5_golden["io"]
    states = model(io["input_ids"], io["attention_mask"])
    assert states.shape == (4, 32, 32)
    assert_matches_golden(states, io["attention_mask"].sum(1), t5_golden)


def test_tokenize_matches_golden_ids(golden_encoder, t5_golden):
    expected = t5_golden["prompts"]["ids_unpadded"]
    ids, mask = golden_encoder.tokenize(t5_golden["prompts"]["prompts"])
    assert ids.dtype == torch.int64 and ids.shape == (4, max(map(len, expected)))
    for b, row in enumerate(expected):
        assert ids[b, : len(row)].tolist() == row
        assert (ids[b, len(row):] == 0).all() and mask[b].tolist() == [1] * len(row) + [0] * (ids.shape[1] - len(row))


def test_encode_matches_golden_and_zeroes_padding(golden_encoder, t5_golden):
    states, lens = golden_encoder.encode(t5_golden["prompts"]["prompts"])
    assert states.shape == (4, 25, 32) and lens.dtype == torch.int64
    assert_matches_golden(states, lens, t5_golden)
    for b, n in enumerate(lens.tolist()):
        assert (states[b, n:] == 0).all()


def test_prompt_alone_equals_prompt_in_batch(golden_encoder, t5_golden):
    prompts = t5_golden["prompts"]["prompts"]
    batch, lens = golden_encoder.encode(prompts)
    for b, prompt in enumerate(prompts):
        alone, n = golden_encoder.encode([prompt])
        torch.testing.assert_close(alone[0, : n[0]], batch[b, : lens[b]], atol=1e-5, rtol=0)


def test_long_prompt_is_cut_with_eos_last(t5_golden, golden_encoder):
    short = TextEncoder(Tokenizer.from_file(str(t5_golden["folder"] / "tokenizer.json")), golden_encoder.model,
                        max_length=8)
    prompts = t5_golden["prompts"]["prompts"]
    ids, mask = short.tokenize(prompts[:3])
    assert ids.shape == (3, 8)
    assert ids[1].tolist() == t5_golden["prompts"]["ids_unpadded"][1][:7] + [1]
    states, lens = short.encode(prompts[:3])
    assert lens.tolist() == [8, 8, 1] and torch.isfinite(states).all()


# ----------------------------------------------------------------------------- loaders

def test_folder_layouts_give_identical_outputs(tmp_path, t5_golden):
    prompts = t5_golden["prompts"]["prompts"]
    outputs = {}
    for layout in ("safetensors", "sharded", "bin", "sharded_bin"):
        encoder = TextEncoder.from_folder(make_folder(tmp_path, t5_golden, layout))
        outputs[layout] = encoder.encode(prompts)
    assert_matches_golden(*outputs["safetensors"], t5_golden)
    for states, lens in outputs.values():
        assert torch.equal(states, outputs["safetensors"][0]) and torch.equal(lens, outputs["safetensors"][1])


def test_full_checkpoint_embed_tokens_name_and_decoder_keys(tmp_path, t5_golden):
    weights = dict(t5_golden["weights"])
    weights["encoder.embed_tokens.weight"] = weights.pop("shared.weight")
    weights["decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.randn(32, 32)
    weights["decoder.final_layer_norm.weight"] = torch.randn(32)
    weights["lm_head.weight"] = torch.randn(32128, 32)
    folder = make_folder(tmp_path, t5_golden, "safetensors", weights)
    state = load_t5_state_dict(folder)
    assert set(state) == set(t5_golden["weights"])
    assert torch.equal(state["shared.weight"], t5_golden["weights"]["shared.weight"])
    assert_matches_golden(*TextEncoder.from_folder(folder).encode(t5_golden["prompts"]["prompts"]), t5_golden)


def test_weights_arrive_in_target_dtype_frozen(tmp_path, t5_golden):
    encoder = TextEncoder.from_folder(make_folder(tmp_path, t5_golden, "bin"), dtype=torch.float16)
    assert encoder.dtype == torch.float16 and encoder.device == torch.device("cpu")
    for name, param in encoder.model.named_parameters():
        assert param.dtype == torch.float16 and not param.is_meta and not param.requires_grad, name
    state = load_t5_state_dict(t5_golden["folder"] / "tiny_t5_encoder.safetensors", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in state.values())


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 1e-2), (torch.bfloat16, 8e-2)])
def test_half_precision_close_to_fp32(t5_golden, golden_encoder, dtype, atol):
    folder = t5_golden["folder"]
    half = TextEncoder.from_files(folder / "tiny_t5_encoder.safetensors", folder / "tokenizer.json",
                                  t5_golden["config"], dtype=dtype)
    states, lens = half.encode(t5_golden["prompts"]["prompts"])
    assert states.dtype == dtype and torch.isfinite(states).all()
    reference, _ = golden_encoder.encode(t5_golden["prompts"]["prompts"])
    torch.testing.assert_close(states.float(), reference, atol=atol, rtol=0)


def test_fp16_survives_ffn_outputs_beyond_fp16_range(t5_golden):
    """Scale the FFN weights so its output exceeds 65504: fp16 must stay finite and near fp32."""
    weights = {k: v * (40.0 if "DenseReluDense.wi" in k else 400.0 if "DenseReluDense.wo" in k else 1.0)
               for k, v in t5_golden["weights"].items()}
    reference = T5Encoder(t5_golden["config"])
    reference.load_state_dict(weights)
    ffn_peak = []
    reference.encoder.block[0].layer[1].register_forward_hook(lambda m, i, out: ffn_peak.append(out.abs().max()))
    half = T5Encoder(t5_golden["config"])
    half.load_state_dict(weights)
    half.half()
    io = t5_golden["io"]
    expected = reference(io["input_ids"], io["attention_mask"])
    assert ffn_peak[0] > 65504  # a plain fp16 FFN would overflow to inf here
    states = half(io["input_ids"], io["attention_mask"])
    mask = io["attention_mask"].bool()
    assert torch.isfinite(states).all()
    torch.testing.assert_close(states.float()[mask], expected[mask], atol=3e-2, rtol=0)


def test_word_level_tokenizer_ids():
    tokenizer = build_word_level_tokenizer(["a", "red", "circle", "on", "white", "background", "Red", "!"])
    assert tokenizer.token_to_id("<pad>") == 0 and tokenizer.token_to_id("</s>") == 1
    assert tokenizer.encode("A red Circle, on white!").ids == [3, 4, 5, 2, 6, 7, 9, 1]
    with pytest.raises(ValueError, match="red car"):
        build_word_level_tokenizer(["red car"])


def test_word_level_folder_with_tiny_random_t5(tmp_path):
    words = ["a", "red", "blue", "circle", "square", "on", "white", "background"]
    config = T5Config(d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=3, vocab_size=12)
    build_word_level_tokenizer(words).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_config()))
    model = T5Encoder(config)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    encoder = TextEncoder.from_folder(tmp_path)
    states, lens = encoder.encode(["a red circle", "A blue square on a white background!"])
    assert states.shape == (2, 9, 16) and lens.tolist() == [4, 9]
    assert torch.isfinite(states).all() and (states[0, 4:] == 0).all()
    ids, mask = encoder.tokenize(["a red circle"])
    assert ids.tolist() == [[3, 4, 6, 1]]
    torch.testing.assert_close(states[0, :4], model(ids, mask)[0], atol=1e-6, rtol=0)


def test_random_init_trains_and_offloads(golden_encoder, t5_golden):
    config = T5Config(d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2, vocab_size=12)
    model = T5Encoder(config)
    ids = torch.tensor([[3, 4, 1, 0]])
    model(ids, (ids != 0).long()).square().mean().backward()
    assert model.shared.weight.grad is not None and model.encoder.block[1].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    encoder = TextEncoder(golden_encoder.tokenizer, load_t5_encoder(
        t5_golden["folder"] / "tiny_t5_encoder.safetensors", t5_golden["config"]))
    assert encoder.to(dtype=torch.bfloat16) is encoder and encoder.dtype == torch.bfloat16
    states, _ = encoder.encode(["a red circle"])
    assert states.dtype == torch.bfloat16 and torch.isfinite(states).all()


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("change, needle", [
    ("missing", "missing keys: encoder.final_layer_norm.weight"),
    ("extra", "unexpected keys: encoder.block.2.layer.0.layer_norm.weight (in model.safetensors)"),
    ("shape", "encoder.block.1.layer.0.SelfAttention.q.weight: (16, 32) in model.safetensors, config needs (32, 32)"),
])
def test_key_mismatch_errors_name_file_and_keys(tmp_path, t5_golden, change, needle):
    weights = dict(t5_golden["weights"])
    if change == "missing":
        del weights["encoder.final_layer_norm.weight"]
    elif change == "extra":
        weights["encoder.block.2.layer.0.layer_norm.weight"] = torch.ones(32)
    else:
        weights["encoder.block.1.layer.0.SelfAttention.q.weight"] = torch.zeros(16, 32)
    folder = make_folder(tmp_path, t5_golden, "safetensors", weights)
    with pytest.raises(T5WeightsError) as info:
        TextEncoder.from_folder(folder)
    assert needle in str(info.value) and str(folder) in str(info.value)


def test_pickle_with_python_objects_is_refused(tmp_path, t5_golden):
    folder = make_folder(tmp_path, t5_golden, "bin", {**t5_golden["weights"], "args": argparse.Namespace(lr=1)})
    with pytest.raises(T5WeightsError, match=r"pytorch_model\.bin: refused.*argparse\.Namespace"):
        TextEncoder.from_folder(folder)


def test_bad_paths_and_inputs(tmp_path, t5_golden, golden_encoder):
    (tmp_path / "weights.ckpt").write_bytes(b"\0" * 16)
    with pytest.raises(T5WeightsError, match="refused"):
        load_t5_state_dict(tmp_path / "weights.ckpt")
    with pytest.raises(T5WeightsError, match="no T5 weights found"):
        load_t5_state_dict(tmp_path)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(T5WeightsError, match="broken.safetensors"):
        load_t5_state_dict(tmp_path / "broken.safetensors")
    folder = make_folder(tmp_path, t5_golden, "safetensors")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        TextEncoder.from_folder(folder)
    for bad in ("a red circle", [], ["ok", 3]):
        with pytest.raises(ValueError, match="prompts"):
            golden_encoder.tokenize(bad)
