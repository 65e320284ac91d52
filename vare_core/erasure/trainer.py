"""The erasure training loop: pairs + frozen model -> adapter.

Usage::

    pairs = make_pairs("circle", "square", n_per_concept=50)
    result = train_erasure(pipe, pairs, EraseConfig(method="svare", steps=500),
                           callback=lambda info: print(info["step"], info["loss"]))
    save_adapter(result.adapter, "erase_circle.safetensors")
    erased = apply_adapter(pipe, result.adapter)

What happens:
1. The frozen model samples one trajectory per pair for the SAFE prompt (trajectories.py,
   cached on disk). Its teacher logits are cached with it, so training needs no frozen teacher
   forward pass.
2. Every prompt is encoded by the (frozen) text encoder once, up front.
3. Only the trained tensors get fp32 master copies (trainable.TrainableWeights); every other
   tensor is shared with the pipeline's model, which is restored unchanged afterwards.
4. Per step: a seeded batch of pairs; one teacher-forced pass over all scales on
   [unsafe prompts; safe prompts] x safe trajectory (the safe half only for svare / early with
   a preservation weight > 0); loss = losses.erasure_objective: L_FCE + w * L_Pre for svare (the
   paper's single objective; the official code's variant with two optimiser steps per iteration,
   L_FCE then w * L_Pre, is not used), MSE to the teacher for vare, plain CE for naive; early:
   early.early_objective (L_FCE on the first early_scales scales + an entropy term + L_Pre).
   Keep pairs (unsafe == safe, pairs.retain_pairs) take part in L_Pre only.
   What the logits are trained toward (`targets`):
   - "cfg" (the paper): L_FCE on the bits sampled with guidance, L_Pre toward the CFG-combined
     teacher. The sampler then applies CFG to a conditional branch that was already taught a
     guided distribution: guidance twice, blotchy frame-filling pictures at cfg >= 2 (docs/method.md).
     Keep pairs are held to the frozen model's own conditional logits (keep_target="frozen").
   - "conditional" (guidance-consistent): every row's target is the frozen model's CONDITIONAL
     logits of the safe prompt on the trajectory (computed once before training); with
     erase_target="soft" the selected tokens of the unsafe prompt are trained toward that
     distribution instead of the sampled bits. A fit conditional branch then meets the sampler's
     guidance exactly as the safe prompt's own branch does, at any cfg.
   - "guided": the student's CFG mix with the frozen null branch, cfg * student(c) + (1 - cfg) *
     null, is what meets the paper's targets (measured, not the default: docs/method.md).
   null_weight > 0 adds the null condition as rows held to its frozen output (an adapter on
   cross-attention moves the unconditional branch too, which shifts every prompt's picture at
   cfg > 1); scale_weights="balanced" weights every scale the same (the 1-, 4-, 16-token scales
   set the layout but are a few % of the tokens).
5. AdamW (betas 0.9/0.97, weight decay on matrices only), gradient clipping, constant lr.
   Precision: fp16 = autocast + GradScaler (overflowing steps are skipped and counted), bf16 =
   autocast, fp32 = plain; a step whose gradients are not finite is always skipped, so weights
   never become NaN.

The model stays in eval mode (no condition dropout); with gradient checkpointing it is put in
train mode only because Infinity.forward checkpoints in train mode, with dropout disabled
explicitly. cancel() is checked before every step; stopping returns the adapter of the steps done.

Under torchrun (an initialised process group) the same call trains with DDP, or FSDP with
`fsdp=True`; each rank takes its slice of the same global batch, so the result equals a
single-process run of that batch (see distributed.py). Only rank 0 runs the callback and gets
the adapter.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

from .. import __version__
from ..checks import is_integer
from ..devices import native_bf16
from ..generation.sampler import SamplingCancelled
from ..models.infinity_defaults import EARLY as INFINITY_EARLY
from . import distributed, lean
from .adapters import FORMAT_VERSION, Adapter
from .choices import (EraseTarget, KeepTarget, LoraTarget, Method, Passes, Precision, ScaleWeights, StreamBlocks,
                      Targets, TrainMode, choices)
from .early import check_early_scales
from .losses import LN2, METHODS, LossConfig
from .pairs import PromptPair, run_pairs_problem
from .step import PromptBank, Stepper, batch_indices
from .targets import prepare_targets
from .trainable import LORA_TARGETS, TRAIN_MODES, TrainableWeights, check_lora_rank, shared_copy
from .trajectories import TrajectorySettings, build_trajectories

PRECISIONS = choices(Precision)
KEEP_TARGETS = choices(KeepTarget)
TARGETS = choices(Targets)
SCALE_WEIGHTS = choices(ScaleWeights)
PASSES = choices(Passes)
STREAM_BLOCKS = choices(StreamBlocks)
OFFICIAL_LR, OFFICIAL_WIDTH = 2.34e-5, 2048   # S-VARE code's effective lr on Infinity-2B


@dataclass
class EraseConfig:
    """One erasure run's settings. The defaults are the S-VARE paper's published setting on
    Infinity: the full CA+FFN fine-tune (train="ca_ffn"), alpha 0.25, L_Pre weight 0.5, 500
    steps, the official lr scaled to the model's width, targets "cfg" with hard L_FCE targets
    (the "paper" formulation, formulations.py). The LoRA fields (rank, lora_targets) hold the
    pack's choice for train="lora", the early method's (early_scales, entropy_weight) Infinity's
    profile's (models/infinity_defaults.EARLY: no published setting). What a product entry point trains with is the model's
    erasure profile (profile.py), which adds its own settings to these: memory-saving ones for
    Infinity (checkpointing, split passes, batch 1, ...), measured tuning for the embedded model."""
    method: Method = "svare"                  # svare | vare | naive | early
    train: TrainMode = "ca_ffn"               # ca_ffn (official) | lora
    rank: int = 8                             # LoRA rank
    lora_targets: tuple[LoraTarget, ...] = ("ca", "ffn")   # from ca, kv, ffn, sa
    lora_scale: float = 1.0                   # weight change = lora_scale * B @ A
    steps: int = 500
    lr: float | None = None                   # None: default_lr(train, width)
    batch_size: int = 2                       # pairs per step (a step holds all their activations)
    alpha: float = 0.25                       # token selected when >= alpha of its bits are wrong
    gamma: float = LN2                        # a bit is wrong when its CE > gamma
    preservation_weight: float = 0.5          # w of L_Pre (svare)
    early_scales: int = INFINITY_EARLY["early_scales"]    # early: L_FCE and the entropy term on
                                              # the first k scales of the schedule (the free ones
                                              # still left out unless erase_free_scales)
    entropy_weight: float = INFINITY_EARLY["entropy_weight"]   # early: weight of (H_student -
                                              # H_target)^2 (early.py)
    null_weight: float = 0.0                  # svare: weight of holding the null (unconditional)
                                              # branch to its frozen self on the trajectories
    keep_target: KeepTarget = "frozen"        # keep pairs' L_Pre target: frozen (own conditional
                                              # logits) | teacher (CFG-combined, like safe prompts)
    targets: Targets = "cfg"                  # cfg (paper: CFG-combined teacher) | conditional (the
                                              # frozen conditional logits of the safe prompt) | guided
                                              # (student's CFG output with the frozen null branch)
    erase_target: EraseTarget = "hard"        # L_FCE on selected tokens: hard (sampled bits) | soft
    scale_weights: ScaleWeights = "tokens"    # tokens: every token counts the same (paper) |
                                              # balanced: every scale counts the same
    erase_free_scales: bool = False           # L_FCE also on the model's free scales (drawn without
                                              # guidance: the layout a prompt leaves open, e.g. the
                                              # embedded model's first); False: only L_Pre holds them
    precision: Precision = "auto"             # half model: its dtype; fp32 model: fp16 on CUDA, else fp32
    gradient_checkpointing: bool = False
    stream_blocks: StreamBlocks = "off"       # trajectories + targets with the blocks streamed from
                                              # CPU memory (low_vram): off | on | auto (on a GPU
                                              # whose free memory cannot hold the KV cache beside them)
    passes: Passes = "joint"                  # joint: every row in one forward/backward | split:
                                              # one row group (unsafe, safe, null) at a time, the
                                              # same gradients with a third of the activations
    seed: int = 42
    grad_clip: float = 5.0                    # 0 disables clipping
    betas: tuple = (0.9, 0.97)
    weight_decay: float = 0.005               # matrices only
    trajectory: TrajectorySettings = field(default_factory=TrajectorySettings)

    def __post_init__(self):
        def fail(name, allowed, value):
            raise ValueError(f"EraseConfig.{name} must be {allowed}, got {value!r}")

        def real(name, value):
            return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)

        for name, allowed in (("method", METHODS), ("train", TRAIN_MODES), ("precision", PRECISIONS),
                              ("keep_target", KEEP_TARGETS), ("targets", TARGETS),
                              ("scale_weights", SCALE_WEIGHTS), ("passes", PASSES),
                              ("stream_blocks", STREAM_BLOCKS)):
            if getattr(self, name) not in allowed:
                fail(name, f"one of {allowed}", getattr(self, name))
        for name, low in (("steps", 1), ("batch_size", 1), ("rank", 1), ("seed", 0), ("early_scales", 1)):
            value = getattr(self, name)
            if not is_integer(value, minimum=low):
                fail(name, f"an integer >= {low}", value)
        if self.seed >= 2**63 - 2:          # torch generators take 64-bit signed seeds (+1 for pairs)
            fail("seed", f"an integer >= 0 and < {2**63 - 2}", self.seed)
        if self.lr is not None and not (real("lr", self.lr) and self.lr > 0):
            fail("lr", "a finite number > 0 (or None for the default)", self.lr)
        for name in ("grad_clip", "weight_decay", "preservation_weight", "null_weight", "entropy_weight"):
            value = getattr(self, name)
            if not (real(name, value) and value >= 0):
                fail(name, "a finite number >= 0", value)
        if not (real("lora_scale", self.lora_scale) and self.lora_scale > 0):
            fail("lora_scale", "a finite number > 0", self.lora_scale)
        self.lora_targets = tuple(self.lora_targets)
        if not self.lora_targets or any(t not in LORA_TARGETS for t in self.lora_targets):
            fail("lora_targets", f"one or more of {tuple(LORA_TARGETS)}", self.lora_targets)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(real("betas", b) and 0 <= b < 1 for b in self.betas):
            fail("betas", "two numbers in [0, 1)", self.betas)
        if not isinstance(self.erase_free_scales, bool):
            fail("erase_free_scales", "True or False", self.erase_free_scales)
        if not isinstance(self.trajectory, TrajectorySettings):
            fail("trajectory", "a TrajectorySettings", self.trajectory)
        self.loss_config()   # alpha / gamma checks live with the losses

    def loss_config(self) -> LossConfig:
        return LossConfig(gamma=self.gamma, alpha=self.alpha, preservation_weight=self.preservation_weight,
                          erase_target=self.erase_target)


@dataclass
class TrainResult:
    adapter: Adapter | None    # None when cancelled before training began, and on ranks > 0
    history: list              # one dict per step (what the callback received)
    cancelled: bool = False


def default_lr(train: str, width: int) -> float:
    """The official full fine-tuning lr at width 2048, scaled like the weights' init std
    (1/sqrt(width)); LoRA (B starts at 0, updates pass through A) gets 10x."""
    lr = OFFICIAL_LR * math.sqrt(OFFICIAL_WIDTH / width)
    return lr * 10 if train == "lora" else lr


def resolve_precision(precision: str, device: torch.device, model_dtype: torch.dtype):
    """-> (name, autocast dtype or None, use GradScaler).

    auto: a half-precision model trains in its own dtype (fp16: with loss scaling); an fp32
    model in bf16 on a GPU with native bf16, fp16 + GradScaler on older GPUs, fp32 on the CPU.
    The trained tensors are fp32 masters in every case. Autocast to the other half type is
    refused: autocast cannot mix bf16 and fp16 tensors in one op (e.g. torch.cat of the frozen
    biases)."""
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    model_name = names.get(model_dtype, str(model_dtype))
    if precision == "auto":
        if model_dtype != torch.float32:
            precision = model_name
        else:
            precision = ("bf16" if native_bf16(device) else "fp16") if device.type == "cuda" else "fp32"
    if model_dtype != torch.float32 and precision != model_name:
        raise ValueError(f"precision {precision} does not work with a model loaded in {model_name}: "
                         f"train with precision {model_name} (or auto), or load the model in fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
    return precision, dtype, precision == "fp16"


# ----------------------------------------------------------------------------- loop

def _check_pairs(pairs) -> list[PromptPair]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty; make some with pairs.make_pairs or load a pairs file")
    problem = run_pairs_problem(len(pairs))
    if problem:
        raise ValueError(problem)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PromptPair):
            raise ValueError(f"pairs[{i}] must be a PromptPair, got {type(pair).__name__}")
    return pairs


def _final_losses(history: list, last: int = 10) -> dict:
    keys = ("loss", "fce", "entropy", "pre", "vare", "naive_ce", "selected_fraction", "bit_error_rate")
    good = [h for h in history if not h["skipped"]][-last:]
    return {k: sum(h[k] for h in good) / len(good) for k in keys if good and k in good[0]}


class TrainingDiverged(ValueError):
    """The trained weights are not finite: there is no usable adapter to save."""


def _check_launch(pipe, config: EraseConfig, context, fsdp: bool) -> None:
    """What can be refused before any sampling: fsdp without processes, a batch smaller than
    the world, a LoRA rank above a target layer's size, an early window outside the schedule or
    holding only free scales."""
    if fsdp and context is None:
        raise ValueError("fsdp shards the training state across processes: launch with "
                         "torchrun --nproc_per_node N (N >= 2)")
    distributed.shard(range(config.batch_size), context)   # refuses batch_size < world size
    if config.train == "lora":
        check_lora_rank(pipe.model, config.rank, config.lora_targets)
    if config.method == "early":
        check_early_scales(config.early_scales, len(pipe.default_schedule), _free_scales(pipe, config))


def _free_scales(pipe, config: EraseConfig) -> int:
    """The first scales L_FCE leaves out: the model's free scales, unless erase_free_scales."""
    return 0 if config.erase_free_scales else getattr(pipe, "free_scales", 0)


