"""The Infinity transformer: next-scale prediction of bitwise tokens, conditioned on T5 text.

An image is a pyramid of scales (1x1 up to 64x64 tokens); each token holds `bits` binary
codes. The transformer predicts every token of scale k at once from the text and all coarser
scales, with two logits per bit.

Usage::

    model = Infinity(InfinityConfig.tiny())                 # or presets.build_infinity(...)
    cond = model.encode_condition(text_states, text_lens)   # T5 states (B, T, C_text)
    logits = model(cond, x_wo_prefix, scale_schedule)       # teacher-forced, (B, L, 2*bits)

    state = model.start_sampling(cond, scale_schedule)      # incremental, KV cache (incremental.py)
    logits_0 = model.forward_scale(state, 0)                # scale 0 reads the start token
    logits_1 = model.forward_scale(state, 1, x_scale_1)     # (B, h*w, bits) next-scale input

    model.enable_block_streaming("cuda")     # low VRAM: blocks stay in (pinned) CPU memory and
                                             # are copied to the GPU one at a time (sampling only)

Layout of the logits: `logits[b, t, 2*j + v]` is the logit that bit j of token t equals v.
Parameter names follow the official checkpoints, except that blocks live in a flat
`blocks.{i}` list (official files store them as `block_chunks.{c}.module.{m}`); see presets.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import CrossAttention, RMSNorm, SelfAttention, TextPool
from .block_streaming import BlockStreaming
from .incremental import IncrementalSampling, SamplingState  # noqa: F401  (SamplingState: re-exported)
from .lowrank import Linear
from .rope import rope_table, rotor


@dataclass
class InfinityConfig:
    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    bits: int = 32                    # bits per token (the VAE's codebook dim); head gives 2 per bit
    text_channels: int = 2048         # T5 width
    text_maxlen: int = 512            # rows of the learned null condition `cfg_uncond`
    block_chunks: int = 8             # only shapes the official checkpoint key names
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_levels: int = 15              # rows of the level (scale index) embedding
    cond_drop_rate: float = 0.1       # training only: replace the text by the null condition
    lvl_embed_every_chunk: bool = False  # S-VARE's modified copy adds it before every chunk
    ca_bf16_rounding: bool = False    # reproduce the official code's bf16 cross-attention in fp32

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def pool_heads(self) -> int:
        return max(1, self.text_channels // 128)

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks

    @classmethod
    def infinity_2b(cls) -> "InfinityConfig":
        return cls(depth=32, embed_dim=2048, num_heads=16, bits=32, block_chunks=8)

    @classmethod
    def infinity_8b(cls) -> "InfinityConfig":
        return cls(depth=40, embed_dim=3584, num_heads=28, bits=56, block_chunks=8)

    @classmethod
    def tiny(cls, **overrides) -> "InfinityConfig":
        """The golden-vector config: small enough for unit tests."""
        base = cls(depth=4, embed_dim=80, num_heads=2, bits=16, text_channels=256, text_maxlen=16,
                   block_chunks=2)
        return replace(base, **overrides)


@dataclass
class Condition:
    """Text condition of a batch, computed once per image and reused by every scale."""
    cond: torch.Tensor        # (B, D) pooled text: AdaLN condition and start token
    text: torch.Tensor        # (B, T, D) projected text, the source of cross-attention K/V
    text_mask: torch.Tensor   # (B, T) bool, True on valid text rows


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)     # lowrank.Linear: can carry LoRA updates
        self.fc2 = Linear(hidden, dim)

    def forward(self, x):
        if x.device.type != "cpu" or torch.is_grad_enabled():
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        # CPU inference, a few thousand tokens at a time: the hidden activation (4x the width)
        # stays near the caches and under the allocator's mmap threshold, the GELU in place;
        # 7-10% faster on the FFN, the same bits (rows are independent)
        rows = max(1, (1 << 22) // self.fc1.out_features)
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], self.fc2.out_features)
        for start in range(0, flat.shape[0], rows):
            hidden = self.fc1(flat[start:start + rows])
            out[start:start + rows] = self.fc2(torch.ops.aten.gelu_(hidden, approximate="tanh"))
        return out.view(*x.shape[:-1], -1)


def modulated_norm(x, scale, shift, eps):
    """LayerNorm without affine parameters, then AdaLN: LN(x) * (1 + scale) + shift."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale)


