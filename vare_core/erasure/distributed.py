"""Erasure training on several processes (torchrun): DDP, or FSDP2 over the trained tensors.

Usage::

    torchrun --nproc_per_node 2 -m vare_core erase --model embedded --concept circle \
        --anchor square --steps 150 --out erase_circle.safetensors
    torchrun --nproc_per_node 8 -m vare_core erase --model infinity_8b ... --fsdp

    # library: the trainer picks up an initialised process group by itself
    context = init_from_env()                  # None when not launched by torchrun
    try:
        result = train_erasure(pipe, pairs, config, fsdp=False)   # result.adapter on rank 0 only
    finally:
        teardown()

Semantics (what makes N processes equal one process with the same global batch):
- Every rank draws the same GLOBAL batch of `batch_size` pair indices from the same seeded
  generator; rank r trains on its contiguous slice (`shard`). The loss of a slice is a mean over
  its pairs, and DDP/FSDP average gradients over ranks, so the local loss is scaled by
  n_local * world / n_global (`loss_weight`, exactly 1 for equal slices): the update then equals
  the single-process update of the whole batch. Logged stats are averaged the same way.
- Trajectories: rank 0 samples and caches them, the others then read that cache (`main_first`;
  with a cache rank 0 could not write, or on another node's disk, they sample the same ones).
- Cancel: any rank's cancel() stops every rank after the same step (`any_rank`); the callback
  runs on rank 0 only; only rank 0 gets the adapter (and the CLI writes it there).
- Device: cuda:LOCAL_RANK with NCCL when CUDA is there, else the CPU with gloo.

Strategies (forward(cond, x, schedule) -> logits, parameters, make_scaler, clip_grad_norm, export):
- `LocalTraining`: one process, the model as is.
- `DataParallel`: torch DDP around a small module whose parameters are exactly the trained tensors
  (the frozen model is held outside its module tree, so DDP neither broadcasts nor watches it).
- `FullyShardedTraining`: FSDP2 `fully_shard` of every block's trained layers (cross-attention,
  FFN, self-attention) and of the model, with every frozen tensor ignored. The trained tensors,
  their gradients and the AdamW state are sharded across ranks (the part that outgrows one card:
  full ca_ffn training of the 8B model holds ~5.7 B fp32 tensors, x4 with gradients and AdamW);
  the frozen weights stay whole on every rank. FSDP rewrites the modules it shards, so it works
  on a structural copy of the model (trainable.shared_copy) and the pipeline's model is untouched.
  Peaks: the fp32 masters are made whole on each rank before sharding (then freed), and rank 0
  gathers them whole again to export the adapter.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from .trainable import TrainableWeights
from ..generation.sampler import SamplingCancelled

# Rank 0 samples every trajectory while the others wait: allow long waits.
TIMEOUT = timedelta(hours=2)


class DistributedError(RuntimeError):
    """Another rank failed; this rank stops too (the failing rank printed the cause)."""


class DistContext:
    """This process's place in the group: rank, world size, and its device."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, device={self.device})"


# ----------------------------------------------------------------------------- set-up

def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={value!r} is not an integer") from None


def rank_device(requested: str | None = None) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available (and not refused with 'cpu'), else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested is not None and requested != "cpu" and requested != "cuda":
        raise ValueError(f"--device {requested}: under torchrun every process uses cuda:LOCAL_RANK; "
                         "leave --device out (or give cuda, or cpu for gloo on the CPU)")
    if requested == "cpu" or not torch.cuda.is_available():
        if requested == "cuda":
            raise ValueError("--device cuda: CUDA is not available; leave --device out to train on the CPU")
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: "
                         "start at most that many processes per node")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_from_env(requested_device: str | None = None) -> DistContext | None:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); None when WORLD_SIZE <= 1 (one process: nothing to join)."""
    if env_world_size() <= 1:
        return None
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run a single process")
    device = rank_device(requested_device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group_from_env(requested_device: str | None = None):
    """`with process_group_from_env(args.device) as context:` init_from_env, and teardown on
    exit when this call created the group."""
    created = env_world_size() > 1 and not (dist.is_available() and dist.is_initialized())
    context = init_from_env(requested_device)
    try:
        yield context
    finally:
        if created:
            teardown()


def current(device) -> DistContext | None:
    """The initialised process group (None for none, or a group of one) with this rank's device."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    device = torch.device(device)
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group uses NCCL but the model is on {device}; "
                         "load the pipeline on cuda:LOCAL_RANK")
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