def _prepare(pipe, pairs, config: EraseConfig, callback, cancel, cache_dir, context, autocast):
    """(trajectories, prompt bank, targets): rank 0 samples and caches the safe prompts'
    trajectories (the other ranks then read its cache), every prompt is encoded once, and the
    targets are computed with the frozen model. SamplingCancelled when `cancel` says so."""
    def progress(done, total):
        if callback is not None:
            callback({"phase": "trajectories", "done": done, "total": total})

    def sample_trajectories():
        return build_trajectories(pipe, [p.safe for p in pairs], config.trajectory, cache_dir,
                                  progress, cancel)

    with lean.blocks_streamed(pipe.model, lean.should_stream_blocks(pipe, config, context)):
        trajs = distributed.main_first(sample_trajectories, context, "trajectories").to(pipe.device)
        bank = PromptBank(pipe, [p.unsafe for p in pairs] + [p.safe for p in pairs])
        targets = prepare_targets(pipe.model, bank, trajs, pairs, config, autocast,
                                  free_scales=_free_scales(pipe, config))
    return trajs, bank, targets


@contextlib.contextmanager
def _training_mode(model, gradient_checkpointing: bool):
    """Frozen tensors collect no gradients; train mode only for gradient checkpointing (Infinity
    checkpoints only in train mode, dropout is off); everything restored afterwards."""
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    saved_mode = (model.training, model.gradient_checkpointing)
    try:
        model.requires_grad_(False)
        model.gradient_checkpointing = gradient_checkpointing
        model.train(gradient_checkpointing)
        yield
    finally:
        model.train(saved_mode[0])
        model.gradient_checkpointing = saved_mode[1]
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)


