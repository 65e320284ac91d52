"""Untrusted values never choose where a file is written, and only regular files are read.

A shared workflow JSON or adapter file is untrusted input (issue: hardening 2): every metadata
field and template field that reaches a path is tried, relative and absolute; every refusal is a
clear message; nothing appears outside the chosen folder and nothing there changes."""
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch

from nodes import adapters as adapter_nodes
from nodes import host
from vare_core import paths
from vare_core.erasure.adapters import FORMAT_VERSION, Adapter, AdapterError, load_adapter, save_adapter

HOSTILE = ["../checkpoints/sd_xl_base_1.0", "../../../../tmp/owned", "/tmp/owned", "..", ".", "./",
           "a/../../b", "~/owned", "~", "\\..\\..\\win", "x/" * 40 + "deep", "\x00nul", "",
           "é" * 300, "$(touch owned)", "con:1", ".hidden", "sub/.", "//double//"]


def adapter(**metadata) -> Adapter:
    meta = {"format": FORMAT_VERSION, "base_fingerprint": "abc", "method": "svare", "train": "ca_ffn",
            "concepts": ["circle"], **metadata}
    return Adapter(tensors={"blocks.0.ca.proj.weight": torch.ones(4, 4)}, metadata=meta)


def tree(root: Path) -> dict[str, str]:
    """Every file under root with its hash (symlinks not followed)."""
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def world(tmp_path, monkeypatch):
    """models/ with a checkpoint next to the adapter folder, and a file outside models/."""
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "sd_xl_base_1.0.safetensors").write_bytes(b"precious weights")
    (tmp_path / "outside.txt").write_text("outside")
    monkeypatch.setenv("VARE_MODELS_DIR", str(models))
    return tmp_path


def save(adapter_, filename, folder="vare", overwrite=True):
    return adapter_nodes.SaveAdapter.execute(adapter_, filename, folder, overwrite)


@pytest.mark.parametrize("field", ["method", "concepts"])
@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("template", ["{method}", "{concepts}", "erase_{concepts}_{method}",
                                      "sub/{method}", "{concepts}/{method}"])
def test_metadata_never_leaves_the_folder(world, field, value, template):
    before = {k: v for k, v in tree(world).items() if not k.startswith("models/vare/")}
    hostile = adapter(**{field: [value] if field == "concepts" else value})
    for folder in adapter_nodes.SAVE_FOLDERS:
        root = (world / "models" / folder).resolve()
        written = Path(save(hostile, template, folder)[0]).resolve()
        assert root in written.parents, (template, value, written)
        assert written.name.endswith(".safetensors") and not written.name.startswith(".")
        assert load_adapter(written).metadata[field] == hostile.metadata[field]
    after = {k: v for k, v in tree(world).items() if not k.startswith(("models/vare/", "models/loras/"))}
    assert after == before                        # the checkpoint and the outside file unchanged


@pytest.mark.parametrize("filename", ["/tmp/owned", "../checkpoints/x", "a/../../x", ".", "./", "sub/..",
                                      "", "   ", "~/x", "..\\x", "x/" * 12 + "y", "a/" * 1100 + "b", "é" * 200, ".hidden"])
def test_bad_filenames_are_refused_with_a_message(world, filename):
    message = adapter_nodes.SaveAdapter.validate_inputs(filename)
    assert isinstance(message, str) and "filename" in message
    with pytest.raises(ValueError, match="filename"):
        save(adapter(), filename)
    assert not (world / "models" / "vare.safetensors").exists()
    assert not list(world.glob("*.safetensors")) and not Path("/tmp/owned.safetensors").exists()


def test_dot_names_stay_inside(world):
    written = Path(save(adapter(), "./sub/./name")[0])
    assert written == (world / "models" / "vare" / "sub" / "name.safetensors").resolve()


def test_symlinked_subfolder_out_of_the_folder_is_refused(world):
    vare = world / "models" / "vare"
    vare.mkdir(parents=True)
    (vare / "escape").symlink_to(world / "models" / "checkpoints")
    with pytest.raises(ValueError, match="outside"):
        save(adapter(), "escape/sd_xl_base_1.0")
    assert (world / "models" / "checkpoints" / "sd_xl_base_1.0.safetensors").read_bytes() == b"precious weights"


def test_overwrite_replaces_adapters_only(world):
    loras = world / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "style.safetensors").write_bytes(b"someone's lora")
    with pytest.raises(ValueError, match="not a VARE adapter"):
        save(adapter(), "style", "loras", overwrite=True)
    assert (loras / "style.safetensors").read_bytes() == b"someone's lora"
    first = save(adapter(), "mine", "loras")[0]
    again = save(adapter(method="other"), "mine", "loras", overwrite=True)[0]
    assert first == again and load_adapter(again).metadata["method"] == "other"


