"""Adapter files, applying (new pipeline, shared tensors), stacking, merging, specs."""
import json

import pytest
import torch
from safetensors.torch import save_file

from vare_core.erasure.adapters import (FORMAT_VERSION, Adapter, AdapterError, apply_adapter, load_adapter,
                                        parse_adapter_spec, save_adapter, save_merged)
from vare_core.erasure.trainable import TrainableWeights, ca_ffn_parameter_names, check_lora_rank, lora_layer_names
from vare_core.models.lowrank import is_update_parameter, merged_state_dict
from vare_core.models.presets import build_infinity
from vare_core.checkpoints import load_state_dict
from vare_core.testing import tiny_pipeline

SCHEDULE = [(1, 1), (2, 2), (4, 4)]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipeline(seed=0)


def random_adapter(pipe, train="ca_ffn", seed=0, scale=0.05, **meta) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    model = pipe.model
    if train == "ca_ffn":
        tensors = {n: torch.randn(model.get_parameter(n).shape, generator=gen) * scale
                   for n in ca_ffn_parameter_names(model)}
    else:
        tensors = {}
        for layer in lora_layer_names(model, ("ca", "sa")):
            out_f, in_f = model.get_submodule(layer).weight.shape
            tensors[f"{layer}.lora_A"] = torch.randn(2, in_f, generator=gen) * scale
            tensors[f"{layer}.lora_B"] = torch.randn(out_f, 2, generator=gen) * scale
    metadata = {"format": FORMAT_VERSION, "base_fingerprint": pipe.fingerprint, "train": train,
                "method": "svare", "concepts": ["circle"], "lora_scale": 1.5, **meta}
    return Adapter(tensors=tensors, metadata=metadata)


def logits_of(pipe, prompts=("a red circle", "a blue square on a gray background")):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(prompts), 20, pipe.model.cfg.bits, generator=gen) * 0.25
    with torch.no_grad():
        states, lens = pipe.encode_prompts(list(prompts))
        return pipe.model(pipe.model.encode_condition(states, lens), x, SCHEDULE)


