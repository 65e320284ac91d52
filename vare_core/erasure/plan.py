"""Memory plan: what sampling and erasure training hold on their device, per phase, from the
model's sizes alone (no weight files).

    plan = plan_memory(preset_config("infinity_2b"), scale_schedule(1.0, "1M"), erase=EraseConfig(...))
    print(plan.table())                                   # one row per phase, then `peak: X.X GiB`

The model is built on the `meta` device (shapes, no memory) and each phase is RUN there: the
sampler scale by scale with its KV caches, the trajectory sampler, a teacher-forced training
step forward and backward with the adapter installed, while `LiveBytes` counts every live
tensor (a storage is freed when the last tensor on it dies). The plan follows the code, not a
formula that drifts from it. What meta cannot run is added by rule:
- attention: SDPA runs a fused kernel (memory-efficient on a GPU, flash on CPU: no L x L
  scores); `efficient_attention()` stands in for it, holding what it holds (output + log-sum-exp);
- workspaces: a convolution holds a second output-sized buffer while it runs;
- the optimiser: trained weights as fp32 masters, their fp32 gradients and AdamW's two fp32
  moments (16 bytes per trained weight), and the loss maths on the logits (a few fp32 copies);
- the runtime: CUDA's context and caching slack on a GPU, the autograd engine's and oneDNN's
  own buffers on a CPU: a fixed reserve each.
bench/memory_check.py compares the plan with real runs on CPU.
"""
from __future__ import annotations

import contextlib
import gc
import math
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..generation.pipeline import DTYPES
from .choices import FILTERED_CE_METHODS

GiB = 2**30
CUDA_RESERVE = int(0.75 * GiB)      # context + allocator slack; measured on recent drivers: 0.5-1 GiB
# CPU: memory the runtime holds beside the tensors (autograd engine, oneDNN/GEMM packing
# buffers, thread-local scratch): tens of MiB in bench/memory_check.py's runs, above the
# tensors that LiveBytes counts exactly (checked against real CPU tensors there).
CPU_RESERVE = 64 * 2**20
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live meta-tensor storages (the planned device) and their peak."""

    def __init__(self):
        super().__init__()
        gc.collect()         # tensors of earlier work in reference cycles must not die inside
        self.storages: dict[int, list] = {}
        self.now = self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.now

    def _drop(self, key, ref):
        entry = self.storages.get(key)
        if entry is not None:
            entry[1].pop(id(ref), None)
            if not entry[1]:
                self.now -= entry[0]
                del self.storages[key]

    def track(self, tensor: torch.Tensor) -> None:
        if tensor.device.type != "meta":   # host-side helpers (e.g. the RoPE table cache)
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self.storages.get(key)
        if entry is None:
            entry = self.storages[key] = [storage.nbytes(), {}]
            self.now += entry[0]
            self.peak = max(self.peak, self.now)
        ref = weakref.ref(tensor, lambda ref, key=key: self._drop(key, ref))
        entry[1][id(ref)] = ref          # by id: weakrefs to tensors cannot be compared

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        if func in _WORKSPACE_OPS and isinstance(out, torch.Tensor):
            # a convolution holds a second output-sized buffer while it runs (oneDNN's reorder
            # on CPU, cuDNN's workspace on a GPU): measured 2.0x the output on CPU
            self.peak = max(self.peak, self.now + out.untyped_storage().nbytes())
        return out


_WORKSPACE_OPS = {torch.ops.aten.convolution.default}


class _EfficientAttention(torch.autograd.Function):
    """What CUDA's memory-efficient SDPA holds: the output, and for backward q, k, v, the
    output and a (B, H, L) fp32 log-sum-exp (never the L x L scores)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _efficient_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _EfficientAttention.apply(q, k, v, attn_mask)


