"""Load VAR Model and VAR Text Encode: files -> VARE_MODEL, prompt -> VARE_CONDITIONING.

Which file goes where (ComfyUI's model folders):
    transformer   models/diffusion_models/ (or models/checkpoints/): infinity_2b_reg.pth, or a
                  folder with a sharded checkpoint (model.safetensors.index.json + shards)
    vae           models/vae/: infinity_vae_d32reg.pth (2B), infinity_vae_d56_f8_14_patchify.pth (8B)
    text encoder  models/text_encoders/flan-t5-xl/ (config.json, tokenizer.json, weights), or one
                  encoder .safetensors there (tokenizer: a tokenizer.json beside it, else ComfyUI's T5 one)
`embedded` needs no files: the pack ships the small shapes-world model.
"""
from __future__ import annotations

from pathlib import Path
from typing import get_args

import torch

from vare_core import paths
from vare_core.checkpoints import sniff_format
from vare_core.generation import budget
from vare_core.generation.pipeline import ModelDtype, load_pipeline
from vare_core.generation.registry import is_named_model, named_models

from . import host
from .compat import CATEGORY, VareConditioning, VareModel, io
from .types import VareConditioning as Conditioning

TRANSFORMER_FOLDERS = ("diffusion_models", "checkpoints")
DTYPES = get_args(ModelDtype)


# The models loaded by name (the embedded model) come first; beside one, the VAE and text encoder
# choices are that model's own, under its name.
def transformer_choices() -> list[str]:
    return named_models() + host.list_entries(TRANSFORMER_FOLDERS, folders_ok="sharded")


def vae_choices() -> list[str]:
    return named_models() + host.list_entries(["vae"])


def text_encoder_choices() -> list[str]:
    return named_models() + host.list_entries(["text_encoders"], folders_ok="hf")


def checkpoint_problem(path: Path, what: str) -> str | None:
    """Why the model-folder entry `path` cannot be the `what` weights, reading only its first
    bytes: a FIFO or device, or a file that is no safetensors / torch.save checkpoint."""
    kind = paths.file_kind(path)
    if kind == "folder":         # a sharded checkpoint or a Hugging Face folder: read when loaded
        return None
    if kind != "file":
        return f"{what} {path.name}: {path} is {paths.describe_kind(kind)}, not a checkpoint file"
    try:
        if sniff_format(path) == "unknown":
            return (f"{what} {path.name} is not a checkpoint: {path} is no safetensors or torch.save "
                    "file; choose the model's .safetensors / .pth file")
    except OSError as err:
        return f"{what} {path.name}: {path} cannot be read ({err.strerror or err})"
    return None


def check_model_files(transformer: str, vae: str, text_encoder: str) -> str | None:
    """None when the choice can load, else the message shown on the node: first a name that
    can be no file, then a file that is no checkpoint, then a transformer without its own VAE
    and text encoder, then a file that is missing."""
    choices = [(TRANSFORMER_FOLDERS, transformer, "transformer"), (("vae",), vae, "vae"),
               (("text_encoders",), text_encoder, "text_encoder")]
    choices = [(folders, value, what) for folders, value, what in choices if not is_named_model(value)]
    for folders, value, what in choices:
        problem = host.entry_problem(value)
        if problem:
            return f"{what}: {problem}"
    for folders, value, what in choices:
        found = host.find_entry(folders, value)
        problem = found is not None and checkpoint_problem(found, what)
        if problem:
            return problem
    if is_named_model(transformer):
        return None
    missing = [label for label, value in (("vae", vae), ("text_encoder", text_encoder)) if is_named_model(value)]
    if missing:
        return (f"{transformer} needs its own {' and '.join(missing)}: choose the BSQ VAE from "
                "models/vae (Infinity-2B: infinity_vae_d32reg.pth) and the flan-t5-xl folder from "
                "models/text_encoders; 'embedded' only goes with the embedded transformer")
    for folders, value, what in choices:
        try:
            host.resolve_entry(folders, value)
        except FileNotFoundError as err:
            return str(err)
    return None


def _tokenizer_for(encoder_file: Path) -> Path:
    beside = encoder_file.parent / "tokenizer.json"
    if beside.is_file():
        return beside
    shipped = host.comfy_t5_tokenizer()
    if shipped is None:
        raise FileNotFoundError(f"text encoder {encoder_file.name} is a single file and no tokenizer.json "
                                f"was found beside it in {encoder_file.parent}; copy the T5 tokenizer.json "
                                "there or use a flan-t5-xl folder")
    return shipped