class Block(nn.Module):
    """Self-attention (AdaLN-gated), cross-attention to the text, FFN (AdaLN-gated).

    The residual stream `x` is fp32 whatever the weights' dtype, as in the official code: the
    norms, gates and sums run in fp32 and only the attention and FFN run in the blocks' (half)
    dtype. A bf16 residual would round every block's small update away (bit probabilities off
    twice as much as the official bf16 path on the golden model)."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, cfg.embed_dim) / cfg.embed_dim ** 0.5)
        self.sa = SelfAttention(cfg.embed_dim, cfg.num_heads)
        self.ca = CrossAttention(cfg.embed_dim, cfg.embed_dim, cfg.num_heads, cfg.ca_bf16_rounding)
        self.ffn = FFN(cfg.embed_dim, cfg.mlp_hidden)
        self.ca_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)

    def forward(self, x, ada, cross_kv, rope, attn_mask=None, self_kv=None):
        compute = self.ffn.fc1.weight.dtype     # x and ada are fp32 (a no-op for fp32 weights)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss.float() + ada).unbind(2)
        h = self.sa(modulated_norm(x, scale1, shift1, self.eps).to(compute), rope, attn_mask, self_kv)
        x = torch.addcmul(x, h.float(), gamma1)
        text_side = F.layer_norm(x, x.shape[-1:], self.ca_norm.weight.float(), self.ca_norm.bias.float(),
                                 self.eps)
        x = x + self.ca(text_side.to(compute), *cross_kv).float()
        x = torch.addcmul(x, self.ffn(modulated_norm(x, scale2, shift2, self.eps).to(compute)).float(), gamma2)
        return x


class HeadNorm(nn.Module):
    """AdaLN before the head: scale and shift from the pooled text."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, head_ada):
        scale, shift = head_ada.unbind(2)
        return modulated_norm(x, scale, shift, self.eps)


