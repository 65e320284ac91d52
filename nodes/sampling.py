"""VAR Sampler: conditioning -> IMAGE, one progress step (with a preview) per scale.

Settings: seed, cfg and tau (a number, one number per scale as text "3,3,4,4,4", or "auto" for
the model's tuned value), top_k, top_p, the image size from the model's aspect templates and the
images per prompt. Cancel stops it between two scales.
"""
from __future__ import annotations

import re

from vare_core.devices import is_out_of_memory, memory_summary
from vare_core.generation import budget
from vare_core.generation.per_scale import check_setting_range, parse_setting, per_scale_values
from vare_core.generation.preview import decode_preview, tint_mask
from vare_core.generation.sampler import SamplingCancelled

from .sampling_speed import check_keep_share, speed_inputs, speed_knobs
from vare_core.models import scales

from . import host
from .compat import CATEGORY, VareConditioning, VareModel, io, node_id
from .loaders import encoder_id

AUTO = "auto"
MODEL_DEFAULT = "model default"
EMBEDDED_SIZE = "64x64 (embedded)"
_SIZE = re.compile(r"^(\d+)x(\d+)\b")
RELEASE_AFTER = 256 * 2**20     # a run that took this much hands its freed heap back at once


def resolution_choices() -> list[str]:
    sizes = [f"{h}x{w} (h/w {ratio:g}, {preset})" for (h, w), (ratio, preset) in scales.all_image_sizes().items()]
    return [MODEL_DEFAULT, EMBEDDED_SIZE] + sizes


def parse_resolution(choice: str) -> tuple[int | None, int | None]:
    if choice == MODEL_DEFAULT:
        return None, None
    match = _SIZE.match(choice)
    if not match:
        raise ValueError(f"resolution {choice!r}: pick one from the list (HEIGHTxWIDTH ...)")
    return int(match.group(1)), int(match.group(2))


def check_per_scale(text: str, name: str, positive: bool = False) -> str | None:
    """None when text is 'auto' or parses as numbers (the count is checked once the model is
    known), else the message for the node."""
    if not isinstance(text, str):
        return f"{name} must be text: a number, one number per scale, or 'auto'; got {text!r}"
    if text.strip().lower() == AUTO:
        return None
    try:
        values = per_scale_values(text, name)
    except ValueError as err:
        return f"{err}, or 'auto' for the model's default"
    if positive and any(v <= 0 for v in values):
        return f"{name} must be > 0 on every scale, got {text!r}"
    try:
        check_setting_range(values, name)
    except ValueError as err:
        return str(err)
    return None


def per_scale(text: str, n_scales: int, name: str):
    """'auto' -> None (the model default), one number -> that number (the model lays it out
    over its scales), else one float per scale."""
    if text.strip().lower() == AUTO:
        return None
    return parse_setting(text, n_scales, name)


def generate_from_conditioning(pipe, cond, *, seed, cfg, tau, top_k, top_p, height, width, batch_size=1,
                               callback=None, cancel=None, **speed):
    """VarPipeline.generate for prompts already encoded (same defaults, same seeding): each
    prompt batch_size times in a row. speed: `speed` and the fast-sampling knobs."""
    settings = pipe.sampling_settings(cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, **speed)
    states, lens, negative_states, negative_lens = cond.padded(batch_size, pipe.device)
    return pipe.generate_encoded(states, lens, settings=settings, negative_states=negative_states,
                                 negative_lens=negative_lens, seed=seed, height=height, width=width,
                                 callback=callback, cancel=cancel)


def is_guided(pipe, cfg, n_scales: int) -> bool:
    """Whether the sampler runs the unconditional half too (cfg != 1 on some scale)."""
    settings = pipe.sampling_settings(cfg=cfg).laid_out(n_scales, pipe.free_scales)
    return any(c != 1.0 for c in settings.per_scale(n_scales)[0])


def check_request(pipe, conditioning, batch_size: int, height, width, cfg) -> tuple[int, str, str]:
    """(the memory the sampler will take for these images: budget.sampling_bytes, what they
    are, what to do if they do not fit), after refusing more images than one run allows
    (budget.NotEnoughMemory)."""
    prompts = len(conditioning.prompts)
    images = prompts * batch_size
    what = f"VAR Sampler: {prompts} prompt{'s' * (prompts != 1)} x batch_size {batch_size} = {images} images"
    advice = "use fewer prompt lines or a smaller batch_size, or several runs"
    budget.check_count(images, what, advice)
    n = len(pipe.schedule_for(height, width))
    return budget.sampling_bytes(pipe, images, conditioning.text_tokens, height, width,
                                 guided=is_guided(pipe, cfg, n)), what, advice


class Sampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_Sampler", display_name="VAR Sampler (VARE)", category=CATEGORY,
            description="Generate images scale by scale (next-scale prediction). Shows the "
                        "partial image after every scale; Cancel stops between scales.",
            inputs=[
                VareModel.Input("model", tooltip="the model (with any adapters applied)"),
                VareConditioning.Input("conditioning", tooltip="from VAR Text Encode"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="same seed, prompts and settings -> same images"),
                io.String.Input("cfg", default=AUTO,
                                tooltip="classifier-free guidance: a number (3), one number per scale "
                                        "('3,3,4,4,4'), or auto for the model's default"),
                io.String.Input("tau", default=AUTO,
                                tooltip="temperature: a number (0.5), one per scale, or auto; lower is "
                                        "more deterministic"),
                io.Int.Input("top_k", default=0, min=0, max=2,
                             tooltip="keep the k most likely values of each bit; 0 = off (a bit has 2 values)"),
                io.Float.Input("top_p", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="nucleus filter per bit; -1 = the model's default (Infinity 0.97, "
                                       "embedded off), 0 = off"),
                io.Combo.Input("resolution", options=resolution_choices(), default=MODEL_DEFAULT,
                               tooltip="image size from the model's aspect-ratio templates (HxW, h/w "
                                       "ratio, preset); the embedded model draws 64x64 only"),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="images per prompt (each prompt gets a different random draw)"),
                io.Boolean.Input("preview", default=True,
                                 tooltip="decode the partial image after every scale and show it on the node "
                                         "(at most 512 px: a quarter of a full decode at 1024²)"),
                io.Boolean.Input("preview_guard_mask", default=False, optional=True,
                                 tooltip="with a Concept Guard on the model: tint red, in the preview, the "
                                         "tokens where the guard changes the image (on the scales it guards)"),
                *speed_inputs(),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="RGB, prompts in order, "
                                     "batch_size images each")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, cfg=None, tau=None, resolution=None, keep_share=None):
        # an input left out or linked arrives as None: ComfyUI reports it, nothing to check here
        for text, name, positive in ((cfg, "cfg", False), (tau, "tau", True)):
            problem = None if text is None else check_per_scale(text, name, positive)
            if problem:
                return problem
        problem = None if keep_share is None else check_keep_share(keep_share)
        if problem:
            return problem
        if resolution is not None and resolution not in resolution_choices():
            return f"resolution {resolution!r} is not in the list"
        return True

    @classmethod
    def execute(cls, model, conditioning, seed, cfg, tau, top_k, top_p, resolution, batch_size,
                preview=True, preview_guard_mask=False, speed="exact", unguided_scales=-1,
                pruned_scales=-1, keep_share=AUTO, kv_budget=-1.0):
        pipe, node = model, node_id(cls)
        if conditioning.encoder != encoder_id(pipe):
            raise ValueError("the conditioning was encoded by another model's text encoder: connect "
                             "VAR Text Encode to the same Load VAR Model as this sampler")
        height, width = parse_resolution(resolution)
        schedule = pipe.schedule_for(height, width)            # ValueError names the valid sizes
        n = len(schedule)
        cfg, tau = per_scale(cfg, n, "cfg"), per_scale(tau, n, "tau")
        knobs = speed_knobs(speed, unguided_scales, pruned_scales, keep_share, kv_budget)
        need, what, advice = check_request(pipe, conditioning, batch_size, height, width, cfg)
        count = len(conditioning.prompts) * batch_size

        def on_scale(step):
            if host.interrupted():          # the progress hook would raise; stop at the next scale
                return
            image = None
            if preview:
                image = decode_preview(pipe.vae, step.summed_codes[:1])[0]
                if preview_guard_mask and step.guard_mask is not None:
                    image = tint_mask(image, step.guard_mask[0])
                image = host.to_pil(image)
            host.report_progress(node, step.index + 1, n, image)

        # ComfyUI unloads its other models to make room for the sampler's peak, then the request
        # is refused if it still does not fit, before any sampling
        host.use_models(pipe, "transformer", "vae", memory_required=need)
        budget.check_fits(need, pipe.device, what, advice)
        host.report_progress(node, 0, n)
        out_of_memory = False
        try:
            result = generate_from_conditioning(
                pipe, conditioning, seed=seed, cfg=cfg, tau=tau, top_k=top_k,
                top_p=None if top_p < 0 else top_p, height=height, width=width, batch_size=batch_size,
                callback=on_scale, cancel=host.interrupted, **knobs)
        except SamplingCancelled:
            host.raise_interrupted()
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            out_of_memory = True    # freed below: inside `except` the traceback keeps the KV caches
        if out_of_memory:
            host.free_accelerator_memory()
            raise MemoryError(f"out of memory sampling {count} images at "
                              f"{resolution} ({memory_summary(pipe.device)}); lower batch_size or "
                              "the resolution, or load the model in fp16/bf16")
        images = result.images.float().cpu()
        del result
        if need > RELEASE_AFTER:
            host.release_memory()           # the KV caches and activations just freed
        host.release_when_freed(images)
        return io.NodeOutput(images)
