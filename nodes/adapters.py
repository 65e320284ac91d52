"""Apply / Save / Load erasure adapters.

Adapters are safetensors files with JSON metadata (what was erased, how, on which base weights).
They live in models/vare/ (registered by the pack; extra_model_paths.yaml may add more) and are
also found in models/loras/ when their metadata says they are VARE adapters.
"""
from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import torch

from vare_core import paths
from vare_core.checkpoints import safetensors_metadata
from vare_core.erasure.adapters import FORMAT_VERSION, STRENGTH_RANGE, apply_adapter, load_adapter, save_adapter

from . import host
from .compat import CATEGORY, VareAdapter, VareModel, io

ADAPTER_FOLDERS = (host.ADAPTER_FOLDER, "loras")
SAVE_FOLDERS = (host.ADAPTER_FOLDER, "loras")
_header_cache: dict[tuple[str, float], bool] = {}


def is_vare_adapter(path: Path) -> bool:
    """Reads only the safetensors header: does its metadata name our adapter format?"""
    if not paths.is_regular_file(path):      # a FIFO would block the node list forever
        return False
    try:
        key = (str(path), path.stat().st_mtime)
    except OSError:
        return False
    if key not in _header_cache:
        try:
            _header_cache[key] = safetensors_metadata(path).get("format") == json.dumps(FORMAT_VERSION)
        except (OSError, ValueError):   # CheckpointError is a ValueError: not an adapter, skip it
            _header_cache[key] = False
    return _header_cache[key]


def adapter_choices() -> list[str]:
    names = [n for n in host.list_entries([host.ADAPTER_FOLDER]) if n.endswith(".safetensors")]
    for name in host.list_entries(["loras"]):
        if name.endswith(".safetensors") and name not in names \
                and is_vare_adapter(host.resolve_entry(["loras"], name)):
            names.append(name)
    return names


def describe(adapter) -> str:
    m = adapter.metadata
    concepts = ", ".join(m.get("concepts", [])) or "?"
    anchors = ", ".join(m.get("anchors", [])) or "?"
    train = m.get("train", "?") + (f" rank {m['rank']}" if m.get("rank") else "")
    losses = ", ".join(f"{k} {v:.4f}" for k, v in (m.get("final_losses") or {}).items())
    state = " (cancelled: partial)" if m.get("cancelled") else ""
    return (f"erases {concepts} -> {anchors} with {m.get('method', '?')} ({train}), "
            f"{m.get('steps_done', '?')} of {m.get('steps_requested', '?')} steps{state}, "
            f"model {m.get('model', '?')} ({m.get('preset', '?')}); {losses}")


class ApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        low, high = STRENGTH_RANGE
        return io.Schema(
            node_id="VARE_ApplyAdapter", display_name="Apply Erasure Adapter (VARE)",
            category=f"{CATEGORY}/adapters",
            description="Add an erasure adapter to a model. Chain several to erase several "
                        "concepts; the input model is left unchanged.",
            inputs=[
                VareModel.Input("model", tooltip="the model (it may already carry other adapters)"),
                VareAdapter.Input("adapter", tooltip="from Train Erasure or Load Erasure Adapter"),
                io.Float.Input("strength", default=1.0, min=low, max=high, step=0.05,
                               tooltip="1 = as trained, 0 = off, between = partial erasure"),
                io.Boolean.Input("allow_other_base", default=False,
                                 tooltip="apply even if the adapter was trained on other base weights "
                                         "(shapes are still checked)"),
            ],
            outputs=[VareModel.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, adapter, strength, allow_other_base=False):
        # the new weights must be normal tensors so the adapted model can be trained further
        with torch.inference_mode(False), torch.no_grad():
            adapted = apply_adapter(model, adapter, strength, force=allow_other_base)
        host.register_models(adapted, like=model)
        host.release_when_freed(adapted)
        return io.NodeOutput(adapted)


def output_name(template: str, adapter) -> str:
    """The template with {concepts} / {method} filled from the adapter's metadata. Metadata is
    untrusted (a shared adapter): every value is sanitised after substitution (paths.safe_part),
    so it can add text to the name but never a folder or '..'."""
    metadata = adapter.metadata
    concepts = metadata.get("concepts")
    concepts = [str(c) for c in concepts] if isinstance(concepts, list) else []
    name = paths.fill_template(template, {"concepts": concepts or ["concept"],
                                          "method": metadata.get("method", "adapter")})
    return name[:-len(".safetensors")] if name.endswith(".safetensors") else name


def check_filename(filename: str) -> str | None:
    if not isinstance(filename, str):
        return f"filename must be text, got {filename!r}"
    stem = filename.replace("{concepts}", "x").replace("{method}", "x").strip()
    problem = paths.check_relative_name(stem, "filename")
    if problem:
        return problem
    if not re.fullmatch(r"[\w .\-/]+", stem):
        return f"filename {filename!r}: use letters, digits, spaces, '-', '_', '.' and '/' only"
    return None


def target_path(folder_root: Path, name: str, overwrite: bool) -> Path:
    """Where Save writes `name`: inside folder_root (checked after every substitution, symlinks
    resolved); an existing file gets a numbered new name unless overwrite, and overwrite never
    replaces something that is not a VARE adapter."""
    path = paths.resolve_inside(folder_root, name + ".safetensors", "filename")
    stem, counter = path.name[:-len(".safetensors")], 1
    while (path.exists() or path.is_symlink()) and not overwrite:
        path, counter = path.with_name(f"{stem}_{counter:03d}.safetensors"), counter + 1
    if path.exists() or path.is_symlink():
        paths.check_output_file(path, "filename")          # a folder, FIFO or device: refused
        if not is_vare_adapter(path):
            raise ValueError(f"filename: {path} exists and is not a VARE adapter; overwrite only "
                             "replaces adapters. Choose another name.")
    return path


class SaveAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_SaveAdapter", display_name="Save Erasure Adapter (VARE)",
            category=f"{CATEGORY}/adapters",
            description="Write the adapter (safetensors + metadata) into models/vare or models/loras.",
            inputs=[
                VareAdapter.Input("adapter", tooltip="from Train Erasure"),
                io.String.Input("filename", default="erase_{concepts}",
                                tooltip="file name without .safetensors; {concepts} and {method} are filled in"),
                io.Combo.Input("folder", options=list(SAVE_FOLDERS), default=host.ADAPTER_FOLDER,
                               tooltip="vare = models/vare (the pack's folder), loras = models/loras"),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="off: an existing file is kept and a number is added to the new name"),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="where the file was written")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename=None):
        # left out or linked: None, which ComfyUI reports (or execute checks once it is known)
        return filename is None or check_filename(filename) or True

    @classmethod
    def execute(cls, adapter, filename, folder, overwrite):
        problem = check_filename(filename)
        if problem:
            raise ValueError(problem)
        if folder not in SAVE_FOLDERS:
            raise ValueError(f"folder {folder!r}: choose one of {', '.join(SAVE_FOLDERS)}")
        root = host.default_root(folder)
        root.mkdir(parents=True, exist_ok=True)
        path = target_path(root, output_name(filename.strip(), adapter), overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        try:
            save_adapter(adapter, path)     # atomic: the old file or the complete new one, never half
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = "keeps its previous content" if existed else "was not written"
            raise OSError(err.errno, f"the disk is full: no space left for the adapter in {path.parent} "
                          f"({path.name} {kept}); free some space, or save into the other folder") from None
        host.log.info("VARE adapter saved to %s", path)
        return io.NodeOutput(str(path), ui={"text": [f"saved {path}"]})


class LoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = adapter_choices()
        return io.Schema(
            node_id="VARE_LoadAdapter", display_name="Load Erasure Adapter (VARE)",
            category=f"{CATEGORY}/adapters",
            description="Load an erasure adapter from models/vare (or a VARE adapter in models/loras).",
            inputs=[
                io.Combo.Input("adapter_name", options=choices, default=choices[0] if choices else None,
                               tooltip="adapters in models/vare and models/loras (press R to refresh "
                                       "the list); partial/ holds adapters of cancelled trainings"),
            ],
            outputs=[VareAdapter.Output(display_name="adapter"),
                     io.String.Output(display_name="info", tooltip="what the adapter erases and how it was trained")],
        )

    @classmethod
    def execute(cls, adapter_name):
        path = host.resolve_entry(ADAPTER_FOLDERS, adapter_name)
        adapter = load_adapter(path)
        return io.NodeOutput(adapter, describe(adapter))
