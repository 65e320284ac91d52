"""The incremental (sampling) pass of the Infinity transformer: one scale at a time, every block
reading its key/value cache of the coarser scales. A mixin of models/infinity.Infinity.

    state = model.start_sampling(cond, scale_schedule)      # text K/V once, empty caches
    logits_0 = model.forward_scale(state, 0)                # scale 0 reads the start token
    logits_1 = model.forward_scale(state, 1, x_scale_1)     # (B, h*w, bits) next-scale input
    state = model.keep_rows(state, 2)                       # rows that leave the batch (guidance off)

Fast sampling (generation/sampler.py's `speed`) changes two things here, both off by default:
`kv_budget` (start_sampling: each block keeps at most that many tokens between scales) and
`keep_share` (forward_scale: only that share of a scale's tokens is computed, the others carried
from the previous scale); see kv_cache.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .kv_cache import KVCache, pivotal_tokens, restore_pruned
from .rope import rope_table, rotor


@dataclass
class SamplingState:
    """Everything the incremental pass keeps between scales."""
    cond: torch.Tensor                 # (B, D)
    ada: torch.Tensor                  # (B, 1, 6, D) shared AdaLN output
    head_ada: torch.Tensor             # (B, 1, 2, D) head AdaLN output
    cross_kv: list                     # per block: (k, v, mask) computed once
    self_kv: list[KVCache]             # per block: the self-attention cache
    rope: torch.Tensor                 # RoPE rotor (L, head_dim/2) complex, every token of the schedule
    offsets: list[int]                 # token offset of each scale (+ total)
    schedule: list[tuple[int, int]]    # (h, w) of each scale
    next_scale: int = 0                # the scale forward_scale runs next
    capacity: int = 0                  # cache room the rows that stay to the end need
    carry_hidden: bool = False         # keep each scale's output: a later scale is pruned
    hidden: torch.Tensor | None = None  # (B, h*w, D) the last scale's output (carry_hidden)

    @property
    def cache_bytes(self) -> int:
        """Bytes the self-attention caches hold between scales."""
        return sum(cache.nbytes for cache in self.self_kv)


class IncrementalSampling:
    def start_sampling(self, cond, scale_schedule, rope_grid: tuple[int, int] | None = None,
                       cache_tokens: int | None = None, kv_budget: int | None = None,
                       carry_hidden: bool = False, capacity: int | None = None) -> SamplingState:
        """Prepare caches: text K/V once per image, empty self-attention caches with room for
        `capacity` tokens (default: the whole schedule; less where scales are pruned, as only
        computed tokens are cached), or for `cache_tokens` (rows that leave the batch before
        the end: keep_rows gives the others room for the rest). kv_budget: each block keeps at
        most that many tokens between scales (None: all). carry_hidden: keep each scale's
        output for a pruned scale after it (forward_scale's keep_share)."""
        schedule = [(int(h), int(w)) for h, w in scale_schedule]
        offsets = [0]
        for h, w in schedule:
            offsets.append(offsets[-1] + h * w)
        batch, device = cond.cond.shape[0], cond.cond.device
        dtype = self.word_embed.weight.dtype
        heads, head_dim = self.cfg.num_heads, self.cfg.head_dim
        ada, head_ada = self._adaln(cond.cond)
        cross_kv = []
        for blk in self.blocks:
            with self._on_compute_device(blk.ca):   # only what the text K/V needs
                cross_kv.append(blk.ca.project_kv(cond.text, cond.text_mask))
        capacity = offsets[-1] if capacity is None else min(int(capacity), offsets[-1])
        length = capacity if cache_tokens is None else min(int(cache_tokens), capacity)
        self_kv = [KVCache.empty(batch, heads, length, head_dim, device, dtype, kv_budget) for _ in self.blocks]
        rope = rotor(rope_table(schedule, head_dim, rope_grid, device))
        return SamplingState(cond=cond.cond, ada=ada, head_ada=head_ada, cross_kv=cross_kv,
                             self_kv=self_kv, rope=rope, offsets=offsets, schedule=schedule,
                             capacity=capacity, carry_hidden=carry_hidden)

    @staticmethod
    def keep_rows(state: SamplingState, rows: int) -> SamplingState:
        """The state of the first `rows` rows of the batch, the others' tensors released: their
        own copies (a view would keep the whole batch alive) with self-attention caches for the
        whole schedule, what is filled so far carried over. Consumes `state`: its caches are
        replaced one block at a time, so the old and new caches never all coexist."""
        def first(tensor):
            return None if tensor is None else tensor[:rows].clone()
        for i, cache in enumerate(state.self_kv):
            state.self_kv[i] = cache.first_rows(rows, state.capacity)
            del cache
        return replace(state, cond=first(state.cond), ada=first(state.ada), head_ada=first(state.head_ada),
                       cross_kv=[(first(k), first(v), first(mask)) for k, v, mask in state.cross_kv],
                       self_kv=list(state.self_kv), hidden=first(state.hidden))

    def forward_scale(self, state: SamplingState, scale_index: int, x_scale: torch.Tensor | None = None,
                      keep_share: float = 1.0, images: int | None = None) -> torch.Tensor:
        """Logits (B, h*w, 2*bits) of one scale. Scales must be fed in order, 0 first;
        x_scale (B, h*w, bits) is the next-scale input (None for scale 0).
        keep_share < 1 (after FastVAR): only that share of the tokens runs through the blocks,
        those that differ most from their neighbours; the others take the previous scale's output,
        resized (start_sampling's carry_hidden). `images`: the batch holds each image's rows
        B // images apart (prompt, unconditional, ...), which all compute the same tokens."""
        if scale_index != state.next_scale:
            raise ValueError(f"scale {scale_index} fed out of order (expected scale {state.next_scale})")
        start, end = state.offsets[scale_index], state.offsets[scale_index + 1]
        grid = state.schedule[scale_index]
        if scale_index == 0:
            x = (state.cond.unsqueeze(1) + self.pos_start).expand(-1, end - start, -1)
        else:
            x = self.word_embed(x_scale.to(self.word_embed.weight.dtype))
        x = x.float()                                   # the residual stream (see Block)
        rope = state.rope[start:end]
        keep = None
        if keep_share < 1.0 and state.hidden is not None:
            keep = pivotal_tokens(x, grid, keep_share, x.shape[0] // (images or x.shape[0]))
            x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            rope = rope[keep]                           # (B, n, hd/2): each row its own tokens
        final = scale_index == len(state.schedule) - 1
        lvl = self.lvl_embed.weight[scale_index].view(1, 1, -1)
        per_chunk = self.cfg.blocks_per_chunk
        for i, block in enumerate(self.blocks):
            if i == 0 or (self.cfg.lvl_embed_every_chunk and i % per_chunk == 0):
                x = x + lvl
            state.self_kv[i].final = final
            with self._on_compute_device(block):
                x = block(x, state.ada, state.cross_kv[i], rope, None, state.self_kv[i])
        if keep is not None:
            x = restore_pruned(x, keep, state.hidden, state.schedule[scale_index - 1], grid)
        state.hidden = x if state.carry_hidden and not final else None
        state.next_scale = scale_index + 1
        return self._logits(x, state.head_ada)
