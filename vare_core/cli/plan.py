"""`python -m vare_core plan`: the memory plan of a run, without weight files.

    python -m vare_core plan --model infinity_2b --height 1024 --width 1024            # erase defaults
    python -m vare_core plan --model infinity_2b --height 1024 --width 1024 --train ca_ffn
    python -m vare_core plan --model infinity_8b --height 1024 --width 1024 --sample --low-vram
    python -m vare_core plan --model infinity_2b --height 1024 --width 1024 --sample --guard nudity:clothed

With no training flags it plans exactly what `erase` and the Train Erasure node would run (the
model's erasure profile); every `erase` training flag is accepted and planned. Every value is
held to the bounds of the command it plans (sample's image count, erase's pairs and batch size,
the model's sizes), with that command's message, before anything is built.
"""
from __future__ import annotations

import argparse
from typing import get_args

from ..erasure.plan import GiB, plan_memory
from .common import CliError
from .guard_args import add_guard_args, check_guard_args, guard_overrides

PRESET_MODELS = ("infinity_2b", "infinity_8b")
CARD_SIZES_GB = (8, 12, 16, 24, 40, 48, 80, 141)


def register(subparsers) -> None:
    from ..erasure.pairs import PAIRS_PER_CONCEPT
    from ..generation.pipeline import ModelDtype
    from ..generation.registry import named_models
    from .erase import add_training_args
    p = subparsers.add_parser("plan", help="memory plan of sampling or erasure training (no weights needed)")
    p.add_argument("--model", default="infinity_2b", choices=PRESET_MODELS + tuple(named_models()),
                   help="an Infinity preset (built on the meta device) or a model loaded by name "
                        f"({', '.join(named_models())})")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--dtype", default=None, choices=[d for d in get_args(ModelDtype) if d != "auto"],
                   help="compute dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the run happens")
    p.add_argument("--sample", action="store_true", help="plan sampling instead of training")
    p.add_argument("--batch", type=int, default=1, help="images sampled together (--sample)")
    p.add_argument("--low-vram", action="store_true",
                   help="sampling with the blocks streamed from CPU memory (Load VAR Model: low_vram)")
    p.add_argument("--offload-text-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="the T5 stays in CPU memory between encodes (default: on for erasure on Infinity)")
    p.add_argument("--n-pairs", type=int, default=PAIRS_PER_CONCEPT, help="pairs per concept (their targets)")
    p.add_argument("--concepts", type=int, default=1, help="concepts erased together")
    add_training_args(p)
    add_guard_args(p)
    p.set_defaults(func=cmd_plan)


def model_sizes(name: str, height: int, width: int):
    """(InfinityConfig, schedule, VAEConfig | None, T5Config | None) of a preset or a model
    loaded by name (its own files, on the CPU)."""
    from ..generation.registry import is_named_model
    from ..models import scales
    from ..models.bsq_vae import VAEConfig
    from ..models.presets import preset_config
    if is_named_model(name):
        from ..generation.pipeline import load_pipeline
        pipe = load_pipeline(name, device="cpu")
        return pipe.model.cfg, pipe.schedule_for(height, width), pipe.vae.config, pipe.text_encoder.model.config
    cfg = preset_config(name)
    schedule, _, _ = scales.schedule_for_image(height, width)
    patchify = cfg.bits > 32                       # Infinity-8B: 14-bit VAE cells, 2x2 per token
    vae = VAEConfig(bits=cfg.bits // 4, patch_size=8) if patchify else VAEConfig(bits=cfg.bits)
    return cfg, schedule, vae, None


def check_plan_args(args):
    """Every bound of the command planned (sample's, erase's) with its message, before anything is
    built: a plan of what the command refuses is no plan. Returns the erasure's EraseConfig (None
    for --sample)."""
    from ..erasure.pairs import run_pairs_problem
    from .common import check_image_count, check_image_size
    from .erase import check_n_pairs, config_from_args
    check_image_count("--batch", args.batch, hint="the bound of `sample --n`")
    check_image_size(args.height, args.width)
    check_n_pairs(args.n_pairs)
    if args.concepts < 1:
        raise CliError(f"--concepts {args.concepts}: must be at least 1")
    problem = run_pairs_problem(args.n_pairs * args.concepts)
    if problem:
        raise ValueError(problem)
    if args.low_vram and not args.sample:
        raise CliError("--low-vram streams the blocks for sampling only (add --sample); "
                       "training needs them on the device")
    if check_guard_args(args) and not args.sample:
        raise CliError("--guard acts while sampling: add --sample to plan it")
    return None if args.sample else config_from_args(args)


def cmd_plan(args) -> None:
    from ..erasure.profile import erasure_profile
    from ..generation.registry import named_model
    erase = check_plan_args(args)
    named = named_model(args.model)
    if named is not None and named.plan_device and args.device == "cuda":
        args.device = named.plan_device            # where that model runs (the embedded model: the CPU)
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    cfg, schedule, vae, t5 = model_sizes(args.model, args.height, args.width)
    profile = erasure_profile(args.model)
    offload = args.offload_text_encoder
    if offload is None:
        offload = profile.offload_text_encoder and not args.sample
    guard = None
    pairs = check_guard_args(args)
    if pairs:
        guard = profile.guard_settings(pairs, **guard_overrides(args))
        try:
            guard.check_blocks(cfg.depth)
        except ValueError as err:
            raise CliError(str(err).replace("guard blocks", "--guard-blocks", 1)) from None
    plan = plan_memory(cfg, schedule, dtype=dtype, device=args.device, erase=erase,
                       sample_batch=args.batch, t5_config=t5, vae_config=vae, low_vram=args.low_vram,
                       offload_text_encoder=offload, n_pairs=args.n_pairs * args.concepts, guard=guard)
    tokens = sum(h * w for h, w in schedule)
    what = f"sampling {args.batch} image(s)" if erase is None else (
        f"erasure: {erase.train}" + (f" rank {erase.rank} on {','.join(erase.lora_targets)}" if erase.train == "lora" else "")
        + f", batch {erase.batch_size}, {erase.passes} passes, checkpointing {'on' if erase.gradient_checkpointing else 'off'}"
        + f", trajectories {erase.trajectory.batch_size} at a time")
    print(f"{args.model} at {args.height}x{args.width} ({len(schedule)} scales, {tokens} tokens), {dtype} on {args.device}; {what}")
    print(plan.table())
    if plan.peak > 0 and args.device == "cuda":
        card = next((g for g in CARD_SIZES_GB if g * GiB >= plan.peak), None)
        print(f"(fits a {card} GB card)" if card else
              f"(more than one {CARD_SIZES_GB[-1]} GB card holds: lower the batch, the resolution or the pairs)")
