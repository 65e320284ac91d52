"""A loaded text-to-image model (transformer + VAE + text encoder) and its one-call generator.

Usage::

    pipe = load_pipeline("embedded")                                   # ships with the pack
    pipe = load_pipeline("infinity_2b_reg.pth", vae="infinity_vae_d32reg.pth",
                         text_encoder="models/text_encoders/flan-t5-xl", dtype=torch.bfloat16)
    result = pipe.generate(["a red circle on a white background"] * 4, seed=0)
    result.images                                                      # (4, H, W, 3) in [0, 1]

    # Small GPU: T5 waits in CPU memory between prompts, transformer blocks are streamed.
    pipe = load_pipeline("infinity_2b_reg.pth", vae=..., text_encoder=..., device="cuda",
                         offload_text_encoder=True, low_vram=True)

The data path: prompts -> TextEncoder (T5 states cut to each prompt's length) -> Infinity
(pooled condition, text K/V once) -> sampler (scale by scale) -> BSQ VAE decode -> images.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..models import scales
from ..devices import native_bf16
from ..checkpoints import CheckpointError, check_finite, file_fingerprint, load_state_dict
from ..families import INFINITY
from ..models import infinity_defaults
from ..models.bsq_vae import BSQVAE, build_vae
from ..models.infinity import Infinity
from ..models.presets import build_infinity, preset_name
from ..models.t5 import T5Config
from ..models.text_encoder import TextEncoder
from .guard import ConceptGuard, GuardSettings
from .registry import named_model
from .sampler import SPEED_KNOBS, SampleResult, SamplingSettings, sample

OFFLOAD_DEVICE = torch.device("cpu")   # where offloaded weights wait
ModelDtype = Literal["auto", "fp32", "fp16", "bf16"]   # what a model is loaded in (pick_dtype)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class VarPipeline:
    model: Infinity
    vae: BSQVAE
    text_encoder: TextEncoder
    name: str                                   # the name it was loaded by, or the transformer file name
    fingerprint: str                            # of the base transformer weights
    default_schedule: list[tuple[int, int]]
    defaults: dict = field(default_factory=dict)   # cfg, tau, top_k, top_p, free_scales
    spatial_patchify: bool = False
    fixed_schedule: bool = False                # small models trained on one resolution only
    applied_adapters: tuple = ()                # (adapter id, strength) applied on top of the base
    offload_text_encoder: bool = False          # T5 rests on the CPU, visits the device to encode
    family: str = INFINITY                      # whose choices apply (vare_core/families.py)
    named: bool = False                         # loaded by name (generation/registry.py): its own preset
    guard: GuardSettings | None = None          # a Concept Guard on every image it samples (guarded())
    # the guard prepared for this pipeline's model (texts encoded, keys projected): once, not per call
    _prepared_guard: ConceptGuard | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.model.word_embed.weight.device

    @property
    def preset(self) -> str:
        return self.name if self.named else preset_name(self.model.cfg)

    def resolutions(self) -> list[tuple[int, int]]:
        """(height, width) choices in pixels."""
        if self.fixed_schedule:
            h, w = self.default_schedule[-1]
            p = self.vae.config.patch_size * (2 if self.spatial_patchify else 1)
            return [(h * p, w * p)]
        return sorted(scales.all_image_sizes())

    def schedule_for(self, height: int | None = None, width: int | None = None) -> list[tuple[int, int]]:
        if height is None and width is None:
            return list(self.default_schedule)
        if self.fixed_schedule:
            allowed = self.resolutions()
            if (height, width) not in allowed:
                raise ValueError(f"resolution {height}x{width}: the {self.name} model only draws "
                                 f"{allowed[0][0]}x{allowed[0][1]}")
            return list(self.default_schedule)
        schedule, _, _ = scales.schedule_for_image(height, width)
        return schedule

    def guarded(self, settings: GuardSettings | None) -> "VarPipeline":
        """A pipeline that samples with a Concept Guard (guard.py), the same weights, this one
        unchanged; None: without one. Adapters applied later keep the guard."""
        if settings is not None and not isinstance(settings, GuardSettings):
            raise ValueError(f"guard must be GuardSettings or None, got {type(settings).__name__}")
        return dataclasses.replace(self, guard=settings, defaults=dict(self.defaults))

    @property
    def low_vram(self) -> bool:
        return self.model.stream_device is not None

    def encode_prompts(self, prompts: list[str]):
        with self._text_encoder_on_device():
            states, lens = self.text_encoder.encode(list(prompts))
        return states.to(self.device), lens.to(self.device)

    def encode_prompts_packed(self, prompts: list[str], device=OFFLOAD_DEVICE, check=None):
        """(packed (sum(lens), C), lens): each prompt's states cut to its own length, one after
        the other, on `device` (the CPU by default: what a ComfyUI conditioning holds between
        nodes). text_encoder.unpack pads them back to what encode_prompts gives, bit for bit.
        check(lens): see TextEncoder.encode_packed."""
        with self._text_encoder_on_device():
            return self.text_encoder.encode_packed(list(prompts), device=device, check=check)

    @contextmanager
    def text_encoder_offloaded(self):
        """Within: the text encoder waits in CPU memory between encodes (as with
        offload_text_encoder), e.g. while an erasure trains; afterwards it is back as loaded."""
        if self.offload_text_encoder or self.device.type == "cpu":
            yield
            return
        self.offload_text_encoder = True
        self.text_encoder.to(OFFLOAD_DEVICE)
        try:
            yield
        finally:
            self.offload_text_encoder = False
            self.text_encoder.to(self.device)

    @contextmanager
    def _text_encoder_on_device(self):
        """With offload_text_encoder the encoder is moved to the compute device for one call
        and back to the CPU afterwards, so its memory is free while the transformer samples."""
        if not self.offload_text_encoder:
            yield
            return
        self.text_encoder.to(self.device)
        try:
            yield
        finally:
            self.text_encoder.to(OFFLOAD_DEVICE)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()   # hand the freed blocks back (other nodes, the VAE)

    @property
    def free_scales(self) -> int:
        """Leading scales drawn at cfg 1 / tau 1 when cfg or tau is one number (the model's
        defaults: the embedded model's embedded.json)."""
        return int(self.defaults.get("free_scales", 0))

    def sampling_settings(self, cfg=None, tau=None, top_k: int | None = None,
                          top_p: float | None = None, **speed) -> SamplingSettings:
        """This model's sampling defaults (its family's: embedded.json, models/infinity_defaults.py;
        else the sampler's) with the given values in their place; `speed` and the fast-sampling
        knobs (generation/speed.py) by name."""
        fields = ("cfg", "tau", "top_k", "top_p", "speed") + SPEED_KNOBS
        model_defaults = {k: self.defaults[k] for k in fields if k in self.defaults}
        return SamplingSettings(**model_defaults).replace(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, **speed)

    @property
    def fast_defaults(self) -> dict | None:
        """The family's knobs for speed "fast" (None: Infinity's, models/infinity_defaults.FAST)."""
        return self.defaults.get("fast")

    def generate(self, prompts: list[str] | str, *, seed: int = 0, negative_prompt: str | None = None,
                 settings: SamplingSettings | None = None, cfg=None, tau=None, top_k: int | None = None,
                 top_p: float | None = None, height: int | None = None, width: int | None = None,
                 callback=None, cancel=None, **speed) -> SampleResult:
        """One image per prompt, deterministic for (seed, prompts, settings, device). settings:
        a SamplingSettings, or None for the model's defaults; cfg / tau / top_k / top_p and
        `speed` / the fast-sampling knobs (speed.py) given here replace the matching fields."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty; write what the image should show")
        settings = (settings or self.sampling_settings()).replace(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p,
                                                                  **speed)
        states, lens = self.encode_prompts(prompts)
        neg_states = neg_lens = None
        if negative_prompt:     # encoded once; generate_encoded gives every image the same row
            neg_states, neg_lens = self.encode_prompts([negative_prompt])
        return self.generate_encoded(states, lens, negative_states=neg_states, negative_lens=neg_lens,
                                     seed=seed, settings=settings, height=height, width=width,
                                     callback=callback, cancel=cancel)

    def generate_encoded(self, states, lens, *, settings: SamplingSettings | None = None,
                         negative_states=None, negative_lens=None, seed: int = 0,
                         height: int | None = None, width: int | None = None, callback=None,
                         cancel=None) -> SampleResult:
        """`generate` for prompts already encoded (e.g. a ComfyUI conditioning); settings None:
        the model's defaults. One cfg / tau number is laid out over the model's scales (its
        free scales at 1: free_scales). negative_states: one row per prompt, or one row for all
        of them (broadcast to every prompt: a negative prompt is encoded once)."""
        schedule = self.schedule_for(height, width)
        if negative_states is not None:
            negative_states, negative_lens = negative_states.to(self.device), negative_lens.to(self.device)
            if negative_states.shape[0] == 1 and states.shape[0] > 1:
                negative_states = negative_states.expand(states.shape[0], -1, -1)
                negative_lens = negative_lens.expand(states.shape[0])
        generator = torch.Generator(self.device).manual_seed(int(seed))
        settings = (settings or self.sampling_settings()).laid_out(len(schedule), self.free_scales)
        guard = None
        if self.guard is not None:
            if self._prepared_guard is None or self._prepared_guard.settings != self.guard:
                self._prepared_guard = ConceptGuard.prepare(self.guard, self.model, self.encode_prompts)
            guard = self._prepared_guard
        return sample(self.model, self.vae, states.to(self.device), lens.to(self.device), schedule, settings,
                      negative_states=negative_states, negative_lens=negative_lens, generator=generator,
                      callback=callback, cancel=cancel, spatial_patchify=self.spatial_patchify, guard=guard,
                      fast_defaults=self.fast_defaults)


def pick_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype, device: torch.device):
    """auto: bf16 on a GPU with native bf16, fp16 on older GPUs, fp32 on the CPU (whose half
    precision matmuls are slow or emulated on most machines)."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose auto, fp32, fp16 or bf16")
        return DTYPES[dtype]
    return dtype


