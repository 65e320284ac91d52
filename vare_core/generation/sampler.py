"""Next-scale sampling: text condition -> bits, scale by scale -> VAE decode -> RGB images.

Usage::

    settings = SamplingSettings(cfg=4.0, tau=0.5, top_p=0.97)      # or cfg="1,4,4,4,4"
    result = sample(model, vae, text_states, text_lens, scale_schedule, settings,
                    generator=torch.Generator().manual_seed(0))
    result.images        # (B, H, W, 3) float in [0, 1], RGB
    result.bits          # per scale (B, h, w, bits) int64

Per scale k: the transformer reads the sum of all coarser codes resized to scale k, gives two
logits per bit for the conditional and the unconditional half of the batch (one pass),
logits are divided by tau, mixed as cfg * cond + (1 - cfg) * uncond, filtered (top-k, top-p)
and every bit is drawn from its 2-way softmax. The drawn codes are upsampled to the final grid
and added to the running sum; the VAE decodes that sum at the end.

With a Concept Guard (guard.py) the batch also carries the guard's texts on its first scales;
the guard mixes those rows' logits instead of plain guidance there, then its rows leave. When
every scale left is drawn at cfg 1 (e.g. cfg "4,4,4,1,1") the unconditional rows leave the batch
and the KV caches too: the same bits, without the work of computing rows that are multiplied by 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..checks import is_finite_number, is_integer
from ..models.bsq_quant import codes_from_bits, next_scale_input, unpatchify_tokens, upsample_codes
from ..models.infinity import Infinity
from ..models.kv_cache import kept_tokens
from .guard import ConceptGuard
from .per_scale import check_setting_range, parse_per_scale, per_scale_values, with_free_scales
from .speed import KNOBS as SPEED_KNOBS, check_speed_settings, speed_plan


class SamplingCancelled(RuntimeError):
    """Raised between scales when the cancel check returns True."""


class NonFiniteLogits(ValueError):
    """The bit logits of a scale hold inf or NaN: no bit can be drawn from them. Raised instead
    of torch.multinomial's 'probability tensor contains either inf, nan or element < 0'."""


def _non_finite_message(k: int, n_scales: int, raw: torch.Tensor, cfg: float, tau: float,
                        applied: str | None, dtype: torch.dtype) -> str:
    """What went wrong at scale k and what to lower (only built when it went wrong)."""
    where = f"scale {k + 1} of {n_scales}: the bit logits are not finite (inf or NaN)"
    carries = f"; the model carries {applied}" if applied else ""
    if not bool(torch.isfinite(raw).all()):
        half = ", or load the model in bf16 or fp32 (fp16 overflows above 65504)" if dtype == torch.float16 else ""
        return (f"{where}: the transformer's own output overflowed{carries}. Lower the strength of "
                f"the adapters applied (or remove them){half}; damaged weights do this too")
    return (f"{where}: the model's output is finite, but guidance {cfg:g} / temperature {tau:g} "
            f"overflowed it{carries}. Lower cfg or raise tau")


