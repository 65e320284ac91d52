"""`python -m vare_core sample` and `demo`: images from a prompt; the pack's story on the embedded model."""
from __future__ import annotations

import time
from pathlib import Path

from .common import (MAX_SEED, CliError, add_model_args, add_sampling_args, apply_adapter_args, check_image_count,
                     check_image_size, load_from_args, sampling_kwargs, save_images)
from .guard_args import add_guard_args, check_guard_args, guard_from_args


def check_sample_args(args) -> None:
    """Everything of `sample` that needs no model: fails before the (slow) load."""
    if not args.prompt.strip():
        raise CliError("--prompt is empty; write what the image should show")
    hint = "images are written as they are made; run several times into the same --out for more"
    check_image_count("--n", args.n, hint=hint)
    check_image_count("--batch", args.batch, hint=hint)
    check_image_size(args.height, args.width)
    check_guard_args(args)
    if not 0 <= args.seed <= MAX_SEED - args.n:
        raise CliError(f"--seed {args.seed}: must be between 0 and {MAX_SEED - args.n} "
                       f"(the batch that starts at image i uses seed + i; torch seeds are 63-bit)")
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
    guard = guard_from_args(args, pipe)
    if guard is not None:
        pipe = pipe.guarded(guard)
        print(guard.describe())
    schedule = pipe.schedule_for(args.height, args.width)
    settings = pipe.sampling_settings(**sampling_kwargs(args, len(schedule)))
    written, batches = [], -(-args.n // args.batch)
    started = time.perf_counter()
    with tqdm(total=len(schedule) * batches, desc="sampling", unit="scale") as bar:
        for start in range(0, args.n, args.batch):
            count = min(args.batch, args.n - start)
            result = pipe.generate([args.prompt] * count, seed=args.seed + start,
                                   negative_prompt=negative, height=args.height, width=args.width,
                                   settings=settings, callback=lambda step: bar.update(1))
            # written as they are made: a stop or a full disk keeps every finished image
            written += save_images(result.images, Path(args.out), args.stem, args.overwrite)
            if start == 0 and batches > 1:
                seconds = (time.perf_counter() - started) * (batches - 1)
                bar.write(f"{args.n} images in {batches} batches: about {seconds / 60:.1f} more minutes")
    print(f"wrote {len(written)} images to {args.out} ({written[0].name} to {written[-1].name})")


def cmd_demo(args):
    from ..demo import run_demo
    report = run_demo(Path(args.out), seed=args.seed, steps=args.steps, thumbnails=args.thumbnails)
    print(report)


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate images")
    add_model_args(p)
    add_sampling_args(p)
    add_guard_args(p)
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
