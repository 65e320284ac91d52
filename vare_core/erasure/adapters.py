"""Erasure adapters: the adapter file (what it holds, saving, loading) and applying it to a model
(the tensors are trained by trainable.py).

Two ways to train (names are our parameter names, `blocks.{i}....`):
- `ca_ffn` (official S-VARE): full weights of every block's cross-attention (`blocks.{i}.ca.*`:
  mat_q, mat_kv, v_bias, proj) and FFN (`blocks.{i}.ffn.*`). The adapter stores the deltas
  (trained - base) of those tensors under the same names.
- `lora`: rank-r factors on chosen linear layers, targets from {"ca", "ffn", "sa"}
  (ca: mat_q, mat_kv, proj; ffn: fc1, fc2; sa: mat_qkv, proj). The adapter stores
  `{layer}.lora_A` (r, in) and `{layer}.lora_B` (out, r); the weight change is
  `lora_scale * B @ A` (metadata `lora_scale`, default 1).

Usage::

    adapter = load_adapter("erase_circle.safetensors")     # tensors + metadata (JSON values)
    erased = apply_adapter(pipe, adapter, strength=0.8)    # a NEW pipeline; `pipe` is unchanged
    both = apply_adapter(erased, load_adapter("other.safetensors"))   # stacking
    save_merged(both, "merged_transformer.safetensors")    # full weights, official key layout
    path, strength = parse_adapter_spec("erase_circle.safetensors:0.8")

File: safetensors; every metadata value is JSON text (format, base_fingerprint, preset, model,
concepts, anchors, method, train, rank, lora_targets, lora_scale, hyperparameters, steps_done,
steps_requested, cancelled, final_losses, pack_version, created ...). Loading parses it as JSON
data only. An adapter made for other base weights is refused unless `force=True` (shapes are
still checked). A file whose metadata contradicts its tensors (train, rank) is refused on load;
an update that cannot give finite logits at the stated strength is refused when applied
(adapter_limits.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from .. import paths
from ..checkpoints import save_safetensors_atomic, sniff_format
from ..checks import is_finite_number
from ..models.lowrank import LowRankUpdate, add_update, merged_state_dict
from ..models.presets import to_official_keys
from .adapter_limits import LORA_KEY, update_problem
from .trainable import CA_FFN_PARAM, LORA_TARGETS, TRAIN_MODES, shared_copy

FORMAT_VERSION = "vare-adapter/1"
MAX_LORA_SCALE = 1e4
STRENGTH_RANGE = (-2.0, 2.0)


class AdapterError(ValueError):
    """An adapter file or adapter that cannot be used; the message names it and the fix."""


@dataclass
class Adapter:
    tensors: dict          # name -> tensor (deltas, or lora_A / lora_B factors)
    metadata: dict         # JSON-compatible values
    source: str = "adapter"  # the file it was loaded from, for messages

    @property
    def train(self) -> str:
        return self.metadata.get("train", "lora" if any(LORA_KEY.match(k) for k in self.tensors) else "ca_ffn")

    def identity(self) -> str:
        """Short id of the tensors and metadata (recorded on pipelines it is applied to)."""
        digest = hashlib.sha256(json.dumps(self.metadata, sort_keys=True, default=str).encode())
        for name in sorted(self.tensors):
            digest.update(name.encode())
            digest.update(str(tuple(self.tensors[name].shape)).encode())
        return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- what trains

# ----------------------------------------------------------------------------- file

# Metadata keys that code reads back (describe, file names, stacking): their types are checked
# on load; any other key is kept as plain JSON data.
def _is_count(v, low=0):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_text_list(v):
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_number_dict(v):
    return isinstance(v, dict) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                       for x in v.values())


_METADATA_TYPES = {
    **{key: (lambda v: isinstance(v, str), "a string")
       for key in ("base_fingerprint", "model", "preset", "method")},
    **{key: (_is_text_list, "a list of strings") for key in ("concepts", "anchors")},
    **{key: (_is_count, "an integer >= 0")
       for key in ("n_pairs", "steps_done", "steps_requested", "skipped_steps")},
    "rank": (lambda v: v is None or _is_count(v, 1), "an integer >= 1 or null"),
    "lora_targets": (lambda v: v is None or (_is_text_list(v) and set(v) <= set(LORA_TARGETS)),
                     f"null or a list from {sorted(LORA_TARGETS)}"),
    "cancelled": (lambda v: isinstance(v, bool), "true or false"),
    "final_losses": (_is_number_dict, "an object of name -> number"),
    "hyperparameters": (lambda v: isinstance(v, dict), "an object"),
    "stacked_on": (lambda v: isinstance(v, list), "a list"),
}


def _check_metadata(metadata: dict, where: str) -> None:
    for key, (ok, allowed) in _METADATA_TYPES.items():
        if key in metadata and not ok(metadata[key]):
            shown = repr(metadata[key])
            raise AdapterError(f"{where}: metadata {key!r} must be {allowed}, got "
                               f"{shown if len(shown) <= 80 else shown[:80] + '...'}")


def _check_structure(tensors: dict, metadata: dict, where: str) -> None:
    _check_metadata(metadata, where)
    train = metadata.get("train")
    if train not in TRAIN_MODES:
        raise AdapterError(f"{where}: metadata 'train' is {train!r}, expected one of {TRAIN_MODES}")
    if not tensors:
        raise AdapterError(f"{where}: holds no tensors")
    _check_agreement(tensors, metadata, train, where)
    if train == "ca_ffn":
        bad = [k for k in tensors if not CA_FFN_PARAM.match(k)]
        if bad:
            raise AdapterError(f"{where}: unexpected tensor names for a ca_ffn adapter: {bad[:5]}")
        return
    bad = [k for k in tensors if not LORA_KEY.match(k)]
    if bad:
        raise AdapterError(f"{where}: unexpected tensor names for a LoRA adapter: {bad[:5]} "
                           "(expected blocks.{i}.<layer>.lora_A / .lora_B)")
    for layer in sorted({LORA_KEY.match(k).group(1) for k in tensors}):
        a, b = tensors.get(f"{layer}.lora_A"), tensors.get(f"{layer}.lora_B")
        if a is None or b is None:
            raise AdapterError(f"{where}: {layer} has only one of lora_A / lora_B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: {layer} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}; expected (r, in) and (out, r)")
    scale = metadata.get("lora_scale", 1.0)
    if not is_finite_number(scale):
        raise AdapterError(f"{where}: metadata lora_scale must be a finite number, got {scale!r}")
    if abs(scale) > MAX_LORA_SCALE:   # 1e308 * a LoRA product is inf weights
        raise AdapterError(f"{where}: metadata lora_scale {scale:g} is beyond +-{MAX_LORA_SCALE:g}; "
                           "the adapter is damaged (ours are written with 1.0)")


def _check_agreement(tensors: dict, metadata: dict, train: str, where: str) -> None:
    """The metadata and the tensors must tell the same story: a file whose 'train' (or 'rank')
    names one kind of adapter and whose tensors are another was edited or damaged."""
    factors = sorted(k for k in tensors if LORA_KEY.match(k))
    deltas = sorted(k for k in tensors if CA_FFN_PARAM.match(k) and not LORA_KEY.match(k))

    def contradiction(says: str, holds: str, example: str) -> AdapterError:
        return AdapterError(f"{where}: the file contradicts itself: its metadata says {says} but its "
                            f"tensors are {holds} (e.g. {example}); it was edited or damaged: use the "
                            "file its training wrote, or train it again")
    if train == "ca_ffn" and factors:
        raise contradiction("train 'ca_ffn' (whole-tensor deltas)", "LoRA factors", factors[0])
    if train == "lora" and deltas:
        raise contradiction("train 'lora' (low-rank factors)", "ca_ffn deltas", deltas[0])
    rank = metadata.get("rank")
    if train == "lora" and isinstance(rank, int) and factors:
        ranks = sorted({tensors[k].shape[0] if k.endswith("_A") else tensors[k].shape[-1]
                        for k in factors if tensors[k].ndim == 2})
        if ranks and rank not in ranks:
            raise contradiction(f"rank {rank}", f"factors of rank {', '.join(map(str, ranks))}", factors[0])


def save_adapter(adapter: Adapter, path) -> None:
    """Atomic write: safetensors + metadata values as JSON text."""
    path = Path(path)
    metadata = dict(adapter.metadata)
    metadata.setdefault("format", FORMAT_VERSION)
    _check_structure(adapter.tensors, metadata, f"adapter for {path}")
    bad = [name for name, tensor in adapter.tensors.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise AdapterError(f"adapter for {path}: {bad[0]} holds inf/NaN (training diverged?); "
                           "an adapter that cannot be applied is never saved")
    encoded = {key: json.dumps(value) for key, value in metadata.items()}
    save_safetensors_atomic(adapter.tensors, path, encoded)


def load_adapter(path) -> Adapter:
    """Read an adapter file; AdapterError (naming the file) when it is not a usable adapter."""
    path = Path(path)
    if path.is_dir():
        raise AdapterError(f"{path} is a folder; give the adapter's .safetensors file")
    if paths.file_kind(path) == "missing":
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        paths.require_regular_file(path, "adapter")
    except ValueError as err:
        raise AdapterError(str(err)) from None
    if sniff_format(path) in ("zip", "legacy"):
        raise AdapterError(f"{path}: is a torch.save / pickle file; adapters are .safetensors files "
                           "written by save_adapter (pickles are never loaded)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # damaged or not safetensors
        raise AdapterError(f"{path}: not a readable safetensors adapter ({err}); "
                           "train or download it again") from None
    metadata = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)   # data only: JSON is never evaluated as code
        except (ValueError, RecursionError) as err:
            problem = "is nested too deeply" if isinstance(err, RecursionError) else "is not JSON"
            raise AdapterError(f"{path}: metadata {key!r} {problem} ({value[:40]!r}); "
                               "this file was not written by save_adapter") from None
    if metadata.get("format") != FORMAT_VERSION:
        raise AdapterError(f"{path}: format {metadata.get('format')!r} is not {FORMAT_VERSION!r}; "
                           "it is not a VARE adapter or comes from a newer version")
    _check_structure(tensors, metadata, str(path))
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{path}: tensor {name} is not a finite float tensor")
    return Adapter(tensors=tensors, metadata=metadata, source=str(path))


# ----------------------------------------------------------------------------- applying

def _check_against_model(adapter: Adapter, model: nn.Module, where: str) -> None:
    params = dict(model.named_parameters())
    for name, tensor in adapter.tensors.items():
        if adapter.train == "ca_ffn":
            target, expected = name, tuple(tensor.shape)
        else:
            layer, which = LORA_KEY.match(name).groups()
            target = f"{layer}.weight"
            if target not in params:
                raise AdapterError(f"{where}: {target} does not exist in this model")
            out_features, in_features = params[target].shape
            side = in_features if which == "A" else out_features
            got = tensor.shape[1] if which == "A" else tensor.shape[0]
            if got != side:
                raise AdapterError(f"{where}: {name} has shape {tuple(tensor.shape)} but "
                                   f"{target} is {out_features}x{in_features}")
            continue
        if target not in params:
            raise AdapterError(f"{where}: {target} does not exist in this model")
        if tuple(params[target].shape) != expected:
            raise AdapterError(f"{where}: {name} has shape {expected} but the model's is "
                               f"{tuple(params[target].shape)}")


def apply_adapter(pipe, adapter: Adapter, strength: float = 1.0, force: bool = False):
    """A new VarPipeline whose model holds base + strength * delta for the adapter's tensors and
    shares every other tensor (and the VAE / text encoder) with `pipe`, which stays unchanged.
    A LoRA adapter is applied unmerged (its factors beside the shared base weights, no copy of
    them); ca_ffn deltas make new tensors for the layers they change."""
    strength = _check_strength(strength, "strength")
    where = adapter.source
    base = adapter.metadata.get("base_fingerprint")
    if base != pipe.fingerprint and not force:
        raise AdapterError(f"{where} was trained on base weights {base} but this model is "
                           f"{pipe.fingerprint} ({pipe.name}); load the model it was made for, "
                           "or apply it anyway (force=True; node: allow_other_base)")
    _check_structure(adapter.tensors, adapter.metadata, where)
    _check_against_model(adapter, pipe.model, where)
    problem = update_problem(adapter, pipe.model, strength) if strength != 0.0 else None
    if problem:
        raise AdapterError(f"{where}: {problem}")
    model = shared_copy(pipe.model)
    if strength != 0.0 and adapter.train == "lora":
        # Applied beside the weights (models/lowrank.py): the new model shares every base tensor.
        scale = strength * float(adapter.metadata.get("lora_scale", 1.0))
        for layer in sorted({LORA_KEY.match(k).group(1) for k in adapter.tensors}):
            module = model.get_submodule(layer)
            device = module.weight.device
            add_update(module, LowRankUpdate(adapter.tensors[f"{layer}.lora_A"].float().to(device),
                                             adapter.tensors[f"{layer}.lora_B"].float().to(device), scale))
    elif strength != 0.0:
        with torch.no_grad():
            for name, delta in adapter.tensors.items():       # ca_ffn: whole-tensor deltas
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                old = getattr(module, attr)
                new = old.float() + strength * delta.float().to(old.device)
                setattr(module, attr, nn.Parameter(new.to(old.dtype), requires_grad=False))
    if strength != 0.0:    # named by the sampler's error if the logits ever overflow
        this = f"adapter {Path(where).name} at strength {strength:g}"
        before = getattr(pipe.model, "applied_description", None)
        model.applied_description = f"{before}, {this}" if before else this
    applied = tuple(getattr(pipe, "applied_adapters", ())) + ((adapter.identity(), strength),)
    new_pipe = dataclasses.replace(pipe, model=model, defaults=dict(pipe.defaults))
    new_pipe.applied_adapters = applied   # part of the trajectory cache key (see trajectories)
    return new_pipe


def save_merged(pipe, path) -> None:
    """The transformer's full weights in the official key layout (block_chunks.{c}.module.{m})."""
    model = pipe.model
    state = to_official_keys(merged_state_dict(model), model.cfg.blocks_per_chunk)
    metadata = {"base_fingerprint": json.dumps(pipe.fingerprint),
                "applied_adapters": json.dumps([list(a) for a in getattr(pipe, "applied_adapters", ())])}
    save_safetensors_atomic(state, path, metadata)