@dataclass(frozen=True)
class SamplingSettings:
    """How bits are drawn; checked once, here (the per-scale count against a schedule in
    per_scale). cfg and tau: one number, or one per scale (a list, or text "3,3,4"; kept as a
    tuple); logits are divided by tau, then mixed cfg * cond + (1 - cfg) * uncond. top_k: 0
    (off), 1 (greedy); top_p: 0 (off) to 1, the nucleus of each bit's two values.
    speed "exact" | "fast" and the fast-sampling knobs (None: the speed's value): see speed.py."""
    cfg: float | tuple = 3.0
    tau: float | tuple = 0.5
    top_k: int = 0
    top_p: float = 0.0
    speed: str = "exact"
    unguided_scales: int | None = None
    pruned_scales: int | None = None
    keep_share: float | tuple | None = None
    kv_budget: float | None = None

    def __post_init__(self):
        for name in ("cfg", "tau"):
            values = per_scale_values(getattr(self, name), name)
            if name == "tau" and any(t <= 0 for t in values):
                raise ValueError(f"tau must be > 0 on every scale, got {values}")
            check_setting_range(values, name)
            object.__setattr__(self, name, values[0] if len(values) == 1 else tuple(values))
        if not is_integer(self.top_k, minimum=0):
            raise ValueError(f"top_k must be an integer >= 0 (0: off, 1: greedy), got {self.top_k!r}")
        if not (is_finite_number(self.top_p) and 0 <= self.top_p <= 1):
            raise ValueError(f"top_p must be a number from 0 (off) to 1, got {self.top_p!r}")
        knobs = check_speed_settings(self.speed, {name: getattr(self, name) for name in SPEED_KNOBS})
        object.__setattr__(self, "keep_share", knobs["keep_share"])

    def replace(self, **changes) -> "SamplingSettings":
        """A copy with the given fields (None: left as it is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def laid_out(self, n_scales: int, free_scales: int) -> "SamplingSettings":
        """One cfg / tau number over n_scales with the first `free_scales` at 1.0 (no guidance,
        the model's own temperature: per_scale.with_free_scales); per-scale lists stay as given."""
        if free_scales <= 0:
            return self
        return dataclasses.replace(self, cfg=with_free_scales(self.cfg, n_scales, free_scales),
                                   tau=with_free_scales(self.tau, n_scales, free_scales))

    def per_scale(self, n_scales: int) -> tuple[list[float], list[float]]:
        """(cfg, tau), one float per scale."""
        return parse_per_scale(self.cfg, n_scales, "cfg"), parse_per_scale(self.tau, n_scales, "tau")


@dataclass
class ScaleStep:
    """What a per-scale callback receives."""
    index: int                 # scale index, 0-based
    total: int                 # number of scales
    bits: torch.Tensor         # (B, h, w, bits) drawn at this scale
    summed_codes: torch.Tensor  # (B, bits, H, W) codes so far, decodable for a preview
    logits: torch.Tensor | None = None  # (B, h*w, 2*bits) fp32 after tau and CFG, before top-k/top-p
    guard_mask: torch.Tensor | None = None   # (B, h, w) bool: tokens a Concept Guard watches here


@dataclass
class SampleResult:
    images: torch.Tensor | None      # (B, H, W, 3) float32 in [0, 1]; None when decode=False
    bits: list[torch.Tensor]         # per scale (B, h, w, bits) int64
    summed_codes: torch.Tensor       # (B, bits, H, W) what the VAE decodes


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Top-k / nucleus filtering over the last axis (the two values of a bit): removed entries
    become -inf. top_p keeps the smallest set of values whose probability reaches top_p, so with
    top_p 0.97 a bit whose less likely value has p <= 0.03 becomes deterministic."""
    classes = logits.shape[-1]
    if 0 < top_k < classes:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1] = False                     # always keep the most likely value
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _pad_rows(states: torch.Tensor, length: int) -> torch.Tensor:
    if states.shape[1] == length:
        return states
    pad = states.new_zeros(states.shape[0], length - states.shape[1], states.shape[2])
    return torch.cat([states, pad], dim=1)


def _batch_conditions(model, text_states, text_lens, negative_states, negative_lens, with_null: bool,
                      guard: ConceptGuard | None):
    """The rows of the batch, image by image within each group: the prompts, then (guided or
    guarded) the unconditional rows: the negative prompt or the learned null condition, then the
    guard's texts. All padded to one length."""
    groups = [(text_states, text_lens)]
    if with_null:
        if negative_states is not None:
            groups.append((negative_states.to(text_states.device, text_states.dtype), negative_lens.to(text_lens.device)))
        else:
            groups.append((model.null_text(text_lens, text_states.shape[1]).to(text_states.dtype), text_lens))
    if guard is not None:
        states, lens = guard.batch_states(text_states.shape[0])
        groups.append((states.to(text_states.device, text_states.dtype), lens.to(text_lens.device)))
    if len(groups) == 1:
        return text_states, text_lens
    length = max(states.shape[1] for states, _ in groups)
    return (torch.cat([_pad_rows(states, length) for states, _ in groups]),
            torch.cat([lens for _, lens in groups]))


@torch.no_grad()
def sample(model: Infinity, vae, text_states: torch.Tensor, text_lens: torch.Tensor,
           scale_schedule: Sequence[tuple[int, int]], settings: SamplingSettings | None = None, *,
           negative_states: torch.Tensor | None = None,
           negative_lens: torch.Tensor | None = None, generator: torch.Generator | None = None,
           callback: Callable[[ScaleStep], None] | None = None,
           cancel: Callable[[], bool] | None = None, rope_grid=None,
           spatial_patchify: bool = False, decode: bool = True,
           applied: str | None = None, guard: ConceptGuard | None = None,
           fast_defaults: dict | None = None) -> SampleResult:
    """Sample one image per prompt. text_states (B, T, C) / text_lens (B,) come from the text
    encoder; without a negative prompt the unconditional half uses the learned null condition
    cut to each prompt's length. settings: SamplingSettings() when None.
    spatial_patchify (Infinity-8B): each token holds the bits of a 2x2 block of VAE cells, so
    codes are summed and resized at twice the schedule's size.
    applied: what the model carries (e.g. "adapter erase.safetensors at strength 1.5"; default:
    the model's `applied_description`, which adapters.apply_adapter sets), named by the
    NonFiniteLogits error a scale with inf/NaN logits raises.
    guard: a prepared ConceptGuard (guard.py): its rows join the batch on its first scales and
    leave it (and the key/value caches) after them; the fast knobs leave its scales as they are.
    fast_defaults: the model family's fast-sampling knobs for speed "fast" (speed.py)."""
    schedule = [tuple(map(int, s)) for s in scale_schedule]
    n_scales = len(schedule)
    settings = SamplingSettings() if settings is None else settings
    cfgs, taus = settings.per_scale(n_scales)
    guard_until = min(guard.settings.scales, n_scales) if guard is not None else 0
    plan = speed_plan(settings, schedule, fast_defaults, untouched=guard_until)
    cfgs = cfgs[:plan.unguided_from] + [1.0] * (n_scales - plan.unguided_from)
    applied = getattr(model, "applied_description", None) if applied is None else applied
    device = model.word_embed.weight.device
    dtype = model.word_embed.weight.dtype
    batch = text_states.shape[0]
    text_states, text_lens = text_states.to(device, dtype), text_lens.to(device)

    guided = any(c != 1.0 for c in cfgs)
    text_states, text_lens = _batch_conditions(model, text_states, text_lens, negative_states, negative_lens,
                                               guided or guard is not None, guard)
    cond = model.encode_condition(text_states, text_lens)
    guided_until = n_scales - next((i for i, c in enumerate(reversed(cfgs)) if c != 1.0), n_scales)
    # rows that leave before the end only ever need cache room for the scales they run: the
    # guard's rows its own scales, the unconditional rows the guided ones (keep_rows gives the
    # rows that stay room for the rest)
    leave_at = guard_until if guard is not None else guided_until
    computed = [kept_tokens(share, h * w) for share, (h, w) in zip(plan.keep_shares, schedule)]
    cache_tokens = sum(computed[:leave_at]) if 0 < leave_at < n_scales else None
    state = model.start_sampling(cond, schedule, rope_grid, cache_tokens=cache_tokens,
                                 kv_budget=plan.kv_budget, carry_hidden=plan.prunes,
                                 capacity=sum(computed))
    rows = text_states.shape[0] // batch                   # rows per image in the batch now

    bits_per_token = model.cfg.bits
    factor = 2 if spatial_patchify else 1
    final = (schedule[-1][0] * factor, schedule[-1][1] * factor)
    code_channels = bits_per_token // (factor * factor)
    summed = torch.zeros(batch, code_channels, *final, device=device, dtype=torch.float32)
    all_bits = []
    for k, (h, w) in enumerate(schedule):
        if cancel is not None and cancel():
            raise SamplingCancelled(f"sampling cancelled before scale {k + 1} of {n_scales}")
        still_guided = any(c != 1.0 for c in cfgs[k:])
        if guard is not None and k == guard_until:         # the guard's rows leave the batch
            rows = 2 if still_guided else 1
            state = model.keep_rows(state, rows * batch)
        elif rows == 2 and not still_guided:               # cfg 1 from here on: cond * 1 + uncond * 0,
            rows = 1                                       # so the unconditional rows leave the batch
            state = model.keep_rows(state, batch)          # and the caches, not computed to be discarded
        guarding = guard is not None and k < guard_until
        x_scale = None
        if k > 0:
            x_scale = next_scale_input(summed, (h * factor, w * factor), spatial_patchify)
            if rows > 1:
                x_scale = x_scale.repeat(rows, 1, 1)
        with guard.capturing(model, batch) if guarding else contextlib.nullcontext():
            raw = model.forward_scale(state, k, x_scale, keep_share=plan.keep_shares[k], images=batch)  # (rows * B, hw, 2d)
        logits = raw / taus[k]
        guard_mask = None
        if guarding:
            logits, guard_mask = guard.combine(k, logits, cfgs[k], batch)
            guard_mask = guard_mask.view(batch, h, w)
        elif rows == 2:
            logits = cfgs[k] * logits[:batch] + (1 - cfgs[k]) * logits[batch:]
        combined = logits                      # what the callback sees (erasure teacher targets)
        # one reduction per scale (meta tensors, in the memory plan, hold no values)
        if combined.device.type != "meta" and not bool(torch.isfinite(combined).all()):
            raise NonFiniteLogits(_non_finite_message(k, n_scales, raw, cfgs[k], taus[k], applied, dtype))
        logits = filter_logits(logits.view(batch, h * w * bits_per_token, 2), settings.top_k, settings.top_p)
        probs = logits.softmax(dim=-1)
        bits = torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=generator)
        bits = bits.view(batch, h, w, bits_per_token)
        all_bits.append(bits)
        vae_bits = unpatchify_tokens(bits) if spatial_patchify else bits
        summed = summed + upsample_codes(codes_from_bits(vae_bits), final)
        if callback is not None:
            callback(ScaleStep(index=k, total=n_scales, bits=bits, summed_codes=summed,
                               logits=combined, guard_mask=guard_mask))

    images = None
    if decode:
        # the KV caches are done: free them before the VAE's full-resolution activations
        # (at 1024^2 on Infinity-2B they are 5 GiB of the peak otherwise)
        del state, cond, raw, logits, probs, combined
        images = decode_images(vae, summed)
    return SampleResult(images=images, bits=all_bits, summed_codes=summed)


@torch.no_grad()
def decode_images(vae, summed_codes: torch.Tensor) -> torch.Tensor:
    """VAE decode -> (B, H, W, 3) float32 RGB in [0, 1]."""
    vae_dtype = next(vae.parameters()).dtype
    decoded = vae.decode(summed_codes.to(vae_dtype).contiguous())
    return ((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()
