"""Tests for vare_core.checkpoints: safe loading, clear errors, atomic saving, fingerprints."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from vare_core import checkpoints
from vare_core.checkpoints import (CheckpointError, check_finite, file_fingerprint, load_state_dict,
                                   save_safetensors_atomic)


def tiny_state_dict():
    generator = torch.Generator().manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(6, 4, generator=generator),
        "blocks.0.bias": torch.randn(6, generator=generator),
        "head.weight": torch.randn(3, 6, generator=generator).to(torch.bfloat16),
        "mask": torch.arange(8, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    }


def assert_same(actual, expected):
    assert list(sorted(actual)) == list(sorted(expected))
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def error_text(path, **kwargs):
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path, **kwargs)
    assert str(path) in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------- formats

@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_torch_files_load(tmp_path, suffix):
    weights = tiny_state_dict()
    torch.save(weights, tmp_path / f"w{suffix}")
    assert_same(load_state_dict(tmp_path / f"w{suffix}"), weights)
    assert_same(load_state_dict(str(tmp_path / f"w{suffix}"), mmap=False), weights)


def test_legacy_torch_file_falls_back_to_no_mmap(tmp_path):
    weights = tiny_state_dict()
    torch.save(weights, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert_same(load_state_dict(tmp_path / "old.pth", mmap=True), weights)


def test_safetensors_and_renamed_files_load(tmp_path):
    weights = tiny_state_dict()
    save_file(weights, tmp_path / "w.safetensors")
    assert_same(load_state_dict(tmp_path / "w.safetensors"), weights)
    # The format is sniffed from the bytes, not the suffix.
    (tmp_path / "w.safetensors").rename(tmp_path / "renamed.pth")
    assert_same(load_state_dict(tmp_path / "renamed.pth"), weights)


def test_golden_pth_and_safetensors_are_identical(golden):
    from_pth = load_state_dict(golden / "tiny_transformer.pth")
    from_safetensors = load_state_dict(golden / "transformer.safetensors")
    assert len(from_pth) == 106
    assert_same(from_pth, from_safetensors)
    assert file_fingerprint(golden / "tiny_transformer.pth") == \
        file_fingerprint(golden / "transformer.safetensors") == file_fingerprint(from_pth)


def write_sharded(folder, weights, index_name="model.safetensors.index.json"):
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, folder / shard)
        weight_map.update({k: shard for k in keys})
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder / index_name


def test_sharded_safetensors_by_folder_and_index(tmp_path):
    weights = tiny_state_dict()
    index = write_sharded(tmp_path, weights)
    assert_same(load_state_dict(tmp_path), weights)
    assert_same(load_state_dict(index), weights)


def test_sharded_missing_shard_is_named(tmp_path):
    index = write_sharded(tmp_path, tiny_state_dict())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    message = error_text(index)
    assert "model-00002-of-00002.safetensors" in message and "missing" in message


def test_sharded_index_problems(tmp_path):
    index = write_sharded(tmp_path, tiny_state_dict())
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map["extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    assert "extra.weight" in error_text(index)
    index.write_text(json.dumps({"metadata": {}}))
    assert "weight_map" in error_text(index)
    index.write_text("{not json")
    assert "JSON" in error_text(index)


def test_folder_with_one_file_loads_and_empty_folder_errors(tmp_path):
    weights = tiny_state_dict()
    (tmp_path / "notes.txt").write_text("not weights")
    message = error_text(tmp_path)
    assert "no weight files" in message
    torch.save(weights, tmp_path / "model.pth")
    assert_same(load_state_dict(tmp_path), weights)
    save_file(weights, tmp_path / "other.safetensors")
    assert "model.pth" in error_text(tmp_path) and "other.safetensors" in error_text(tmp_path)


def test_missing_path(tmp_path):
    assert "no such file" in error_text(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------- containers

@pytest.mark.parametrize("wrap", [
    lambda w: {"trainer": {"gpt_fsdp": w, "gpt_fsdp_opt": {"lr": torch.tensor(1.0)}}, "epoch": 3},
    lambda w: {"state_dict": w, "epoch": 1},
    lambda w: {"model": w},
    lambda w: {"module": w},
    lambda w: {"vae": w},
    lambda w: {"ema": w},
    lambda w: {"vae": w, "ema": {k: v + 1 for k, v in w.items()}, "step": 10},  # official loader reads 'vae'
    lambda w: {f"module.{k}": v for k, v in w.items()},
    lambda w: {f"module._orig_mod.{k}": v for k, v in w.items()},
    lambda w: {"state_dict": {f"_orig_mod.{k}": v for k, v in w.items()}},
])
def test_containers_and_prefixes_unwrap(tmp_path, wrap):
    weights = {k: v for k, v in tiny_state_dict().items() if v.dtype != torch.bool}
    torch.save(wrap(weights), tmp_path / "wrapped.pth")
    assert_same(load_state_dict(tmp_path / "wrapped.pth"), weights)


def test_infix_module_is_kept_and_container_can_be_chosen(tmp_path):
    # Infinity keys carry ".module." inside the name: only a prefix on every key is DDP's.
    weights = {"block_chunks.0.module.0.w": torch.ones(2), "module.x": torch.zeros(1),
               "my_orig_mod.w": torch.zeros(3)}
    torch.save(weights, tmp_path / "a.pth")
    assert_same(load_state_dict(tmp_path / "a.pth"), weights)
    # torch.compile of a submodule puts `_orig_mod.` inside the name.
    torch.save({"blocks.0._orig_mod.w": torch.ones(2)}, tmp_path / "compiled.pth")
    assert list(load_state_dict(tmp_path / "compiled.pth")) == ["blocks.0.w"]
    ema = {"w": torch.full((2,), 3.0)}
    torch.save({"vae": {"w": torch.ones(2)}, "ema": ema}, tmp_path / "vae.pth")
    assert_same(load_state_dict(tmp_path / "vae.pth", container="ema"), ema)
    assert "'gpt_ema'" in error_text(tmp_path / "vae.pth", container="gpt_ema")


def test_non_tensor_entries_and_non_dict_pickles_are_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    assert "holds a list, not a dict of tensors" in error_text(tmp_path / "list.pth")
    torch.save(torch.zeros(2), tmp_path / "tensor.pth")
    assert "holds a Tensor" in error_text(tmp_path / "tensor.pth")
    torch.save({"w": torch.zeros(2), "note": "hello"}, tmp_path / "mixed.pth")
    assert "not tensors: note" in error_text(tmp_path / "mixed.pth")
    torch.save({}, tmp_path / "empty_dict.pth")
    assert "no tensors" in error_text(tmp_path / "empty_dict.pth")


# ---------------------------------------------------------------------------- unsafe and broken files

class WritesMarker:
    """Unpickling this with plain pickle would run a shell command creating a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CustomConfig:
    def __init__(self):
        self.depth = 4


