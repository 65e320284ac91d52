"""Loading real-layout checkpoints into a pipeline: .pth, training checkpoints, sharded
safetensors, VAE wrappers, text-encoder folders, and clear errors for wrong combinations."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vare_core.checkpoints import CheckpointError, load_state_dict
from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
from vare_core.models.presets import build_infinity, to_official_keys
from vare_core.models.t5 import T5Config, T5Encoder
from vare_core.generation.pipeline import load_pipeline

SCHEDULE = [(1, 1), (2, 2), (4, 4)]


def tiny_official_state_dict(seed=0):
    torch.manual_seed(seed)
    cfg = InfinityConfig.tiny()
    model = init_weights(Infinity(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return to_official_keys(model.state_dict(), cfg.blocks_per_chunk)


def forward_logits(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(2, 5, model.cfg.text_channels, generator=g)
    x = torch.randn(2, 20, model.cfg.bits, generator=g)
    with torch.no_grad():
        return model(model.encode_condition(text, torch.tensor([5, 3])), x, SCHEDULE)


def write_sharded(state_dict, folder, shards=3):
    folder.mkdir()
    keys = sorted(state_dict)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state_dict[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_pth_training_checkpoint_and_sharded_give_same_outputs(tmp_path):
    official = tiny_official_state_dict()
    torch.save(official, tmp_path / "plain.pth")
    torch.save({"trainer": {"gpt_fsdp": official}, "args": {"note": "plain data only"}}, tmp_path / "train.pth")
    write_sharded(official, tmp_path / "sharded")
    reference = forward_logits(build_infinity(official))
    for path in (tmp_path / "plain.pth", tmp_path / "train.pth", tmp_path / "sharded",
                 tmp_path / "sharded" / "model.safetensors.index.json"):
        model = build_infinity(load_state_dict(path), source=str(path))
        assert torch.equal(forward_logits(model), reference), path


def test_golden_pth_loads_like_safetensors(golden):
    a = build_infinity(load_state_dict(golden / "tiny_transformer.pth"))
    b = build_infinity(load_state_dict(golden / "transformer.safetensors"))
    assert torch.equal(forward_logits(a), forward_logits(b))


class Payload:
    def __reduce__(self):
        return (os.system, ("touch should_never_exist",))


def test_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    official = tiny_official_state_dict()
    official["evil"] = Payload()
    torch.save(official, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth"):
        load_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "should_never_exist").exists()


def test_wrong_and_truncated_files_name_the_problem(tmp_path):
    official = tiny_official_state_dict()
    broken = dict(official)
    broken.pop("head.weight")
    broken["block_chunks.1.module.1.ffn.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"(?s)missing.*head\.weight.*wrong shapes.*ffn\.fc1"):
        build_infinity(broken, source="broken.pth")
    save_file({k: v.contiguous() for k, v in official.items()}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_state_dict(tmp_path / "cut.safetensors")
    vae_only = load_file(str(tmp_path / "t.safetensors"))
    vae_only.pop("pos_start")
    with pytest.raises(ValueError, match="vae_only.pth: not an Infinity transformer"):
        build_infinity(vae_only, source="vae_only.pth")


def make_text_encoder_folder(folder, golden, d_model):
    folder.mkdir()
    cfg = T5Config(d_model=d_model, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=32128)
    torch.manual_seed(0)
    t5 = T5Encoder(cfg)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    (folder / "tokenizer.json").write_bytes((golden / "t5" / "tokenizer.json").read_bytes())
    save_file({k: v.contiguous() for k, v in t5.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def test_pipeline_from_official_files(tmp_path, golden):
    """The golden tiny transformer + VAE (wrapped under 'vae' in a .pth) + a T5 folder."""
    torch.save({"vae": load_file(str(golden / "vae.safetensors"))}, tmp_path / "vae.pth")
    encoder = make_text_encoder_folder(tmp_path / "t5", golden, d_model=256)
    pipe = load_pipeline(golden / "tiny_transformer.pth", tmp_path / "vae.pth", encoder, device="cpu", dtype="fp32")
    assert pipe.preset == "custom" and not pipe.spatial_patchify
    # in fp32, cross-attention is rounded through bf16 as the official code does: its logits
    fwd = load_file(str(golden / "transformer_forward.safetensors"))
    lens = fwd["text.lens"].long()
    text = torch.zeros(len(lens), int(lens.max()), fwd["text.kv_compact"].shape[1])
    for b, (start, n) in enumerate(zip([0] + lens.cumsum(0).tolist()[:-1], lens.tolist())):
        text[b, :n] = fwd["text.kv_compact"][start:start + n]
    with torch.no_grad():
        logits = pipe.model(pipe.model.encode_condition(text, lens), fwd["x_BLC_wo_prefix"],
                            [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16)])
    assert pipe.model.cfg.ca_bf16_rounding
    assert (logits - fwd["logits"]).abs().max() <= 3e-3 < (logits - fwd["variant_fp32ca.logits"]).abs().max()
    result = pipe.generate(["a red circle", "a church"], seed=3, height=256, width=256)
    again = pipe.generate(["a red circle", "a church"], seed=3, height=256, width=256)
    assert result.images.shape == (2, 256, 256, 3)
    assert torch.equal(result.images, again.images)          # deterministic for a seed
    other = pipe.generate(["a red circle", "a church"], seed=4, height=256, width=256)
    assert not torch.equal(result.images, other.images)


def test_mismatched_text_encoder_is_refused(tmp_path, golden):
    encoder = make_text_encoder_folder(tmp_path / "t5", golden, d_model=32)
    with pytest.raises(ValueError, match="expects 256"):
        load_pipeline(golden / "tiny_transformer.pth", golden / "vae.safetensors", encoder, device="cpu")


def test_transformer_without_vae_gives_usage_message(golden):
    with pytest.raises(ValueError, match="--vae"):
        load_pipeline(golden / "tiny_transformer.pth")


def test_pipeline_rejects_bad_resolution_and_empty_prompt(golden, tmp_path):
    encoder = make_text_encoder_folder(tmp_path / "t5", golden, d_model=256)
    pipe = load_pipeline(golden / "transformer.safetensors", golden / "vae.safetensors", encoder, device="cpu")
    with pytest.raises(ValueError, match="1000"):
        pipe.generate(["a cat"], height=1000, width=1000)
    with pytest.raises(ValueError, match="empty"):
        pipe.generate(["  "])