class Infinity(IncrementalSampling, BlockStreaming, nn.Module):
    # Parameters that stay fp32 in a half-precision model: they act on the fp32 residual stream
    # (level embedding, start token, AdaLN, head), as in the official bf16 inference, where only
    # the blocks are cast. 1.5% of the 2B model's weights; with them in bf16 the golden model's
    # bit probabilities are 10% further from the fp32 ones than the official bf16 path's.
    FP32_PARAMETERS = ("lvl_embed.", "pos_start", "shared_ada_lin.", "head_nm.", "head.")

    @classmethod
    def parameter_dtype(cls, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype parameter `name` takes in a model loaded in `dtype`."""
        return torch.float32 if name.startswith(cls.FP32_PARAMETERS) else dtype

    def cast(self, dtype: torch.dtype) -> "Infinity":
        """The weights in `dtype`, except FP32_PARAMETERS (see there); returns self."""
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(self.parameter_dtype(name, dtype))
        return self

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.gradient_checkpointing = False
        self.stream_device: torch.device | None = None   # set by enable_block_streaming
        # Text side: null condition for CFG, RMSNorm, pooled condition, cross-attention source.
        self.cfg_uncond = nn.Parameter(torch.randn(cfg.text_maxlen, cfg.text_channels) * 0.03)
        self.text_norm = RMSNorm(cfg.text_channels, eps=1e-6)
        self.text_proj_for_sos = TextPool(dim, cfg.text_channels, cfg.pool_heads, cfg.ca_bf16_rounding)
        self.text_proj_for_ca = nn.Sequential(
            nn.Linear(cfg.text_channels, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        # Image side: start token, level (scale index) embedding, bit-code embedding.
        self.pos_start = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.lvl_embed = nn.Embedding(cfg.num_levels, dim)
        self.word_embed = nn.Linear(cfg.bits, dim)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = HeadNorm(dim, cfg.norm_eps)
        self.head = nn.Linear(dim, 2 * cfg.bits)

    # ---------------------------------------------------------------- text condition
    def null_text(self, text_lens: torch.Tensor, length: int) -> torch.Tensor:
        """The learned null condition cut to each prompt's length, zero padded: (B, T, C)."""
        rows = torch.arange(length, device=text_lens.device)
        mask = (rows[None, :] < text_lens[:, None]).unsqueeze(-1)
        uncond = self.cfg_uncond[:length].unsqueeze(0)
        return torch.where(mask, uncond, torch.zeros_like(uncond))

    def encode_condition(self, text_states: torch.Tensor, text_lens: torch.Tensor,
                         drop: torch.Tensor | None = None) -> Condition:
        """text_states (B, T, C_text) from T5, rows past text_lens[b] ignored.

        `drop` (B,) bool replaces those prompts by the null condition (classifier-free
        guidance training); in training mode it is drawn with `cond_drop_rate` when not given.
        """
        length = text_states.shape[1]
        if length > self.cfg.text_maxlen:
            raise ValueError(f"text has {length} tokens; this model accepts at most {self.cfg.text_maxlen}")
        text_lens = text_lens.to(text_states.device)
        if drop is None and self.training and self.cfg.cond_drop_rate > 0:
            drop = torch.rand(text_states.shape[0], device=text_states.device) < self.cfg.cond_drop_rate
        if drop is not None and bool(drop.any()):
            null = self.null_text(text_lens, length).to(text_states.dtype)
            text_states = torch.where(drop.view(-1, 1, 1), null, text_states)
        mask = torch.arange(length, device=text_states.device)[None, :] < text_lens[:, None]
        normed = self.text_norm(text_states)
        return Condition(cond=self.text_proj_for_sos(normed, mask),
                         text=self.text_proj_for_ca(normed), text_mask=mask)

    def _adaln(self, cond: torch.Tensor):
        # fp32 like the residual stream they scale and gate (the official code disables autocast
        # here); once per image, so the cost does not matter.
        dim = self.cfg.embed_dim
        cond = F.silu(cond.float())
        with _full_precision(cond):
            ada = _linear_fp32(self.shared_ada_lin[1], cond).view(-1, 1, 6, dim)
            head_ada = _linear_fp32(self.head_nm.ada_lin[1], cond).view(-1, 1, 2, dim)
        return ada, head_ada

    def _logits(self, x, head_ada):
        # The head runs in fp32 whatever the compute dtype: bit probabilities near 0/1 matter.
        with _full_precision(x):
            return _linear_fp32(self.head, self.head_nm(x.float(), head_ada.float()))

    # ---------------------------------------------------------------- teacher-forced pass
    def forward(self, cond: Condition, x_wo_prefix: torch.Tensor, scale_schedule,
                rope_grid: tuple[int, int] | None = None) -> torch.Tensor:
        """All scales at once (training). x_wo_prefix (B, L-1, bits): the next-scale inputs of
        scales 1.. (see bsq_quant.teacher_forcing_inputs). Returns logits (B, L, 2*bits)."""
        counts = [h * w for h, w in scale_schedule]
        total = sum(counts)
        if x_wo_prefix.shape[1] != total - counts[0]:
            raise ValueError(f"x_wo_prefix has {x_wo_prefix.shape[1]} tokens; the schedule "
                             f"{list(scale_schedule)} needs {total - counts[0]}")
        device = x_wo_prefix.device
        batch = x_wo_prefix.shape[0]
        sos = (cond.cond.unsqueeze(1) + self.pos_start).expand(batch, counts[0], -1)
        x = torch.cat([sos, self.word_embed(x_wo_prefix.to(self.word_embed.weight.dtype))], dim=1).float()
        scale_ids = torch.repeat_interleave(torch.arange(len(counts), device=device),   # output_size:
                                            torch.tensor(counts, device=device), output_size=total)  # meta can run it
        lvl = self.lvl_embed(scale_ids).unsqueeze(0)
        # Block-causal: a token sees its own scale and every coarser one.
        attn_mask = scale_ids[:, None] >= scale_ids[None, :]
        rope = rotor(rope_table(scale_schedule, self.cfg.head_dim, rope_grid, device))
        ada, head_ada = self._adaln(cond.cond)
        cross_sources = (cond.text, cond.text_mask)
        per_chunk = self.cfg.blocks_per_chunk
        for i, block in enumerate(self.blocks):
            if i == 0 or (self.cfg.lvl_embed_every_chunk and i % per_chunk == 0):
                x = x + lvl
            with self._on_compute_device(block):
                cross_kv = block.ca.project_kv(*cross_sources)
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    # The kept block input in the blocks' dtype: half the checkpoint memory of
                    # an fp32 stream (8B at 1024²: 3.2 GiB). Training then rounds the residual
                    # at block boundaries; sampling and no-grad passes keep it fp32 throughout.
                    compute = block.ffn.fc1.weight.dtype
                    x = checkpoint(_run_block, block, x.to(compute), ada, cross_kv, rope, attn_mask,
                                   use_reentrant=False)
                else:
                    x = block(x, ada, cross_kv, rope, attn_mask)
        return self._logits(x, head_ada)


def _run_block(block: Block, x, *args):
    return block(x.float(), *args)


def _full_precision(x: torch.Tensor):
    """Autocast off around fp32 maths ("meta" has no autocast: the memory plan runs this code
    on meta tensors)."""
    return torch.autocast("cpu" if x.device.type == "meta" else x.device.type, enabled=False)


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight.float(), layer.bias.float())


@torch.no_grad()
def init_weights(model: Infinity, std: float = 0.02) -> Infinity:
    """Initialisation for training from scratch: small normal weights, zero biases, and
    zero AdaLN gates so every block starts close to the identity."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=std)
    for block in model.blocks:
        block.ada_gss.zero_()
    nn.init.zeros_(model.shared_ada_lin[1].weight)
    nn.init.zeros_(model.head_nm.ada_lin[1].weight)
    model.head.weight.mul_(0.1)
    model.text_proj_for_sos.ca.mat_q.normal_(std=std)
    return model
