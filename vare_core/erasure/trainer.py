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
3. Only the trained tensors get fp32 master copies (adapters.TrainableWeights); every other
   tensor is shared with the pipeline's model, which is restored unchanged afterwards.
4. Per step: a seeded batch of pairs; one teacher-forced pass over all scales on
   [unsafe prompts; safe prompts] x safe trajectory (the safe half only for svare with a
   preservation weight > 0); loss = losses.erasure_objective: L_FCE + w * L_Pre for svare (the
   paper's single objective; the official code's variant with two optimiser steps per iteration,
   L_FCE then w * L_Pre, is not used), MSE to the teacher for vare, plain CE for naive.
   Keep pairs (unsafe == safe, pairs.retain_pairs) take part in L_Pre only.
   What the logits are trained toward (`targets`):
   - "cfg" (the paper): L_FCE on the bits sampled with guidance, L_Pre toward the CFG-combined
     teacher. The sampler then applies CFG to a conditional branch that was already taught a
     guided distribution: guidance twice, blotchy frame-filling pictures at cfg >= 2 (README).
     Keep pairs are held to the frozen model's own conditional logits (keep_target="frozen").
   - "conditional" (guidance-consistent): every row's target is the frozen model's CONDITIONAL
     logits of the safe prompt on the trajectory (computed once before training); with
     erase_target="soft" the selected tokens of the unsafe prompt are trained toward that
     distribution instead of the sampled bits. A fit conditional branch then meets the sampler's
     guidance exactly as the safe prompt's own branch does, at any cfg.
   - "guided": the student's CFG mix with the frozen null branch, cfg * student(c) + (1 - cfg) *
     null, is what meets the paper's targets (measured, not the default: README).
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
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

from .. import __version__
from ..checks import is_integer
from ..devices import native_bf16
from . import distributed, lean, losses
from .adapters import (FORMAT_VERSION, TRAIN_MODES, Adapter, LORA_TARGETS, TrainableWeights,
                       check_lora_rank, shared_copy)
from .losses import LN2, METHODS, LossConfig
from .pairs import MAX_PAIRS, PromptPair
from .targets import prepare_targets
from .trajectories import TrajectorySettings, build_trajectories
from ..sampler import SamplingCancelled

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
KEEP_TARGETS = ("frozen", "teacher")
TARGETS = ("cfg", "conditional", "guided")
SCALE_WEIGHTS = ("tokens", "balanced")
PASSES = ("joint", "split")
STREAM_BLOCKS = ("off", "on", "auto")
OFFICIAL_LR, OFFICIAL_WIDTH = 2.34e-5, 2048   # S-VARE code's effective lr on Infinity-2B


@dataclass
class EraseConfig:
    method: str = "svare"                     # svare | vare | naive
    train: str = "ca_ffn"                     # ca_ffn (official) | lora
    rank: int = 4                             # LoRA rank
    lora_targets: tuple = ("ca", "ffn")       # from ca, ffn, sa
    lora_scale: float = 1.0                   # weight change = lora_scale * B @ A
    steps: int = 500
    lr: float | None = None                   # None: default_lr(train, width)
    batch_size: int = 2
    alpha: float = 0.25                       # token selected when >= alpha of its bits are wrong
    gamma: float = LN2                        # a bit is wrong when its CE > gamma
    preservation_weight: float = 0.5          # w of L_Pre (svare)
    null_weight: float = 0.0                  # svare: weight of holding the null (unconditional)
                                              # branch to its frozen self on the trajectories
    keep_target: str = "frozen"               # keep pairs' L_Pre target: frozen (own conditional
                                              # logits) | teacher (CFG-combined, like safe prompts)
    targets: str = "cfg"                      # cfg (paper: CFG-combined teacher) | conditional (the
                                              # frozen conditional logits of the safe prompt) | guided
                                              # (student's CFG output with the frozen null branch)
    erase_target: str = "hard"                # L_FCE on selected tokens: hard (sampled bits) | soft
    scale_weights: str = "tokens"             # tokens: every token counts the same (paper) |
                                              # balanced: every scale counts the same
    erase_free_scales: bool = False           # L_FCE also on the model's free scales (drawn without
                                              # guidance: the layout a prompt leaves open, e.g. the
                                              # embedded model's first); False: only L_Pre holds them
    precision: str = "auto"                   # half model: its dtype; fp32 model: fp16 on CUDA, else fp32
    gradient_checkpointing: bool = False
    stream_blocks: str = "off"                # trajectories + targets with the blocks streamed from
                                              # CPU memory (low_vram): off | on | auto (on a GPU
                                              # whose free memory cannot hold the KV cache beside them)
    passes: str = "joint"                     # joint: every row in one forward/backward | split:
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
        for name, low in (("steps", 1), ("batch_size", 1), ("rank", 1), ("seed", 0)):
            value = getattr(self, name)
            if not is_integer(value, minimum=low):
                fail(name, f"an integer >= {low}", value)
        if self.seed >= 2**63 - 2:          # torch generators take 64-bit signed seeds (+1 for pairs)
            fail("seed", f"an integer >= 0 and < {2**63 - 2}", self.seed)
        if self.lr is not None and not (real("lr", self.lr) and self.lr > 0):
            fail("lr", "a finite number > 0 (or None for the default)", self.lr)
        for name in ("grad_clip", "weight_decay", "preservation_weight", "null_weight"):
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