def test_fill_template_sanitises_after_substitution():
    name = paths.fill_template("erase_{concepts}_{method}",
                               {"concepts": ["../../x", "a/b"], "method": "/etc/passwd"})
    assert "/" not in name and ".." not in name and paths.check_relative_name(name, "f") is None
    long = paths.fill_template("{method}", {"method": "x" * 10_000})
    assert len(long) <= paths.PART_LIMIT
    assert paths.shorten("a" * 500) != paths.shorten("a" * 499 + "b")      # hashes keep them apart


# ----------------------------------------------------------------------------- output files

def test_output_file_checks(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file").write_text("x")
    cases = {"/dev/null": "not a regular file", str(fifo): "not a regular file",
             str(tmp_path): "is a folder", str(tmp_path / "file" / "out.safetensors"): "is a file, not a folder",
             str(tmp_path / "missing" / "out.safetensors"): "does not exist",
             str(tmp_path / ("n" * 300)): "longer than 255", "/" + "a/" * 2100 + "b": "too long",
             ".": "give a file name"}
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message):
            paths.check_output_file(Path(path), "--out")
    assert paths.check_output_file(tmp_path / "new.safetensors", "--out") == tmp_path / "new.safetensors"
    assert paths.check_output_file(tmp_path / "file", "--out") == tmp_path / "file"


@pytest.mark.parametrize("kind", ["fifo", "folder", "under_file", "long"])
def test_erase_refuses_a_bad_out_before_loading(tmp_path, kind, capsys, monkeypatch):
    from vare_core import cli
    from vare_core.generation import pipeline
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    target = {"fifo": tmp_path / "fifo", "folder": tmp_path,
              "under_file": tmp_path / "file" / "x.safetensors", "long": tmp_path / ("n" * 300)}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    (tmp_path / "file").write_text("x")
    code = cli.main(["erase", "--model", "embedded", "--concept", "circle", "--anchor", "square",
                     "--out", str(target)])
    assert code == 2 and "--out" in capsys.readouterr().err
    if kind == "fifo":
        assert paths.file_kind(target) == "fifo"          # the FIFO is still a FIFO


# ----------------------------------------------------------------------------- reading

def finishes(function, fifo: Path, seconds: float = 10.0):
    """Run function() in a thread; if it is still blocked on the FIFO after `seconds`, release it
    by opening the write end, and report the hang."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", _capture(function)), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"{function} blocked on the FIFO {fifo}")
    return box["result"]


def _capture(function):
    try:
        return function()
    except Exception as err:   # the refusal is what the tests look at
        return err


def test_fifo_as_weights_adapter_or_pairs_is_refused_quickly(tmp_path):
    from vare_core.checkpoints import CheckpointError, load_state_dict
    from vare_core.erasure.pairs_file import load_pairs_file
    for name, load, error in [("model.pth", load_state_dict, CheckpointError),
                              ("vae.safetensors", load_state_dict, CheckpointError),
                              ("adapter.safetensors", load_adapter, AdapterError),
                              ("pairs.txt", load_pairs_file, ValueError)]:
        fifo = tmp_path / name
        os.mkfifo(fifo)
        result = finishes(lambda: load(fifo), fifo)
        assert isinstance(result, error) and "FIFO" in str(result), (name, result)


def test_model_listing_skips_fifos_and_ends_on_symlink_loops(world):
    loras = world / "models" / "loras"
    (loras / "a").mkdir(parents=True)
    (loras / "b").mkdir()
    (loras / "a" / "to_b").symlink_to(loras / "b")
    (loras / "b" / "to_a").symlink_to(loras / "a")              # two looping folder links
    (loras / "self").symlink_to(loras)                          # one loop onto the root
    save_adapter(adapter(), loras / "b" / "real.safetensors")
    os.mkfifo(loras / "trap.safetensors")
    entries = finishes(lambda: host.list_entries(["loras"]), loras / "trap.safetensors")
    assert "trap.safetensors" not in entries
    assert len([e for e in entries if e.endswith("real.safetensors")]) == 1, entries
    choices = finishes(adapter_nodes.adapter_choices, loras / "trap.safetensors")
    assert [c for c in choices if c.endswith("real.safetensors")] and "trap.safetensors" not in choices


def test_partial_adapter_of_a_long_concept_name_is_saved(world):
    from nodes import erasure as erasure_nodes
    from nodes.types import LossHistory
    from vare_core.erasure.trainer import EraseConfig
    history = LossHistory(steps=[{"step": 1, "loss": 0.5}], method="svare",
                          concepts=["a very long inferred concept " * 30, "../../etc/x"])
    path = Path(erasure_nodes.save_partial(adapter(steps_done=1), history, EraseConfig(steps=10)))
    assert path.parent == (world / "models" / "vare" / "partial").resolve()
    assert len(path.name.encode()) <= paths.NAME_LIMIT + len(".safetensors") and path.is_file()
    assert path.with_suffix(".loss.json").is_file()
    assert load_adapter(path).metadata["steps_done"] == 1
