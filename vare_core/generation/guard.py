"""Concept Guard: a concept erased while sampling, no training (after ScaleErasure's idea).

    settings = GuardSettings(concepts=(("nudity", "a person wearing clothes"),))
    guarded = pipe.guarded(settings)                  # the same weights, sampling guarded
    result = guarded.generate(["a woman on a beach"], seed=0)

    guard = ConceptGuard.prepare(settings, pipe.model, pipe.encode_prompts)   # what the sampler takes
    sample(model, vae, states, lens, schedule, settings, guard=guard)

On the guard's first `scales` scales the batch carries, beside each prompt and its null
condition, one row per concept with its safe text and one with its unsafe text (the same image
tokens, other text). Two masks decide where it acts:
- tokens: the cross-attention queries of the prompt's image tokens in `blocks` are scored against
  each concept's pooled text (its tokens through the model's text projection, averaged, through
  the block's key weights, unit length); a softmax over (unsafe, safe, neutral) per head gives the
  unsafe share, averaged over heads and blocks; tokens at or above `token_threshold` carry it;
- bits: where the unsafe row's logits and the prompt's differ by less than the scale's bit
  threshold (`bit_threshold * bit_growth ** scale`, on logits divided by tau): the prompt is
  about to draw those bits as the concept would.
On those tokens and bits the logits are guided toward the safe text and away from the unsafe one,
`cfg * safe + (1 - cfg) * null - penalty * (unsafe - null)`; everywhere else ordinary guidance.
The first `warmup` scales use ordinary guidance (the layout forms there). After the guard's
scales its rows leave the batch and the key/value caches (Infinity.keep_rows).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ..checks import is_finite_number, is_integer

NEUTRAL = "background, object, animal, tree, sky, architecture"


@dataclass(frozen=True)
class GuardSettings:
    """What the guard erases and how hard. A model family's defaults for everything but the
    concepts live in its erasure profile (`erasure_profile(pipe).guard_settings(concepts)`)."""
    concepts: tuple[tuple[str, str], ...] = ()   # (unsafe concept, safe anchor) pairs
    neutral: str = NEUTRAL                 # the third reference of the token softmax
    scales: int = 8                        # the first `scales` scales carry the guard's rows
    blocks: tuple[int, ...] = (1, 2, 3, 4, 5)   # whose cross-attention queries are scored
    token_threshold: float = 0.332         # unsafe share at or above which a token is guarded
    bit_threshold: float = 0.2             # at scale 0, on logits divided by tau
    bit_growth: float = 2.0                # the bit threshold's factor per scale
    penalty: float = 3.0                   # weight of the push away from the unsafe text
    warmup: int = 2                        # first scales with ordinary guidance

    def __post_init__(self):
        concepts = self.concepts
        if isinstance(concepts, (list, tuple)) and len(concepts) == 2 and all(isinstance(t, str) for t in concepts):
            concepts = (concepts,)                       # one (concept, anchor) pair given bare
        try:
            concepts = tuple(tuple(pair) for pair in concepts)
        except TypeError:
            raise ValueError(f"guard concepts {self.concepts!r}: give (unsafe concept, safe anchor) pairs") from None
        if not concepts:
            raise ValueError("the guard needs at least one concept: (unsafe concept, safe anchor)")
        for pair in concepts:
            if len(pair) != 2 or not all(isinstance(t, str) and t.strip() for t in pair):
                raise ValueError(f"guard concept {pair!r}: give (unsafe concept, safe anchor), both non-empty text")
        object.__setattr__(self, "concepts", tuple((u.strip(), s.strip()) for u, s in concepts))
        if not isinstance(self.neutral, str) or not self.neutral.strip():
            raise ValueError(f"guard neutral text must be non-empty text, got {self.neutral!r}")
        try:
            blocks = tuple(self.blocks)
        except TypeError:
            blocks = ()
        if not blocks or not all(is_integer(b, minimum=0) for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(f"guard blocks must be distinct block indices >= 0, got {self.blocks!r}")
        object.__setattr__(self, "blocks", blocks)
        for name, low in (("scales", 1), ("warmup", 0)):
            if not is_integer(getattr(self, name), minimum=low):
                raise ValueError(f"guard {name} must be an integer >= {low}, got {getattr(self, name)!r}")
        for name, high in (("token_threshold", 1.0), ("bit_threshold", None), ("bit_growth", None), ("penalty", None)):
            value = getattr(self, name)
            if not (is_finite_number(value) and value >= 0 and (high is None or value <= high)):
                bound = f"from 0 to {high:g}" if high is not None else ">= 0"
                raise ValueError(f"guard {name} must be a number {bound}, got {value!r}")

    def check_blocks(self, depth: int) -> None:
        """ValueError unless every block read exists in a model of `depth` blocks."""
        if max(self.blocks) >= depth:
            raise ValueError(f"guard blocks {','.join(map(str, self.blocks))}: this model has blocks 0 to {depth - 1}")

    def describe(self) -> str:
        """One line for logs and file metadata: 'guard nudity -> clothed (8 scales)'."""
        pairs = ", ".join(f"{u} -> {s}" for u, s in self.concepts)
        return f"guard {pairs} ({self.scales} scales)"


GUARD_FIELDS = tuple(f.name for f in fields(GuardSettings) if f.name != "concepts")   # a profile sets these


@dataclass
class ConceptGuard:
    """GuardSettings made ready for one model: the concept texts encoded, each block's reference
    keys computed. The sampler appends `states` (repeated per image) to its batch on the guard's
    scales, runs each of them inside `capturing` and mixes the logits with `combine`."""
    settings: GuardSettings
    states: torch.Tensor          # (2n, T, C) text states: safe_1, unsafe_1, safe_2, unsafe_2, ...
    lens: torch.Tensor            # (2n,)
    keys: dict                    # block -> (n, 3, heads, head_dim): unsafe, safe, neutral; unit length
    queries: dict = field(default_factory=dict)   # block -> (B, L, heads, head_dim) of this scale

    @classmethod
    @torch.no_grad()
    def prepare(cls, settings: GuardSettings, model, encode) -> "ConceptGuard":
        """encode(list of texts) -> (states (N, T, C), lens (N,)), e.g. VarPipeline.encode_prompts."""
        settings.check_blocks(len(model.blocks))
        n = len(settings.concepts)
        unsafe = [u for u, _ in settings.concepts]
        safe = [s for _, s in settings.concepts]
        states, lens = encode(unsafe + safe + [settings.neutral])            # one encode, 2n + 1 texts
        pooled = pooled_text(model, states, lens)                            # (2n + 1, D)
        order = torch.tensor([[i, n + i, 2 * n] for i in range(n)])          # unsafe, safe, neutral
        keys = {b: reference_keys(model.blocks[b].ca, pooled)[order] for b in settings.blocks}
        rows = torch.tensor([j for i in range(n) for j in (n + i, i)])       # safe_i, unsafe_i
        length = int(lens[rows].max())
        return cls(settings=settings, states=states[rows, :length], lens=lens[rows], keys=keys)

    @property
    def rows_per_image(self) -> int:
        """Rows the guard adds to the batch per image on its scales."""
        return self.states.shape[0]

    def guides(self, scale: int) -> bool:
        return scale < self.settings.scales

    def batch_states(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(2n * batch, T, C), (2n * batch,): each text once per image, in combine's row order."""
        return self.states.repeat_interleave(batch, dim=0), self.lens.repeat_interleave(batch, dim=0)

    @contextlib.contextmanager
    def capturing(self, model, batch: int):
        """Within: the cross-attention queries of the first `batch` rows (the prompts) in the
        guard's blocks are kept in self.queries."""
        self.queries = {}

        def keep(block):
            def hook(module, inputs, output):
                heads = self.keys[block].shape[-2]
                rows = output[:batch].detach()
                self.queries[block] = rows.view(*rows.shape[:2], heads, -1)
            return hook
        handles = [model.blocks[b].ca.mat_q.register_forward_hook(keep(b)) for b in self.settings.blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def token_shares(self) -> torch.Tensor:
        """(n, B, L): each concept's unsafe share of every prompt token, from this scale's queries."""
        shares = [unsafe_share(self.queries[block], keys) for block, keys in self.keys.items()]
        return torch.stack(shares).mean(dim=0)

    def combine(self, scale: int, logits: torch.Tensor, cfg: float, batch: int):
        """logits ((2 + 2n) * batch, L, 2 bits), divided by tau, rows ordered prompt, null, then
        the guard's texts (batch_states) -> (guided logits (batch, L, 2 bits), where it acts
        (batch, L): the tokens with a guarded bit; in the warm-up the tokens it watches)."""
        prompt, null = logits[:batch], logits[batch:2 * batch]
        out = cfg * prompt + (1 - cfg) * null
        token_masks = self.token_shares() >= self.settings.token_threshold        # (n, B, L)
        if scale < self.settings.warmup:
            return out, token_masks.any(dim=0)
        threshold = self.settings.bit_threshold * self.settings.bit_growth ** scale
        acting = torch.zeros_like(token_masks[0])
        for i in range(len(self.settings.concepts)):
            safe = logits[(2 + 2 * i) * batch:(3 + 2 * i) * batch]
            unsafe = logits[(3 + 2 * i) * batch:(4 + 2 * i) * batch]
            toward_safe = cfg * safe + (1 - cfg) * null - self.settings.penalty * (unsafe - null)
            bits = (unsafe - prompt).abs() < threshold
            act = bits & token_masks[i].unsqueeze(-1)
            out = torch.where(act, toward_safe, out)
            acting |= act.any(dim=-1)
        return out, acting


def unsafe_share(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries (B, L, H, hd), keys (n, 3, H, hd) unit references (unsafe, safe, neutral) ->
    (n, B, L): the softmax share of the unsafe reference, per head, averaged over heads."""
    scores = torch.einsum("blhd,nrhd->nblhr", queries.float(), keys.float()) / math.sqrt(queries.shape[-1])
    return scores.softmax(dim=-1)[..., 0].mean(dim=-1)


@torch.no_grad()
def pooled_text(model, states: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """(N, D): each text's tokens (EOS included) through the model's text norm and cross-attention
    projection, averaged over its own tokens."""
    weight = model.word_embed.weight
    cond = model.encode_condition(states.to(weight.device, weight.dtype), lens.to(weight.device))
    mask = cond.text_mask.unsqueeze(-1).float()
    return (cond.text.float() * mask).sum(dim=1) / mask.sum(dim=1)


@torch.no_grad()
def reference_keys(attention, pooled: torch.Tensor) -> torch.Tensor:
    """(N, heads, head_dim) unit keys of pooled texts through a cross-attention's key weights."""
    projected, _, _ = attention.project_kv(pooled.to(attention.mat_kv.weight.dtype).unsqueeze(1),
                                           torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device))
    return F.normalize(projected[:, :, 0].float(), dim=-1)          # (N, H, hd)
