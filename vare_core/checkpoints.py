"""Reading and writing weight files safely.

Loads the state dicts users actually have: `.safetensors` files, sharded safetensors checkpoints
(a folder or its `*.index.json`), and `torch.save` files (`.pth`, `.pt`, `.bin`, `.ckpt`) through
`torch.load(weights_only=True)` only. A pickle that needs code to load (a class, or a
`__reduce__` that runs a command) is refused, never executed. Every problem raises
`CheckpointError` naming the file and the fix, instead of a bare traceback.

The file format is sniffed from the first bytes, not the suffix (renamed files still load).
Common containers are unwrapped: `['trainer']['gpt_fsdp']` (Infinity training checkpoints),
`state_dict`, `model`, `module`, and `vae` before `ema` (the official Infinity VAE loader reads
`'vae'` unless run with `ema='yes'`; pass `container="ema"` for the EMA weights). Key prefixes
`module.` (DDP, when every key has it) and `_orig_mod.` (torch.compile) are removed. Mapping keys
to a model and detecting its size live with the model code, not here.

Usage:
    from vare_core.checkpoints import load_state_dict, check_finite, save_safetensors_atomic
    weights = load_state_dict("infinity_2b_reg.pth")           # mmap: cheap until used
    check_finite(weights, "infinity_2b_reg.pth")
    save_safetensors_atomic(weights, "infinity_2b_reg.safetensors", {"format": "pt"})
    file_fingerprint("infinity_2b_reg.safetensors")            # same value for the .pth
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from . import paths
from .checks import is_integer

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library refuses larger headers too
# Tried in order until the dict holds tensors; 'vae' before 'ema' as in the official VAE loader.
CONTAINER_KEYS = (("trainer", "gpt_fsdp"), ("state_dict",), ("model",), ("module",), ("vae",), ("ema",))
_PLAIN_FIX = ("Only plain tensor checkpoints are accepted (a dict of tensors saved with "
              "torch.save(model.state_dict()) or safetensors); convert the file with "
              "safetensors.torch.save_file in a trusted environment.")


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and what to do."""

    def __init__(self, path, problem: str, fix: str = ""):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}" + (f". {fix}" if fix else ""))


# ---------------------------------------------------------------------------- loading

def load_state_dict(path, *, map_location="cpu", mmap: bool = True,
                    container: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a weight file, a sharded checkpoint (folder or index) or a folder
    holding one weight file. `container` picks a nested dict by dotted keys ("ema",
    "trainer.gpt_ema_fsdp") instead of the automatic choice."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder", "Check the path and the file name")
    if not path.is_dir():       # a FIFO or device would block or stream forever
        try:
            paths.require_regular_file(path, "checkpoint")
        except ValueError as err:
            raise CheckpointError(path, str(err).split(f"{path} ", 1)[-1]) from None
    if path.is_dir():
        raw = _load_folder(path, map_location, mmap)
    elif path.name.endswith(".index.json"):
        raw = _load_sharded(path, map_location, mmap)
    else:
        raw = load_weight_file(path, map_location, mmap)
    return _strip_wrappers(_unwrap(raw, path, container), path)


def _load_folder(folder: Path, map_location, mmap: bool):
    indexes = sorted(folder.glob("*.index.json"))
    preferred = folder / "model.safetensors.index.json"
    if preferred in indexes:
        return _load_sharded(preferred, map_location, mmap)
    if len(indexes) == 1:
        return _load_sharded(indexes[0], map_location, mmap)
    if len(indexes) > 1:
        raise CheckpointError(folder, "holds several shard indexes: " + ", ".join(p.name for p in indexes),
                              "Pass the index file to use")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    if len(files) == 1:
        return load_weight_file(files[0], map_location, mmap)
    if not files:
        raise CheckpointError(folder, "folder holds no weight files (" + ", ".join(WEIGHT_SUFFIXES)
                              + ") and no model.safetensors.index.json",
                              "Point to the weight file itself, or download the checkpoint into it")
    raise CheckpointError(folder, f"folder holds {len(files)} weight files and no shard index: "
                          + ", ".join(p.name for p in files[:8]),
                          "Pass one file, or the *.index.json of a sharded checkpoint")


def read_shard_index(index_path: Path) -> tuple[dict[str, str], list[Path]]:
    """(weight_map, shard files in first-use order) of a `*.index.json` (HF layout: {"weight_map":
    {key: shard_file}}); CheckpointError when it is unreadable or names shards that are absent."""
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(index_path, f"shard index is not readable JSON ({err})",
                              "Download the index file again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map \
            or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(index_path, 'shard index has no "weight_map" of tensor name -> shard file',
                              "Use the model.safetensors.index.json shipped with the checkpoint")
    folder = index_path.parent
    shards = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(index_path, f"names shard file(s) missing from {folder}: {', '.join(missing)}",
                              "Download every shard listed in the index into that folder")
    return weight_map, [folder / name for name in shards]


