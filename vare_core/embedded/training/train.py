"""Train the embedded default model from scratch, reproducibly from a seed, on a CPU.

    python -m vare_core.embedded.training.train --out vare_core/embedded/weights --seed 0

Two stages, logged to OUT/train.log:
1. VAE: a BSQ autoencoder (patch 8, 16 bits) on rendered shapes, multi-scale residual bit
   quantisation with a straight-through gradient, L1 + L2 reconstruction loss.
2. Transformer + text encoder: the training set is tokenised once by the frozen VAE; the
   Infinity transformer and a small T5 encoder (word-level vocabulary) learn next-scale bit
   prediction jointly, teacher-forced over all scales, with 10% condition dropout for CFG.
With --coarse-codes (embedded model v2) the VAE's first-scale token is held to a layout in which
the attributes a prompt may leave open have bits of their own (coarse_codes.py), the transformer
learns to continue the one unused code, and embedded.json records free_scales = 1.
With --vae FILE --decoder-steps N the decoder of that VAE is fine-tuned alone on its frozen
encoder's codes (--steps 0 stops there); with --init a trained transformer is fine-tuned, with
--self-correction as Infinity trains. The shipped model chains these: embedded/training/recipe.py.
Weights are saved in the official layouts (transformer with `block_chunks` keys, VAE, a
Hugging Face style T5 folder), so the pack loads them with the same code as real checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...checkpoints import load_state_dict, save_safetensors_atomic
from ...models.bsq_quant import summed_codes_from_bits, teacher_forcing_inputs, upsample_codes
from ...models.bsq_vae import BSQVAE
from ...models.infinity import Infinity, init_weights
from ...models.presets import from_official_keys, to_official_keys
from ...models.t5 import T5Encoder, load_t5_state_dict
from ...models.text_encoder import TextEncoder, build_word_level_tokenizer
from .. import spec
from .coarse_codes import coarse_code_loss, coarse_targets, layout_agreement, repair_flips
from ...models.self_correction import self_corrected_batch
from ..world import VOCABULARY, make_dataset


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.start = time.time()

    def __call__(self, message: str):
        line = f"[{time.time() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def to_model_images(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def quantize_straight_through(features: torch.Tensor, schedule) -> torch.Tensor:
    """Multi-scale BSQ with straight-through gradients; returns the summed codes to decode."""
    final = schedule[-1]
    residual, summed = features, torch.zeros_like(features)
    for h, w in schedule:
        part = residual if (h, w) == final else F.interpolate(residual, size=(h, w), mode="area")
        tokens = F.normalize(part, dim=1)
        hard = torch.where(tokens > 0, 1.0, -1.0) / math.sqrt(features.shape[1])
        codes = tokens + (hard - tokens).detach()
        up = upsample_codes(codes, final)
        summed = summed + up
        residual = residual - up
    return summed


def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator, log: Log,
              coarse: torch.Tensor | None = None) -> BSQVAE:
    """coarse: (n, d) first-scale targets per image (coarse_codes.py), or None for none."""
    vae = BSQVAE(spec.VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=100)
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x = images[idx]
        features = vae.encode_features(x)
        recon = vae.decoder(quantize_straight_through(features, spec.SCHEDULE))
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        if coarse is not None:
            layout = coarse_code_loss(features, coarse[idx])
            loss = loss + layout
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4 / max(F.mse_loss(recon.detach().clamp(-1, 1), x).item(), 1e-10))
            agree = "" if coarse is None else \
                f" first-scale layout {100 * layout_agreement(features.detach(), coarse[idx]).mean():.1f}%"
            log(f"vae step {step}/{steps} loss {loss.item():.4f} psnr {psnr:.2f} dB{agree}")
    return vae.eval()


# a render is "hard" for a decoder when the geometric judge's best shape fit of its round trip is
# under this IoU: the judge's bar is 0.85, and 0.9 keeps the near misses too
HARD_FIT_IOU = 0.9


@torch.no_grad()
def mine_hard_renders(vae: BSQVAE, n: int, seed: int, log: Log, chunk: int = 500) -> torch.Tensor:
    """Of n random renders, those that `vae` (encode, quantise, decode) does not draw as their
    shape, or draws with a fit under HARD_FIT_IOU, as model images. The data's mix shows these
    too rarely: v2.1's decoder drew 22% of small yellow crosses on gray as four-point stars
    (the dark stripe shade of yellow is near gray), against none of the other colours on black."""
    from ...generation.sampler import decode_images
    from ...evaluation.judges.geometry import judge_images
    images, _, scenes = make_dataset(n, seed=seed)
    hard = []
    for start in range(0, n, chunk):
        x = to_model_images(images[start:start + chunk])
        codes = summed_codes_from_bits(vae.encode_bits(x, spec.SCHEDULE), spec.SCHEDULE[-1])
        hard += [start + i for i, judged in enumerate(judge_images(decode_images(vae, codes)))
                 if judged["shape"] != scenes[start + i].shape or judged["shape_iou"] < HARD_FIT_IOU]
    kinds = Counter(f"{scenes[i].color} {scenes[i].shape} on {scenes[i].background}" for i in hard)
    log(f"mined {len(hard)} hard renders of {n}; most common: {kinds.most_common(5)}")
    return to_model_images(images[hard])


def finetune_decoder(vae: BSQVAE, images: torch.Tensor, steps: int, batch: int, lr: float,
                     gen: torch.Generator, log: Log, hard: torch.Tensor | None = None,
                     hard_share: float = 0.5) -> BSQVAE:
    """Train the decoder alone on the frozen encoder's quantised codes (the sampler's decode
    path). The encoder, and so every code the transformer learned, stays as it was; only how
    codes are drawn as pixels improves (stage 1 is short, and its decoder rounds small crosses).
    With `hard` (mine_hard_renders), that share of every batch comes from those images."""
    n_hard = round(batch * hard_share) if hard is not None and len(hard) else 0
    vae.encoder.requires_grad_(False)
    vae.decoder.requires_grad_(True)     # a loaded VAE comes frozen for inference
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    vae.decoder.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=100)
        x = images[torch.randint(0, images.shape[0], (batch - n_hard,), generator=gen)]
        if n_hard:
            x = torch.cat([x, hard[torch.randint(0, hard.shape[0], (n_hard,), generator=gen)]])
        with torch.no_grad():
            codes = summed_codes_from_bits(vae.encode_bits(x, spec.SCHEDULE), spec.SCHEDULE[-1])
        recon = vae.decoder(codes)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            psnr = 10 * math.log10(4 / max(F.mse_loss(recon.detach().clamp(-1, 1), x).item(), 1e-10))
            log(f"decoder step {step}/{steps} loss {loss.item():.4f} psnr {psnr:.2f} dB")
    return vae.eval()


@torch.no_grad()
def encode_bits(vae: BSQVAE, images: torch.Tensor, chunk: int = 256) -> list[torch.Tensor]:
    """Bits per scale for the whole set, uint8 to keep memory small."""
    per_scale = [[] for _ in spec.SCHEDULE]
    for start in range(0, images.shape[0], chunk):
        for k, bits in enumerate(vae.encode_bits(images[start:start + chunk], spec.SCHEDULE)):
            per_scale[k].append(bits.to(torch.uint8))
    return [torch.cat(parts) for parts in per_scale]


@torch.no_grad()
def encode_latents(vae: BSQVAE, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Raw latents of the whole set (self-correction re-quantises them in every batch)."""
    return torch.cat([vae.encode_features(images[s:s + chunk]) for s in range(0, images.shape[0], chunk)])


