"""T5 v1.1 / flan-t5 text encoder in plain PyTorch and its checkpoint reader (the tokenizer
wrapper the pipeline calls, TextEncoder, is in text_encoder.py).

Usage:
    encoder = load_t5_encoder("models/flan-t5-xl", T5Config.from_hf_config(config), torch.float16, "cuda")
    states = encoder(ids, mask)          # (B, T, d_model)

A folder is what users have from Hugging Face: `config.json`, `tokenizer.json` and weights as
`model.safetensors`, sharded `model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`,
or `pytorch_model.bin` (+ `.index.json`, read with torch.load(weights_only=True)). A lone
`.safetensors` of encoder weights loads with `TextEncoder.from_files(weights, tokenizer, config)`.

Parameter names are Hugging Face's own (`shared.weight`,
`encoder.block.{i}.layer.0.SelfAttention.q.weight`, `...layer.1.DenseReluDense.wi_0.weight`, ...)
so checkpoints map 1:1; `encoder.embed_tokens.weight` is accepted for `shared.weight`, decoder and
lm_head keys are skipped. Weights are built on `meta` and each tensor is cast to the target
dtype/device as it is read, so an fp16 load never holds a full fp32 copy.

Half precision: T5 overflows fp16 in its FFN output. Here the residual stream is always fp32, the RMS
norms run in fp32, the gated FFN product is formed in fp32 and, for fp16 weights, the FFN output
projection `wo` runs in fp32 (weight upcast on the fly; HF keeps `wo` in fp32 for the same reason).
Attention softmax accumulates in fp32 inside scaled_dot_product_attention. No clamping is needed.
"""
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from ..checkpoints import CheckpointError, load_weight_file, read_safetensors_header, read_shard_index
from ..checks import is_integer


class T5WeightsError(ValueError):
    """A T5 checkpoint, config or folder that cannot be loaded; the message names the file and fix."""


ACTIVATIONS = {"gelu_tanh": partial(F.gelu, approximate="tanh"), "gelu": F.gelu,
               "relu": F.relu, "silu": F.silu}
_HF_ACTIVATION = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                  "relu": "relu", "silu": "silu", "swish": "silu"}


# Far above every released T5 (t5-11b / flan-ul2: 24-32 layers, d_ff 65536, vocab 32k-250k).
CONFIG_BOUNDS = {"d_model": 16384, "d_kv": 1024, "d_ff": 262144, "num_layers": 128, "num_heads": 512,
                 "vocab_size": 1_048_576}


@dataclass
class T5Config:
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    vocab_size: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    gated: bool = True               # v1.1 / flan: act(wi_0 x) * wi_1 x; v1.0: act(wi x)
    activation: str = "gelu_tanh"    # one of ACTIVATIONS

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"T5Config.activation={self.activation!r}; use one of {sorted(ACTIVATIONS)}")
        for name in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size"):
            value = getattr(self, name)
            if not is_integer(value, minimum=1):
                raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
            if value > CONFIG_BOUNDS[name]:   # a config must not make us build a huge model
                raise ValueError(f"T5Config.{name}={value} is beyond any T5 (at most "
                                 f"{CONFIG_BOUNDS[name]}); the config.json is damaged or not a T5's")

    @classmethod
    def flan_t5_xl(cls) -> "T5Config":
        return cls(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32, vocab_size=32128)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "T5Config":
        """From a Hugging Face T5 `config.json` dict (t5, mt5; the encoder half only)."""
        if hf.get("model_type", "t5") not in ("t5", "mt5"):
            raise ValueError(f"config model_type={hf['model_type']!r}: only t5 / mt5 layouts are "
                             "supported (umt5 has a position bias in every layer)")
        required = ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"T5 config lacks {missing}; pass the model's config.json")
        # HF derives the FFN from `feed_forward_proj` alone ("gated-gelu" means the tanh GELU).
        proj = hf.get("feed_forward_proj", "relu")
        gated, act = proj.startswith("gated-"), proj.split("-")[-1]
        act = "gelu_new" if proj == "gated-gelu" else act
        if act not in _HF_ACTIVATION or proj.count("-") > (1 if gated else 0):
            raise ValueError(f"T5 config feed_forward_proj={proj!r} is not supported")
        extra = {k: hf[k] for k in ("relative_attention_num_buckets", "relative_attention_max_distance",
                                    "layer_norm_epsilon") if k in hf}
        return cls(**{k: hf[k] for k in required}, **extra, gated=gated,
                   activation=_HF_ACTIVATION[act])

    def to_hf_config(self) -> dict:
        """A Hugging Face style config.json dict; from_hf_config(to_hf_config()) round-trips."""
        hf_act = {"gelu_tanh": "gelu" if self.gated else "gelu_new"}.get(self.activation, self.activation)
        if self.gated and self.activation == "gelu":
            raise ValueError("gated exact-GELU has no Hugging Face feed_forward_proj name")
        return dict(model_type="t5", d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
                    num_layers=self.num_layers, num_heads=self.num_heads, vocab_size=self.vocab_size,
                    relative_attention_num_buckets=self.relative_attention_num_buckets,
                    relative_attention_max_distance=self.relative_attention_max_distance,
                    layer_norm_epsilon=self.layer_norm_epsilon, pad_token_id=0, eos_token_id=1,
                    feed_forward_proj=("gated-" if self.gated else "") + hf_act)


