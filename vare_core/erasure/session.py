"""One erasure training run as every entry point starts it (the Train Erasure node, `erase`): the
model's profile, a memory check before any work, progress as typed events, and an out-of-memory
error turned into advice after the failed run's memory is released.

    session = TrainingSession(pipe, pairs)              # config: the model's profile's
    session = TrainingSession(pipe, pairs, erasure_profile(pipe).config(steps=300))
    plan = session.check_memory()        # on a GPU: ValueError naming the settings that fit
    result = session.train(progress=show, cancel=stop)  # trainer.TrainResult

    def show(event):
        if isinstance(event, TrainStepProgress):
            print(event.step, event.steps, event.loss, event.terms)

What it adds to trainer.train_erasure: training works inside torch.inference_mode (ComfyUI runs
nodes in it) and after sampling there (the RoPE tables are rebuilt); a model whose profile says
so keeps its text encoder in CPU memory while it trains (Infinity); out of memory, the run's
tensors are freed first (`release_memory`, default: collect and empty the CUDA cache), then a
MemoryError says where it happened, what the device has free and which settings to change
(memory.memory_advice).
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..devices import is_out_of_memory, memory_summary
from ..models import rope
from . import distributed
from .memory import memory_advice
from .plan import MemoryPlan, check_fits
from .profile import erasure_profile
from .trainer import EraseConfig, TrainResult, train_erasure

LOSS_TERMS = ("fce", "entropy", "pre", "vare", "naive_ce")   # the methods' loss terms (losses.py, early.py)


@dataclass(frozen=True)
class TrajectoriesProgress:
    """The frozen model sampled `done` of the `total` safe prompts' trajectories."""
    done: int
    total: int


@dataclass(frozen=True)
class TrainStepProgress:
    """One training step done: `step` of `steps` (1-based)."""
    step: int
    steps: int
    loss: float                          # NaN on a skipped step
    seconds: float                       # since training began
    skipped_steps: int                   # so far (non-finite gradients, fp16 overflow)
    terms: dict[str, float]              # the method's loss terms: fce and pre (early: + entropy),
                                         # vare, or naive_ce
    selected_fraction: float | None      # tokens L_FCE trained (None: the method selects none)
    record: dict = field(repr=False)     # the trainer's whole record of the step (the loss history's)

    @property
    def eta(self) -> float:
        """Seconds left at this step's pace."""
        return self.seconds / self.step * (self.steps - self.step)


Progress = TrajectoriesProgress | TrainStepProgress


def progress_event(info: dict) -> Progress:
    """The trainer's callback dict as a typed event."""
    if info["phase"] == "trajectories":
        return TrajectoriesProgress(done=info["done"], total=info["total"])
    return TrainStepProgress(step=info["step"], steps=info["steps"], loss=info["loss"], seconds=info["seconds"],
                             skipped_steps=info["skipped_steps"],
                             terms={k: info[k] for k in LOSS_TERMS if k in info},
                             selected_fraction=info.get("selected_fraction"), record=info)


def release_device_memory() -> None:
    """Free what a failed run left: its tensors (they may sit in reference cycles), then the
    CUDA allocator's cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrainingSession:
    def __init__(self, pipe, pairs, config: EraseConfig | None = None, *, cache_dir=None, fsdp: bool = False):
        self.pipe, self.pairs = pipe, list(pairs)
        self.profile = erasure_profile(pipe)
        self.config = config if config is not None else self.profile.config()
        self.cache_dir, self.fsdp = cache_dir, fsdp
        self.last_step = 0                  # the last training step finished (0: none yet)

    def check_memory(self, free_bytes: int | None = None) -> MemoryPlan | None:
        """On a GPU, in one process: the memory plan of this run (erasure/plan.py), or a
        ValueError naming the settings, cheapest first, whose plan fits (or saying none does).
        free_bytes: what the run may take (default: the device's free memory plus what this
        process already holds there, the model among it). None on other devices and under
        torchrun (each process holds a share of the batch the plan does not model)."""
        pipe = self.pipe
        if pipe.device.type != "cuda" or distributed.env_world_size() > 1:
            return None
        if free_bytes is None:
            free, _ = torch.cuda.mem_get_info(pipe.device)
            free_bytes = free + torch.cuda.memory_allocated(pipe.device)
        rope.clear_cache()
        with torch.inference_mode(False):
            return check_fits(pipe, self.config, len(self.pairs), free_bytes, self.profile.offload_text_encoder)

    def train(self, progress: Callable[[Progress], None] | None = None, cancel: Callable[[], bool] | None = None,
              release_memory: Callable[[], None] = release_device_memory) -> TrainResult:
        """train_erasure with progress as events; MemoryError with advice when memory runs out."""
        def callback(info):
            event = progress_event(info)
            if isinstance(event, TrainStepProgress):
                self.last_step = event.step
            if progress is not None:
                progress(event)

        pipe = self.pipe
        rope.clear_cache()        # tables cached under inference mode cannot enter autograd
        parked = pipe.text_encoder_offloaded() if self.profile.offload_text_encoder else contextlib.nullcontext()
        out_of_memory = False
        try:
            with torch.inference_mode(False), torch.enable_grad(), parked:
                return train_erasure(pipe, self.pairs, self.config, callback=callback, cancel=cancel,
                                     cache_dir=self.cache_dir, fsdp=self.fsdp)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            out_of_memory = True  # released below: inside `except` the traceback keeps the run's tensors
        if out_of_memory:
            release_memory()
            raise MemoryError(self.out_of_memory_message())

    def out_of_memory_message(self) -> str:
        device = self.pipe.device
        where = "while sampling the trajectories" if self.last_step == 0 else f"at step {self.last_step}"
        kind = "GPU" if device.type == "cuda" else str(device.type).upper()
        return (f"out of {kind} memory {where} ({memory_summary(device)}); "
                + memory_advice(self.pipe.model, self.config, on_cuda=device.type == "cuda"))