def _check_finite(tensors: dict, steps_done: int, lr: float) -> None:
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:   # e.g. --lr 1e308: the weights overflowed; such an adapter is never handed out
        raise TrainingDiverged(
            f"training diverged: {len(bad)} of {len(tensors)} trained tensors hold inf/NaN after "
            f"{steps_done} steps (lr {lr:g}); nothing was saved. Lower the learning rate "
            "(the default is usually right) or use precision fp32.")


def adapter_metadata(pipe, pairs, config: EraseConfig, *, lr: float, precision: str, schedule,
                     history: list, skipped_steps: int, cancelled: bool, context=None,
                     fsdp: bool = False) -> dict:
    """What an adapter file records about its training (adapters.py writes it as JSON)."""
    hyper = {"lr": lr, "batch_size": config.batch_size, "alpha": config.alpha,
             "gamma": config.gamma, "preservation_weight": config.preservation_weight,
             "keep_target": config.keep_target, "targets": config.targets, "null_weight": config.null_weight,
             "erase_target": config.erase_target, "scale_weights": config.scale_weights,
             "erase_free_scales": config.erase_free_scales, "precision": precision, "seed": config.seed,
             "grad_clip": config.grad_clip, "betas": list(config.betas), "weight_decay": config.weight_decay,
             "gradient_checkpointing": config.gradient_checkpointing, "passes": config.passes,
             "stream_blocks": config.stream_blocks, "trajectory": asdict(config.trajectory)}
    if config.method == "early":
        hyper.update(early_scales=config.early_scales, entropy_weight=config.entropy_weight)
    if context is not None:
        hyper["distributed"] = {"world_size": context.world_size, "strategy": "fsdp" if fsdp else "ddp"}
    return {
        "format": FORMAT_VERSION, "base_fingerprint": pipe.fingerprint, "preset": pipe.preset,
        "model": pipe.name, "stacked_on": [list(a) for a in getattr(pipe, "applied_adapters", ())],
        "concepts": sorted({p.concept for p in pairs if p.concept}),
        "anchors": sorted({p.anchor for p in pairs if p.anchor}),
        "method": config.method, "train": config.train,
        "rank": config.rank if config.train == "lora" else None,
        "lora_targets": list(config.lora_targets) if config.train == "lora" else None,
        "lora_scale": config.lora_scale, "hyperparameters": hyper, "n_pairs": len(pairs),
        "schedule": [list(s) for s in schedule], "steps_done": len(history),
        "steps_requested": config.steps, "skipped_steps": skipped_steps, "cancelled": cancelled,
        "final_losses": _final_losses(history), "pack_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def train_erasure(pipe, pairs, config: EraseConfig | None = None, callback=None, cancel=None,
                  cache_dir=None, fsdp: bool = False) -> TrainResult:
    """Train an erasure adapter on `pairs` (PromptPair list); see the module docstring.

    callback(info) gets {"phase": "trajectories", "done", "total"} while trajectories are
    sampled, then one dict per step: phase "train", step, steps, loss, the method's terms (fce,
    pre, pre_weighted, and for early entropy, entropy_weighted / vare / naive_ce), selected_fraction, bit_error_rate, lr, grad_norm,
    seconds (since training began), skipped (this step), skipped_steps, loss_scale.
    In a process group the stats are those of the global batch, the same on every rank."""
    config = config or EraseConfig()
    pairs = _check_pairs(pairs)
    model, device = pipe.model, pipe.device
    context = distributed.current(device)       # None: a single process
    _check_launch(pipe, config, context, fsdp)
    main = context is None or context.is_main
    callback = callback if main else None
    precision, amp_dtype, use_scaler = resolve_precision(config.precision, device, model.word_embed.weight.dtype)
    lr = config.lr if config.lr is not None else default_lr(config.train, model.cfg.embed_dim)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None \
        else contextlib.nullcontext
    try:
        trajs, bank, targets = _prepare(pipe, pairs, config, callback, cancel if main else None,
                                        cache_dir, context, autocast)
    except SamplingCancelled:
        return TrainResult(adapter=None, history=[], cancelled=True)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    cancelled = False
    with _training_mode(model, config.gradient_checkpointing):
        trained_model = shared_copy(model) if fsdp else model   # FSDP rewrites what it shards
        weights = TrainableWeights(trained_model, config.train, config.rank, config.lora_targets,
                                   config.lora_scale, generator)
        batches = batch_indices(len(pairs), config.batch_size, generator)
        with weights.installed():
            parallel = distributed.strategy(trained_model, weights, context, fsdp)
            stepper = Stepper(parallel, bank, trajs, targets, pairs, config, lr, autocast, use_scaler,
                              device, context)
            for step in range(config.steps):
                if distributed.any_rank(cancel is not None and cancel(), context):
                    cancelled = True                # every rank stops after the same step
                    break
                history.append(stepper.step(next(batches), step))
                if callback is not None:
                    callback(history[-1])
            tensors = parallel.export()             # None on ranks > 0
    if not main or not history:     # ranks > 0, or stopped before the first step: nothing to save
        return TrainResult(adapter=None, history=history, cancelled=cancelled)
    _check_finite(tensors, len(history), lr)
    metadata = adapter_metadata(pipe, pairs, config, lr=lr, precision=precision, schedule=trajs.schedule,
                                history=history, skipped_steps=stepper.skipped_steps,
                                cancelled=cancelled, context=context, fsdp=fsdp)
    return TrainResult(adapter=Adapter(tensors=tensors, metadata=metadata), history=history,
                       cancelled=cancelled)
