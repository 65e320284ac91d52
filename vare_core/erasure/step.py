"""One optimiser step of the erasure training (trainer.py runs the loop around it).

    bank = PromptBank(pipe, prompts)                 # T5 states, encoded once
    stepper = Stepper(parallel, bank, trajs, targets, pairs, config, lr, autocast, use_scaler, context)
    info = stepper.step(next(batches), step)         # the dict the callback and history get

A step: the pairs of the batch (this rank's slice in a process group), one teacher-forced pass
over all scales on [unsafe prompts; safe prompts; null rows] x the safe trajectory (the safe
rows only when L_Pre is on, the null rows only when null_weight > 0), the method's objective
(losses.erasure_objective, early.early_objective for method early, plus the null rows held to
their frozen logits), backward (joint, or one row group at a time with passes="split"), gradient
clipping, and the optimiser step, which is skipped when the gradients are not finite.
"""
from __future__ import annotations

import math
import time

import torch

from . import distributed, early, lean, losses
from .choices import FILTERED_CE_METHODS


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


def batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless seeded epochs: every pair once per epoch, in a new order each time."""
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = torch.randperm(n, generator=generator).tolist()
            batch.append(order.pop())
        yield batch


def make_optimizer(params, lr: float, config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=config.betas)


class Stepper:
    """The optimiser, the loss scaler and the step count of one training run."""

    def __init__(self, parallel, bank, trajs, targets, pairs, config, lr: float, autocast,
                 use_scaler: bool, device: torch.device, context=None):
        self.parallel, self.bank, self.trajs, self.targets = parallel, bank, trajs, targets
        self.pairs, self.config, self.lr, self.autocast, self.context = pairs, config, lr, autocast, context
        self.use_scaler = use_scaler
        self.optimizer = make_optimizer(parallel.parameters, lr, config)
        self.scaler = parallel.make_scaler(device, use_scaler)
        self.needs_safe = config.method in FILTERED_CE_METHODS and config.preservation_weight > 0
        self.holds_null = targets.null_rows is not None      # svare with null_weight > 0
        self.split_passes = config.passes == "split" and context is None   # DDP syncs once per backward
        self.loss_config = config.loss_config()
        self.skipped_steps = 0
        self.start_time = time.perf_counter()

    def _prompts(self, chosen) -> tuple[list[str], list[bool]]:
        """The rows of one pass: unsafe prompts, safe prompts (L_Pre), null rows (null_weight)."""
        prompts = [p.unsafe for p in chosen] + ([p.safe for p in chosen] if self.needs_safe else [])
        null = [False] * len(prompts) + [True] * (len(chosen) if self.holds_null else 0)
        prompts += [p.safe for p in chosen] if self.holds_null else []
        return prompts, null

    def _objective(self, logits, batch, local, chosen):
        config, targets, n = self.config, self.targets, len(local)
        unsafe_logits = targets.guide(logits[:n], local, "unsafe")
        safe_logits = targets.guide(logits[n:2 * n], local, "safe") if self.needs_safe else None
        erase_rows = torch.tensor([p.unsafe != p.safe for p in chosen])   # False: keep pairs
        token_mask = None if targets.token_weights is None else targets.token_weights.expand(n, -1)
        erase_mask = None if targets.erase_weights is None else targets.erase_weights.expand(n, -1)
        inputs = (unsafe_logits, safe_logits, batch["teacher_logits"], batch["bit_labels"], self.loss_config)
        if config.method == "early":
            loss, stats = early.early_objective(*inputs, config.entropy_weight, erase_rows=erase_rows,
                                                token_mask=token_mask, erase_token_mask=erase_mask)
        else:
            loss, stats = losses.erasure_objective(config.method, *inputs, erase_rows=erase_rows,
                                                   token_mask=token_mask, erase_token_mask=erase_mask)
        if self.holds_null:
            null_pre = losses.preservation_loss(logits[-n:], targets.null_rows[local], token_mask)
            loss = loss + config.null_weight * null_pre
            stats["null_pre"] = float(null_pre.detach())
            stats["loss"] = float(loss.detach())
        return loss, stats

    def _backward(self, condition, x, n, objective, weight) -> dict:
        schedule, scaler = self.trajs.schedule, self.scaler
        if self.split_passes:
            return lean.split_backward(self.parallel, condition, x, schedule, n, self.autocast,
                                       lambda logits: lean.scaled(objective(logits), scaler, weight))
        with self.autocast():
            logits = self.parallel.forward(condition, x, schedule)
        loss, stats = objective(logits)
        scaler.scale(loss if weight == 1 else loss * weight).backward()
        return stats

    def _update(self) -> tuple[torch.Tensor, bool]:
        """Clip, then step (skipped when the gradients are not finite); -> (grad norm, finite)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.parallel.clip_grad_norm(self.config.grad_clip or math.inf)
        finite = bool(torch.isfinite(grad_norm))
        if self.use_scaler:
            self.scaler.step(self.optimizer)          # skips the step itself when grads overflowed
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += not finite
        return grad_norm, finite

    def step(self, indices, step: int) -> dict:
        """One step on the global batch `indices` (step counts from 0); -> the step's info."""
        context = self.context
        local = distributed.shard(indices, context)
        batch = self.trajs.batch(local)
        chosen = [self.pairs[i] for i in local]
        prompts, null = self._prompts(chosen)
        x = batch["x_wo_prefix"].repeat(len(prompts) // len(chosen), 1, 1)
        weight = distributed.loss_weight(len(local), len(indices), context)
        condition = self.bank.condition(prompts, null=null)
        stats = self._backward(condition, x, len(local),
                               lambda logits: self._objective(logits, batch, local, chosen), weight)
        grad_norm, finite = self._update()
        stats = distributed.reduce_stats(stats, len(local), len(indices), context)
        return {"phase": "train", "step": step + 1, "steps": self.config.steps, **stats,
                "lr": self.lr, "grad_norm": float(grad_norm), "skipped": not finite,
                "skipped_steps": self.skipped_steps, "loss_scale": float(self.scaler.get_scale()),
                "seconds": time.perf_counter() - self.start_time}
