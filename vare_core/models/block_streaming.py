"""Low-VRAM sampling: the transformer's blocks wait in CPU memory and visit the GPU one at a time.

    model.enable_block_streaming("cuda")     # blocks pinned on the CPU, the rest on the GPU
    model.forward_scale(...)                 # each block copied in while it runs
    model.disable_block_streaming()

A mixin of models/infinity.Infinity: the forward passes wrap each block in
`self._on_compute_device(block)`, which does nothing unless streaming is on.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class BlockStreaming:
    stream_device: torch.device | None = None      # set by enable_block_streaming

    @torch.no_grad()
    def enable_block_streaming(self, compute_device, storage_device="cpu") -> "BlockStreaming":
        """Keep the blocks (nearly all the weights) on `storage_device` and copy each block to
        `compute_device` only while it runs; everything else (text projections, embeddings,
        head) and every activation and cache live on `compute_device`. On a GPU the stored
        blocks are pinned so the copies are asynchronous. For sampling only: a forward pass with
        gradients enabled raises. Returns self."""
        compute, storage = torch.device(compute_device), torch.device(storage_device)
        pin = compute.type == "cuda" and storage.type == "cpu"
        for name, child in self.named_children():
            child.to(storage if name == "blocks" else compute)
        for tensor in self.parameters(recurse=False):
            tensor.data = tensor.data.to(compute)
        if pin:
            for tensor in list(self.blocks.parameters()) + list(self.blocks.buffers()):
                tensor.data = tensor.data.pin_memory()
        self.stream_device = compute
        return self

    @torch.no_grad()
    def disable_block_streaming(self) -> "BlockStreaming":
        """Move the blocks back onto the compute device (the normal, fastest mode)."""
        if self.stream_device is not None:
            self.blocks.to(self.stream_device)
            self.stream_device = None
        return self

    @contextmanager
    def _on_compute_device(self, module: nn.Module):
        """While inside, the tensors of `module` (a block or part of one) are copies on the
        compute device (streaming mode only). The copies are queued on the current stream
        behind the work already there and freed on exit: the allocator reuses their memory
        for the next block in stream order, so only one block is on the device at a time."""
        if self.stream_device is None:
            yield
            return
        if torch.is_grad_enabled():
            raise RuntimeError("low-VRAM block streaming is for sampling only: run under "
                               "torch.no_grad(), or load the model without low_vram to train it")
        tensors = list(module.parameters()) + list(module.buffers())
        stored = [t.data for t in tensors]
        for tensor in tensors:
            tensor.data = _copy_to_device(tensor.data, self.stream_device)
        try:
            yield
        finally:
            for tensor, data in zip(tensors, stored):
                tensor.data = data


def _copy_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # From pinned memory the copy is asynchronous; the source stays referenced until it is done.
    return tensor.to(device, non_blocking=True)