def model_info(pipe) -> str:
    params = sum(p.numel() for p in pipe.model.parameters())
    h, w = pipe.resolutions()[0] if pipe.fixed_schedule else pipe.schedule_for()[-1]
    if not pipe.fixed_schedule:
        factor = pipe.vae.config.patch_size * (2 if pipe.spatial_patchify else 1)
        h, w = h * factor, w * factor
    dtype = str(pipe.model.word_embed.weight.dtype).replace("torch.", "")
    memory = "".join(note for on, note in ((pipe.low_vram, ", blocks streamed from CPU memory (low_vram)"),
                                           (pipe.offload_text_encoder, ", text encoder waits in CPU memory"))
                     if on)
    return (f"{pipe.name}: preset {pipe.preset}, {params / 1e6:.1f}M transformer parameters, "
            f"{dtype} on {pipe.device}, default image {h}x{w}{memory}")


class LoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_LoadModel", display_name="Load VAR Model (VARE)", category=CATEGORY,
            description="Load an Infinity-family VAR text-to-image model, or the embedded "
                        "shapes-world model that needs no files. The preset (2B, 8B, ...) is "
                        "detected from the weights.",
            inputs=[
                io.Combo.Input("transformer", options=transformer_choices(), default=named_models()[0],
                               tooltip="'embedded' (ships with the pack, runs on any CPU), or an "
                                       "Infinity transformer from models/diffusion_models or "
                                       "models/checkpoints (a file, or a folder of shards)"),
                io.Combo.Input("vae", options=vae_choices(), default=named_models()[0],
                               tooltip="BSQ VAE from models/vae (Infinity-2B: infinity_vae_d32reg.pth); "
                                       "'embedded' with the embedded transformer"),
                io.Combo.Input("text_encoder", options=text_encoder_choices(), default=named_models()[0],
                               tooltip="flan-t5-xl folder (or one encoder file) from models/text_encoders; "
                                       "'embedded' with the embedded transformer"),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="auto: bf16 on GPUs that have it natively (RTX 30xx / A100 and "
                                       "later), fp16 on older GPUs, fp32 on CPU; the embedded model "
                                       "loads in fp32 under auto. In half precision the residual "
                                       "stream, AdaLN and head stay fp32, as in the official code"),
                io.Boolean.Input("offload_text_encoder", default=False, optional=True,
                                 tooltip="keep the text encoder in CPU memory and move it to the GPU "
                                         "only while it encodes (flan-t5-xl: 2.4 GB in fp16); same images"),
                io.Boolean.Input("low_vram", default=False, optional=True,
                                 tooltip="keep the transformer blocks in CPU memory and copy them to the "
                                         "GPU one at a time while sampling: much less VRAM, slower, same "
                                         "images; for sampling only (training needs it off)"),
            ],
            outputs=[VareModel.Output(display_name="model"),
                     io.String.Output(display_name="info", tooltip="what was loaded")],
        )

    @classmethod
    def validate_inputs(cls, transformer=None, vae=None, text_encoder=None, dtype=None,
                        offload_text_encoder=False, low_vram=False):
        # an input left out or linked arrives as None: ComfyUI reports it, nothing to check here
        if dtype is not None and dtype not in DTYPES:
            return f"dtype {str(dtype)[:40]!r}: choose one of {', '.join(DTYPES)}"
        if not all(isinstance(v, str) for v in (transformer, vae, text_encoder)):
            return True
        return check_model_files(transformer, vae, text_encoder) or True

    @classmethod
    def execute(cls, transformer, vae, text_encoder, dtype, offload_text_encoder=False, low_vram=False):
        problem = check_model_files(transformer, vae, text_encoder)
        if problem:
            raise ValueError(problem)
        device = host.torch_device()
        # ComfyUI's --lowvram / --novram: our way of loading in parts (models loaded by name are small)
        by_flag = host.comfy_low_vram() and not is_named_model(transformer)
        memory = {"offload_text_encoder": bool(offload_text_encoder) or by_flag,
                  "low_vram": bool(low_vram) or by_flag}
        # ComfyUI runs nodes under torch.inference_mode(); weights made there could never take
        # part in training (autograd refuses inference tensors), so load them as normal tensors.
        with torch.inference_mode(False), torch.no_grad():
            if is_named_model(transformer):
                pipe = load_pipeline(transformer, device=device, dtype=dtype, **memory)
            else:
                model_path = host.resolve_entry(TRANSFORMER_FOLDERS, transformer)
                vae_path = host.resolve_entry(["vae"], vae)
                encoder_path = host.resolve_entry(["text_encoders"], text_encoder)
                tokenizer = None if encoder_path.is_dir() else _tokenizer_for(encoder_path)
                pipe = load_pipeline(model_path, vae_path, encoder_path, device=device, dtype=dtype,
                                     tokenizer=tokenizer, **memory)
        host.register_models(pipe)          # ComfyUI's model management counts and unloads them
        host.release_when_freed(pipe)
        info = model_info(pipe) + (" (ComfyUI runs with --lowvram/--novram)" if by_flag else "")
        host.log.info("VARE loaded %s", info)
        return io.NodeOutput(pipe, info)