def _load_sharded(index_path: Path, map_location, mmap: bool) -> dict[str, torch.Tensor]:
    """Load every shard a `*.index.json` names."""
    weight_map, shards = read_shard_index(index_path)
    tensors: dict[str, torch.Tensor] = {}
    for shard_path in shards:
        part = load_weight_file(shard_path, map_location, mmap)
        part = _unwrap(part, shard_path, None)
        duplicated = sorted(set(part) & set(tensors))
        if duplicated:
            raise CheckpointError(shard_path, "repeats tensors of another shard: "
                                  + ", ".join(duplicated[:5]),
                                  "The shards come from different checkpoints; download them again")
        tensors.update(part)
    absent = [key for key in weight_map if key not in tensors]
    if absent:
        raise CheckpointError(index_path, f"{len(absent)} tensor(s) of the index are in no shard: "
                              + ", ".join(absent[:5]), "The shards are incomplete or from another version")
    return tensors


def sniff_format(path: Path) -> str:
    """'safetensors', 'zip' (torch.save), 'legacy' (old torch.save) or 'unknown', from the
    first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle protocol marker
        return "legacy"
    return "unknown"


def load_weight_file(path: Path, map_location="cpu", mmap: bool = True):
    """What one weight file holds (safetensors: a dict of tensors; torch.save: the unpickled
    object, tensors and plain containers only), with CheckpointError for every way it can be
    unusable."""
    path = Path(path)
    try:
        size = path.stat().st_size
        kind = sniff_format(path)
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror or err})",
                              "Check the file permissions") from None
    if size == 0:
        raise CheckpointError(path, "file is empty (0 bytes)",
                              "The download or copy was interrupted; fetch the file again")
    if kind == "safetensors":
        return _load_safetensors(path, size, map_location)
    if kind in ("zip", "legacy"):
        return _torch_load(path, kind, map_location, mmap)
    raise CheckpointError(path, f"is not a safetensors or torch.save file (suffix {path.suffix or 'none'!r})",
                          "Use a .safetensors or .pth/.pt/.bin/.ckpt checkpoint of the model")


def read_safetensors_header(path, size: int | None = None) -> dict:
    """The JSON header of a safetensors file (tensor entries and "__metadata__"), checked
    against the file's size; CheckpointError for truncated files and absurd headers (before
    the safetensors library reports them less clearly)."""
    path = Path(path)
    size = path.stat().st_size if size is None else size
    truncated = "The file is truncated or not a safetensors file; download it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(path, f"has {size} bytes, too few for a safetensors header", truncated)
        (header_size,) = struct.unpack("<Q", head)
        if header_size > MAX_SAFETENSORS_HEADER or 8 + header_size > size:
            raise CheckpointError(path, f"safetensors header claims {header_size} bytes but the file "
                                  f"has {size} bytes", truncated)
        try:
            header = json.loads(f.read(header_size))
            data_end = max((entry["data_offsets"][1] for key, entry in header.items()
                            if key != "__metadata__"), default=0)
            if not is_integer(data_end, minimum=0):
                raise TypeError("data_offsets must be integers")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
            raise CheckpointError(path, "safetensors header is not valid", truncated) from None
    if 8 + header_size + data_end > size:
        raise CheckpointError(path, f"tensor data needs {8 + header_size + data_end} bytes but the file "
                              f"has {size} bytes", truncated)
    return header


def safetensors_metadata(path) -> dict[str, str]:
    """The "__metadata__" strings of a safetensors file ({} when it has none), reading only the
    header; CheckpointError when it is not a sound safetensors file."""
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "safetensors metadata is not a map of strings",
                              "The file is damaged; download or write it again")
    return metadata


def _load_safetensors(path: Path, size: int, map_location) -> dict[str, torch.Tensor]:
    read_safetensors_header(path, size)
    try:
        device = str(torch.device(map_location))
    except (TypeError, RuntimeError):
        raise ValueError(f"map_location for a safetensors file must be a device such as 'cpu' or "
                         f"'cuda:0', got {map_location!r} ({path})") from None
    try:
        return safetensors.torch.load_file(path, device=device)  # memory-mapped, lazy
    except Exception as err:  # SafetensorError and friends: report the file, keep the cause
        raise CheckpointError(path, f"safetensors could not read it ({err})",
                              "The file is corrupt; download it again") from err


def _torch_load(path: Path, kind: str, map_location, mmap: bool):
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointError(path, "torch.save archive is incomplete (its zip directory is missing)",
                              "The file is truncated or corrupt; download or copy it again")
    try:
        # mmap works only for the zip format; old (legacy) files load into memory.
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:  # weights_only met a class or function: refuse, never run it
            raise CheckpointError(path, f"refused: the pickle needs code to load (it names "
                                  f"{found.group(1)})", _PLAIN_FIX) from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
        reason = detail.group(1)[:200] if detail else "UnpicklingError"
        raise CheckpointError(path, f"could not be unpickled ({reason}); the file is truncated or "
                              "corrupt, or not a plain tensor checkpoint", _PLAIN_FIX) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, struct.error, zipfile.BadZipFile) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(path, f"torch.load could not read it ({type(err).__name__}: {reason})",
                              "The file is truncated or corrupt; download or copy it again") from None


def _unwrap(obj, path: Path, container: str | None) -> dict[str, torch.Tensor]:
    """Find the dict of tensors inside a checkpoint object."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors",
                              "Save model.state_dict() rather than the model or a list")
    if container is not None:
        for key in container.split("."):
            if not isinstance(obj, Mapping) or key not in obj:
                keys = list(obj)[:10] if isinstance(obj, Mapping) else []
                raise CheckpointError(path, f"has no container {container!r} (keys here: {keys})",
                                      "Leave container=None for the automatic choice")
            obj = obj[key]
    else:
        for _ in range(4):  # nesting depth of the known layouts
            if obj and all(torch.is_tensor(v) for v in obj.values()):
                break
            for keys in CONTAINER_KEYS:
                inner = obj
                for key in keys:
                    inner = inner.get(key) if isinstance(inner, Mapping) else None
                if isinstance(inner, Mapping) and inner:
                    obj = inner
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(path, "holds no tensors", "Check that this is a model weight file")
    strange = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if strange:
        raise CheckpointError(path, f"entries that are not tensors: {', '.join(strange[:5])}",
                              "Pass container=... naming the dict that holds the weights, or save "
                              "model.state_dict() only")
    return dict(obj)