# ----------------------------------------------------------------------------- batch and agreement

def shard(indices: list, context: DistContext | None) -> list:
    """This rank's contiguous slice of the global batch (the first len % world ranks get one more)."""
    if context is None:
        return list(indices)
    n, world = len(indices), context.world_size
    if n < world:
        raise ValueError(f"batch_size {n} is smaller than the number of processes ({world}); "
                         f"use --batch-size {world} or more, or fewer processes")
    base, extra = divmod(n, world)
    start = context.rank * base + min(context.rank, extra)
    return list(indices[start:start + base + (context.rank < extra)])


def loss_weight(n_local: int, n_global: int, context: DistContext | None) -> float:
    """Factor on a slice's mean loss so that averaging gradients over ranks gives the gradient
    of the global batch mean: n_local * world / n_global."""
    return 1.0 if context is None else n_local * context.world_size / n_global


def any_rank(flag: bool, context: DistContext | None) -> bool:
    """True on every rank when it is True on any rank (stop together)."""
    if context is None:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def reduce_stats(stats: dict, n_local: int, n_global: int, context: DistContext | None) -> dict:
    """Per-step stats of the global batch: means weighted by slice size, counts summed."""
    if context is None:
        return stats
    names = sorted(stats)
    weights = [1.0 if name == "selected_tokens" else n_local / n_global for name in names]
    values = torch.tensor([float(stats[n]) * w for n, w in zip(names, weights)],
                          dtype=torch.float64, device=context.device)
    dist.all_reduce(values)
    out = dict(zip(names, values.tolist()))
    if "selected_tokens" in out:
        out["selected_tokens"] = int(round(out["selected_tokens"]))
    return out


def main_first(fn, context: DistContext | None, what: str):
    """fn() on rank 0, then on the others (which then find rank 0's cached result on disk).
    When rank 0 is cancelled or fails, the others stop too instead of waiting forever."""
    if context is None:
        return fn()
    status = torch.tensor([0], device=context.device)   # 0 done, 1 cancelled, 2 failed
    result = None
    if context.is_main:
        try:
            result = fn()
        except SamplingCancelled:
            status.fill_(1)
        except BaseException:
            status.fill_(2)
            dist.broadcast(status, src=0)
            raise
    dist.broadcast(status, src=0)
    code = int(status.item())
    if code == 1:
        raise SamplingCancelled(f"{what} cancelled")
    if code == 2:
        raise DistributedError(f"rank 0 failed while building {what}; see its error above")
    return result if context.is_main else fn()


# ----------------------------------------------------------------------------- strategies

class LocalTraining:
    """One process: the model as it is, the trained tensors as they are."""

    def __init__(self, model: nn.Module, weights: TrainableWeights):
        self.model, self.weights = model, weights
        self.parameters = [p for _, p in weights.named_parameters()]

    def forward(self, cond, x_wo_prefix, schedule) -> torch.Tensor:
        return self.model(cond, x_wo_prefix, schedule)

    def make_scaler(self, device: torch.device, enabled: bool):
        return torch.amp.GradScaler(device.type, enabled=enabled)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)

    def export(self) -> dict | None:
        return self.weights.export()


class _TrainedTensors(nn.Module):
    """A module whose parameters are exactly the trained tensors; its forward runs the model
    (which already uses them: TrainableWeights.installed) and returns the logits."""

    def __init__(self, model: nn.Module, weights: TrainableWeights):
        super().__init__()
        self.trained = nn.ParameterList([p for _, p in weights.named_parameters()])
        self._model = [model]        # in a list: not a submodule, so DDP leaves it alone

    def forward(self, cond, x_wo_prefix, schedule):
        return self._model[0](cond, x_wo_prefix, schedule)