def split_prompts(prompt: str, one_per_line: bool) -> list[str]:
    if one_per_line:
        return [line.strip() for line in prompt.splitlines() if line.strip()]
    return [prompt.strip()] if prompt.strip() else []


def check_prompt_count(prompt, one_per_line) -> str | None:
    """Why `prompt` holds too many prompts for one run (budget.MAX_IMAGES), or None."""
    if not (isinstance(prompt, str) and one_per_line is True):
        return None
    count = sum(1 for line in prompt.splitlines() if line.strip())
    if count <= budget.MAX_IMAGES:
        return None
    return (f"prompt has {count} lines (one prompt per line): at most {budget.MAX_IMAGES} prompts per run "
            "(each is at least one image); split them over several runs")


def encoder_id(pipe) -> str:
    """Identifies the text encoder object (shared by a model and its adapted copies)."""
    return f"{pipe.name}:{id(pipe.text_encoder):x}"


def encode_conditioning(pipe, prompts: list[str], negative: str) -> Conditioning:
    """The prompts (each its own rows, on the CPU) and the negative prompt (once), refused before
    the encoder runs when they would not fit in memory."""
    def check(lens):
        budget.check_encoding(pipe.text_encoder, lens, f"VAR Text Encode: {len(prompts)} prompts",
                              "use fewer lines or shorter prompts, or split them over several runs")
    states, lens = pipe.encode_prompts_packed(prompts, check=check)
    neg_states = neg_lens = None
    if negative:
        packed, neg_lens = pipe.encode_prompts_packed([negative])
        neg_states = packed.unsqueeze(0)
    return Conditioning(prompts=prompts, negative=negative, states=states, lens=lens,
                        negative_states=neg_states, negative_lens=neg_lens, encoder=encoder_id(pipe))


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VARE_TextEncode", display_name="VAR Text Encode (VARE)", category=CATEGORY,
            description="Encode a prompt (and an optional negative prompt) with the model's T5 "
                        "text encoder.",
            inputs=[
                VareModel.Input("model", tooltip="the model from Load VAR Model"),
                io.String.Input("prompt", multiline=True, default="a red circle on a white background",
                                tooltip="what the image should show"),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="optional: what to steer away from (replaces the empty "
                                        "condition of classifier-free guidance)"),
                io.Boolean.Input("one_prompt_per_line", default=False,
                                 tooltip="on: every non-empty line is its own prompt (one image "
                                         f"each per batch entry, at most {budget.MAX_IMAGES} lines); "
                                         "off: the whole text is one prompt"),
            ],
            outputs=[VareConditioning.Output(display_name="conditioning")],
        )

    @classmethod
    def validate_inputs(cls, prompt=None, one_prompt_per_line=None):
        # an input left out or linked arrives as None: ComfyUI reports it, nothing to check here
        if not isinstance(prompt, str):
            return True
        if not prompt.strip():
            return "prompt is empty; write what the image should show"
        return check_prompt_count(prompt, one_prompt_per_line) or True

    @classmethod
    def execute(cls, model, prompt, negative_prompt, one_prompt_per_line):
        problem = check_prompt_count(prompt, one_prompt_per_line)
        if problem:
            raise budget.NotEnoughMemory(problem)
        prompts = split_prompts(prompt, one_prompt_per_line)
        if not prompts:
            raise ValueError("prompt is empty; write what the image should show")
        host.use_models(model, "text_encoder")
        conditioning = encode_conditioning(model, prompts, negative_prompt.strip())
        host.release_when_freed(conditioning)
        if len(prompts) > 100 or len(negative_prompt) > 100_000:
            host.release_memory()           # the tokenizer's and the encoder's scratch memory
        return io.NodeOutput(conditioning)
