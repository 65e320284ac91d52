"""Self-attention key/value caches of the incremental (sampling) pass, one per block, and the
two ways the fast mode makes a scale's work smaller.

    cache = KVCache.empty(batch, heads, capacity, head_dim, device, dtype)        # exact
    cache = KVCache.empty(..., budget=2048)                                       # at most 2048 kept
    k_slot, v_slot = cache.reserve(n)     # (B, H, n, hd) views: write this scale's n keys/values
    keys, values = cache.readable()       # what the scale attends to (cached + its own)
    cache.commit(n, queries)              # budget: keep the most attended (none after the last)

Exact sampling writes every scale into a buffer sized for the schedule once (no growth by
concatenation). With a budget (after ScaleKV: the fine scales read their own scale and few
coarse tokens) each block keeps at most `budget` tokens between scales: the ones this scale's
queries attend to most, per head. A scale's own keys are whole only while it runs, one block at a
time. Token pruning (after FastVAR) computes only a scale's pivotal tokens (`pivotal_tokens`:
those that differ most from their neighbourhood; `kept_tokens` of them), fills the others from
the previous scale's output (`restore_pruned`) and caches only the computed ones.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

QUERY_SAMPLE = 64       # queries per head that score the keys a budgeted cache keeps


class KVCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor, filled: int = 0, budget: int | None = None):
        self.k, self.v = k, v              # (B, H, capacity, hd); with a budget exactly `filled` long
        self.filled = filled               # tokens kept from earlier scales
        self.budget = budget               # None: keep every token
        self._work = None                  # with a budget: (k, v) of cached + this scale's tokens
        self._end = 0                      # tokens readable by the scale that reserved last
        self.final = False                 # the scale being run is the schedule's last

    @classmethod
    def empty(cls, batch: int, heads: int, capacity: int, head_dim: int, device, dtype,
              budget: int | None = None) -> "KVCache":
        length = 0 if budget is not None else capacity
        return cls(torch.empty(batch, heads, length, head_dim, device=device, dtype=dtype),
                   torch.empty(batch, heads, length, head_dim, device=device, dtype=dtype), 0, budget)

    @property
    def nbytes(self) -> int:
        """Bytes held between scales (what the cache costs; a scale's work is transient)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reserve(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, H, n, hd) where this scale's n keys and values go."""
        end = self._end = self.filled + n
        if self.budget is None:
            if end > self.k.shape[2]:
                raise ValueError(f"the key/value cache holds {self.k.shape[2]} tokens; {end} needed")
            return self.k[:, :, self.filled:end], self.v[:, :, self.filled:end]
        shape = (*self.k.shape[:2], end, self.k.shape[3])
        work = (self.k.new_empty(shape), self.v.new_empty(shape))
        work[0][:, :, :self.filled] = self.k
        work[1][:, :, :self.filled] = self.v
        self._work = work
        return work[0][:, :, self.filled:], work[1][:, :, self.filled:]

    def readable(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, L, hd) the scale just reserved attends to."""
        if self._work is not None:
            return self._work
        return self.k[:, :, :self._end], self.v[:, :, :self._end]

    def commit(self, n: int, queries: torch.Tensor) -> None:
        """After the scale's attention: its n tokens join the cache. With a budget the cache then
        keeps the `budget` tokens the scale's queries (B, H, n, hd) attend to most; after the
        final scale (`final` set by the sampling pass) nothing is kept: nothing reads it."""
        if self.budget is None:
            self.filled += n
            return
        k, v = self._work
        self._work = None
        if self.final:
            return
        if k.shape[2] <= self.budget:
            self.k, self.v, self.filled = k, v, k.shape[2]
            return
        keep = most_attended(queries, k, self.budget)                    # (B, H, budget)
        index = keep.unsqueeze(-1).expand(-1, -1, -1, k.shape[3])
        self.k, self.v, self.filled = k.gather(2, index), v.gather(2, index), self.budget

    def first_rows(self, rows: int, capacity: int) -> "KVCache":
        """The first `rows` rows (their own copies: a view would keep the whole batch alive);
        without a budget sized for `capacity` tokens, what is filled carried over."""
        if self.budget is not None:
            return KVCache(self.k[:rows].clone(), self.v[:rows].clone(), self.filled, self.budget)

        def grown(cache):
            full = cache.new_empty(rows, cache.shape[1], capacity, cache.shape[3])
            full[:, :, :self.filled] = cache[:rows, :, :self.filled]
            return full
        return KVCache(grown(self.k), grown(self.v), self.filled)


def most_attended(queries: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """(B, H, count) indices of the keys that an evenly spread sample of the queries
    (B, H, n, hd) gives the most attention mass (softmax over all keys, summed), in order."""
    step = max(1, queries.shape[2] // QUERY_SAMPLE)
    sample = queries[:, :, ::step].float()
    weights = (sample @ keys.float().transpose(-1, -2)).softmax(dim=-1)  # cosine attention: scale 1
    mass = weights.sum(dim=2)
    return mass.topk(count, dim=-1).indices.sort(dim=-1).values


def kept_tokens(keep_share: float, tokens: int) -> int:
    """How many of a scale's `tokens` a keep share computes (at least one)."""
    return max(1, min(tokens, math.ceil(keep_share * tokens)))


def pivotal_tokens(x: torch.Tensor, grid: tuple[int, int], keep_share: float, rows: int) -> torch.Tensor:
    """(B, n) indices of the tokens of a scale (x: (B, h*w, D), images repeated `rows` times
    down the batch) to compute: the n = ceil(share * h*w) that differ most from their 3x3
    neighbourhood (where the coarser scales left an edge or detail to draw), in raster order.
    FastVAR scores the distance from the image's mean token instead; on the embedded model the
    neighbourhood keeps outlines better (docs/speed.md). Every row of an image (prompt,
    unconditional) gets the first row's choice, so guidance mixes like with like."""
    batch, (h, w) = x.shape[0] // rows, grid
    first = x[:batch].float().transpose(1, 2).reshape(batch, -1, h, w)
    around = F.avg_pool2d(F.pad(first, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    contrast = (first - around).pow(2).sum(dim=1).flatten(1)                   # (batch, h*w)
    count = kept_tokens(keep_share, h * w)
    keep = contrast.topk(count, dim=1).indices.sort(dim=1).values
    return keep.repeat(rows, 1)


def restore_pruned(computed: torch.Tensor, keep: torch.Tensor, previous: torch.Tensor,
                   previous_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D): the computed tokens (B, n, D) at their places, every other token the
    previous scale's output (B, h'*w', D) area-resized to this grid."""
    batch, _, dim = previous.shape
    carried = previous.transpose(1, 2).reshape(batch, dim, *previous_grid)
    carried = F.interpolate(carried.float(), size=grid, mode="area")
    carried = carried.flatten(2).transpose(1, 2).contiguous().to(computed.dtype)
    return carried.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, dim), computed)
