"""VARE auxiliary visual tokens: trajectories the frozen model samples for the SAFE prompts.

For every safe prompt c the frozen model draws one image token by token (the S-VARE paper's
auxiliary tokens: fixed seed, CFG 4 on logits, tau 1, top_p 0.97) and we keep, per scale, what
teacher-forced training needs:

    x_wo_prefix     (L-1, d)  float32  next-scale inputs of scales 1.. (the student's input)
    bit_labels      (L, d)    uint8    the sampled bits (L_FCE targets)
    teacher_logits  (L, 2d)   the frozen model's CFG-combined logits after tau, before top-p
                                       (L_Pre / VARE targets); fp16 on disk when the model runs
                                       in fp16/bf16 (its logits carry no more precision), else fp32
    seeds           ()        int64    seed of the torch.Generator of the batch that drew it

Usage::

    settings = TrajectorySettings()                        # cfg 4, tau 1, top_p 0.97, seed 0
    trajs = build_trajectories(pipe, [p.safe for p in pairs], settings)
    batch = trajs.batch([0, 3], device="cuda")             # dict of stacked tensors

Batch b (prompts b*batch_size ...) is drawn with a generator seeded `seed + b*batch_size`, so the
trajectories depend on batch_size; with batch_size 1, trajectory i is exactly
`pipe.generate(prompt_i, seed=seed + i, cfg=cfg, tau=tau, top_p=top_p)`.

Cache: one safetensors file per set, in `cache_dir` (default `$VARE_CACHE_DIR` or
`~/.cache/vare/trajectories`), named by a hash of the model fingerprint (plus any applied
adapters and the compute dtype), the prompts, the settings, the scale schedule and the format
version. A sha256 of the tensors is stored in the metadata and checked on load: a corrupted or
truncated file is reported (logging warning) and rebuilt. Files are written atomically.
The device is not part of the key: a set sampled on a GPU is reused on the CPU (both are valid
samples of the same model; only bit-exact reproduction differs across devices).
The cache is bounded: after each write, the least recently used sets (a hit counts as a use)
are deleted until the folder holds at most `$VARE_CACHE_LIMIT_GB` (default 8 GiB, also when
set but empty; 0 keeps only the set just written; text, a negative number or inf are refused
before any sampling, naming the variable). The set just written is never deleted.
A cache folder that cannot be read or written (read-only, full, not a folder) only costs the
caching: the trajectories are sampled and training goes on, with a logged warning; so does a
missing home folder ($HOME unset and no VARE_CACHE_DIR: nothing is cached).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open

from ..checkpoints import save_safetensors_atomic
from ..checks import is_finite_number, is_integer
from ..models.bsq_quant import next_scale_input
from ..generation.sampler import SamplingCancelled, SamplingSettings, sample

log = logging.getLogger(__name__)

FORMAT_VERSION = "vare-trajectories/1"
_TENSOR_NAMES = ("x_wo_prefix", "bit_labels", "teacher_logits", "seeds")


@dataclass
class TrajectorySettings:
    cfg: float = 4.0          # guidance on logits: cfg * cond + (1 - cfg) * uncond
    tau: float = 1.0          # logits are divided by tau before CFG
    top_p: float = 0.97       # nucleus filter when drawing bits (teacher_logits are unfiltered)
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8       # prompts sampled together (part of the cache key: see docstring)
    logits_dtype: str = "auto"  # teacher_logits on disk: auto (fp16 for half models), fp16, fp32

    def __post_init__(self):
        for name in ("cfg", "tau"):        # one number each: they are part of the cache key
            value = getattr(self, name)
            if not is_finite_number(value):
                raise ValueError(f"TrajectorySettings.{name} must be a finite number, got {value!r}")
        try:
            self.sampling()                # the sampler's own checks (ranges, top_k, top_p)
        except ValueError as err:
            raise ValueError(f"TrajectorySettings: {err}") from None
        for name, low in (("seed", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not is_integer(value, minimum=low):
                raise ValueError(f"TrajectorySettings.{name} must be an integer >= {low}, got {value!r}")
        if self.logits_dtype not in ("auto", "fp16", "fp32"):
            raise ValueError(f"TrajectorySettings.logits_dtype must be auto, fp16 or fp32, "
                             f"got {self.logits_dtype!r}")

    def sampling(self) -> SamplingSettings:
        """How the trajectories' bits are drawn (before the model's free scales are laid out)."""
        return SamplingSettings(cfg=self.cfg, tau=self.tau, top_k=self.top_k, top_p=self.top_p)


@dataclass
class TrajectorySet:
    """Trajectories of `prompts`, stacked over prompts (first axis)."""
    prompts: list[str]
    schedule: list[tuple[int, int]]
    x_wo_prefix: torch.Tensor      # (N, L-1, d) float32
    bit_labels: torch.Tensor       # (N, L, d) uint8
    teacher_logits: torch.Tensor   # (N, L, 2d) float16 or float32
    seeds: torch.Tensor            # (N,) int64
    key: str = ""                  # cache key
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.prompts)

    def to(self, device) -> "TrajectorySet":
        """Move the tensors (e.g. onto the GPU once, for training); returns self."""
        for name in _TENSOR_NAMES:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def batch(self, indices, device=None) -> dict:
        """Training inputs of the given trajectories: x_wo_prefix and teacher_logits float32,
        bit_labels int64."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.bit_labels.device)
        device = self.bit_labels.device if device is None else device
        return {
            "x_wo_prefix": self.x_wo_prefix[index].to(device, torch.float32),
            "bit_labels": self.bit_labels[index].to(device, torch.long),
            "teacher_logits": self.teacher_logits[index].to(device, torch.float32),
            "seeds": self.seeds[index].to(device),
        }


