"""The text encoder the pipeline calls: a tokenizer and a T5 encoder (t5.py).

Usage:
    from vare_core.models.text_encoder import TextEncoder
    text = TextEncoder.from_folder("models/flan-t5-xl", dtype=torch.float16, device="cuda")
    states, lens = text.encode(["a red circle on a white background"])
    # states (B, T, 2048), T = longest prompt; Infinity reads states[b, :lens[b]] (EOS included),
    # rows past lens[b] are zero.
    packed, lens = text.encode_packed(prompts, device="cpu")
    # packed (sum(lens), 2048): each prompt's states cut to its own length, in order; memory is
    # the sum of the prompt lengths times the width, whatever the longest prompt
    text.to(device="cpu")  # offload once the prompts are encoded

Many prompts are encoded in chunks of rows whose activations fit ENCODE_BYTES, every chunk
padded to the longest prompt of the whole call, so the states are the same bits as one batch of
all of them; a prompt of a huge text is tokenised only as far as its first max_length tokens.

The folder layouts it reads are described in t5.py; build_word_level_tokenizer makes the small
word-level tokenizer of the embedded model.
"""
import json
from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from .. import paths
from .t5 import T5Config, T5Encoder, T5WeightsError, load_t5_encoder

# activations (row_bytes) of the rows the encoder runs at once: on a GPU a few prompts are one
# batch as they always were (the same kernels, the same bits), on the CPU the chunks are small
ENCODE_BYTES = {"cpu": 64 * 2**20, "other": 2**30}
CHARS_PER_TOKEN = 16        # a prompt longer than this many characters per token may be cut ...
LONG_RUN = 8192             # ... at a space; without any space in this many characters, here

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

    def _head(self, text: str) -> str:
        """The start of `text` whose tokens begin with the first max_length tokens of `text`
        (what truncation keeps), so that a huge prompt is never tokenised whole (1 MB of words:
        ~140 MB and seconds in the tokenizer). The cut is at a space, after a word: T5's and the
        embedded tokenizer split words at whitespace and tokenise each word alone, so the tokens
        of the head are the first tokens of the whole text. A head is taken once it alone gives
        more than max_length tokens. Only a run of more than LONG_RUN characters without a space
        is cut inside it (its last token may then differ, one past those kept)."""
        budget = CHARS_PER_TOKEN * self.max_length
        while len(text) > budget:
            space = text.rfind(" ", 0, budget)
            if budget - max(space, 0) > LONG_RUN:
                head = text[:budget]
            else:                   # whitespace every tokenizer splits at (str.isspace has more)
                head = text[:space].rstrip(" \t\n\r\x0b\x0c") if space > 0 else ""
            if head:
                ids = self.tokenizer.encode(head).ids
                content = len(ids) - (1 if ids and ids[-1] == self.eos_id else 0)
                if content >= self.max_length:
                    return head
            budget *= 4
        return text

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B,T) int64 padded with pad_id, mask (B,T) int64; T = longest prompt (<= max_length)."""
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        rows = []
        for encoding in self.tokenizer.encode_batch([self._head(p) for p in prompts]):
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

    def row_bytes(self, length: int) -> int:
        """About what one prompt padded to `length` tokens holds while the encoder runs (fp32
        counted; measured on CPU within 15%): the residual stream, norms, q/k/v and attention
        output copies (12 x d_model), the gated feed-forward's hidden states (5 x d_ff), and
        the attention bias with its padding mask (heads x length x length)."""
        config = self.model.config
        return length * (config.d_model * 12 + config.d_ff * 5) * 4 + config.num_heads * length * length * 12

    def chunk_bytes(self) -> int:
        """ENCODE_BYTES for the encoder's device."""
        return ENCODE_BYTES["cpu" if self.device.type == "cpu" else "other"]

    def _chunks(self, input_ids, mask) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first row, states, mask) for chunks of rows whose activations fit chunk_bytes(),
        all padded to the same length: each row gets the bits it gets in one batch of all rows."""
        rows = max(1, self.chunk_bytes() // self.row_bytes(input_ids.shape[1]))
        for start in range(0, input_ids.shape[0], rows):
            ids, part = input_ids[start:start + rows].to(self.device), mask[start:start + rows].to(self.device)
            states = self.model(ids, part)
            yield start, states.masked_fill(part[..., None] == 0, 0.0), part

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B,T,d_model) in the model dtype, zero past each length; lens (B,) int64, on the
        model's device. Row lens[b]-1 is the EOS token."""
        input_ids, mask = self.tokenize(prompts)
        states = None
        for start, chunk, part in self._chunks(input_ids, mask):
            if start == 0 and chunk.shape[0] == input_ids.shape[0]:
                return chunk, part.sum(1)
            if states is None:
                states = chunk.new_empty(input_ids.shape[0], *chunk.shape[1:])
            states[start:start + chunk.shape[0]] = chunk
        return states, mask.sum(1).to(self.device)

    @torch.no_grad()
    def encode_packed(self, prompts: list[str], device=None, check=None) -> tuple[torch.Tensor, torch.Tensor]:
        """packed (sum(lens), d_model): each prompt's states cut to its own length, one after
        the other in order, on `device` (default: the model's); lens (B,) int64 on the same
        device. The same bits as `encode` at the same rows, without the padding (unpack pads
        them back). check(lens): called once the prompts are tokenised, before the encoder
        runs, e.g. to refuse a request larger than the memory there is."""
        input_ids, mask = self.tokenize(prompts)
        lens = mask.sum(1)
        if check is not None:
            check(lens)
        device = self.device if device is None else torch.device(device)
        packed = torch.empty(int(lens.sum()), self.model.config.d_model, dtype=self.dtype, device=device)
        offset = 0
        for start, chunk, part in self._chunks(input_ids, mask):
            keep = part.bool()
            rows = chunk[keep]                     # the valid rows of each prompt, in order
            packed[offset:offset + rows.shape[0]] = rows.to(device)
            offset += rows.shape[0]
        return packed, lens.to(device)

    def to(self, device=None, dtype=None) -> "TextEncoder":
        """Move / cast the encoder (e.g. to the CPU once prompts are encoded); returns self."""
        self.model.to(device=device, dtype=dtype)
        return self


def unpack(packed: torch.Tensor, lens: torch.Tensor, repeat: int = 1, device=None):
    """encode_packed's (packed, lens) as encode gives them: states (B * repeat, T, d_model)
    zero past each length, T the longest prompt, each prompt `repeat` times in a row
    ([p0, p0, p1, p1, ...]), and lens (B * repeat,); on `device` (default: packed's)."""
    device = packed.device if device is None else torch.device(device)
    lens = lens.to(device)
    mask = torch.arange(int(lens.max()), device=device)[None, :] < lens[:, None]
    states = packed.new_zeros(lens.shape[0], mask.shape[1], packed.shape[-1], device=device)
    states[mask] = packed.to(device)
    if repeat > 1:
        states, lens = states.repeat_interleave(repeat, dim=0), lens.repeat_interleave(repeat, dim=0)
    return states, lens