@pytest.mark.parametrize("zip_format", [True, False])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": WritesMarker(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    message = error_text(path)
    assert "only plain tensor checkpoints are accepted" in message.lower()
    assert "system" in message  # names the refused global
    assert not marker.exists()


def test_class_global_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}, "args": CustomConfig()}, tmp_path / "train.ckpt")
    message = error_text(tmp_path / "train.ckpt")
    assert "CustomConfig" in message and "safetensors" in message


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
def test_truncated_files(tmp_path, kind):
    weights = {"w": torch.randn(64, 64)}
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pth")
    if kind == "safetensors":
        save_file(weights, path)
    else:
        torch.save(weights, path, _use_new_zipfile_serialization=kind == "zip")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = error_text(path)
    assert "truncated" in message


def test_empty_and_unknown_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "empty (0 bytes)" in error_text(tmp_path / "empty.safetensors")
    (tmp_path / "page.pth").write_text("<html>404 not found</html>")
    assert "not a safetensors or torch.save file" in error_text(tmp_path / "page.pth")


def test_absurd_safetensors_header(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 60) + b'{"w": {}}')
    assert "header claims" in error_text(path)
    path.write_bytes(struct.pack("<Q", 9) + b"{not json")
    assert "header is not valid" in error_text(path)


# ---------------------------------------------------------------------------- finite check