# ----------------------------------------------------------------------------- cache key, files

CACHE_LIMIT_ENV = "VARE_CACHE_LIMIT_GB"
DEFAULT_CACHE_LIMIT_GB = 8.0


def cache_limit_bytes() -> int:
    """The cache's size bound from $VARE_CACHE_LIMIT_GB (GiB, >= 0); a bad value is a clear error."""
    text = os.environ.get(CACHE_LIMIT_ENV, "").strip()
    if not text:
        return int(DEFAULT_CACHE_LIMIT_GB * 2**30)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"${CACHE_LIMIT_ENV}={text!r}: give the trajectory cache's size limit in GiB "
                         f"(a number >= 0, e.g. {DEFAULT_CACHE_LIMIT_GB:g})")
    return int(value * 2**30)


def evict(folder: Path, limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used trajectory sets until `folder` holds at most `limit`
    bytes of them (`keep` is never deleted); returns what was deleted."""
    entries = []
    for path in Path(folder).glob("traj-*.safetensors"):
        try:
            info = path.stat()
        except OSError:
            continue
        entries.append((info.st_mtime, info.st_size, path))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if keep is not None and path == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        deleted.append(path)
    return deleted


def default_cache_dir() -> Path | None:
    """$VARE_CACHE_DIR/trajectories, else ~/.cache/vare/trajectories; None (no caching) where
    there is no home folder to put it in ($HOME unset or not absolute, and no passwd entry)."""
    root = os.environ.get("VARE_CACHE_DIR", "").strip()
    if root:
        return Path(root) / "trajectories"
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home):
        try:
            import pwd
            home = pwd.getpwuid(os.getuid()).pw_dir
        except (ImportError, KeyError, OSError):
            home = ""
    if not os.path.isabs(home or ""):
        return None
    return Path(home) / ".cache" / "vare" / "trajectories"


def model_identity(pipe) -> dict:
    """What decides the frozen model's outputs: base weights, applied adapters, compute dtype."""
    identity = {"fingerprint": pipe.fingerprint,
                "adapters": [list(a) for a in getattr(pipe, "applied_adapters", ())],
                "dtype": str(pipe.model.word_embed.weight.dtype),
                "spatial_patchify": bool(pipe.spatial_patchify)}
    free = pipe.free_scales
    return {**identity, "free_scales": free} if free else identity   # keys of older caches kept


def cache_key(pipe, prompts: Sequence[str], settings: TrajectorySettings, schedule) -> str:
    payload = {"format": FORMAT_VERSION, "model": model_identity(pipe), "prompts": list(prompts),
               "settings": asdict(settings), "schedule": [list(s) for s in schedule]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def tensors_checksum(tensors: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _logits_storage_dtype(pipe, settings: TrajectorySettings) -> torch.dtype:
    if settings.logits_dtype == "fp16":
        return torch.float16
    if settings.logits_dtype == "fp32":
        return torch.float32
    half = pipe.model.word_embed.weight.dtype in (torch.float16, torch.bfloat16)
    return torch.float16 if half else torch.float32


def save_trajectories(trajs: TrajectorySet, path: Path, settings: TrajectorySettings) -> None:
    tensors = {name: getattr(trajs, name) for name in _TENSOR_NAMES}
    metadata = {"format": FORMAT_VERSION, "key": trajs.key, "prompts": json.dumps(trajs.prompts),
                "schedule": json.dumps([list(s) for s in trajs.schedule]),
                "settings": json.dumps(asdict(settings)), "checksum": tensors_checksum(tensors)}
    save_safetensors_atomic(tensors, path, metadata)


class CacheEntryError(ValueError):
    """A cache file that cannot be used (corrupt, truncated, or for other inputs)."""


def load_trajectories(path: Path, key: str) -> TrajectorySet:
    """Read and verify one cache file; CacheEntryError says what is wrong with it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CacheEntryError(f"{path}: unreadable ({err})") from None
    if metadata.get("format") != FORMAT_VERSION or metadata.get("key") != key:
        raise CacheEntryError(f"{path}: written for other inputs or another format "
                              f"({metadata.get('format')!r})")
    if sorted(tensors) != sorted(_TENSOR_NAMES):
        raise CacheEntryError(f"{path}: holds {sorted(tensors)}, expected {sorted(_TENSOR_NAMES)}")
    if tensors_checksum(tensors) != metadata.get("checksum"):
        raise CacheEntryError(f"{path}: checksum mismatch (the file is damaged)")
    try:
        prompts = json.loads(metadata["prompts"])
        schedule = [tuple(s) for s in json.loads(metadata["schedule"])]
    except (KeyError, ValueError, TypeError) as err:
        raise CacheEntryError(f"{path}: metadata is damaged ({err})") from None
    return TrajectorySet(prompts=prompts, schedule=schedule, key=key, from_cache=True, **tensors)


# ----------------------------------------------------------------------------- sampling

def _sample_batch(pipe, prompts: list[str], schedule, settings: TrajectorySettings, seed: int,
                  cancel) -> dict:
    """Draw one trajectory per prompt; returns the per-prompt tensors stacked over the batch."""
    factor = 2 if pipe.spatial_patchify else 1
    inputs, labels, logits = [], [], []

    def record(step):
        labels.append(step.bits.flatten(1, 2))              # (B, h*w, d)
        logits.append(step.logits)                          # (B, h*w, 2d)
        if step.index + 1 < len(schedule):                  # exactly what the sampler feeds next
            h, w = schedule[step.index + 1]
            inputs.append(next_scale_input(step.summed_codes, (h * factor, w * factor),
                                           pipe.spatial_patchify))

    states, lens = pipe.encode_prompts(prompts)
    generator = torch.Generator(pipe.device).manual_seed(seed)
    sample(pipe.model, pipe.vae, states, lens, schedule,            # drawn as the sampler draws them
           settings.sampling().laid_out(len(schedule), pipe.free_scales), generator=generator,
           callback=record, cancel=cancel, spatial_patchify=pipe.spatial_patchify, decode=False)
    d = labels[0].shape[-1]
    x = torch.cat(inputs, dim=1) if inputs else torch.zeros(len(prompts), 0, d, device=pipe.device)
    return {"x_wo_prefix": x.float().cpu(), "bit_labels": torch.cat(labels, 1).to(torch.uint8).cpu(),
            "teacher_logits": torch.cat(logits, 1).float().cpu()}


@torch.no_grad()
def generate_trajectories(pipe, prompts: Sequence[str], settings: TrajectorySettings,
                          schedule=None, callback: Callable[[int, int], None] | None = None,
                          cancel: Callable[[], bool] | None = None) -> TrajectorySet:
    """Sample the trajectories (no cache). callback(done, total) after each prompt;
    cancel() is checked between scales and raises sampler.SamplingCancelled."""
    schedule = [tuple(s) for s in (schedule or pipe.default_schedule)]
    prompts = list(prompts)
    store_dtype = _logits_storage_dtype(pipe, settings)
    parts, seeds = [], []
    was_training = pipe.model.training
    pipe.model.eval()                      # no condition dropout while sampling
    try:
        for start in range(0, len(prompts), settings.batch_size):
            if cancel is not None and cancel():
                raise SamplingCancelled(f"trajectories cancelled after {start} of {len(prompts)} prompts")
            chunk = prompts[start:start + settings.batch_size]
            seed = settings.seed + start
            parts.append(_sample_batch(pipe, chunk, schedule, settings, seed, cancel))
            seeds += [seed] * len(chunk)
            if callback is not None:
                for i in range(len(chunk)):
                    callback(start + i + 1, len(prompts))
    finally:
        pipe.model.train(was_training)
    logits = torch.cat([p["teacher_logits"] for p in parts])
    if store_dtype == torch.float16:  # fp16 tops out at 65504; real logits are far below
        logits = logits.clamp(-6e4, 6e4)
    return TrajectorySet(prompts=prompts, schedule=schedule,
                         x_wo_prefix=torch.cat([p["x_wo_prefix"] for p in parts]),
                         bit_labels=torch.cat([p["bit_labels"] for p in parts]),
                         teacher_logits=logits.to(store_dtype),
                         seeds=torch.tensor(seeds, dtype=torch.int64))


def build_trajectories(pipe, safe_prompts: Sequence[str], settings: TrajectorySettings | None = None,
                       cache_dir=None, callback: Callable[[int, int], None] | None = None,
                       cancel: Callable[[], bool] | None = None, schedule=None) -> TrajectorySet:
    """Trajectories of the safe prompts: loaded from the cache when present and intact,
    otherwise sampled and cached. schedule defaults to pipe.default_schedule."""
    settings = settings or TrajectorySettings()
    prompts = list(safe_prompts)
    if not prompts:
        raise ValueError("safe_prompts is empty; give at least one safe prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"safe prompt {i} is empty ({prompt!r}); every pair needs a safe prompt")
    schedule = [tuple(s) for s in (schedule or pipe.default_schedule)]
    key = cache_key(pipe, prompts, settings, schedule)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    limit = cache_limit_bytes()        # a bad setting fails before the (long) sampling
    if folder is None:
        log.warning("trajectories are not cached: there is no home folder for ~/.cache/vare ($HOME "
                    "is unset); set VARE_CACHE_DIR to a folder to cache them")
        return _generate(pipe, prompts, settings, schedule, callback, cancel, key)
    path = folder / f"traj-{key[:32]}.safetensors"
    try:
        cached = path.is_file()
    except OSError as err:             # an unreadable cache folder: sample as if it were empty
        log.warning("cannot read the trajectory cache %s (%s); sampling without it", folder, err)
        cached = False
    if cached:
        try:
            trajs = load_trajectories(path, key)
            with contextlib.suppress(OSError):
                os.utime(path)              # a hit is a use: least-recently-used eviction
            if callback is not None:
                callback(len(prompts), len(prompts))
            return trajs
        except CacheEntryError as err:
            log.warning("trajectory cache entry is unusable, rebuilding it: %s", err)
    trajs = _generate(pipe, prompts, settings, schedule, callback, cancel, key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_trajectories(trajs, path, settings)
        for old in evict(folder, limit, keep=path):
            log.info("trajectory cache over %.1f GiB: removed %s", limit / 2**30, old.name)
    except OSError as err:  # a read-only or full cache folder must not stop training
        log.warning("could not cache trajectories in %s (%s); training goes on without the cache", folder, err)
    return trajs


def _generate(pipe, prompts, settings, schedule, callback, cancel, key) -> TrajectorySet:
    trajs = generate_trajectories(pipe, prompts, settings, schedule, callback, cancel)
    trajs.key = key
    return trajs


@torch.no_grad()
def frozen_conditional_logits(model, condition, trajs: TrajectorySet, indices: Sequence[int],
                              prompts: Sequence[str], tau: float = 1.0, chunk: int = 8,
                              autocast=None) -> torch.Tensor:
    """(len(indices), L, 2d) fp32: the frozen model's own CONDITIONAL logits (no CFG) for
    prompts[i] teacher-forced on trajectory indices[i], divided by tau.

    Targets for keep pairs: "draw this prompt exactly as before" means both CFG branches stay
    as they were, so the conditional branch is held to its own old output, not to the
    CFG-combined teacher (which would sharpen it). `condition(prompts)` -> model Condition."""
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), chunk):
            rows = list(indices[start:start + chunk])
            batch = trajs.batch(rows)
            with (autocast() if autocast is not None else contextlib.nullcontext()):
                logits = model(condition(list(prompts[start:start + chunk])), batch["x_wo_prefix"], trajs.schedule)
            out.append(logits.float() / tau)
    finally:
        model.train(was_training)
    return torch.cat(out)