def teacher_forced_batch(data, idx: torch.Tensor, max_flip: float, gen: torch.Generator, repair=None,
                         layout_scales: int = 0):
    """(x_wo_prefix, labels) of the images `idx`: plain teacher forcing on the stored bits, or
    on the stored latents bitwise self-correction (max_flip > 0, never on the first
    `layout_scales` scales) and / or the first-scale repair flips (repair = (coarse targets of
    every image, share))."""
    if max_flip > 0 or repair is not None:
        flips = None if repair is None else repair_flips(repair[0][idx], repair[1], gen)
        return self_corrected_batch(data[idx], spec.SCHEDULE, max_flip, gen, first_scale_flips=flips,
                                    layout_scales=layout_scales)
    batch_bits = [b[idx].long() for b in data]
    labels = torch.cat([b.reshape(len(idx), -1, b.shape[-1]) for b in batch_bits], dim=1)
    return teacher_forcing_inputs(batch_bits, spec.SCHEDULE), labels


def train_transformer(data, ids: torch.Tensor, mask: torch.Tensor, vocab_size: int,
                      steps: int, batch: int, lr: float, gen: torch.Generator, log: Log, checkpoint=None,
                      max_flip: float = 0.0, repair=None, init: Path | None = None, layout_scales: int = 0):
    """data: bits per scale (plain teacher forcing) or, with max_flip > 0 or repair, the raw
    latents. init: a trained weights folder to start from (fine-tuning), else random weights.
    layout_scales: scales that hold a freely drawn layout code (coarse codes), never flipped by
    self-correction."""
    model = Infinity(spec.transformer_config())
    init_weights(model)
    t5 = T5Encoder(spec.text_encoder_config(vocab_size))
    if init is not None:
        load_trained(init, model, t5)
        log(f"transformer and text encoder start from {init}")
    params = [p for p in list(model.parameters()) + list(t5.parameters())]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.97))
    model.train()
    t5.train()
    n = ids.shape[0]
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup=200)
        idx = torch.randint(0, n, (batch,), generator=gen)
        x, labels = teacher_forced_batch(data, idx, max_flip, gen, repair, layout_scales)
        batch_ids, batch_mask = ids[idx], mask[idx]
        lens = batch_mask.sum(1)
        width = int(lens.max())
        states = t5(batch_ids[:, :width], batch_mask[:, :width])
        states = states.masked_fill(batch_mask[:, :width, None] == 0, 0.0)
        drop = torch.rand(batch, generator=gen) < 0.1
        logits = model(model.encode_condition(states, lens, drop=drop), x, spec.SCHEDULE)
        loss = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                acc = (logits.reshape(-1, 2).argmax(-1) == labels.reshape(-1)).float().mean().item()
            log(f"transformer step {step}/{steps} loss {np.mean(losses[-50:]):.4f} bit acc {acc:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e}")
        if checkpoint is not None and step > 0 and step % 500 == 0:
            checkpoint(model, t5, step)   # a usable snapshot in case a long run is stopped
    return model.eval(), t5.eval(), float(np.mean(losses[-100:]))


