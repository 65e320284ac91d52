"""Command line: python -m vare_core {sample, demo, erase, bench-erasure, plan, evaluate} ...

    python -m vare_core sample --model embedded --prompt "a red circle on a white background" \
        --n 8 --seed 0 --out out/
    python -m vare_core sample --model infinity_2b_reg.pth --vae infinity_vae_d32reg.pth \
        --text-encoder models/text_encoders/flan-t5-xl --prompt "a cat" --out out/
    python -m vare_core demo --out out/demo
    python -m vare_core plan --model infinity_2b --height 1024 --width 1024   # memory, no weights
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


MAX_SEED = 2**63 - 1
MAX_IMAGES = 10_000


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def save_images(images, out: Path, stem: str, overwrite: bool = False) -> list[Path]:
    """(B, H, W, 3) floats in [0, 1] -> numbered PNGs, each written atomically. Without
    overwrite the numbers continue after the files already in `out` (nothing is replaced)."""
    import io

    from .paths import free_numbered_names, write_bytes_atomic
    out.mkdir(parents=True, exist_ok=True)
    names = [out / f"{stem}_{i:03d}.png" for i in range(len(images))] if overwrite \
        else free_numbered_names(out, stem, len(images))
    for image, path in zip(images, names):
        buffer = io.BytesIO()
        Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)).save(buffer, "PNG")
        write_bytes_atomic(path, buffer.getvalue())
    return names


def add_model_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="embedded",
                       help="'embedded' (ships with the pack) or an Infinity checkpoint (.pth/.safetensors/sharded folder)")
    group.add_argument("--vae", help="BSQ VAE checkpoint (needed with a checkpoint --model)")
    group.add_argument("--text-encoder", help="flan-t5-xl folder, or an encoder .safetensors with --tokenizer")
    group.add_argument("--tokenizer", help="tokenizer.json when --text-encoder is a single file")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    group.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])


def add_sampling_args(parser: argparse.ArgumentParser):
    group = parser.add_argument_group("sampling")
    group.add_argument("--cfg", default=None, help="guidance: a number or one per scale, e.g. '3,3,4,4,4'")
    group.add_argument("--tau", default=None, help="temperature: a number or one per scale")
    group.add_argument("--top-k", type=int, default=None)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--negative", default=None, help="negative prompt")
    group.add_argument("--height", type=int, default=None)
    group.add_argument("--width", type=int, default=None)
    group.add_argument("--adapter", action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="erasure adapter to apply (repeatable), strength default 1.0")


def check_device(text: str | None) -> None:
    """--device must name a device torch can use here (not only one it can spell)."""
    if text is None:
        return
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise CliError(f"--device {text!r} is not a device; use cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {text}: torch sees no CUDA GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {text}: there are only {torch.cuda.device_count()} CUDA "
                           f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {text}: the Apple MPS backend is not available; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {text}: VARE runs on cpu, cuda or mps")


def check_model_args(args) -> None:
    """File flags and --device, checked before anything loads so the message names the flag."""
    from .pipeline import EMBEDDED
    check_device(args.device)
    extra = [flag for flag, value in (("--vae", args.vae), ("--text-encoder", args.text_encoder),
                                      ("--tokenizer", args.tokenizer)) if value]
    if args.model == EMBEDDED and extra:
        raise CliError(f"{', '.join(extra)}: only for a checkpoint --model; the embedded model "
                       "brings its own VAE and text encoder (leave them out, or pass --model FILE)")
    files = [("--model", args.model), ("--vae", args.vae), ("--text-encoder", args.text_encoder),
             ("--tokenizer", args.tokenizer)]
    from .paths import file_kind
    for flag, value in files:
        if not value or value == EMBEDDED:
            continue
        kind = file_kind(Path(value))
        if kind == "missing":
            raise CliError(f"{flag} {value}: no such file or folder")
        if kind not in ("file", "folder"):   # a FIFO would block the load forever
            raise CliError(f"{flag} {value}: is a {kind}, not a weight file or folder; give the file itself")


def load_from_args(args, offload_text_encoder: bool = False):
    from .pipeline import EMBEDDED, load_pipeline
    check_model_args(args)
    extra = {"offload_text_encoder": True} if offload_text_encoder and args.model != EMBEDDED else {}
    return load_pipeline(args.model, args.vae, args.text_encoder, device=args.device,
                         dtype=args.dtype, tokenizer=args.tokenizer, **extra)


def sampling_kwargs(args, n_scales: int) -> dict:
    from .scales import check_setting_range, parse_per_scale, parse_setting
    kwargs = {}
    if args.cfg is not None:
        kwargs["cfg"] = parse_setting(args.cfg, n_scales, "--cfg")
    if args.tau is not None:
        kwargs["tau"] = parse_setting(args.tau, n_scales, "--tau")
        if any(t <= 0 for t in parse_per_scale(kwargs["tau"], n_scales, "--tau")):
            raise CliError(f"--tau {args.tau}: the temperature must be > 0 on every scale "
                           "(lower = more deterministic, e.g. 0.5)")
    for flag in ("cfg", "tau"):
        if flag in kwargs:
            check_setting_range(parse_per_scale(kwargs[flag], n_scales, "--" + flag), "--" + flag)
    if args.top_k is not None:
        if not 0 <= args.top_k <= 2:
            raise CliError(f"--top-k {args.top_k}: must be 0 (off), 1 (greedy) or 2; "
                           "each bit has only two values")
        kwargs["top_k"] = args.top_k
    if args.top_p is not None:
        if not 0 <= args.top_p <= 1:
            raise CliError(f"--top-p {args.top_p}: must be between 0 and 1")
        kwargs["top_p"] = args.top_p
    return kwargs


def check_sample_args(args) -> None:
    """Everything of `sample` that needs no model: fails before the (slow) load."""
    if not args.prompt.strip():
        raise CliError("--prompt is empty; write what the image should show")
    for flag, value in (("--n", args.n), ("--batch", args.batch)):
        if value < 1:
            raise CliError(f"{flag} {value}: must be at least 1")
    if (args.height is None) != (args.width is None):
        raise CliError("give --height and --width together (or neither, for the model's default size)")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise CliError(f"{flag} {value}: must be a positive number of pixels")
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise CliError(f"--seed {args.seed}: must be between 0 and {MAX_SEED - args.n} "
                       f"(the batch that starts at image i uses seed + i; torch seeds are 63-bit)")
    if args.n > MAX_IMAGES:
        raise CliError(f"--n {args.n}: at most {MAX_IMAGES} images per run (images are written as "
                       "they are made; run several times into the same --out for more)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; give a folder for the images")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise CliError(f"--out {out}: {parent} is a file, not a folder; choose a folder path")
    if not args.stem or Path(args.stem).name != args.stem or args.stem.startswith("."):
        raise CliError(f"--stem {args.stem!r}: give a file name prefix such as 'sample', not a path")
    if len(f"{args.stem}_{args.n:03d}.png.tmp".encode()) + 16 > 255:
        raise CliError(f"--stem: {len(args.stem)} characters is too long for a file name; "
                       "use a shorter prefix (at most about 200 characters)")


def cmd_sample(args):
    from tqdm import tqdm
    check_sample_args(args)
    negative = args.negative if args.negative and args.negative.strip() else None
    pipe = apply_adapter_args(load_from_args(args), args.adapter)
    schedule = pipe.schedule_for(args.height, args.width)
    kwargs = sampling_kwargs(args, len(schedule))
    import time
    written, batches = [], -(-args.n // args.batch)
    started = time.perf_counter()
    with tqdm(total=len(schedule) * batches, desc="sampling", unit="scale") as bar:
        for start in range(0, args.n, args.batch):
            count = min(args.batch, args.n - start)
            result = pipe.generate([args.prompt] * count, seed=args.seed + start,
                                   negative_prompt=negative, height=args.height, width=args.width,
                                   callback=lambda step: bar.update(1), **kwargs)
            # written as they are made: a stop or a full disk keeps every finished image
            written += save_images(result.images, Path(args.out), args.stem, args.overwrite)
            if start == 0 and batches > 1:
                seconds = (time.perf_counter() - started) * (batches - 1)
                bar.write(f"{args.n} images in {batches} batches: about {seconds / 60:.1f} more minutes")
    print(f"wrote {len(written)} images to {args.out} ({written[0].name} to {written[-1].name})")


def apply_adapter_args(pipe, specs: list[str]):
    """A new pipeline with every --adapter FILE[:STRENGTH] applied in order (base unchanged)."""
    if not specs:
        return pipe
    from .erasure.adapters import apply_adapter, load_adapter, parse_adapter_spec
    for spec in specs:
        path, strength = parse_adapter_spec(spec)
        pipe = apply_adapter(pipe, load_adapter(path), strength)
    return pipe


def cmd_demo(args):
    from .demo import run_demo
    report = run_demo(Path(args.out), seed=args.seed, steps=args.steps, thumbnails=args.thumbnails)
    print(report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vare_core", description="VARE: VAR text-to-image and concept erasure")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=4, help="number of images")
    p.add_argument("--batch", type=int, default=8, help="images per forward batch")
    p.add_argument("--seed", type=int, default=0,
                   help="the batch starting at image i draws from seed + i: the same --seed and "
                        "--batch give the same images")
    p.add_argument("--out", default="out")
    p.add_argument("--stem", default="sample", help="file name prefix")
    p.add_argument("--overwrite", action="store_true",
                   help="replace {stem}_000.png ... instead of numbering after the files already in --out")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the whole story on the embedded model: sample, erase, compare")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="erasure steps (default: the pack's default)")
    p.add_argument("--thumbnails", action="store_true",
                   help="also write the embedded workflows' template pictures (OUT/workflows/*.jpg)")
    p.set_defaults(func=cmd_demo)

    from .erasure import cli as erasure_cli
    erasure_cli.register(sub)
    from .erasure import plan_cli
    plan_cli.register(sub)
    from . import prompt_eval
    prompt_eval.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    # OSError: files that cannot be read or written; MemoryError: out of memory, with advice
    except (CliError, ValueError, OSError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as err:      # torch's allocators say "out of memory" as RuntimeError
        from .erasure.memory import is_out_of_memory
        if not is_out_of_memory(err):
            raise
        print(f"error: out of memory ({str(err).splitlines()[0][:160]}); use a smaller --batch, "
              "--height/--width or --dtype fp16/bf16, or free memory and retry", file=sys.stderr)
        return 2
    return 0