class DataParallel(LocalTraining):
    """DDP: every rank holds the whole model; gradients of the trained tensors are averaged."""

    def __init__(self, model: nn.Module, weights: TrainableWeights, context: DistContext):
        super().__init__(model, weights)
        self.context = context
        # device_ids=None: the inputs are already on this rank's device (CPU or cuda:LOCAL_RANK).
        self.ddp = nn.parallel.DistributedDataParallel(_TrainedTensors(model, weights),
                                                       device_ids=None)

    def forward(self, cond, x_wo_prefix, schedule) -> torch.Tensor:
        return self.ddp(cond, x_wo_prefix, schedule)

    def export(self) -> dict | None:
        return self.weights.export() if self.context.is_main else None


def _shardable_layers(model: nn.Module, trained: set) -> list[nn.Module]:
    """Each block's direct children that hold trained tensors (ca, ffn, sa)."""
    return [child for block in model.blocks for child in block.children()
            if any(id(p) in trained for p in child.parameters())]


class FullyShardedTraining(LocalTraining):
    """FSDP2: trained tensors, gradients and AdamW state sharded over the ranks; each trained
    layer is gathered only while it runs. `model` must be a structural copy (shared_copy) with
    `weights` installed into it: fully_shard rewrites its modules."""

    def __init__(self, model: nn.Module, weights: TrainableWeights, context: DistContext):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        super().__init__(model, weights)
        self.context = context
        adapter_names = {id(p): name for name, p in weights.named_parameters()}
        # model parameter name -> adapter tensor name (LoRA factors: the layers' update modules)
        self.names = {name: adapter_names[id(p)] for name, p in model.named_parameters()
                      if id(p) in adapter_names}
        frozen = {p for p in model.parameters() if id(p) not in adapter_names}
        mesh = init_device_mesh(context.device.type, (context.world_size,))
        for layer in _shardable_layers(model, set(adapter_names)):
            fully_shard(layer, mesh=mesh, ignored_params=frozen)
            if hasattr(layer, "project_kv"):   # Infinity projects text K/V before the block runs
                register_fsdp_forward_method(layer, "project_kv")
        fully_shard(model, mesh=mesh, ignored_params=frozen)
        # The shards are copies: free the whole-tensor masters until export fills them again.
        for p in weights.params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.parameters = [p for name, p in model.named_parameters() if name in self.names]

    def forward(self, cond, x_wo_prefix, schedule) -> torch.Tensor:
        # FSDP warns that its layers return views (in-place ops on them would skip its hooks);
        # Infinity only ever adds out of place, so the warning is noise here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
            return self.model(cond, x_wo_prefix, schedule)

    def make_scaler(self, device: torch.device, enabled: bool):
        # Each rank sees only its shard of the gradients: overflow must be agreed on by all.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device.type, enabled=enabled)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # global norm

    def export(self) -> dict | None:
        """Gather every trained tensor whole (a collective: all ranks); rank 0 exports them."""
        for name, param in self.model.named_parameters():
            if name in self.names:
                whole = param.detach().full_tensor()
                if self.context.is_main:
                    self.weights.params[self.names[name]].data = whole
        return self.weights.export() if self.context.is_main else None


def strategy(model: nn.Module, weights: TrainableWeights, context: DistContext | None,
             fsdp: bool = False) -> LocalTraining:
    """The training strategy for this process: local, DDP, or FSDP (with `fsdp`)."""
    if context is None:
        if fsdp:
            raise ValueError("fsdp shards the training state across processes: launch with "
                             "torchrun --nproc_per_node N (N >= 2)")
        return LocalTraining(model, weights)
    if fsdp:
        return FullyShardedTraining(model, weights, context)
    return DataParallel(model, weights, context)