def _check_floating(weights, path) -> None:
    ints = [f"{k} ({v.dtype})" for k, v in weights.items() if torch.is_tensor(v) and not v.is_floating_point()]
    if ints:
        raise CheckpointError(path, f"weights must be floating point; {len(ints)} tensor(s) are not "
                              f"(first: {', '.join(ints[:3])})", "Is this the right checkpoint? Use an intact copy")


def _build_vae_file(path, dtype, device) -> BSQVAE:
    """build_vae with the file named in its errors, after the same checks as the transformer."""
    weights = load_state_dict(path)
    check_finite(weights, path)
    try:
        return build_vae(weights, dtype=dtype, device=device)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_transformer(path, *, dtype=None, device="cpu", low_vram: bool = False,
                     ca_bf16_rounding: bool = False) -> tuple[Infinity, str]:
    """The transformer of a checkpoint file and the fingerprint of its weights. The file is
    memory-mapped and each tensor is cast and moved on its own, so no full fp32 copy is made
    (see presets.build_infinity). low_vram: blocks stay on the CPU, streamed to `device`.
    ca_bf16_rounding: in fp32, round cross-attention through bf16 as the official code does."""
    weights = load_state_dict(path, mmap=True)
    check_finite(weights, path)     # NaN weights would only show up as black images
    target = torch.device(device)
    try:
        model = build_infinity(weights, dtype=dtype, device=OFFLOAD_DEVICE if low_vram else target,
                               source=str(path), ca_bf16_rounding=ca_bf16_rounding)
    except RuntimeError:            # load_state_dict refusing e.g. integer weights
        _check_floating(weights, path)
        raise
    if low_vram:
        model.enable_block_streaming(target, OFFLOAD_DEVICE)
    return model, file_fingerprint(weights)


