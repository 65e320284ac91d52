"""The text encoder the pipeline calls: a tokenizer and a T5 encoder (t5.py).

Usage:
    from vare_core.models.text_encoder import TextEncoder
    text = TextEncoder.from_folder("models/flan-t5-xl", dtype=torch.float16, device="cuda")
    states, lens = text.encode(["a red circle on a white background"])
    # states (B, T, 2048), T = longest prompt; Infinity reads states[b, :lens[b]] (EOS included),
    # rows past lens[b] are zero.
    text.to(device="cpu")  # offload once the prompts are encoded

The folder layouts it reads are described in t5.py; build_word_level_tokenizer makes the small
word-level tokenizer of the embedded model.
"""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from .. import paths
from .t5 import T5Config, T5Encoder, T5WeightsError, load_t5_encoder

def build_word_level_tokenizer(words: list[str]) -> Tokenizer:
    """A tiny T5-compatible tokenizer: <pad>=0, </s>=1, <unk>=2, then `words` lowercased in order;
    lowercase normaliser, whitespace + punctuation pre-tokeniser, `</s>` appended to every prompt."""
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        word = word.lower()
        if [piece for piece, _ in pre_tokenizer.pre_tokenize_str(word)] != [word]:
            raise ValueError(f"word {word!r} would be split by the pre-tokeniser (spaces or punctuation); "
                             "give single words or single punctuation marks")
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return tokenizer


def _as_config(config) -> T5Config:
    if isinstance(config, T5Config):
        return config
    if isinstance(config, dict):
        return T5Config.from_hf_config(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"T5 config not found: {path}; give the model's config.json")
    try:
        return T5Config.from_hf_config(json.loads(path.read_text()))
    except ValueError as err:
        raise T5WeightsError(f"{path}: {err}") from None


class TextEncoder:
    """Tokenizer + T5Encoder: what the rest of the pack calls to turn prompts into text states."""

    def __init__(self, tokenizer: Tokenizer, model: T5Encoder, max_length: int = 512):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length
        tokenizer.no_padding()      # we pad to the longest prompt ourselves
        tokenizer.no_truncation()   # and cut keeping EOS last
        self.eos_id = tokenizer.token_to_id("</s>")
        if self.eos_id is None:
            raise ValueError("the tokenizer has no '</s>' token; a T5 tokenizer.json needs it")
        pad_id = tokenizer.token_to_id("<pad>")
        self.pad_id = 0 if pad_id is None else pad_id

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @classmethod
    def from_folder(cls, folder, dtype=torch.float32, device="cpu", max_length=512) -> "TextEncoder":
        """A Hugging Face T5 folder: config.json, tokenizer.json and weights (see module docstring)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"T5 folder not found: {folder}")
        tokenizer = folder / "tokenizer.json"
        if not tokenizer.is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.json; copy the T5 v1.1 tokenizer.json "
                                    "(the flan-t5 vocabulary, e.g. the one ComfyUI ships for T5) into it")
        return cls.from_files(folder, tokenizer, folder / "config.json", dtype, device, max_length)

    @classmethod
    def from_files(cls, weights, tokenizer, config, dtype=torch.float32, device="cpu",
                   max_length=512) -> "TextEncoder":
        """weights: folder, index or file; tokenizer: tokenizer.json path or Tokenizer;
        config: T5Config, HF config dict or config.json path."""
        config = _as_config(config)
        if not isinstance(tokenizer, Tokenizer):
            if paths.file_kind(tokenizer) == "missing":
                raise FileNotFoundError(f"tokenizer.json not found: {tokenizer}")
            paths.require_regular_file(Path(tokenizer), "tokenizer")
            try:
                tokenizer = Tokenizer.from_file(str(tokenizer))
            except Exception as err:   # the tokenizers library raises a bare Exception
                raise ValueError(f"tokenizer.json {tokenizer} is not a tokenizer file ({str(err)[:120]}); "
                                 "use the tokenizer.json of a flan-t5 / T5 v1.1 folder") from None
        return cls(tokenizer, load_t5_encoder(weights, config, dtype, device), max_length)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B,T) int64 padded with pad_id, mask (B,T) int64; T = longest prompt (<= max_length)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        rows = []
        for encoding in self.tokenizer.encode_batch(list(prompts)):
            ids = list(encoding.ids)
            if not ids or ids[-1] != self.eos_id:  # a tokenizer.json without T5's post-processor
                ids.append(self.eos_id)
            if len(ids) > self.max_length:
                ids = ids[: self.max_length - 1] + [self.eos_id]
            rows.append(ids)
        input_ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for b, ids in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            mask[b, : len(ids)] = 1
        if int(input_ids.max()) >= self.model.config.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} is outside the model's vocab_size "
                             f"{self.model.config.vocab_size}: tokenizer.json and weights do not match")
        return input_ids, mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B,T,d_model) in the model dtype, zero past each length; lens (B,) int64, on the
        model's device. Row lens[b]-1 is the EOS token."""
        input_ids, mask = self.tokenize(prompts)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        states = self.model(input_ids, mask)
        return states.masked_fill(mask[..., None] == 0, 0.0), mask.sum(1)

    def to(self, device=None, dtype=None) -> "TextEncoder":
        """Move / cast the encoder (e.g. to the CPU once prompts are encoded); returns self."""
        self.model.to(device=device, dtype=dtype)
        return self