def _strip_wrappers(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Remove `_orig_mod.` (torch.compile, at any depth) and a `module.` prefix (DDP) on every key."""
    renamed = {re.sub(r"(^|\.)_orig_mod\.", r"\1", key): value for key, value in tensors.items()}
    if len(renamed) != len(tensors):
        raise CheckpointError(path, "holds the same tensor with and without the torch.compile "
                              "'_orig_mod.' prefix", "Save the state dict of the uncompiled model")
    while renamed and all(key.startswith("module.") for key in renamed):
        renamed = {key[len("module."):]: value for key, value in renamed.items()}
    return renamed


# ---------------------------------------------------------------------------- checks

def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_finite(state_dict: Mapping[str, torch.Tensor], path="state dict") -> None:
    """Raise CheckpointError listing the first tensors holding NaN or Inf (floating tensors only;
    one tensor at a time, in chunks, so big models need no extra copy)."""
    bad = [name for name, tensor in state_dict.items()
           if torch.is_tensor(tensor) and not tensor.is_meta
           and (tensor.is_floating_point() or tensor.is_complex()) and not _all_finite(tensor)]
    if bad:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(path, f"{len(bad)} tensor(s) hold NaN or Inf values: {listed}",
                              "The weights are corrupt or overflowed (e.g. a bad fp16 conversion); "
                              "use an intact copy")


def file_fingerprint(state_dict_or_path, samples_per_tensor: int = 64) -> str:
    """A short stable hex id of a model's weights: sha256 over the sorted names, dtypes, shapes
    and a strided sample of each tensor's values. Cheap for multi-GB files (memory-mapped, only
    the sampled pages are read) and the same for the same weights in .pth or .safetensors."""
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        state_dict = load_state_dict(state_dict_or_path, mmap=True)
    elif isinstance(state_dict_or_path, Mapping):
        state_dict = state_dict_or_path
    else:
        raise ValueError("file_fingerprint needs a path or a state dict, got "
                         f"{type(state_dict_or_path).__name__}")
    if samples_per_tensor < 2:
        raise ValueError(f"samples_per_tensor must be at least 2, got {samples_per_tensor}")
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not torch.is_tensor(tensor) or tensor.is_meta:
            raise ValueError(f"file_fingerprint: {name!r} is not a tensor with data")
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() > samples_per_tensor:
            index = torch.arange(samples_per_tensor) * (flat.numel() - 1) // (samples_per_tensor - 1)
            flat = flat[index.to(flat.device)]
        digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- saving

def _prepare_for_safetensors(tensors: Mapping) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing storage (safetensors refuses tied weights)."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a dict of name -> tensor, got {type(tensors).__name__}")
    prepared, storages = {}, set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not torch.is_tensor(tensor):
            raise ValueError(f"tensors[{name!r}] must be a tensor under a str name, "
                             f"got {type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in storages and tensor.numel():
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        prepared[name] = tensor
    return prepared


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], path,
                            metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that readers only ever see the old file or the complete new
    one: write a temp file in the same folder, fsync it, then os.replace it over `path`.
    On failure the previous file is untouched and the temp file is removed."""
    path = Path(path)
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"metadata for {path} must be a dict of str -> str, got {metadata!r}")
    prepared = _prepare_for_safetensors(tensors)

    def write(temp_name):
        try:
            safetensors.torch.save_file(prepared, temp_name, metadata=metadata)
        except safetensors.SafetensorError as err:   # its I/O errors (a full disk) are not OSError
            raise _as_os_error(err) from err

    paths.write_atomic(path, write)


def _as_os_error(err: Exception) -> Exception:
    """safetensors reports write failures as SafetensorError('... (os error 28) ...') or
    '... Os { code: 28, ... }'; return the OSError they are (the error itself when not I/O)."""
    text = str(err)
    found = re.search(r"os error (\d+)|code: (\d+)", text)
    if not found:
        return err
    number = int(found.group(1) or found.group(2))
    return OSError(number, os.strerror(number))
