"""What the nodes need from ComfyUI besides the node API: model folders, device, progress bars
with previews, interrupts, events to the web extension. Every function also works without
ComfyUI (tests, scripting): folders then come from $VARE_MODELS_DIR (default ./models), progress
and events go nowhere, and nothing is ever interrupted.

Model folders (ComfyUI's names; extra_model_paths.yaml entries are honoured):
    diffusion_models, checkpoints   Infinity transformers: a weight file, or a folder holding a
                                    sharded checkpoint (*.index.json + shards)
    vae                             BSQ VAE files
    text_encoders                   flan-t5-xl folders (config.json, tokenizer.json, weights) or
                                    single encoder files
    vare (models/vare), loras       erasure adapters (.safetensors)
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
import threading
import weakref
from pathlib import Path

import torch

from vare_core import paths
from vare_core.generation.preview import SHOWN_SIDE

log = logging.getLogger("vare")

try:
    import folder_paths
except ImportError:
    folder_paths = None
try:
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
except ImportError:
    model_management = comfy_utils = None

ADAPTER_FOLDER = "vare"
# ComfyUI's ModelPatcher of each part of a pipeline (register_models), by id(pipeline): kept here,
# not on the library's VarPipeline; an entry goes when its pipeline is freed.
_PATCHERS: dict[int, dict] = {}
NAME_MAX = 255               # bytes in one file or folder name (Linux, macOS, Windows alike)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".sft")
_SHARD = re.compile(r"-\d{3,6}-of-\d{3,6}\.\w+$")


class Interrupted(Exception):
    """Raised outside ComfyUI where ComfyUI would raise InterruptProcessingException."""


# ----------------------------------------------------------------------------- folders

def register_folders() -> None:
    """Add models/vare as the adapter folder (ComfyUI also lists models/loras for adapters)."""
    if folder_paths is None:
        return
    path = os.path.join(folder_paths.models_dir, ADAPTER_FOLDER)
    folder_paths.add_model_folder_path(ADAPTER_FOLDER, path, is_default=True)
    paths, extensions = folder_paths.folder_names_and_paths[ADAPTER_FOLDER]
    folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = (paths, set(extensions) | {".safetensors"})


def folder_roots(name: str) -> list[Path]:
    """Every directory ComfyUI searches for a model folder name."""
    if folder_paths is not None:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(name)]
        except KeyError:
            return []
    base = Path(os.environ.get("VARE_MODELS_DIR", "models"))
    return [base / name]


def default_root(name: str) -> Path:
    """Where new files of this folder are written (its first directory)."""
    return folder_roots(name)[0]


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def list_entries(names, folders_ok: str | None = None) -> list[str]:
    """Relative names of weight files under the folders `names`, sorted, without duplicates.

    folders_ok="sharded": a folder with a *.index.json is one entry ("name/"), its shards none.
    folders_ok="hf": a folder with config.json (Hugging Face layout) is one entry ("name/").
    """
    entries: list[str] = []
    for name in names:
        for root in folder_roots(name):
            if not root.is_dir():
                continue
            seen: set[tuple[int, int]] = set()    # real folders listed: symlink loops end here
            for directory, subdirs, files in os.walk(root, followlinks=True):
                here = Path(directory)
                try:
                    real = os.stat(here)
                except OSError:
                    subdirs[:] = []
                    continue
                if (real.st_dev, real.st_ino) in seen:
                    subdirs[:] = []
                    continue
                seen.add((real.st_dev, real.st_ino))
                rel = here.relative_to(root).as_posix()
                if here != root and folders_ok == "sharded" and any(f.endswith(".index.json") for f in files):
                    entries.append(rel + "/")
                    subdirs[:] = []
                    continue
                if here != root and folders_ok == "hf" and _is_hf_folder(here):
                    entries.append(rel + "/")
                    subdirs[:] = []
                    continue
                subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
                for f in files:   # regular files only: a FIFO would block whoever opens it
                    if f.lower().endswith(WEIGHT_SUFFIXES) and not _SHARD.search(f) \
                            and paths.is_regular_file(here / f):
                        entries.append(f if here == root else f"{rel}/{f}")
    return sorted(dict.fromkeys(entries), key=str.lower)


def entry_problem(entry) -> str | None:
    """Why `entry` cannot be a name from list_entries (not text, a path leading out of the
    model folders, longer than a file name can be), or None. Reads nothing."""
    if not isinstance(entry, str) or not entry.strip().rstrip("/"):
        return f"{str(entry)[:80]!r}: give a name from the list"
    clean = entry.rstrip("/")
    shown = repr(clean) if len(clean) <= 80 else f"{clean[:60]!r}... ({len(clean)} characters)"
    if "\x00" in clean:
        return f"{shown}: a name cannot hold a NUL character; choose one from the list"
    if len(os.fsencode(clean)) >= paths.PATH_LIMIT or \
            any(len(os.fsencode(part)) > NAME_MAX for part in clean.split("/")):
        return (f"{shown} is longer than a file name can be ({NAME_MAX} bytes per name, "
                f"{paths.PATH_LIMIT} per path): choose one from the list")
    if Path(clean).is_absolute() or ".." in Path(clean).parts:
        return (f"{shown}: give a name from the list, not a path outside the model folders (only "
                "checkpoints in them are read)")
    return None


def find_entry(names, entry: str) -> Path | None:
    """The path of an entry (checked with entry_problem first), None where no folder has it."""
    clean = entry.rstrip("/")
    for name in names:
        for root in folder_roots(name):
            candidate = root / clean
            try:
                if candidate.exists() or candidate.is_symlink():
                    return candidate
            except OSError:          # a part that is a file, permissions: not there
                continue
    return None


def resolve_entry(names, entry: str) -> Path:
    """The path of an entry from list_entries; FileNotFoundError naming the folders searched
    (or why the name cannot be one)."""
    problem = entry_problem(entry)
    if problem:
        raise FileNotFoundError(problem)
    found = find_entry(names, entry)
    if found is not None:
        return found
    searched = ", ".join(str(r) for n in names for r in folder_roots(n))
    raise FileNotFoundError(f"{entry!r} was not found in {searched}; put the file there and "
                            "refresh the node (press R)")


def comfy_t5_tokenizer() -> Path | None:
    """The T5 tokenizer.json ComfyUI ships (same vocabulary as flan-t5), if present."""
    if model_management is None:
        return None
    import comfy
    path = Path(comfy.__file__).parent / "text_encoders" / "t5_tokenizer" / "tokenizer.json"
    return path if path.is_file() else None


def output_dir() -> Path:
    return Path(folder_paths.get_output_directory()) if folder_paths else Path("output")


# ----------------------------------------------------------------------------- device, memory

def torch_device() -> torch.device:
    if model_management is not None:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def comfy_low_vram() -> bool:
    """ComfyUI was started with --lowvram or --novram (its own models then load in parts)."""
    if model_management is None:
        return False
    state = model_management.VRAMState
    return model_management.vram_state in (state.LOW_VRAM, state.NO_VRAM)


def register_models(pipe, like=None) -> None:
    """Hand the pipeline's resident parts (transformer, VAE, T5) to ComfyUI's model management,
    one ModelPatcher each, as its own models are: it counts them, may unload them to its offload
    device when another model needs the memory, and `use_models` brings them back. Parts the
    pipeline moves itself (streamed blocks with low_vram, an offloaded T5) are left to it.
    `like`: the pipeline this one was made from (an applied adapter): shared parts keep that
    pipeline's patchers, so ComfyUI counts them once. Outside ComfyUI: nothing."""
    if model_management is None:
        return
    from comfy.model_patcher import ModelPatcher
    inherited = comfy_patchers(like) if like is not None else {}
    parts = {"vae": pipe.vae}
    if not pipe.low_vram:
        parts["transformer"] = pipe.model
    if not pipe.offload_text_encoder:
        parts["text_encoder"] = pipe.text_encoder.model
    patchers = {}
    for name, module in parts.items():
        known = inherited.get(name)
        if known is not None and known.model is module:
            patchers[name] = known
        else:
            size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
            patchers[name] = ModelPatcher(module, load_device=pipe.device,
                                          offload_device=model_management.unet_offload_device(), size=size)
    _PATCHERS[id(pipe)] = patchers
    weakref.finalize(pipe, _PATCHERS.pop, id(pipe), None)


