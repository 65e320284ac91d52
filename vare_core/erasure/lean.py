"""Memory-lean parts of the erasure step (trainer.py calls them; docs/memory.md).

    stats = split_backward(parallel, condition, x, schedule, n, autocast, scaled_objective)
    with blocks_streamed(model, should_stream_blocks(pipe, config, context)): ...

- split passes (EraseConfig.passes="split"): the joint gradients with one row group's
  activations at a time;
- streamed blocks (EraseConfig.stream_blocks): trajectories and targets with the transformer
  blocks in CPU memory, one on the GPU at a time, when their KV cache would not fit.
"""
from __future__ import annotations

import contextlib

import torch

from ..models.infinity import Condition


def should_stream_blocks(pipe, config, context) -> bool:
    """Whether the no-grad phases (trajectories, targets) stream the blocks from CPU memory."""
    if config.stream_blocks == "off" or context is not None or pipe.model.stream_device is not None:
        return False
    if config.stream_blocks == "on":
        return True
    if pipe.device.type != "cuda":
        return False
    cfg, tokens = pipe.model.cfg, sum(h * w for h, w in pipe.default_schedule)
    element = pipe.model.word_embed.weight.element_size()
    kv_cache = 2 * cfg.depth * 2 * config.trajectory.batch_size * tokens * cfg.embed_dim * element
    free, _ = torch.cuda.mem_get_info(pipe.device)
    return free < 1.25 * kv_cache      # the caches plus a scale's activations would not fit


@contextlib.contextmanager
def blocks_streamed(model, enabled: bool):
    """Within: the transformer blocks wait in CPU memory and visit the device one at a time
    (Infinity.enable_block_streaming), so the KV caches of the trajectories fit beside the rest;
    afterwards they are back on the device for training."""
    if not enabled:
        yield
        return
    device = model.word_embed.weight.device
    model.enable_block_streaming(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        model.disable_block_streaming()


def scaled(loss_and_stats, scaler, weight):
    """(loss scaled for the GradScaler and the process's share of the batch, stats)."""
    loss, stats = loss_and_stats
    return scaler.scale(loss if weight == 1 else loss * weight), stats


def split_backward(parallel, condition, x, schedule, n: int, autocast, scaled_objective) -> dict:
    """passes="split": the same gradients as one joint pass, holding one row group's
    activations at a time. The logits of every row come first without a graph, the objective's
    gradient with respect to them is taken on those, then each group of n rows (unsafe, safe,
    null) runs forward again with a graph and backward with its slice of that gradient."""
    with torch.no_grad(), autocast():
        logits = parallel.forward(condition, x, schedule)
    leaf = logits.detach().requires_grad_(True)
    loss, stats = scaled_objective(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    for start in range(0, logits.shape[0], n):
        rows = slice(start, start + n)
        part = Condition(cond=condition.cond[rows], text=condition.text[rows], text_mask=condition.text_mask[rows])
        with autocast():
            group_logits = parallel.forward(part, x[rows], schedule)
        group_logits.backward(grad[rows])
    return stats