# ----------------------------------------------------------------------------- model

def relative_position_bucket(offset: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets of key-minus-query offsets: half the buckets for keys after the
    query; in each half, exact distances below half of it, then log-spaced up to max_distance."""
    half = num_buckets // 2
    bucket = (offset > 0).long() * half
    distance = offset.abs()
    exact = half // 2
    log_bucket = exact + (torch.log(distance.clamp(min=1).float() / exact)
                          / math.log(max_distance / exact) * (half - exact)).long()
    return bucket + torch.where(distance < exact, distance, log_bucket.clamp(max=half - 1))


class T5LayerNorm(nn.Module):
    """T5's norm: RMS scaling only (no mean, no bias), computed in fp32, returned in weight dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(self.weight.dtype)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.num_heads, self.d_kv, self.cfg = cfg.num_heads, cfg.d_kv, cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:  # only block 0 owns it; every block reuses its output
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        """(1, heads, length, length) fp32 bias added to the attention scores."""
        positions = torch.arange(length, device=device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                           self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).float().permute(2, 0, 1).unsqueeze(0)

    def forward(self, x, bias):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, self.num_heads, self.d_kv).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        # T5 does not scale q.k by 1/sqrt(d_kv): the scale is folded into the weights' init.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class T5FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated, self.act = cfg.gated, ACTIVATIONS[cfg.activation]
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        if self.gated:
            hidden = self.act(self.wi_0(x).float()) * self.wi_1(x).float()
        else:
            hidden = self.act(self.wi(x).float())
        if self.wo.weight.dtype == torch.float16:  # fp16 overflow guard, see module docstring
            return F.linear(hidden, self.wo.weight.float())
        return self.wo(hidden.to(self.wo.weight.dtype))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        return self.SelfAttention(self.layer_norm(x), bias)


class T5FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5FeedForward(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x):
        return self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_relative_bias), T5FeedForwardLayer(cfg)])

    def forward(self, x, bias):
        x = x + self.layer[0](x, bias)  # fp32 residual + weight-dtype update stays fp32
        return x + self.layer[1](x)


class T5Encoder(nn.Module):
    """The encoder stack. forward(input_ids (B,T), attention_mask (B,T)) -> (B,T,d_model) in the
    weight dtype; rows at padded positions hold whatever the stack computes there."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = nn.ModuleDict(dict(
            block=nn.ModuleList([T5Block(config, has_relative_bias=i == 0) for i in range(config.num_layers)]),
            final_layer_norm=T5LayerNorm(config.d_model, config.layer_norm_epsilon)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """T5's init scales (for training from scratch): unit-variance embeddings, fan-in scaled
        projections, q additionally by 1/sqrt(d_kv) since scores are not scaled. Norms stay 1."""
        cfg = self.config
        std = dict(q=(cfg.d_model * cfg.d_kv) ** -0.5, k=cfg.d_model ** -0.5, v=cfg.d_model ** -0.5,
                   o=(cfg.num_heads * cfg.d_kv) ** -0.5, relative_attention_bias=cfg.d_model ** -0.5,
                   wi_0=cfg.d_model ** -0.5, wi_1=cfg.d_model ** -0.5, wi=cfg.d_model ** -0.5,
                   wo=cfg.d_ff ** -0.5, shared=1.0)
        for name, param in self.named_parameters():
            module = name.split(".")[-2]
            if module in std:
                nn.init.normal_(param, std=std[module])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"T5Encoder needs input_ids and attention_mask of the same (B, T) shape, "
                             f"got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        dtype = self.shared.weight.dtype
        x = self.shared(input_ids).float()
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], x.device)
        padded_key = (attention_mask == 0)[:, None, None, :]
        bias = torch.where(padded_key, torch.finfo(torch.float32).min, bias)
        bias = bias.to(dtype).clamp(min=torch.finfo(dtype).min)  # fp16: masked keys stay finite
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ----------------------------------------------------------------------------- checkpoints

_FOLDER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json",
                   "pytorch_model.bin", "pytorch_model.bin.index.json")


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint files behind a folder, an index or a single file, in load order."""
    if path.is_dir():
        for name in _FOLDER_WEIGHTS:
            if (path / name).is_file():
                return _weight_files(path / name)
        found = sorted(p.name for p in path.iterdir())[:20]
        raise T5WeightsError(f"{path}: no T5 weights found (looked for {', '.join(_FOLDER_WEIGHTS)}); "
                             f"the folder holds {found}")
    if not path.is_file():
        raise FileNotFoundError(f"T5 weights not found: {path}")
    if path.name.endswith(".index.json"):
        with _as_t5_error():
            return read_shard_index(path)[1]
    if path.suffix in (".safetensors", ".bin"):
        return [path]
    raise T5WeightsError(f"{path}: refused; T5 weights are read only from .safetensors, pytorch_model.bin "
                         "(plain tensors) or their .index.json. Convert the file to .safetensors.")