def load_pipeline(model: str | Path = "embedded", vae: str | Path | None = None,
                  text_encoder: str | Path | None = None, *, device=None, dtype=None,
                  tokenizer: str | Path | None = None, offload_text_encoder: bool = False,
                  low_vram: bool = False) -> VarPipeline:
    """Load a model by name ('embedded': generation/registry.py) or from checkpoint files users
    already have.

    text_encoder: a flan-t5-xl folder (config.json, tokenizer.json, weights), or a single
    encoder .safetensors file together with `tokenizer` (a tokenizer.json path).
    offload_text_encoder: keep the text encoder in CPU memory and move it to the device only
    while it encodes (flan-t5-xl is 2.4 GB in fp16). low_vram: keep the transformer blocks in
    CPU memory and copy them to the device one at a time while sampling (slower; training
    needs the model loaded without it). Both change where weights wait, not the results.
    """
    for name, flag in (("offload_text_encoder", offload_text_encoder), ("low_vram", low_vram)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    named = named_model(str(model))
    if named is not None:
        return named.load(device, dtype, offload_text_encoder=offload_text_encoder, low_vram=low_vram)
    if vae is None or text_encoder is None:
        raise ValueError("a transformer checkpoint needs --vae (the BSQ VAE .pth/.safetensors) and "
                         "--text-encoder (a flan-t5-xl folder); or use --model embedded")
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    # Official Infinity weights in fp32: their code rounds cross-attention through bf16 even
    # then (flash-attn has no fp32 kernel), so we do too (docs/memory.md, "Precision"; a no-op in half).
    transformer, fingerprint = load_transformer(model, dtype=dtype, device=device, low_vram=low_vram,
                                                ca_bf16_rounding=dtype == torch.float32)
    vae_model = _build_vae_file(vae, dtype, device)
    encoder_device = OFFLOAD_DEVICE if offload_text_encoder else device
    if Path(text_encoder).is_dir():
        encoder = TextEncoder.from_folder(text_encoder, dtype=dtype, device=encoder_device,
                                          max_length=transformer.cfg.text_maxlen)
    else:
        if tokenizer is None:
            raise ValueError(f"text encoder {text_encoder} is a single file: also give the T5 "
                             "tokenizer.json (tokenizer=...)")
        encoder = TextEncoder.from_files(text_encoder, tokenizer, T5Config.flan_t5_xl(), dtype=dtype,
                                         device=encoder_device, max_length=transformer.cfg.text_maxlen)
    check_compatible(transformer, vae_model, encoder, str(model), str(vae), str(text_encoder))
    patchify = vae_model.config.bits * 4 == transformer.cfg.bits
    return VarPipeline(model=transformer, vae=vae_model, text_encoder=encoder, name=Path(model).name,
                       fingerprint=fingerprint,
                       default_schedule=scales.scale_schedule(1.0, "1M"),
                       defaults=dict(infinity_defaults.SAMPLING),
                       spatial_patchify=patchify, offload_text_encoder=offload_text_encoder)


def check_compatible(model: Infinity, vae: BSQVAE, encoder: TextEncoder, model_name="model",
                     vae_name="vae", encoder_name="text encoder"):
    """A transformer, VAE and text encoder that cannot work together give one clear error."""
    bits, vae_bits = model.cfg.bits, vae.config.bits
    if bits not in (vae_bits, 4 * vae_bits):
        raise ValueError(f"{model_name} predicts {bits} bits per token but {vae_name} has {vae_bits}: "
                         "use the VAE that belongs to this model (Infinity-2B: d32, Infinity-8B: d56/14-bit)")
    width = encoder.model.config.d_model
    if width != model.cfg.text_channels:
        raise ValueError(f"{encoder_name} gives {width}-wide states but {model_name} expects "
                         f"{model.cfg.text_channels} (flan-t5-xl gives 2048)")