# ----------------------------------------------------------------------------- text

class PromptBank:
    """T5 states of every prompt, encoded once; `condition(prompts)` pads a batch of them."""

    def __init__(self, pipe, prompts, chunk: int = 16):
        self.pipe, self.states = pipe, {}
        unique = list(dict.fromkeys(prompts))
        with torch.no_grad():
            for start in range(0, len(unique), chunk):
                batch = unique[start:start + chunk]
                states, lens = pipe.encode_prompts(batch)
                for prompt, row, n in zip(batch, states, lens.tolist()):
                    self.states[prompt] = row[:n].clone()

    @torch.no_grad()
    def condition(self, prompts, null=False):
        """Condition of a batch of prompts; null=True (or a bool per prompt) gives the sampler's
        unconditional branch for them (the learned null condition cut to each prompt's length)."""
        rows = [self.states[p] for p in prompts]
        lens = torch.tensor([len(r) for r in rows], device=rows[0].device)
        padded = rows[0].new_zeros(len(rows), int(lens.max()), rows[0].shape[-1])
        for i, row in enumerate(rows):
            padded[i, :len(row)] = row
        model = self.pipe.model
        drop = torch.as_tensor(null if isinstance(null, (list, tuple)) else [null] * len(rows),
                               dtype=torch.bool, device=padded.device)
        return model.encode_condition(padded.to(model.word_embed.weight.dtype), lens, drop=drop)

    def null_condition(self, prompts):
        return self.condition(prompts, null=True)


# ----------------------------------------------------------------------------- loop

def _check_pairs(pairs) -> list[PromptPair]:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty; make some with pairs.make_pairs or load a pairs file")
    if len(pairs) > 4 * MAX_PAIRS:   # several concepts' pairs plus keep pairs
        raise ValueError(f"{len(pairs)} pairs: at most {4 * MAX_PAIRS} (every safe prompt is sampled "
                         "once before training); use fewer pairs per concept")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PromptPair):
            raise ValueError(f"pairs[{i}] must be a PromptPair, got {type(pair).__name__}")
    return pairs