@contextlib.contextmanager
def efficient_attention(enabled: bool = True):
    """Within: F.scaled_dot_product_attention holds what the GPU kernel holds (see above)."""
    if not enabled:
        yield
        return
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@contextlib.contextmanager
def autocast_linear(dtype):
    """Within: F.linear casts its weight and bias to the input's dtype, as CUDA autocast does
    for the trainer's half-precision steps (meta has no autocast; the LoRA factors are fp32)."""
    real = F.linear

    def linear(x, weight, bias=None):
        if x.dtype == dtype and weight.dtype != dtype:
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return real(x, weight, bias)
    F.linear = linear
    try:
        yield
    finally:
        F.linear = real


@dataclass
class MemoryPlan:
    """Bytes on the device per phase: what stays resident plus the phase's own peak."""
    device: str
    resident: dict[str, int]                       # weights that stay loaded
    phases: dict[str, dict[str, int]] = field(default_factory=dict)

    def phase_total(self, name: str) -> int:
        return sum(self.resident.values()) + sum(self.phases[name].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> int:
        return self.phase_total(self.peak_phase)

    def table(self) -> str:
        lines = [f"memory plan on {self.device} (GiB)", "", "| phase | item | GiB |", "|---|---|---|"]
        for name, value in self.resident.items():
            lines.append(f"| weights | {name} | {value / GiB:.2f} |")
        for phase, items in self.phases.items():
            for name, value in items.items():
                lines.append(f"| {phase} | {name} | {value / GiB:.2f} |")
            lines.append(f"| {phase} | **total with weights** | **{self.phase_total(phase) / GiB:.2f}** |")
        lines += ["", f"peak: {self.peak / GiB:.1f} GiB ({self.peak_phase})"]
        return "\n".join(lines)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + \
        sum(b.numel() * b.element_size() for b in module.buffers())


def _meta(builder):
    with torch.inference_mode(False), torch.device("meta"):   # trainable in the training phase
        return builder()


def meta_guard(model, guard, text_tokens: int, dtype):
    """A ConceptGuard of `guard` (GuardSettings) on meta: its rows and keys have their sizes."""
    from ..generation.guard import ConceptGuard
    n, heads, head_dim = len(guard.concepts), model.cfg.num_heads, model.cfg.head_dim
    return ConceptGuard(settings=guard,
                        states=torch.empty(2 * n, text_tokens, model.cfg.text_channels, device="meta", dtype=dtype),
                        lens=torch.full((2 * n,), text_tokens, dtype=torch.long),
                        keys={b: torch.empty(n, 3, heads, head_dim, device="meta") for b in guard.blocks})


def sampling_peak(model, vae, schedule, batch: int, text_tokens: int, dtype, cfg: float = 4.0,
                  decode: bool = True, record: bool = False, patchify: bool = False, guard=None) -> int:
    """Peak live bytes (beyond the weights) of sampling `batch` images on meta; guard: the
    GuardSettings of a Concept Guard whose rows join the batch on its scales."""
    from ..generation.sampler import SamplingSettings, sample
    meter = LiveBytes()
    kept = []
    guard = meta_guard(model, guard, text_tokens, dtype) if guard is not None else None

    def keep(step):      # the trajectory sampler keeps every scale's bits and logits
        kept.append((step.bits, step.logits, step.summed_codes.clone()))
    with meter, efficient_attention(), torch.no_grad():
        states = torch.empty(batch, text_tokens, model.cfg.text_channels, device="meta", dtype=dtype)
        lens = torch.full((batch,), text_tokens, dtype=torch.long)
        sample(model, vae, states, lens, schedule, SamplingSettings(cfg=cfg, tau=1.0, top_p=0.97),
               callback=keep if record else None, decode=decode, spatial_patchify=patchify, guard=guard)
    return meter.peak


def training_peak(model, schedule, sequences: int, text_tokens: int, dtype, train: str, rank: int,
                  lora_targets, checkpointing: bool) -> int:
    """Peak live bytes of one teacher-forced forward + backward of `sequences` sequences with the
    adapter installed (its fp32 masters/factors excluded: counted by trained_state_bytes)."""
    from ..models.infinity import Condition
    from .trainable import TrainableWeights
    bits = model.cfg.bits
    total = sum(h * w for h, w in schedule)
    weights = TrainableWeights(model, train, rank, lora_targets)
    for name, param in weights.params.items():   # on meta without autocast: the compute dtype
        weights.params[name] = torch.nn.Parameter(param.detach().to(dtype))
    meter = LiveBytes()
    model.gradient_checkpointing = checkpointing
    model.train(checkpointing)
    try:
        # a graph is needed whatever the caller's mode (ComfyUI runs nodes in inference mode)
        with torch.inference_mode(False), torch.enable_grad(), weights.installed(), \
                efficient_attention(), autocast_linear(dtype):
            with meter:
                text = torch.empty(sequences, text_tokens, model.cfg.text_channels, device="meta", dtype=dtype)
                lens = torch.full((sequences,), text_tokens, dtype=torch.long)
                x = torch.empty(sequences, total - schedule[0][0] * schedule[0][1], bits, device="meta")
                pairs = max(1, sequences // 3)       # the step's batch from the trajectory set
                _batch = [torch.empty(pairs, total, 2 * bits, device="meta"),
                          torch.empty(pairs, total, bits, device="meta", dtype=torch.uint8)] * 2
                cond: Condition = model.encode_condition(text, lens)
                logits = model(cond, x, schedule)
                # the loss maths: a few fp32 tensors the size of the logits (softmax, targets, masks)
                loss = sum((logits * torch.empty_like(logits)).sum() for _ in range(LOSS_COPIES))
                loss.backward()
    finally:
        model.gradient_checkpointing = False
        model.train(False)
    # the gradients are counted (in fp32) by trained_state_bytes
    grads = sum(p.grad.numel() * p.grad.element_size() for p in weights.params.values() if p.grad is not None)
    return meter.peak - grads


LOSS_COPIES = 3


def targets_peak(model, schedule, sequences: int, text_tokens: int, dtype) -> int:
    """Peak live bytes of the frozen model's no-grad teacher-forced pass that makes the targets
    (trajectories.frozen_conditional_logits: `sequences` at a time)."""
    from ..models.infinity import Condition
    total = sum(h * w for h, w in schedule)
    meter = LiveBytes()
    with meter, efficient_attention(), torch.no_grad():
        text = torch.empty(sequences, text_tokens, model.cfg.text_channels, device="meta", dtype=dtype)
        lens = torch.full((sequences,), text_tokens, dtype=torch.long)
        x = torch.empty(sequences, total - schedule[0][0] * schedule[0][1], model.cfg.bits, device="meta")
        cond: Condition = model.encode_condition(text, lens)
        logits = model(cond, x, schedule).float()
        del logits
    return meter.peak


def trained_state_bytes(model, train: str, rank: int, lora_targets) -> int:
    """fp32 master (or LoRA factor) + fp32 gradient + AdamW's two fp32 moments per trained weight."""
    from .memory import OPTIMIZER_BYTES_PER_WEIGHT, trainable_count
    config = type("C", (), {"train": train, "rank": rank, "lora_targets": tuple(lora_targets)})
    return trainable_count(model, config) * OPTIMIZER_BYTES_PER_WEIGHT


def plan_memory(model_cfg, schedule, *, dtype: str = "bf16", device: str = "cuda", erase=None,
                sample_batch: int = 1, t5_config=None, offload_text_encoder: bool = False,
                vae_config=None, text_tokens: int = 64, n_pairs: int = 50,
                low_vram: bool = False, guard=None) -> MemoryPlan:
    """The plan of sampling `sample_batch` images (erase=None; guard: with a Concept Guard's
    GuardSettings) or of an erasure run with `erase` (an EraseConfig; n_pairs pairs) on
    `device` ('cuda' or 'cpu')."""
    from ..models.bsq_vae import BSQVAE, VAEConfig
    from ..models.infinity import Infinity
    from ..models.t5 import T5Config, T5Encoder
    if low_vram and erase is not None:
        raise ValueError("low_vram streams the blocks for sampling only; training needs them on the device")
    torch_dtype = DTYPES[dtype]
    gpu = device != "cpu"
    text_tokens = min(text_tokens, model_cfg.text_maxlen)     # prompts are cut to the model's text length
    schedule = [tuple(s) for s in schedule]
    model_cfg = replace(model_cfg, num_levels=max(model_cfg.num_levels, len(schedule)), cond_drop_rate=0.0)
    model = _meta(lambda: Infinity(model_cfg)).cast(torch_dtype).eval().requires_grad_(False)
    patchify = (vae_config.bits if vae_config else model_cfg.bits) * 4 == model_cfg.bits
    vae = _meta(lambda: BSQVAE(vae_config or VAEConfig(bits=model_cfg.bits))).to(torch_dtype).eval()
    t5 = _meta(lambda: T5Encoder(t5_config or T5Config.flan_t5_xl()))
    t5_bytes = sum(p.numel() for p in t5.parameters()) * BYTES[dtype]
    if erase is not None and erase.train == "lora":   # erase refuses it before sampling: so does the plan
        from .trainable import check_lora_rank
        check_lora_rank(model, erase.rank, erase.lora_targets)
    if low_vram:   # one block on the device at a time (infinity.enable_block_streaming)
        blocks = [param_bytes(block) for block in model.blocks]
        resident = {"transformer (blocks streamed: one at a time)": param_bytes(model) - sum(blocks) + max(blocks)}
    else:
        resident = {"transformer": param_bytes(model)}
    resident["VAE"] = param_bytes(vae)
    if not offload_text_encoder:
        resident["text encoder"] = t5_bytes
    resident["CUDA context + allocator slack" if gpu else "CPU runtime buffers"] = CUDA_RESERVE if gpu else CPU_RESERVE
    plan = MemoryPlan(device=device, resident=resident)
    if offload_text_encoder:        # on the device only while prompts are encoded
        plan.phases["text encoding"] = {"text encoder (offloaded between uses)": t5_bytes}
    if erase is None:
        with_guard = "" if guard is None else (f", Concept Guard: {2 * len(guard.concepts)} extra rows per image on "
                                               f"{min(guard.scales, len(schedule))} of {len(schedule)} scales")
        plan.phases["sampling"] = {f"sampling {sample_batch} image(s) (KV cache, activations, VAE decode{with_guard})":
                                   sampling_peak(model, vae, schedule, sample_batch, text_tokens, torch_dtype,
                                                 patchify=patchify, guard=guard)}
        return plan
    traj_batch = erase.trajectory.batch_size
    total = sum(h * w for h, w in schedule)
    logit_bytes = 4 if dtype == "fp32" else 2     # trajectories: fp16 teacher logits for half models
    # bit labels (uint8) + next-scale inputs (fp32) + teacher logits, per pair
    per_pair = total * model_cfg.bits + (total - 1) * model_cfg.bits * 4 + total * 2 * model_cfg.bits * logit_bytes
    host = {"trajectory set": n_pairs * per_pair}      # trainer: trajs.to(device)
    plan.phases["trajectories"] = {
        f"sampling {traj_batch} trajectories at a time (KV cache, activations, kept logits)":
            sampling_peak(model, vae, schedule, min(traj_batch, n_pairs), text_tokens, torch_dtype,
                          cfg=erase.trajectory.cfg, decode=False, record=True, patchify=patchify), **host}
    targets_chunk = erase.trajectory.batch_size      # targets.prepare_targets
    holds_null_rows = erase.method in FILTERED_CE_METHODS and erase.null_weight > 0
    targets = n_pairs * total * 2 * model_cfg.bits * logit_bytes * holds_null_rows
    host["frozen-model targets"] = targets
    plan.phases["targets"] = {f"frozen forward of {min(targets_chunk, n_pairs)} pairs at a time":
                              targets_peak(model, schedule, min(targets_chunk, n_pairs), text_tokens, torch_dtype),
                              **host}
    needs_safe = erase.method in (*FILTERED_CE_METHODS, "vare")
    holds_null = erase.method in FILTERED_CE_METHODS and erase.null_weight > 0
    sequences = erase.batch_size * (1 + needs_safe + holds_null)
    # split passes: one row group's graph at a time (and every row's logits without one)
    graph = erase.batch_size if erase.passes == "split" else sequences
    plan.phases["training step"] = {
        f"activations of {graph} of {sequences} sequences ({erase.batch_size} pairs), forward + backward":
            training_peak(model, schedule, graph, text_tokens, torch_dtype, erase.train, erase.rank,
                          erase.lora_targets, erase.gradient_checkpointing)
            + (sequences * total * 2 * model_cfg.bits * 4 * 2 if graph < sequences else 0),
        f"trained weights ({erase.train}): fp32 master + gradient + AdamW moments":
            trained_state_bytes(model, erase.train, erase.rank, erase.lora_targets),
        **host,
    }
    _plan_streaming(plan, model, erase, gpu, low_vram)
    return plan


def _plan_streaming(plan: MemoryPlan, model, erase, gpu: bool, low_vram: bool) -> None:
    """stream_blocks: the no-grad phases hold one block instead of all (lean.blocks_streamed).
    'auto' streams when a GPU could not hold those phases where it holds the training step."""
    if erase.stream_blocks == "off" or low_vram:
        return
    blocks = [param_bytes(block) for block in model.blocks]
    saved = sum(blocks) - max(blocks)
    streamed_phases = ("trajectories", "targets")
    if erase.stream_blocks == "auto":
        step = plan.phase_total("training step")
        if not gpu or all(plan.phase_total(name) <= step for name in streamed_phases):
            return
    for name in streamed_phases:
        plan.phases[name]["blocks waiting in CPU memory (stream_blocks)"] = -saved


def gib(value: int) -> str:
    return f"{value / GiB:.1f} GiB" if math.isfinite(value) else "?"


def plan_for_pipeline(pipe, erase, n_pairs: int, offload_text_encoder: bool = False) -> MemoryPlan:
    """The plan of training `erase` on a loaded pipeline (its own sizes, dtype and device)."""
    model = pipe.model
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[model.word_embed.weight.dtype]
    return plan_memory(model.cfg, pipe.default_schedule, dtype=dtype,
                       device="cuda" if pipe.device.type == "cuda" else "cpu", erase=erase,
                       t5_config=pipe.text_encoder.model.config, vae_config=pipe.vae.config,
                       n_pairs=n_pairs, offload_text_encoder=offload_text_encoder or pipe.offload_text_encoder)


# Changes that lower the peak, cheapest first (what the refusal names when a run does not fit).
FIT_STEPS = (("passes", "split"), ("gradient_checkpointing", True), ("stream_blocks", "on"),
             ("batch_size", 1), ("train", "lora"), ("rank", 4))


def check_fits(pipe, erase, n_pairs: int, budget: int, offload_text_encoder: bool = False) -> MemoryPlan:
    """The plan, or ValueError when its peak exceeds `budget` bytes: the message names the
    settings (applied in order, cheapest first) whose plan fits, or says that none does."""
    plan = plan_for_pipeline(pipe, erase, n_pairs, offload_text_encoder)
    if plan.peak <= budget:
        return plan
    changed, trial = [], erase
    for name, value in FIT_STEPS:
        if getattr(trial, name) == value or (name == "rank" and trial.train != "lora"):
            continue
        trial = replace(trial, **{name: value})
        changed.append(f"{name} {value}")
        fitted = plan_for_pipeline(pipe, trial, n_pairs, offload_text_encoder)
        if fitted.peak <= budget:
            raise ValueError(f"this erasure needs about {gib(plan.peak)} at its peak ({plan.peak_phase}) "
                             f"and {gib(budget)} is free: set {', '.join(changed)} (plan: {gib(fitted.peak)})")
    raise ValueError(f"this erasure needs about {gib(plan.peak)} at its peak ({plan.peak_phase}) and "
                     f"{gib(budget)} is free; even with {', '.join(changed) or 'the leanest settings'} it needs "
                     f"{gib(fitted.peak if changed else plan.peak)}: free memory (other models), or use a larger GPU")