@contextmanager
def _as_t5_error():
    """checkpoints.py's errors (they name the file and the fix) as T5WeightsError."""
    try:
        yield
    except CheckpointError as err:
        raise T5WeightsError(str(err)) from None


def _torch_load(file: Path) -> dict:
    """A plain {name: tensor} pickle; anything carrying other Python objects is refused."""
    with _as_t5_error():
        state = load_weight_file(file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise T5WeightsError(f"{file}: expected a flat {{name: tensor}} state dict")
    return state


def _file_tensors(file: Path):
    """Yield (key, read) pairs; read() loads one tensor, so unwanted keys are never read."""
    if file.suffix == ".bin":
        for key, tensor in _torch_load(file).items():
            yield key, lambda tensor=tensor: tensor
        return
    with _as_t5_error():
        read_safetensors_header(file)      # truncated files and absurd headers, clearly named
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:
        raise T5WeightsError(f"{file}: cannot be read as safetensors ({err})") from None
    with handle:
        for key in handle.keys():
            yield key, lambda key=key: handle.get_tensor(key)


def _our_name(key: str) -> str | None:
    if key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "shared.weight"
    if key.startswith(("decoder.", "lm_head.")):
        return None
    return key


def _read_weights(path, dtype=None, device="cpu") -> tuple[dict, dict]:
    """Encoder tensors under our names, each cast as read, plus the file each one came from."""
    state, origin = {}, {}
    for file in _weight_files(Path(path)):
        for key, read in _file_tensors(file):
            name = _our_name(key)
            if name is None or name in state:  # decoder / lm_head, or the tied embedding twice
                continue
            tensor = read()
            state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
            origin[name] = file
    return state, origin


def load_t5_state_dict(path_or_folder, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """Encoder weights of a folder / index / .safetensors / pytorch_model.bin, under our (HF) names."""
    return _read_weights(path_or_folder, dtype, device)[0]


def _listing(keys, limit=8) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def load_t5_encoder(path, config: T5Config, dtype=torch.float32, device="cpu") -> T5Encoder:
    """A frozen, eval-mode T5Encoder with the weights at `path`, straight in `dtype` on `device`."""
    state, origin = _read_weights(path, dtype, device)
    # the weights' own block count is checked before the model is built (a config of 10^7
    # layers with a 2 MB file must fail in milliseconds)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    if config.num_layers > len(blocks):   # fewer: the key check below lists what is extra
        raise T5WeightsError(f"{path}: the config says {config.num_layers} layers but the weights hold "
                             f"{len(blocks)} encoder blocks; check that the config belongs to these weights")
    with torch.device("meta"):
        model = T5Encoder(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    extra = [f"{k} (in {origin[k].name})" for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} in {origin[k].name}, config needs {tuple(expected[k])}"
             for k in expected if k in state and state[k].shape != expected[k]]
    if missing or extra or wrong:
        files = sorted({f.name for f in origin.values()}) or [Path(path).name]
        problems = [f"{label}: {_listing(keys)}" for label, keys in
                    (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", wrong)) if keys]
        raise T5WeightsError(f"{path} ({', '.join(files)}): weights do not fit the T5 config; "
                             + "; ".join(problems) + ". Check that the config belongs to these weights.")
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)