def _batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless seeded epochs: every pair once per epoch, in a new order each time."""
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = torch.randperm(n, generator=generator).tolist()
            batch.append(order.pop())
        yield batch


def _final_losses(history: list, last: int = 10) -> dict:
    keys = ("loss", "fce", "pre", "vare", "naive_ce", "selected_fraction", "bit_error_rate")
    good = [h for h in history if not h["skipped"]][-last:]
    return {k: sum(h[k] for h in good) / len(good) for k in keys if good and k in good[0]}


def _make_optimizer(params, lr: float, config: EraseConfig) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=config.betas)


class TrainingDiverged(ValueError):
    """The trained weights are not finite: there is no usable adapter to save."""


def train_erasure(pipe, pairs, config: EraseConfig | None = None, callback=None, cancel=None,
                  cache_dir=None, fsdp: bool = False) -> TrainResult:
    """Train an erasure adapter on `pairs` (PromptPair list); see the module docstring.

    callback(info) gets {"phase": "trajectories", "done", "total"} while trajectories are
    sampled, then one dict per step: phase "train", step, steps, loss, the method's terms (fce,
    pre, pre_weighted / vare / naive_ce), selected_fraction, bit_error_rate, lr, grad_norm,
    seconds (since training began), skipped (this step), skipped_steps, loss_scale.
    In a process group the stats are those of the global batch, the same on every rank."""
    config = config or EraseConfig()
    pairs = _check_pairs(pairs)
    model = pipe.model
    device = pipe.device
    context = distributed.current(device)       # None: a single process
    if fsdp and context is None:
        raise ValueError("fsdp shards the training state across processes: launch with "
                         "torchrun --nproc_per_node N (N >= 2)")
    distributed.shard(range(config.batch_size), context)   # refuses batch_size < world size
    main = context is None or context.is_main
    callback, traj_cancel = (callback, cancel) if main else (None, None)
    if config.train == "lora":
        check_lora_rank(model, config.rank, config.lora_targets)
    precision, amp_dtype, use_scaler = resolve_precision(config.precision, device,
                                                         model.word_embed.weight.dtype)
    lr = config.lr if config.lr is not None else default_lr(config.train, model.cfg.embed_dim)
    loss_config = config.loss_config()
    needs_safe = config.method == "svare" and config.preservation_weight > 0

    def traj_progress(done, total):
        if callback is not None:
            callback({"phase": "trajectories", "done": done, "total": total})

    def sample_trajectories():
        return build_trajectories(pipe, [p.safe for p in pairs], config.trajectory, cache_dir,
                                  traj_progress, traj_cancel)

    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None \
        else contextlib.nullcontext
    with lean.blocks_streamed(model, lean.should_stream_blocks(pipe, config, context)):
        try:   # rank 0 samples and caches; the other ranks then read its cache
            trajs = distributed.main_first(sample_trajectories, context, "trajectories").to(device)
        except SamplingCancelled:
            return TrainResult(adapter=None, history=[], cancelled=True)
        bank = PromptBank(pipe, [p.unsafe for p in pairs] + [p.safe for p in pairs])
        free = 0 if config.erase_free_scales else getattr(pipe, "free_scales", 0)
        targets = prepare_targets(model, bank, trajs, pairs, config, autocast, free_scales=free)
    schedule = trajs.schedule
    holds_null = targets.null_rows is not None      # svare with null_weight > 0
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    skipped_steps, cancelled = 0, False
    split_passes = config.passes == "split" and context is None   # DDP syncs once per backward
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    saved_mode = (model.training, model.gradient_checkpointing)
    start_time = time.perf_counter()
    try:
        model.requires_grad_(False)                 # frozen tensors never collect gradients
        model.gradient_checkpointing = config.gradient_checkpointing
        model.train(config.gradient_checkpointing)  # Infinity checkpoints only in train mode
        trained_model = shared_copy(model) if fsdp else model   # FSDP rewrites what it shards
        weights = TrainableWeights(trained_model, config.train, config.rank, config.lora_targets,
                                   config.lora_scale, generator)
        batches = _batch_indices(len(pairs), config.batch_size, generator)
        with weights.installed():
            parallel = distributed.strategy(trained_model, weights, context, fsdp)
            optimizer = _make_optimizer(parallel.parameters, lr, config)
            scaler = parallel.make_scaler(device, use_scaler)
            for step in range(config.steps):
                if distributed.any_rank(cancel is not None and cancel(), context):
                    cancelled = True                # every rank stops after the same step
                    break
                indices = next(batches)             # the global batch, the same on every rank
                local = distributed.shard(indices, context)
                batch = trajs.batch(local)
                chosen = [pairs[i] for i in local]
                prompts = [p.unsafe for p in chosen] + ([p.safe for p in chosen] if needs_safe else [])
                null = [False] * len(prompts) + [True] * (len(chosen) if holds_null else 0)
                prompts += [p.safe for p in chosen] if holds_null else []
                x = batch["x_wo_prefix"].repeat(len(prompts) // len(chosen), 1, 1)
                n = len(local)

                def objective(logits):
                    unsafe_logits = targets.guide(logits[:n], local, "unsafe")
                    safe_logits = targets.guide(logits[n:2 * n], local, "safe") if needs_safe else None
                    erase_rows = torch.tensor([p.unsafe != p.safe for p in chosen])   # False: keep pairs
                    token_mask = None if targets.token_weights is None else targets.token_weights.expand(n, -1)
                    erase_mask = None if targets.erase_weights is None else targets.erase_weights.expand(n, -1)
                    loss, stats = losses.erasure_objective(
                        config.method, unsafe_logits, safe_logits, batch["teacher_logits"],
                        batch["bit_labels"], loss_config, erase_rows=erase_rows, token_mask=token_mask,
                        erase_token_mask=erase_mask)
                    if holds_null:
                        null_pre = losses.preservation_loss(logits[-n:], targets.null_rows[local], token_mask)
                        loss = loss + config.null_weight * null_pre
                        stats["null_pre"] = float(null_pre.detach())
                        stats["loss"] = float(loss.detach())
                    return loss, stats

                weight = distributed.loss_weight(len(local), len(indices), context)
                condition = bank.condition(prompts, null=null)
                if split_passes:
                    stats = lean.split_backward(parallel, condition, x, schedule, n, autocast,
                                                lambda logits: lean.scaled(objective(logits), scaler, weight))
                else:
                    with autocast():
                        logits = parallel.forward(condition, x, schedule)
                    loss, stats = objective(logits)
                    scaler.scale(loss if weight == 1 else loss * weight).backward()
                scaler.unscale_(optimizer)
                grad_norm = parallel.clip_grad_norm(config.grad_clip or math.inf)
                finite = bool(torch.isfinite(grad_norm))
                if use_scaler:
                    scaler.step(optimizer)          # skips the step itself when grads overflowed
                    scaler.update()
                elif finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                skipped_steps += not finite
                stats = distributed.reduce_stats(stats, len(local), len(indices), context)
                info = {"phase": "train", "step": step + 1, "steps": config.steps, **stats,
                        "lr": lr, "grad_norm": float(grad_norm), "skipped": not finite,
                        "skipped_steps": skipped_steps, "loss_scale": float(scaler.get_scale()),
                        "seconds": time.perf_counter() - start_time}
                history.append(info)
                if callback is not None:
                    callback(info)
            tensors = parallel.export()             # None on ranks > 0
    finally:
        model.train(saved_mode[0])
        model.gradient_checkpointing = saved_mode[1]
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    if not main or not history:     # ranks > 0, or stopped before the first step: nothing to save
        return TrainResult(adapter=None, history=history, cancelled=cancelled)
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:   # e.g. --lr 1e308: the weights overflowed; such an adapter is never handed out
        raise TrainingDiverged(
            f"training diverged: {len(bad)} of {len(tensors)} trained tensors hold inf/NaN after "
            f"{len(history)} steps (lr {lr:g}); nothing was saved. Lower the learning rate "
            "(the default is usually right) or use precision fp32.")

    hyper = {"lr": lr, "batch_size": config.batch_size, "alpha": config.alpha,
             "gamma": config.gamma, "preservation_weight": config.preservation_weight,
             "keep_target": config.keep_target, "targets": config.targets, "null_weight": config.null_weight,
             "erase_target": config.erase_target, "scale_weights": config.scale_weights,
             "erase_free_scales": config.erase_free_scales, "precision": precision, "seed": config.seed, "grad_clip": config.grad_clip,
             "betas": list(config.betas), "weight_decay": config.weight_decay,
             "gradient_checkpointing": config.gradient_checkpointing, "passes": config.passes,
             "stream_blocks": config.stream_blocks,
             "trajectory": asdict(config.trajectory)}
    if context is not None:
        hyper["distributed"] = {"world_size": context.world_size, "strategy": "fsdp" if fsdp else "ddp"}
    metadata = {
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
    return TrainResult(adapter=Adapter(tensors=tensors, metadata=metadata), history=history,
                       cancelled=cancelled)