def snapshot(model):
    return {n: (t, t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model, snap):
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(snap)
    for name, (obj, value) in snap.items():
        assert now[name] is obj, f"{name} was replaced"
        assert torch.equal(now[name].detach(), value), f"{name} was modified"


@pytest.mark.parametrize("train", ["ca_ffn", "lora"])
def test_save_load_apply_round_trip(pipe, tmp_path, train):
    adapter = random_adapter(pipe, train)
    path = tmp_path / "a.safetensors"
    save_adapter(adapter, path)
    loaded = load_adapter(path)
    assert loaded.metadata["concepts"] == ["circle"] and loaded.metadata["format"] == FORMAT_VERSION
    assert loaded.source == str(path)
    assert set(loaded.tensors) == set(adapter.tensors)
    from_file = logits_of(apply_adapter(pipe, loaded))
    in_memory = logits_of(apply_adapter(pipe, adapter))
    assert torch.equal(from_file, in_memory)
    assert not torch.allclose(from_file, logits_of(pipe), atol=1e-4)


def test_apply_values_and_sharing(pipe):
    snap = snapshot(pipe.model)
    adapter = random_adapter(pipe)
    erased = apply_adapter(pipe, adapter, strength=0.5)
    assert_unchanged(pipe.model, snap)                       # base untouched
    assert erased.model is not pipe.model and erased.fingerprint == pipe.fingerprint
    assert erased.vae is pipe.vae and erased.text_encoder is pipe.text_encoder
    base_params, new_params = dict(pipe.model.named_parameters()), dict(erased.model.named_parameters())
    for name, param in new_params.items():
        if name in adapter.tensors:
            assert param is not base_params[name]
            assert torch.allclose(param, base_params[name] + 0.5 * adapter.tensors[name], atol=1e-7)
        else:
            assert param is base_params[name], f"{name} should be shared, not copied"
    base_buffers = dict(pipe.model.named_buffers())
    assert all(b is base_buffers[n] for n, b in erased.model.named_buffers())
    assert erased.applied_adapters[0][1] == 0.5


def test_lora_delta_is_scaled_b_times_a(pipe):
    adapter = random_adapter(pipe, "lora")
    erased = apply_adapter(pipe, adapter)
    layer = "blocks.1.sa.mat_qkv"
    expected = pipe.model.get_parameter(f"{layer}.weight") + 1.5 * (
        adapter.tensors[f"{layer}.lora_B"] @ adapter.tensors[f"{layer}.lora_A"])
    assert torch.allclose(merged_state_dict(erased.model)[f"{layer}.weight"], expected, atol=1e-6)
    # applied beside the weights: every base tensor is shared, nothing the size of a weight is new
    base = {id(p) for p in pipe.model.parameters()}
    new = [(n, p) for n, p in erased.model.named_parameters() if id(p) not in base]
    assert new and all(is_update_parameter(n) and not p.requires_grad for n, p in new)
    assert sum(p.numel() for _, p in new) == sum(t.numel() for t in adapter.tensors.values())
    # and computes what the merged weights compute
    merged = build_infinity(merged_state_dict(erased.model))
    x = torch.randn(1, 20, 16) * 0.25
    with torch.no_grad():
        states, lens = pipe.encode_prompts(["a red circle"])
        a = merged(merged.encode_condition(states, lens), x, SCHEDULE)
        b = erased.model(erased.model.encode_condition(states, lens), x, SCHEDULE)
    assert torch.allclose(a, b, atol=1e-5)


def test_strength_zero_is_the_base(pipe):
    base = logits_of(pipe)
    assert torch.equal(logits_of(apply_adapter(pipe, random_adapter(pipe), 0.0)), base)
    assert torch.equal(logits_of(apply_adapter(pipe, random_adapter(pipe, "lora"), 0.0)), base)


def test_stacking_two_adapters(pipe):
    first, second = random_adapter(pipe, seed=1), random_adapter(pipe, "lora", seed=2)
    stacked = apply_adapter(apply_adapter(pipe, first), second, strength=-1.0)
    name = "blocks.0.ca.mat_q.weight"
    expected = (pipe.model.get_parameter(name) + first.tensors[name]
                - 1.5 * second.tensors["blocks.0.ca.mat_q.lora_B"] @ second.tensors["blocks.0.ca.mat_q.lora_A"])
    assert torch.allclose(merged_state_dict(stacked.model)[name], expected, atol=1e-6)
    assert len(stacked.applied_adapters) == 2
    # applying in the other order gives the same weights
    other = apply_adapter(apply_adapter(pipe, second, strength=-1.0), first)
    assert torch.allclose(logits_of(stacked), logits_of(other), atol=1e-5)


def test_mismatched_fingerprint_refused(pipe):
    adapter = random_adapter(pipe, base_fingerprint="0123456789abcdef")
    with pytest.raises(AdapterError) as err:
        apply_adapter(pipe, adapter)
    assert "0123456789abcdef" in str(err.value) and pipe.fingerprint in str(err.value)
    assert apply_adapter(pipe, adapter, force=True).model is not pipe.model
    # force still checks shapes: an adapter for a wider model cannot be applied
    wide = tiny_pipeline(seed=0, embed_dim=96)
    with pytest.raises(AdapterError, match="shape"):
        apply_adapter(pipe, random_adapter(wide), force=True)


def test_strength_out_of_range(pipe):
    with pytest.raises(AdapterError, match="outside"):
        apply_adapter(pipe, random_adapter(pipe), strength=3.0)


def test_load_errors_name_the_file(pipe, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(AdapterError, match="plain.safetensors"):
        load_adapter(plain)
    bad_json = tmp_path / "bad.safetensors"
    save_file({"blocks.0.ffn.fc1.bias": torch.zeros(256)}, str(bad_json),
              metadata={"format": "not json {"})
    with pytest.raises(AdapterError, match="bad.safetensors.*not JSON"):
        load_adapter(bad_json)
    adapter = random_adapter(pipe, "lora")
    del adapter.tensors["blocks.0.ca.proj.lora_B"]
    with pytest.raises(AdapterError, match="only one of"):
        save_adapter(adapter, tmp_path / "half.safetensors")
    good = tmp_path / "good.safetensors"
    save_adapter(random_adapter(pipe), good)
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="good.safetensors"):
        load_adapter(good)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_adapter(tmp_path / "missing.safetensors")


def test_metadata_is_json_data_only(pipe, tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(random_adapter(pipe, hyperparameters={"lr": 1e-4, "betas": [0.9, 0.97]},
                                note="__import__('os').system('echo hi')"), path)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    assert json.loads(raw["hyperparameters"]) == {"lr": 1e-4, "betas": [0.9, 0.97]}
    loaded = load_adapter(path)
    assert loaded.metadata["note"] == "__import__('os').system('echo hi')"   # a string, never run


def test_lora_rank_checks(pipe):
    check_lora_rank(pipe.model, 64, ("ca", "ffn"))                  # width 64: allowed
    with pytest.raises(ValueError, match="rank 65 .*blocks.0.ca.mat_q"):
        check_lora_rank(pipe.model, 65, ("ca", "ffn"))
    with pytest.raises(ValueError, match="lora_targets"):
        lora_layer_names(pipe.model, ("attn",))


def test_kv_target_is_the_text_side_of_cross_attention(pipe):
    depth = len(pipe.model.blocks)
    assert lora_layer_names(pipe.model, ("kv",)) == [f"blocks.{i}.ca.mat_kv" for i in range(depth)]
    both = lora_layer_names(pipe.model, ("ca", "kv"))          # "ca" already holds mat_kv: no duplicate
    assert both == lora_layer_names(pipe.model, ("ca",)) and len(both) == len(set(both))


@pytest.mark.parametrize("train", ["ca_ffn", "lora"])
def test_trainable_weights_restore_the_model(pipe, train):
    snap = snapshot(pipe.model)
    weights = TrainableWeights(pipe.model, train, rank=2, generator=torch.Generator().manual_seed(0))
    with weights.installed():
        names = dict(pipe.model.named_parameters())
        trained = [p for _, p in weights.named_parameters()]
        assert all(p.dtype == torch.float32 and p.requires_grad for p in trained)
        with torch.no_grad():
            for p in trained:
                p.add_(0.01)
        if train == "ca_ffn":
            assert names["blocks.0.ffn.fc1.weight"] is weights.params["blocks.0.ffn.fc1.weight"]
        changed = logits_of(pipe)
    assert_unchanged(pipe.model, snap)
    assert type(pipe.model.blocks[0].ca.mat_q).__name__ == "Linear"
    assert not torch.allclose(changed, logits_of(pipe), atol=1e-5)
    exported = weights.export()
    # the exported adapter reproduces the installed weights
    adapter = Adapter(exported, {"format": FORMAT_VERSION, "base_fingerprint": pipe.fingerprint,
                                 "train": train, "lora_scale": 1.0})
    assert torch.allclose(logits_of(apply_adapter(pipe, adapter)), changed, atol=1e-5)


@pytest.mark.parametrize("train", ["ca_ffn", "lora"])
def test_save_merged_official_layout(pipe, tmp_path, train):
    erased = apply_adapter(pipe, random_adapter(pipe, train))
    path = tmp_path / "merged.safetensors"
    save_merged(erased, path)
    weights = load_state_dict(path)
    assert "block_chunks.0.module.1.ca.mat_q.weight" in weights
    assert not any(k.startswith("blocks.") or "lora" in k for k in weights)
    rebuilt = build_infinity(weights)
    x = torch.randn(1, 20, 16) * 0.25
    with torch.no_grad():
        states, lens = pipe.encode_prompts(["a red circle"])
        a = rebuilt(rebuilt.encode_condition(states, lens), x, SCHEDULE)
        b = erased.model(erased.model.encode_condition(states, lens), x, SCHEDULE)
    assert torch.allclose(a, b, atol=1e-5) if train == "lora" else torch.equal(a, b)


@pytest.mark.parametrize("spec, expected", [
    ("erase.safetensors", ("erase.safetensors", 1.0)),
    ("erase.safetensors:0.8", ("erase.safetensors", 0.8)),
    ("dir/erase.safetensors:-1", ("dir/erase.safetensors", -1.0)),
    ("C:\\models\\erase.safetensors", ("C:\\models\\erase.safetensors", 1.0)),
    ("C:\\models\\erase.safetensors:0.5", ("C:\\models\\erase.safetensors", 0.5)),
    ("C:/models/erase.safetensors", ("C:/models/erase.safetensors", 1.0)),
])
def test_parse_adapter_spec(spec, expected):
    assert parse_adapter_spec(spec) == expected


@pytest.mark.parametrize("spec, word", [("erase.safetensors:abc", "not a number"),
                                        ("erase.safetensors:5", "outside"),
                                        ("erase.safetensors:nan", "finite"),
                                        (":0.5", "no file"), ("", "empty")])
def test_parse_adapter_spec_errors(spec, word):
    with pytest.raises(AdapterError, match=word) as err:
        parse_adapter_spec(spec)
    assert repr(spec) in str(err.value) or not spec


class _OpShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every new tensor an op returns (views of its inputs left out)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages:
                self.shapes.add(tuple(t.shape))
        return out


def test_lora_forms_no_copy_of_the_weights(pipe):
    """Neither a LoRA training step (forward + backward) nor a forward with an applied LoRA
    makes a tensor the shape of a targeted weight: the update is computed beside it."""
    model = pipe.model
    layers = lora_layer_names(model, ("ca", "ffn", "sa"))
    weight_shapes = {tuple(model.get_submodule(layer).weight.shape) for layer in layers}
    x = torch.randn(2, 20, 16) * 0.25
    states, lens = pipe.encode_prompts(["a red circle", "a blue square"])
    weights = TrainableWeights(model, "lora", rank=2, targets=("ca", "ffn", "sa"),
                               generator=torch.Generator().manual_seed(0))
    with weights.installed(), _OpShapes() as seen:
        model(model.encode_condition(states, lens), x, SCHEDULE).square().mean().backward()
    assert all(p.grad is not None for _, p in weights.named_parameters())
    assert not seen.shapes & weight_shapes
    erased = apply_adapter(pipe, random_adapter(pipe, "lora"))
    with torch.no_grad(), _OpShapes() as seen:
        erased.model(erased.model.encode_condition(states, lens), x, SCHEDULE)
    assert not seen.shapes & weight_shapes
