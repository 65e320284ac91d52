"""How much memory a request will take, and refusing one that would take more than there is,
before any work starts (a request must never take the process down).

    need = sampling_bytes(pipe, images=2000, text_tokens=10)      # closed form, see below
    check_fits(need, pipe.device, "VAR Sampler: 2000 prompts x batch_size 1 = 2000 images",
               "use fewer prompt lines or a smaller batch_size, or several runs")
    # NotEnoughMemory: "... = 2000 images need about 5.8 GiB at once, more than the 3.1 GiB
    # this process may take (4.1 GiB available RAM (MemAvailable) minus a 1.00 GiB reserve): ..."

The limit is what the device has free: on the CPU the kernel's MemAvailable (/proc/meminfo),
on a GPU the driver's free memory plus what PyTorch's allocator holds unused; minus a reserve
(RESERVE) for the rest of the process. The sampler draws all images of a run at once (one
random stream for the batch: splitting it would change the images), so its peak grows with the
number of images: the KV caches, the largest scale's activations and the VAE decode, per image.
`sampling_bytes` counts those from the model's sizes (docs/nodes.md, VAR Sampler); it is
calibrated against the meta-device planner (vare_core.erasure.plan, too slow to run per request:
seconds to a minute) and measured peaks (tests/test_request_memory.py), and errs high.
"""
from __future__ import annotations

import math
import os

import torch