def comfy_patchers(pipe) -> dict:
    """The ModelPatchers register_models made for this pipeline, by part ({} if none)."""
    return dict(_PATCHERS.get(id(pipe), {}))


def use_models(pipe, *parts: str, memory_required: int = 0) -> None:
    """Before a node runs these parts ("transformer", "vae", "text_encoder"; none = all):
    ComfyUI loads them onto the device, moving them back if it had unloaded them and unloading
    its other models first when memory is short. Whole models: ours have no per-layer casting
    for ComfyUI's partial loading (low_vram streaming is ours instead). memory_required: bytes
    the work will take beside the weights; ComfyUI unloads other models to leave them free
    (not asked for more than the device holds: such a request is refused, not made room for)."""
    patchers = _PATCHERS.get(id(pipe))
    if model_management is None or not patchers:
        return
    wanted = [patchers[p] for p in (parts or tuple(patchers)) if p in patchers]
    if not wanted:
        return
    if memory_required and pipe.device.type == "cuda" \
            and memory_required < torch.cuda.get_device_properties(pipe.device).total_memory:
        model_management.load_models_gpu(wanted, memory_required=memory_required, force_full_load=True)
    else:
        model_management.load_models_gpu(wanted, force_full_load=True)


def free_accelerator_memory() -> None:
    """Ask ComfyUI to unload its own models before a memory-hungry job (training), or after an
    out-of-memory error (the failed job's tensors: collected first, they may sit in cycles)."""
    gc.collect()
    if model_management is not None:
        model_management.unload_all_models()
        model_management.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()



