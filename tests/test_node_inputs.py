"""Inputs a graph (or the environment) can get wrong, and what the nodes do with them: a graph
that leaves an input out, names longer than a file name, files that are no checkpoints, text of
a megabyte where a title goes, a cache folder that cannot be written, no home folder, a disk
that fills while an adapter is saved, an interrupt in the middle of that save.

    python -m pytest tests/test_node_inputs.py -q
"""
import errno
import inspect
import itertools
import logging
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import nodes
from nodes import adapters, drawing, evaluation, loaders
from vare_core.erasure import trajectories
from vare_core.erasure.adapters import FORMAT_VERSION, Adapter, load_adapter
from vare_core.testing import tiny_pipeline

MEGABYTE = "x" * 1_100_000                 # past PIL's 1,000,000 characters per string
IMAGES = torch.rand(2, 64, 64, 3)


@pytest.fixture(autouse=True)
def folders(tmp_path, monkeypatch):
    monkeypatch.setenv("VARE_MODELS_DIR", str(tmp_path / "models"))
    for name in ("diffusion_models", "vae", "text_encoders", "vare"):
        (tmp_path / "models" / name).mkdir(parents=True)
    return tmp_path / "models"


# ----------------------------------------------------------------------------- left-out inputs

def own_validators():
    return [node for node in nodes.NODES if "validate_inputs" in node.__dict__]


def test_every_validate_inputs_lets_comfyui_report_a_missing_input():
    """ComfyUI calls validate_inputs with only the inputs the graph holds (linked ones as None):
    every subset must give True or a message, never a TypeError hiding ComfyUI's own "Required
    input is missing". And no **kwargs: ComfyUI skips its own range and list checks for every
    input a validate_inputs takes, so each takes only the inputs it checks."""
    checked = own_validators()
    assert {n.GET_SCHEMA().node_id for n in checked} >= {"VARE_LoadModel", "VARE_TextEncode", "VARE_Sampler",
                                                         "VARE_PromptPairs", "VARE_SaveAdapter", "VARE_ErasureCheck"}
    for node in checked:
        spec = inspect.getfullargspec(node.validate_inputs)
        assert spec.varkw is None, node
        names = [a for a in spec.args if a != "cls"]
        for count in range(len(names) + 1):
            for subset in itertools.combinations(names, count):
                for value in (None, "x"):          # linked (None) or a value
                    result = node.validate_inputs(**{name: value for name in subset})
                    assert result is True or isinstance(result, str), (node, subset, result)
        assert node.validate_inputs() is True


# ----------------------------------------------------------------------------- model names, files

def test_a_model_name_longer_than_a_file_name_is_named_as_such(folders):
    name = "m" * 100_000
    for message in (loaders.LoadModel.validate_inputs(name, "embedded", "embedded", "auto"),
                    loaders.LoadModel.validate_inputs("embedded", "embedded", name, "auto")):
        assert "(100000 characters) is longer than a file name can be (255 bytes per name" in message
        assert len(message) < 400 and "Errno" not in message
    with pytest.raises(FileNotFoundError, match="longer than a file name can be"):
        adapters.LoadAdapter.execute("a" * 300 + ".safetensors")
    deep = "/".join(["d" * 200] * 30)
    assert "longer than a file name can be" in loaders.LoadModel.validate_inputs(deep, "v", "t", "auto")


def test_a_file_that_is_no_checkpoint_is_named_before_the_vae_pairing(folders):
    assert "not a path outside the model folders" in loaders.LoadModel.validate_inputs(
        "/etc/passwd", "embedded", "embedded", "auto")
    (folders / "diffusion_models" / "notes.pth").write_text("root:x:0:0:root:/root:/bin/bash\n")
    message = loaders.LoadModel.validate_inputs("notes.pth", "embedded", "embedded", "auto")
    assert message.startswith("transformer notes.pth is not a checkpoint") and "needs its own" not in message
    os.mkfifo(folders / "vae" / "pipe.pth")         # never opened: it would block
    assert "notes.pth is not a checkpoint" in loaders.LoadModel.validate_inputs("notes.pth", "pipe.pth", "embedded", "auto")
    torch.save({"w": torch.zeros(1)}, folders / "diffusion_models" / "real.pth")
    assert "needs its own vae" in loaders.LoadModel.validate_inputs("real.pth", "embedded", "embedded", "auto")
    assert "a FIFO" in loaders.LoadModel.validate_inputs("real.pth", "pipe.pth", "embedded", "auto")


# ----------------------------------------------------------------------------- text where pictures are drawn

def test_a_megabyte_of_text_in_titles_labels_and_captions_draws():
    grid = evaluation.CompareGrid.execute(IMAGES, IMAGES, MEGABYTE, MEGABYTE, MEGABYTE + "\n" + MEGABYTE)[0]
    assert grid.shape[2] <= drawing.MAX_LABEL_WIDTH + 2 * 160 and grid.std() > 0.01
    pil = drawing.to_pils(IMAGES)[0]
    assert drawing.label_image(pil, MEGABYTE, good=True).size == (192, 214)
    message = evaluation.ErasureCheck.validate_inputs(MEGABYTE)
    assert message.startswith("concept is 1100000 characters long") and len(message) < 300
    with pytest.raises(ValueError, match="concept is 1100000 characters long"):
        evaluation.ErasureCheck.execute(IMAGES, MEGABYTE, "absent", 4)


# ----------------------------------------------------------------------------- the trajectory cache

@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline(seed=0)


SETTINGS = trajectories.TrajectorySettings(batch_size=2)