GiB = 2**30
MAX_IMAGES = 10_000          # images per run: the nodes and the CLI (sample --n / --batch, plan --batch)
RESERVE = {"cpu": 1 * GiB, "cuda": GiB // 2}    # left to the rest of the process (and ComfyUI)
SAFETY = 1.25                # the closed form against measured CPU peaks (allocator slack)
RUNTIME = 128 * 2**20        # what a run takes whatever its size (oneDNN / cuBLAS workspaces)
MEMINFO = "/proc/meminfo"


class NotEnoughMemory(ValueError):
    """A request whose estimated memory exceeds what the device has available."""


def gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value < 10 * GiB else f"{value / GiB:.1f} GiB"


def cpu_available() -> int | None:
    """MemAvailable in bytes (what can be allocated without swapping), None where unknown."""
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available(device) -> tuple[int | None, str]:
    """(bytes a request may still take on `device`, how that was measured)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return cpu_available(), "available RAM (MemAvailable)"
    return None, f"{device.type} memory"


def limit(device) -> tuple[int | None, str]:
    """(the most a request may take on `device`: available minus the reserve, how measured)."""
    free, how = available(device)
    if free is None:
        return None, how
    reserve = RESERVE.get(torch.device(device).type, GiB // 2)
    return max(0, free - reserve), f"{gib(free)} {how} minus a {gib(reserve)} reserve"


def check_fits(need: int, device, what: str, advice: str) -> None:
    """NotEnoughMemory naming the estimate and the limit when `need` bytes exceed the limit of
    `device`; nothing where the device cannot say what it has free."""
    allowed, how = limit(device)
    if allowed is not None and need > allowed:
        raise NotEnoughMemory(f"{what} need about {gib(need)} at once, more than the {gib(allowed)} this "
                              f"process may take ({how}): {advice}")


def check_count(images: int, what: str, advice: str) -> None:
    if images > MAX_IMAGES:
        raise NotEnoughMemory(f"{what}: at most {MAX_IMAGES} images per run; {advice}")


# ----------------------------------------------------------------------------- estimates

def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sampling_bytes_per_image(model_cfg, vae_cfg, schedule, text_tokens: int, dtype_bytes: int,
                             patchify: bool = False, guided: bool = True) -> int:
    """What one image adds to the sampler's peak (beyond the weights), from the sizes alone.
    guided (cfg != 1): the unconditional half doubles the transformer's rows."""
    rows = 2 if guided else 1
    e, f = dtype_bytes, 4
    dim, depth, bits = model_cfg.embed_dim, model_cfg.depth, model_cfg.bits
    tokens = sum(h * w for h, w in schedule)
    last = schedule[-1][0] * schedule[-1][1]
    kv_self = depth * 2 * tokens * dim * e                       # preallocated for every scale
    kv_text = depth * 2 * text_tokens * dim * e
    text = text_tokens * (model_cfg.text_channels * (f + 3 * e) + 3 * dim * e)
    # one block at the largest scale: fp32 residual stream and norms, q/k/v and rope copies in
    # the weights' dtype, the FFN's hidden states; then the head's fp32 logits and their maths
    block = last * (6 * dim * f + 4 * dim * e + 2 * model_cfg.mlp_hidden * e)
    logits = last * 2 * bits * f * 6
    transformer = rows * (kv_self + kv_text + text + block + logits)
    # kept until the end: every scale's bits (int64), the summed codes, the uniform draws
    factor = 2 if patchify else 1
    final_h, final_w = schedule[-1][0] * factor, schedule[-1][1] * factor
    kept = tokens * bits * 8 + 3 * (bits // (factor * factor)) * final_h * final_w * f + last * bits * 2 * f * 2
    # VAE decode at full resolution: the finest levels' activations (a resblock's input, norm,
    # conv output and workspace) and the image (decoded, clamped, permuted fp32 copies)
    pixels = final_h * final_w * vae_cfg.patch_size ** 2
    chans = [vae_cfg.base_channels * m for m in vae_cfg.channel_mult]
    decode = pixels * (4 * max(chans[:2]) * e + 16 * f)
    return math.ceil(max(transformer, decode) + kept)


def guard_bytes_per_image(model_cfg, schedule, text_tokens: int, dtype_bytes: int, guard, guided: bool = True) -> int:
    """What a Concept Guard (GuardSettings) adds per image: its rows (two per concept, and the
    null row when unguided) with caches for its scales' tokens only, while they last."""
    scales = schedule[:min(guard.scales, len(schedule))]
    rows = 2 * len(guard.concepts) + (0 if guided else 1)
    e, f, dim, depth = dtype_bytes, 4, model_cfg.embed_dim, model_cfg.depth
    tokens, last = sum(h * w for h, w in scales), max(h * w for h, w in scales)
    kv = depth * 2 * (tokens + text_tokens) * dim * e
    text = text_tokens * (model_cfg.text_channels * (f + 3 * e) + 3 * dim * e)
    block = last * (6 * dim * f + 4 * dim * e + 2 * model_cfg.mlp_hidden * e) + last * 2 * model_cfg.bits * f * 6
    return rows * (kv + text + block)


def sampling_bytes(pipe, images: int, text_tokens: int, height: int | None = None, width: int | None = None,
                   guided: bool = True) -> int:
    """The sampler's peak for `images` images of a loaded pipeline, beyond its weights: per
    image (sampling_bytes_per_image, times SAFETY) plus the padded text states the node builds,
    one image more and RUNTIME for what does not grow with the batch (rope tables, workspaces).
    On the embedded model: 2.9 MiB per image, measured 2.4 MiB plus ~70 MiB."""
    schedule = pipe.schedule_for(height, width)
    dtype = pipe.model.word_embed.weight.dtype
    per_image = sampling_bytes_per_image(pipe.model.cfg, pipe.vae.config, schedule, text_tokens,
                                         _dtype_bytes(dtype), pipe.spatial_patchify, guided)
    if getattr(pipe, "guard", None) is not None:
        per_image += guard_bytes_per_image(pipe.model.cfg, schedule, text_tokens, _dtype_bytes(dtype), pipe.guard, guided)
    states = text_tokens * pipe.model.cfg.text_channels * _dtype_bytes(pipe.text_encoder.dtype)
    return RUNTIME + math.ceil((images + 1) * (per_image * SAFETY + states))


def check_encoding(text_encoder, lens: torch.Tensor, what: str, advice: str) -> None:
    """Refuse (NotEnoughMemory) to encode prompts of these token counts when their packed states
    (kept in CPU memory: the sum of the lengths times the width) and the token ids would not fit
    in RAM, or the encoder's activations for one chunk of rows (TextEncoder.row_bytes) not on
    its device."""
    width = text_encoder.model.config.d_model * _dtype_bytes(text_encoder.dtype)
    longest = int(lens.max())
    chunk = text_encoder.row_bytes(longest) * min(lens.numel(), max(1, text_encoder.chunk_bytes()
                                                                    // text_encoder.row_bytes(longest)))
    kept = int(lens.sum()) * width + lens.numel() * longest * 8 * 2      # + ids and mask (int64)
    if text_encoder.device.type == "cpu":
        check_fits(kept + chunk, "cpu", what, advice)
    else:
        check_fits(kept, "cpu", what, advice)
        check_fits(chunk, text_encoder.device, what, advice)
