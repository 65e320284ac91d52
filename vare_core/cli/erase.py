"""Command line for erasure: `python -m vare_core erase ...` and `bench-erasure`.

    python -m vare_core erase --model embedded --concept circle --anchor square \
        --steps 500 --out erase_circle.safetensors
    python -m vare_core erase --model infinity_2b_reg.pth --vae infinity_vae_d32reg.pth \
        --text-encoder flan-t5-xl --concept church --anchor building --out erase_church.safetensors
    python -m vare_core sample --prompt "a red circle" --adapter erase_circle.safetensors:0.8

The pairs and the training options left unset come from the model's erasure profile
(erasure/profile.py, the same as the Train Erasure node's): on the embedded shapes-world model
its templates (the unsafe prompt names the concept by its main word only, so synonyms stay
unseen and can test generalisation; the safe prompt the anchor, with the same colour /
background / style words) and its tuned settings.
Training runs as a TrainingSession (erasure/session.py, as the node's): on a GPU the run's
memory plan comes first, and a run that cannot fit is refused with the settings that fit; out of
memory, the message says which settings to change. Ctrl-C stops training after the current step
and saves the partial adapter (a second Ctrl-C aborts at once).

Several processes (DDP; --fsdp shards the trained tensors and optimizer state, see
erasure/distributed.py): the same command under torchrun. The global batch (--batch-size) is
split over the processes; rank 0 samples the trajectories, prints, and writes the adapter.

    torchrun --nproc_per_node 2 -m vare_core erase --model embedded --concept circle \
        --anchor square --steps 150 --out erase_circle.safetensors
"""
from __future__ import annotations

import argparse
import signal
from pathlib import Path

from .. import paths
from .common import add_model_args, load_from_args

TRAINING_OPTIONS = ("method", "train", "rank", "steps", "lr", "batch_size", "alpha", "gamma",
                    "preservation_weight", "keep_target", "targets", "erase_target", "precision", "seed",
                    "passes", "stream_blocks", "early_scales", "entropy_weight")
# Pairs per training step (the global batch): a step holds every one of their sequences' activations
# at once. Far above any run that fits (Infinity trains 1 at 1024x1024, the embedded model 8); a
# larger number is a typo, and building its index lists alone would exhaust the memory.
MAX_BATCH_SIZE = 1024


def check_n_pairs(n_pairs) -> None:
    """--n-pairs (of `erase` and `plan`): the pair module's bound, in the flag's name."""
    from ..erasure.pairs import check_pair_count
    _with_flag_names(lambda: check_pair_count(n_pairs))


def check_pair_flags(args) -> None:
    """--n-pairs / --retain, checked before the model loads."""
    from ..erasure.pairs import MAX_PAIRS
    if args.retain is not None and args.retain < 0:
        raise ValueError(f"--retain must be >= 0 (keep pairs per kept concept), got {args.retain}")
    if args.retain is not None and args.retain > MAX_PAIRS:
        raise ValueError(f"--retain {args.retain}: at most {MAX_PAIRS} keep pairs per concept")
    if not args.pairs:
        check_n_pairs(args.n_pairs)


def pairs_from_args(args, pipe):
    """The pairs of `erase`: a --pairs file, or the model's pairs for --concept / --anchor
    (its erasure profile's, with --keep, --retain, --n-pairs and --seed)."""
    from ..erasure.profile import erasure_profile
    profile = erasure_profile(pipe)
    if args.pairs:
        return profile.pairs(pairs_file=args.pairs, default_concept=args.concept)
    if not args.concept or not args.anchor:
        raise ValueError("give --concept and --anchor (or a --pairs file)")
    check_pair_flags(args)
    return _with_flag_names(lambda: profile.pairs(args.concept, args.anchor, seed=args.seed,
                                                  n_per_concept=args.n_pairs, retain=args.retain,
                                                  keep=args.keep, pipe=pipe))