# ----------------------------------------------------------------------------- specs

def _check_strength(value, what: str) -> float:
    if not is_finite_number(value):
        raise AdapterError(f"{what} must be a finite number, got {value!r}")
    low, high = STRENGTH_RANGE
    if not low <= value <= high:
        raise AdapterError(f"{what} {value} is outside [{low}, {high}]")
    return float(value)


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """'file.safetensors' -> (path, 1.0); 'file.safetensors:0.8' -> (path, 0.8).
    A Windows drive letter ('C:\\x.safetensors') is part of the path, not a strength."""
    if not isinstance(spec, str) or not spec.strip():
        raise AdapterError(f"adapter spec {spec!r} is empty; write FILE or FILE:STRENGTH")
    spec = spec.strip()
    head, sep, tail = spec.rpartition(":")
    drive_only = len(head) == 1 and head.isalpha()           # 'C:\x.safetensors'
    if not sep or drive_only or "/" in tail or "\\" in tail:
        return spec, 1.0
    try:
        strength = float(tail)
    except ValueError:
        raise AdapterError(f"adapter spec {spec!r}: strength {tail!r} is not a number; "
                           "write FILE:STRENGTH, e.g. erase.safetensors:0.8") from None
    if not head:
        raise AdapterError(f"adapter spec {spec!r} has no file name before ':'")
    return head, _check_strength(strength, f"adapter spec {spec!r}: strength")