TRIM_DELAY = 2.0            # seconds after the last big object died (its memory is freed after it)
_trim_lock = threading.Lock()
_trim_timer: threading.Timer | None = None


def _malloc_trim() -> bool:
    """Hand the C heap's free pages back to the system (glibc keeps what Python and PyTorch
    freed for reuse: a finished 5 GB sampling run would otherwise leave the process at 5 GB).
    False where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def release_memory() -> None:
    """After a big job's tensors are freed: give their memory back to the system (CPU; the
    accelerator's cache is ComfyUI's soft_empty_cache)."""
    global _trim_timer
    with _trim_lock:
        if _trim_timer is not None:
            _trim_timer.cancel()
            _trim_timer = None
    _malloc_trim()


def release_when_freed(obj) -> None:
    """When `obj` (a pipeline, a conditioning, images: what ComfyUI drops from its cache on
    POST /free or when a graph changes) is freed, trim the heap shortly after, once its tensors are gone
    too (a weakref callback runs before the object's own attributes are released)."""
    def schedule():
        global _trim_timer
        with _trim_lock:
            if _trim_timer is not None:
                _trim_timer.cancel()
            _trim_timer = threading.Timer(TRIM_DELAY, _malloc_trim)
            _trim_timer.daemon = True
            _trim_timer.start()
    weakref.finalize(obj, schedule).atexit = False


# ----------------------------------------------------------------------------- progress, events

def interrupted() -> bool:
    """True once the user pressed Cancel (the flag stays set until ComfyUI handles it)."""
    return model_management is not None and model_management.processing_interrupted()


def raise_interrupted() -> None:
    """End the run as interrupted, the way ComfyUI's own nodes do."""
    if model_management is not None:
        model_management.interrupt_current_processing(False)
        raise model_management.InterruptProcessingException()
    raise Interrupted("cancelled")


def report_progress(node: str | None, value: int, total: int, preview=None) -> None:
    """Progress bar on the node; preview: a PIL image shown on it (the frontend scales it)."""
    if comfy_utils is None:
        return
    bar = comfy_utils.ProgressBar(total, node_id=node)
    bar.update_absolute(value, total, ("JPEG", preview, SHOWN_SIDE) if preview is not None else None)


def send_event(event: str, data: dict) -> None:
    """A custom websocket message to the client that queued the prompt (no-op outside ComfyUI)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = PromptServer.instance
    server.send_sync(event, data, server.client_id)


def to_pil(image: torch.Tensor):
    """(H, W, 3) float [0, 1] -> PIL RGB."""
    from PIL import Image
    array = (image.detach().float().clamp(0, 1).cpu() * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)