def config_from_args(args):
    """EraseConfig from the options given; the rest from the model's erasure profile
    (erasure/profile.py: the same defaults as the Train Erasure node)."""
    from ..erasure.profile import erasure_profile
    from ..erasure.trajectories import TrajectorySettings
    given = {name: getattr(args, name) for name in TRAINING_OPTIONS if getattr(args, name) is not None}
    if isinstance(args.batch_size, int) and args.batch_size > MAX_BATCH_SIZE:
        raise ValueError(f"--batch-size {args.batch_size}: at most {MAX_BATCH_SIZE} pairs per step (a step "
                         "holds the activations of all of them at once; 1-64 is typical)")
    if args.lora_targets is not None:
        given["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if args.grad_checkpointing is not None:
        given["gradient_checkpointing"] = args.grad_checkpointing
    if args.trajectory_batch is not None:
        if args.trajectory_batch < 1:
            raise ValueError(f"--trajectory-batch must be an integer >= 1, got {args.trajectory_batch}")
        given["trajectory"] = TrajectorySettings(batch_size=args.trajectory_batch)
    formulation = getattr(args, "formulation", None) or "auto"
    return _with_flag_names(lambda: erasure_profile(args.model).config(formulation, **given))


FLAGS = {"preservation_weight": "--loss-weight", "n_per_concept": "--n-pairs"}   # the rest: --name-with-dashes


def _with_flag_names(build):
    """Run build(); a ValueError about EraseConfig.x / a pair option names the CLI flag instead."""
    import re
    try:
        return build()
    except ValueError as err:
        def flag(match):
            name = match.group(1)
            return FLAGS.get(name, "--" + name.replace("_", "-"))
        message = re.sub(r"\b(?:EraseConfig\.|LossConfig\.)?(preservation_weight|n_per_concept|lora_targets|"
                         r"batch_size|method|train|rank|steps|lr|alpha|gamma|precision|seed|early_scales|"
                         r"entropy_weight)\b(?= must| is| should| \()",
                         flag, str(err))
        message = re.sub(r"(?<![\w-])(keep|retain)\b(?=:| must|$)", r"--\1", message)   # the pair options
        raise ValueError(message) from None


class _StopFlag:
    """First Ctrl-C asks training to stop after the current step; the second one aborts.
    (torchrun passes a Ctrl-C on to every process: all of them stop after the same step.)"""

    def __init__(self, verbose: bool = True):
        self.stop, self.verbose = False, verbose

    def __call__(self) -> bool:
        return self.stop

    def handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        if self.verbose:
            print("\nstopping after this step (Ctrl-C again to abort without saving)...", flush=True)


def cmd_erase(args):
    from ..erasure import distributed
    # checked before anything loads: a bad path must not cost a training run, and a device
    # node, FIFO or folder at --out is never replaced
    out = paths.check_output_file(Path(args.out), "--out")
    config = config_from_args(args)              # bad settings fail before the model loads
    check_pair_flags(args)
    args.seed = config.seed
    if args.fsdp and distributed.env_world_size() <= 1:
        raise ValueError("--fsdp shards training across processes: launch with "
                         "torchrun --nproc_per_node N -m vare_core erase ... (N >= 2)")
    with distributed.process_group_from_env(args.device) as context:   # None: one process
        if context is not None:
            args.device = str(context.device)
        _erase(args, config, out, main=context is None or context.is_main)


def _erase(args, config, out: Path, main: bool):
    """Load, train, save; under torchrun only rank 0 (`main`) prints and writes."""
    from tqdm import tqdm

    from ..erasure.adapters import save_adapter
    from ..erasure.profile import erasure_profile
    from ..erasure.session import TrainingSession, TrajectoriesProgress
    # the profile's memory plan: Infinity keeps its T5 in CPU memory between encodes
    pipe = load_from_args(args, offload_text_encoder=erasure_profile(args.model).offload_text_encoder)
    pairs = pairs_from_args(args, pipe)
    if main:
        print(f"{len(pairs)} pairs, e.g. {pairs[0].unsafe!r} -> {pairs[0].safe!r}")
    session = TrainingSession(pipe, pairs, config, cache_dir=args.cache_dir, fsdp=args.fsdp)
    session.check_memory()                       # on a GPU: a run that cannot fit never starts

    bars = {}

    def progress(event):
        if isinstance(event, TrajectoriesProgress):
            bar = bars.setdefault("traj", tqdm(total=event.total, desc="trajectories", unit="prompt"))
            bar.n = event.done
            bar.refresh()
            return
        bar = bars.setdefault("train", tqdm(total=event.steps, desc=f"erase ({config.method})", unit="step"))
        terms = {k: f"{v:.4f}" for k, v in {"loss": event.loss, **event.terms}.items()}
        terms["sel"] = f"{event.selected_fraction or 0.0:.3f}"
        if event.skipped_steps:
            terms["skipped"] = event.skipped_steps
        bar.set_postfix(terms, refresh=False)
        bar.update(1)

    stop = _StopFlag(verbose=main)
    previous = signal.signal(signal.SIGINT, stop.handle)
    try:
        result = session.train(progress=progress if main else None, cancel=stop)
    finally:
        signal.signal(signal.SIGINT, previous)
        for bar in bars.values():
            bar.close()
    if not main:                                 # rank 0 reports and writes the adapter
        if result.cancelled:
            raise KeyboardInterrupt
        return
    if result.adapter is None:
        print("interrupted before the first training step; nothing saved"
              + (f" ({out} is unchanged)" if out.exists() else ""))
        raise KeyboardInterrupt
    save_adapter(result.adapter, out)
    meta = result.adapter.metadata
    losses = ", ".join(f"{k} {v:.4f}" for k, v in meta["final_losses"].items())
    if result.cancelled:
        print(f"interrupted: saved the partial adapter ({meta['steps_done']} of "
              f"{meta['steps_requested']} steps) to {out}")
        raise KeyboardInterrupt
    print(f"saved {out} ({meta['steps_done']} steps, {meta['skipped_steps']} skipped; {losses})")


def cmd_bench(args):
    from ..evaluation.shapes_world import erasure_bench as bench  # the shapes world's benchmark
    return bench.main(args)


def register(subparsers) -> None:
    from ..erasure.choices import Method, TrainMode, choices
    from ..erasure.pairs import PAIRS_PER_CONCEPT
    p = subparsers.add_parser("erase", help="train a concept-erasure adapter")
    add_model_args(p)
    g = p.add_argument_group("pairs")
    g.add_argument("--concept", help="what to erase, e.g. circle (several: comma separated)")
    g.add_argument("--anchor", help="what to draw instead, e.g. square")
    g.add_argument("--pairs", help="pairs file (.txt 'unsafe | safe' lines, .json or .csv)")
    g.add_argument("--n-pairs", type=int, default=PAIRS_PER_CONCEPT, help="generated pairs per concept")
    g.add_argument("--keep", help="concepts to keep as they are (comma list): adds keep-as-is pairs "
                                  "(embedded model: every shape not erased, always)")
    g.add_argument("--retain", type=int, help="keep-as-is pairs per kept concept (default: 2/5 of --n-pairs; 0 = none)")
    add_training_args(p)
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.set_defaults(func=cmd_erase)

    p = subparsers.add_parser("bench-erasure", help="compare erasure methods on the embedded model")
    p.add_argument("--concept", default="circle")
    p.add_argument("--anchor", default="square")
    p.add_argument("--samples", type=int, default=64, help="images per prompt set")
    p.add_argument("--out", default="out/bench-erasure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(choices(Method)), help="comma list")
    p.add_argument("--train", default="lora", help=f"comma list of what trains: {', '.join(choices(TrainMode))}")
    p.add_argument("--cfg", default="4", help="guidance scales to sample at (comma list, e.g. 1,2,4,6)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's default)")
    p.add_argument("--retain", type=int, default=None,
                   help="keep-as-is pairs per shape not erased (default 20 = 2/5 of the 50 pairs; 0 = the paper's pairs only)")
    p.add_argument("--early-scales", type=int, default=None,
                   help="method early: the first K scales it erases on (default: the model's profile)")
    p.add_argument("--entropy-weight", type=float, default=None,
                   help="method early: weight of its entropy term (default: the model's profile)")
    p.add_argument("--erase-free-scales", action="store_true",
                   help="the erasure loss also on the model's free scales (drawn without guidance)")
    p.set_defaults(func=cmd_bench)


def add_training_args(p) -> None:
    """The training options of `erase` (and `plan`, which plans exactly these); the choices and
    the defaults named in the help are the library's own (erasure/choices.py, the profiles)."""
    from ..erasure.choices import (EraseTarget, Formulation, KeepTarget, LoraTarget, Method, Passes, Precision,
                                   StreamBlocks, Targets, TrainMode, choices)
    from ..erasure.formulations import AUTO
    from ..erasure.profile import profile_defaults
    from ..erasure.trainer import OFFICIAL_LR, EraseConfig
    profile = "the model's profile: "
    g = p.add_argument_group("training")
    g.add_argument("--method", choices=choices(Method),
                   help=f"default {profile_defaults('method')}; early: svare's erasure loss on the first "
                        "--early-scales scales, with an entropy term (--entropy-weight)")
    g.add_argument("--train", choices=choices(TrainMode),
                   help=f"default: {profile}{profile_defaults('train')} (LoRA factors on the layers of "
                        "--lora-targets); ca_ffn = the official full fine-tune of cross-attention + FFN")
    g.add_argument("--rank", type=int, help=f"LoRA rank (default {profile_defaults('rank')})")
    g.add_argument("--lora-targets", help=f"comma list of {', '.join(choices(LoraTarget))} (kv: cross-attention "
                                          f"K/V only; default: {profile}{profile_defaults('lora_targets')})")
    g.add_argument("--steps", type=int, help=f"default: {profile}{profile_defaults('steps')}")
    width_scaled = f"the official {OFFICIAL_LR:g} scaled to the model width".replace("e-0", "e-")
    g.add_argument("--lr", type=float, help=f"default: {profile}"
                   + profile_defaults("lr", show=lambda lr: width_scaled if lr is None else f"{lr:g}"))
    g.add_argument("--batch-size", type=int, help=f"pairs per step (default: {profile}{profile_defaults('batch_size')})")
    g.add_argument("--alpha", type=float, help="fraction of wrong bits that selects a token "
                                               f"(default: {profile}{profile_defaults('alpha')})")
    g.add_argument("--gamma", type=float, help="bit CE threshold (default ln 2)")
    g.add_argument("--loss-weight", type=float, dest="preservation_weight",
                   help=f"weight of the preservation loss L_Pre (default: {profile}"
                        f"{profile_defaults('preservation_weight')})")
    g.add_argument("--early-scales", type=int, metavar="K",
                   help="method early: the erasure loss and its entropy term on the first K scales of the "
                        f"schedule (the free ones still left out; default: {profile}{profile_defaults('early_scales')})")
    g.add_argument("--entropy-weight", type=float, metavar="W",
                   help="method early: weight of the entropy term that keeps the erased bits as sharp as the "
                        f"target's (default: {profile}{profile_defaults('entropy_weight')})")
    g.add_argument("--keep-target", choices=choices(KeepTarget),
                   help="what keep pairs are held to in L_Pre: frozen = the model's own conditional "
                        "logits (default), teacher = the CFG teacher like the safe prompts")
    g.add_argument("--formulation", choices=(AUTO,) + choices(Formulation),
                   help="consistent (auto, every model): guidance-consistent targets, the null branch held; "
                        "paper: the S-VARE paper's objective as published. --targets / --erase-target "
                        "override single parts")
    g.add_argument("--targets", choices=choices(Targets),
                   help="what the prompts' logits are trained toward: cfg = the CFG-combined teacher "
                        "(the paper), conditional = the frozen model's conditional logits of the safe "
                        "prompt (guidance-consistent; the default), guided = the student's CFG "
                        "output with the frozen null branch against the paper's targets")
    g.add_argument("--erase-target", choices=choices(EraseTarget),
                   help="L_FCE on selected tokens: hard = the sampled bits (paper), soft = the target "
                        "logits' distribution (the default)")
    g.add_argument("--precision", choices=choices(Precision), help=f"default: {profile}{profile_defaults('precision')}")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: "
                        f"{profile}{profile_defaults('gradient_checkpointing')})")
    g.add_argument("--passes", choices=choices(Passes),
                   help="split: one row group (unsafe, safe, null) per backward, a third of the "
                        f"activations, same gradients (default: {profile}{profile_defaults('passes')})")
    g.add_argument("--stream-blocks", choices=choices(StreamBlocks),
                   help="sample the trajectories and targets with the blocks in CPU memory, one on the "
                        "GPU at a time (auto: when the KV cache would not fit; default: "
                        f"{profile}{profile_defaults('stream_blocks')})")
    g.add_argument("--trajectory-batch", type=int,
                   help="safe prompts sampled together for the trajectories and the targets (default: "
                        f"{profile}{profile_defaults(lambda config: config.trajectory.batch_size)})")
    g.add_argument("--seed", type=int, help=f"training and pair seed (default {EraseConfig.seed})")
    g.add_argument("--cache-dir", default=None, help="trajectory cache (default $VARE_CACHE_DIR or ~/.cache/vare)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the trained tensors, gradients and optimizer state "
                        "over the processes (FSDP) instead of replicating them (DDP)")