def test_check_finite(tmp_path):
    weights = tiny_state_dict()
    check_finite(weights, tmp_path / "ok.pth")  # integer and bool tensors are skipped
    weights["blocks.0.bias"][2] = float("nan")
    weights["head.weight"][0, 0] = float("inf")
    with pytest.raises(CheckpointError) as info:
        check_finite(weights, tmp_path / "bad.pth")
    message = str(info.value)
    assert str(tmp_path / "bad.pth") in message and "2 tensor(s)" in message
    assert "blocks.0.bias" in message and "head.weight" in message and "blocks.0.weight" not in message


def test_check_finite_lists_only_the_first_few():
    weights = {f"t{i}": torch.full((3,), float("nan")) for i in range(8)}
    with pytest.raises(CheckpointError, match="t4 and 3 more"):
        check_finite(weights, "model.safetensors")


# ---------------------------------------------------------------------------- atomic save

def test_save_atomic_round_trip_with_metadata(tmp_path):
    weights = tiny_state_dict()
    weights["tied"] = weights["blocks.0.weight"]  # shared storage is saved as a copy
    weights["transposed"] = weights["blocks.0.weight"].t()
    path = tmp_path / "out.safetensors"
    save_safetensors_atomic(weights, path, {"format": "pt", "source": "test"})
    loaded = load_state_dict(path)
    assert torch.equal(loaded["transposed"], weights["blocks.0.weight"].t())
    assert_same(loaded, {k: v.contiguous() for k, v in weights.items()})
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "source": "test"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_save_atomic_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_safetensors_atomic({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError) as info:
        save_safetensors_atomic({"w": torch.zeros(3)}, path)
    assert str(path) in str(info.value) and "No space left" in str(info.value)
    assert info.value.errno == 28
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_save_atomic_failed_fsync_or_replace_cleans_up(tmp_path, monkeypatch, failing):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous")

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoints.os, failing, refuse)
    with pytest.raises(OSError, match="could not write .*model.safetensors.*unchanged"):
        save_safetensors_atomic({"w": torch.ones(3)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert path.read_bytes() == b"previous"


def test_save_atomic_bad_inputs(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        save_safetensors_atomic({"w": torch.ones(1)}, tmp_path / "missing" / "x.safetensors")
    with pytest.raises(ValueError, match="metadata"):
        save_safetensors_atomic({"w": torch.ones(1)}, tmp_path / "x.safetensors", {"step": 3})
    with pytest.raises(ValueError, match="tensors\\['w'\\]"):
        save_safetensors_atomic({"w": [1, 2]}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- fingerprint

def test_fingerprint_same_weights_same_id_across_formats(tmp_path):
    weights = {"big": torch.randn(300, 301), **tiny_state_dict()}
    torch.save(weights, tmp_path / "w.pth")
    save_file(weights, tmp_path / "w.safetensors")
    fingerprint = file_fingerprint(weights)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert file_fingerprint(tmp_path / "w.pth") == fingerprint
    assert file_fingerprint(str(tmp_path / "w.safetensors")) == fingerprint
    assert file_fingerprint(dict(reversed(list(weights.items())))) == fingerprint  # order-free


def test_fingerprint_changes_with_weights_names_dtypes_shapes():
    weights = {"a": torch.randn(100, 100), "b": torch.randn(5)}
    reference = file_fingerprint(weights)
    changed_value = {**weights, "b": weights["b"] + 1}
    renamed = {"a": weights["a"], "c": weights["b"]}
    recast = {**weights, "b": weights["b"].double()}
    reshaped = {**weights, "a": weights["a"].reshape(50, 200)}
    fingerprints = {reference} | {file_fingerprint(w) for w in (changed_value, renamed, recast, reshaped)}
    assert len(fingerprints) == 5
    with pytest.raises(ValueError):
        file_fingerprint(42)