def test_a_cache_folder_that_cannot_be_written_only_costs_the_caching(tiny, tmp_path, monkeypatch, caplog):
    reference = trajectories.generate_trajectories(tiny, ["a red circle"], SETTINGS)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    for folder, patch in ((not_a_folder / "cache", None), (tmp_path / "ro", read_only)):
        with monkeypatch.context() as m:
            if patch:
                m.setattr(trajectories, "save_trajectories", patch)
            with caplog.at_level(logging.WARNING):
                trajs = trajectories.build_trajectories(tiny, ["a red circle"], SETTINGS, cache_dir=folder)
        assert torch.equal(trajs.bit_labels, reference.bit_labels) and not trajs.from_cache
        assert "training goes on without the cache" in caplog.text
        caplog.clear()

    def unreadable(self):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(Path, "is_file", unreadable)
    with caplog.at_level(logging.WARNING):
        trajs = trajectories.build_trajectories(tiny, ["a red circle"], SETTINGS, cache_dir=tmp_path / "locked")
    assert torch.equal(trajs.bit_labels, reference.bit_labels) and "sampling without it" in caplog.text


def test_no_home_folder_means_no_cache_not_a_crash(tiny, tmp_path, monkeypatch, caplog):
    import pwd
    monkeypatch.delenv("VARE_CACHE_DIR", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    def unknown(uid):
        raise KeyError(uid)
    monkeypatch.setattr(pwd, "getpwuid", unknown)
    assert trajectories.default_cache_dir() is None
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    with caplog.at_level(logging.WARNING):
        trajs = trajectories.build_trajectories(tiny, ["a red circle"], SETTINGS)
    assert len(trajs) == 1 and "set VARE_CACHE_DIR" in caplog.text and not list((tmp_path / "cwd").iterdir())
    monkeypatch.setenv("HOME", "")                      # empty or relative: not a home either
    assert trajectories.default_cache_dir() is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert trajectories.default_cache_dir() == tmp_path / ".cache" / "vare" / "trajectories"


@pytest.mark.parametrize("value, limit", [("", 8 * 2**30), ("  ", 8 * 2**30), ("0", 0), ("0.5", 2**29),
                                          ("-1", None), ("lots", None), ("inf", None), ("nan", None)])
def test_cache_limit_values(value, limit, monkeypatch):
    monkeypatch.setenv("VARE_CACHE_LIMIT_GB", value)
    if limit is None:
        with pytest.raises(ValueError, match=r"\$VARE_CACHE_LIMIT_GB=.*a number >= 0"):
            trajectories.cache_limit_bytes()
    else:
        assert trajectories.cache_limit_bytes() == limit


def test_a_bad_cache_limit_is_refused_even_when_the_set_is_cached(tiny, tmp_path, monkeypatch):
    trajectories.build_trajectories(tiny, ["a red circle"], SETTINGS, cache_dir=tmp_path)
    monkeypatch.setenv("VARE_CACHE_LIMIT_GB", "-2")
    with pytest.raises(ValueError, match="VARE_CACHE_LIMIT_GB"):
        trajectories.build_trajectories(tiny, ["a red circle"], SETTINGS, cache_dir=tmp_path)


# ----------------------------------------------------------------------------- saving an adapter

def small_adapter(metadata=None) -> Adapter:
    tensors = {"blocks.0.ca.mat_q.lora_A": torch.ones(2, 8), "blocks.0.ca.mat_q.lora_B": torch.ones(8, 2)}
    return Adapter(tensors, {"format": FORMAT_VERSION, "train": "lora", "concepts": ["circle"], **(metadata or {})})


def failing_writer(monkeypatch, error):
    """safetensors writes half of the temp file, then `error` (a full disk, an interrupt)."""
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise error
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)


def test_a_full_disk_while_saving_keeps_the_previous_adapter(folders, monkeypatch):
    first = Path(adapters.SaveAdapter.execute(small_adapter(), "erase_{concepts}", "vare", False)[0])
    before = first.read_bytes()
    full = safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                       'message: "No space left on device" })')
    failing_writer(monkeypatch, full)
    with pytest.raises(OSError, match="the disk is full: no space left for the adapter in .* "
                                      r"\(erase_circle.safetensors keeps its previous content\); free some space"):
        adapters.SaveAdapter.execute(small_adapter({"steps_done": 5}), "erase_{concepts}", "vare", True)
    with pytest.raises(OSError, match=r"erase_new.safetensors was not written"):
        adapters.SaveAdapter.execute(small_adapter(), "erase_new", "vare", False)
    assert first.read_bytes() == before and load_adapter(first).metadata.get("steps_done") is None
    assert sorted(p.name for p in first.parent.iterdir()) == ["erase_circle.safetensors"]    # no temp files


class InterruptProcessingException(Exception):
    """What ComfyUI raises when its Cancel is handled (comfy.model_management)."""


@pytest.mark.parametrize("interrupt", [InterruptProcessingException(), KeyboardInterrupt()])
def test_an_interrupt_while_saving_leaves_the_file_complete_or_absent(interrupt, folders, monkeypatch):
    first = Path(adapters.SaveAdapter.execute(small_adapter(), "erase_{concepts}", "vare", False)[0])
    before = first.read_bytes()
    failing_writer(monkeypatch, interrupt)
    with pytest.raises(type(interrupt)):
        adapters.SaveAdapter.execute(small_adapter({"steps_done": 5}), "erase_{concepts}", "vare", True)
    with pytest.raises(type(interrupt)):
        adapters.SaveAdapter.execute(small_adapter(), "other", "vare", False)
    monkeypatch.undo()
    assert first.read_bytes() == before
    assert sorted(p.name for p in first.parent.iterdir()) == ["erase_circle.safetensors"]
    assert load_adapter(first).tensors.keys() == small_adapter().tensors.keys()