def load_trained(folder: Path, model: Infinity, t5: T5Encoder) -> None:
    """Load a weights folder written by save_transformer into `model` and `t5` (strict: the
    shapes must be this spec's)."""
    model.load_state_dict(from_official_keys(load_state_dict(folder / spec.TRANSFORMER_FILE)))
    t5.load_state_dict(load_t5_state_dict(folder / spec.TEXT_ENCODER_DIR))


def save_text_encoder(folder: Path, t5: T5Encoder, tokenizer):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(t5.config.to_hf_config(), indent=1))
    tokenizer.save(str(folder / "tokenizer.json"))
    save_safetensors_atomic({k: v.contiguous() for k, v in t5.state_dict().items()}, folder / "model.safetensors")


def save_transformer(folder: Path, model: Infinity, t5: T5Encoder, tokenizer):
    folder.mkdir(parents=True, exist_ok=True)
    official = to_official_keys(model.state_dict(), model.cfg.blocks_per_chunk)
    save_safetensors_atomic({k: v.contiguous() for k, v in official.items()}, folder / spec.TRANSFORMER_FILE)
    save_text_encoder(folder / spec.TEXT_ENCODER_DIR, t5, tokenizer)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=spec.WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1.5e-3)
    parser.add_argument("--vae-images", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=2500, help="transformer steps (0: stop after the VAE)")
    parser.add_argument("--images", type=int, default=40000, help="transformer training images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae", type=Path, default=None, help="reuse a trained VAE file, skip stage 1")
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="with --vae: fine-tune its decoder this many steps on the frozen encoder's "
                             "codes (--vae-images images, --vae-batch, --decoder-lr); every code, and "
                             "so any transformer trained on them, stays valid")
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument("--decoder-hard", type=int, default=0, metavar="N",
                        help="with --decoder-steps: judge the VAE's round trip of N random renders and "
                             "draw --decoder-hard-share of every batch from those it draws badly")
    parser.add_argument("--decoder-hard-share", type=float, default=0.5)
    parser.add_argument("--init", type=Path, default=None,
                        help="fine-tune: start the transformer and text encoder from this trained "
                             "weights folder (use with --vae OUT_OF_THAT_FOLDER/vae file)")
    parser.add_argument("--self-correction", type=float, default=0.0, metavar="MAX_FLIP",
                        help="bitwise self-correction: flip up to this share of each scale's bits in "
                             "the teacher-forcing inputs (Infinity trains with 0.3); 0 = plain")
    parser.add_argument("--coarse-codes", action="store_true",
                        help="hold the VAE's first-scale token to the layout of coarse_codes.py, so "
                             "open attributes (background, position, size) can be drawn bit by bit")
    parser.add_argument("--repair-share", type=float, default=0.25,
                        help="with --coarse-codes: share of the white (shape on the right) and black "
                             "(on the left) images fed with the first scale's unused (+, -) code, so it "
                             "is continued as one of them (coarse_codes.repair_flips)")
    args = parser.parse_args(argv)
    if args.decoder_steps > 0 and args.vae is None:
        parser.error("--decoder-steps fine-tunes the decoder of a trained VAE: give its file with --vae FILE")
    if args.decoder_hard > 0 and args.decoder_steps == 0:
        parser.error("--decoder-hard picks examples for a decoder fine-tune: give --decoder-steps N too")
    if not 0 < args.decoder_hard_share < 1:
        parser.error(f"--decoder-hard-share is the share of each batch, strictly between 0 and 1; "
                     f"got {args.decoder_hard_share}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train.log")
    log(f"args {vars(args)}")
    gen = torch.Generator().manual_seed(args.seed)
    record = {"seed": args.seed, "args": {k: str(v) for k, v in vars(args).items()}}

    t0 = time.time()
    if args.vae is None:
        images, _, scenes = make_dataset(args.vae_images, seed=args.seed + 1)
        coarse = coarse_targets(scenes, spec.VAE.bits) if args.coarse_codes else None
        vae = train_vae(to_model_images(images), args.vae_steps, args.vae_batch, args.vae_lr, gen, log, coarse)
        save_safetensors_atomic({k: v.contiguous() for k, v in vae.state_dict().items()}, args.out / spec.VAE_FILE)
    else:
        from ...models.bsq_vae import build_vae
        from safetensors.torch import load_file
        vae = build_vae(load_file(args.vae))
        if args.decoder_steps > 0:
            images, _, _ = make_dataset(args.vae_images, seed=args.seed + 1)
            hard = mine_hard_renders(vae, args.decoder_hard, args.seed + 3, log) if args.decoder_hard else None
            vae = finetune_decoder(vae, to_model_images(images), args.decoder_steps, args.vae_batch,
                                   args.decoder_lr, gen, log, hard, args.decoder_hard_share)
        if args.decoder_steps > 0 or args.vae.resolve() != (args.out / spec.VAE_FILE).resolve():
            save_safetensors_atomic({k: v.contiguous() for k, v in vae.state_dict().items()}, args.out / spec.VAE_FILE)
    record["vae_minutes"] = round((time.time() - t0) / 60, 1)
    if args.steps == 0:
        log(f"done (VAE only): {record}")
        return

    t1 = time.time()
    images, prompts, scenes = make_dataset(args.images, seed=args.seed + 2)
    # with coarse codes the first scale is the layout the sampler draws freely
    free_scales = spec.DEFAULT_FREE_SCALES if args.coarse_codes else 0
    repair = (coarse_targets(scenes, spec.VAE.bits), args.repair_share) if args.coarse_codes and args.repair_share > 0 else None
    latents = args.self_correction > 0 or repair is not None
    data = (encode_latents if latents else encode_bits)(vae, to_model_images(images))
    del images
    log(f"encoded {len(prompts)} training images in {time.time() - t1:.0f}s")
    tokenizer = build_word_level_tokenizer(VOCABULARY)
    vocab_size = tokenizer.get_vocab_size()
    text_encoder = TextEncoder(tokenizer, T5Encoder(spec.text_encoder_config(vocab_size)), spec.TEXT_MAX_TOKENS)
    ids, mask = text_encoder.tokenize(prompts)
    def save_snapshot(model, t5, step):
        snapshot = args.out / "snapshots" / f"step{step}"
        save_transformer(snapshot, model, t5, tokenizer)
        log(f"snapshot saved to {snapshot}")

    model, t5, final_loss = train_transformer(data, ids, mask, vocab_size, args.steps, args.batch, args.lr, gen, log,
                                              checkpoint=save_snapshot, max_flip=args.self_correction, repair=repair,
                                              init=args.init, layout_scales=free_scales)
    record["transformer_minutes"] = round((time.time() - t1) / 60, 1)
    record["final_bit_ce"] = round(final_loss, 4)

    save_transformer(args.out, model, t5, tokenizer)
    info = {"image_size": spec.IMAGE_SIZE, "scale_schedule": spec.SCHEDULE, "cfg": spec.DEFAULT_CFG,
            "tau": spec.DEFAULT_TAU, "top_p": spec.DEFAULT_TOP_P,
            "free_scales": free_scales, "training": record}
    (args.out / spec.INFO_FILE).write_text(json.dumps(info, indent=1))
    log(f"done: {record}")


if __name__ == "__main__":
    main()
