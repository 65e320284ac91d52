"""Every GPU measurement in one run, one table: Infinity-2B sampling and an S-VARE erasure at
1024² on random weights, each beside its memory plan.

    bash bench/gpu_check.sh                       # on a CUDA machine (a few minutes on one GPU)
    python bench/gpu_check.py --quick --device cpu   # the same code on a tiny model (CI)

Rows: sampling in bf16 and in fp16, sampling with low_vram + the T5 offloaded, sampling with the
Concept Guard (its published Infinity settings: compare time and peak with the first row),
sampling at speed "fast" (Infinity's fast defaults), on CUDA the exact row with the blocks
compiled (torch.compile default) and the fast row with CUDA graphs (reduce-overhead), and the S-VARE
erasure with the pack's Infinity defaults (erasure/profile.py: LoRA, checkpointing, split passes,
one pair per step; 2 pairs, 2 steps). Measured: seconds, and on CUDA the peak of
torch.cuda.max_memory_allocated (tensors; the plan's CUDA reserve is left out of the compared
figure). Weights are random (the shapes of the real checkpoints: flan-t5-xl, the d32 VAE), so
the images mean nothing; speed and memory are what is checked. A second GPU adds a DDP (NCCL)
row; with one it says so.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from vare_core.models import scales
from vare_core.embedded.world import VOCABULARY
from vare_core.erasure.plan import CUDA_RESERVE, CPU_RESERVE, plan_memory
from vare_core.erasure.trainer import train_erasure
from vare_core.erasure.profile import erasure_profile
from vare_core.models.bsq_vae import BSQVAE, VAEConfig
from vare_core.models.compiled import compile_blocks
from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
from vare_core.models.presets import preset_config
from vare_core.models.t5 import T5Config, T5Encoder
from vare_core.models.text_encoder import TextEncoder, build_word_level_tokenizer
from vare_core.generation.pipeline import VarPipeline

GiB = 2**30
PROMPT = "a red circle on a white background"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sizes(quick: bool):
    """(InfinityConfig, schedule, VAEConfig, T5Config) of the check."""
    if quick:
        cfg = InfinityConfig(depth=2, embed_dim=128, num_heads=2, bits=16, text_channels=64, text_maxlen=32,
                             block_chunks=1, cond_drop_rate=0.0, num_levels=4)
        return (cfg, [(1, 1), (2, 2), (4, 4), (8, 8)],
                VAEConfig(bits=16, patch_size=16, base_channels=24, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1),
                T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, vocab_size=len(VOCABULARY) + 3))
    cfg = preset_config("infinity_2b")
    return cfg, scales.scale_schedule(1.0, "1M"), VAEConfig(bits=cfg.bits), T5Config.flan_t5_xl()


def build(quick: bool, device: torch.device, dtype: torch.dtype, low_vram: bool = False) -> VarPipeline:
    cfg, schedule, vae_cfg, t5_cfg = sizes(quick)
    torch.manual_seed(0)
    with torch.device(device):
        model = init_weights(Infinity(cfg)).cast(dtype).eval().requires_grad_(False)
        vae = BSQVAE(vae_cfg).to(dtype).eval().requires_grad_(False)
        t5 = T5Encoder(t5_cfg).to(dtype).eval().requires_grad_(False)
    tokenizer = build_word_level_tokenizer(VOCABULARY)
    if t5_cfg.vocab_size < tokenizer.get_vocab_size():
        raise ValueError("the check's T5 vocabulary is too small for its tokenizer")
    pipe = VarPipeline(model=model, vae=vae, text_encoder=TextEncoder(tokenizer, t5, cfg.text_maxlen),
                       name="infinity_2b (random)", fingerprint="gpu-check", default_schedule=list(schedule),
                       defaults={"cfg": 3.0, "tau": 0.5, "top_p": 0.97}, fixed_schedule=True,
                       offload_text_encoder=low_vram)
    if low_vram:
        pipe.text_encoder.to("cpu")
        model.enable_block_streaming(device)
    return pipe


def peak_window(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measured_peak(device):
    if device.type != "cuda":
        return None                     # CPU peaks: bench/memory_check.py
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def row(name, seconds, peak, plan, reserve) -> dict:
    planned = plan.peak - reserve
    return {"row": name, "seconds": seconds, "peak": peak, "plan": planned,
            "error": None if peak is None else (planned - peak) / peak}


def sample_row(quick, device, precision, low_vram=False, guard=False, speed="exact", compile_mode="off") -> dict:
    dtype = DTYPES[precision]
    pipe = build(quick, device, dtype, low_vram)
    pipe = dataclasses.replace(pipe, defaults={**pipe.defaults, "speed": speed})
    if compile_mode != "off":       # the first (warm-up) image pays the compile
        compile_blocks(pipe.model, compile_mode)
    cfg, schedule, vae_cfg, t5_cfg = sizes(quick)
    settings = None
    if guard:     # the published Infinity settings: 8 of 13 scales guarded at 1024²
        settings = erasure_profile("infinity").guard_settings([("circle", "square")])
        if quick:
            settings = erasure_profile("infinity").guard_settings([("circle", "square")], scales=2, blocks=(0, 1))
        pipe = pipe.guarded(settings)
    pipe.generate([PROMPT], seed=0)                        # warm-up (kernels, RoPE tables)
    peak_window(device)
    start = time.perf_counter()
    pipe.generate([PROMPT], seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = len(pipe.text_encoder.tokenizer.encode(PROMPT).ids)
    plan = plan_memory(cfg, schedule, dtype=precision, device=device.type, t5_config=t5_cfg, vae_config=vae_cfg,
                       text_tokens=tokens, low_vram=low_vram, offload_text_encoder=low_vram, guard=settings)
    name = (f"sample 1 image, {precision}" + (", low_vram + T5 offloaded" if low_vram else "")
            + (f", Concept Guard ({settings.scales} scales)" if settings else "")
            + (f", speed {speed}" if speed != "exact" else "")
            + (f", torch.compile {compile_mode}" if compile_mode != "off" else ""))
    return row(name, seconds, measured_peak(device), plan, reserve(device))


def erase_row(quick, device, precision) -> dict:
    dtype = DTYPES[precision]
    pipe = build(quick, device, dtype)
    cfg, schedule, vae_cfg, t5_cfg = sizes(quick)
    profile = erasure_profile("infinity")
    config = profile.config(steps=2, precision="auto")
    pairs = profile.pairs(["circle"], ["square"], seed=0, n_per_concept=2, retain=0)
    peak_window(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache, pipe.text_encoder_offloaded():
        result = train_erasure(pipe, pairs, config, cache_dir=Path(cache))
    seconds = time.perf_counter() - start
    tokens = len(pipe.text_encoder.tokenizer.encode(pairs[0].unsafe).ids)
    plan = plan_memory(cfg, schedule, dtype=precision, device=device.type, erase=config, t5_config=t5_cfg,
                       vae_config=vae_cfg, text_tokens=tokens, n_pairs=len(pairs),
                       offload_text_encoder=profile.offload_text_encoder)
    step = result.history[-1]["seconds"] / len(result.history)
    return row(f"S-VARE erasure, defaults ({config.train}, {config.passes} passes), 2 pairs, {step:.2f} s/step",
               seconds, measured_peak(device), plan, reserve(device))


def reserve(device) -> int:
    return CUDA_RESERVE if device.type == "cuda" else CPU_RESERVE


def table(rows: list[dict], title: str) -> str:
    lines = [title, "", "| row | seconds | measured peak GiB | plan GiB (without the reserve) | error |", "|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak"] is None else f"{r['peak'] / GiB:.2f}"
        error = "-" if r["error"] is None else f"{100 * r['error']:+.1f}%"
        lines.append(f"| {r['row']} | {r['seconds']:.2f} | {peak} | {r['plan'] / GiB:.2f} | {error} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (--quick, CI)")
    parser.add_argument("--quick", action="store_true", help="a tiny model at 128 px instead of 2B at 1024")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a GPU machine, or --quick --device cpu")
    half = ("bf16", "fp16") if device.type == "cuda" else ("fp32",)
    rows = []

    def measured(new_row: dict) -> None:
        """Kept, and printed at once: a run stopped by its time limit still shows what it measured."""
        rows.append(new_row)
        print("measured: " + table([new_row], "").splitlines()[-1], flush=True)

    for precision in half:
        measured(sample_row(args.quick, device, precision))
    measured(sample_row(args.quick, device, half[0], low_vram=True))
    measured(sample_row(args.quick, device, half[0], guard=True))    # beside the unguarded first row
    measured(sample_row(args.quick, device, half[0], speed="fast"))  # beside the exact first row
    measured(erase_row(args.quick, device, half[0]))
    if device.type == "cuda":       # last: compiling may take minutes; beside the first rows
        for speed, mode in (("exact", "default"), ("fast", "reduce-overhead")):
            try:
                measured(sample_row(args.quick, device, half[0], speed=speed, compile_mode=mode))
            except Exception as err:   # a compiler missing or failing: said, the other rows kept
                print(f"torch.compile {mode}, speed {speed}: {type(err).__name__}: {str(err)[:200]}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    model = "tiny model, 128 px" if args.quick else "Infinity-2B (random weights), 1024x1024"
    print(table(rows, f"{model} on {name}, torch {torch.__version__}"))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    print("\nDDP (NCCL): " + ("run `torchrun --nproc_per_node 2 -m vare_core erase ...` (tests/test_distributed.py "
                             "checks the same on CPU)" if gpus >= 2 else f"skipped: {gpus or 'no'} GPU(s), it needs 2"))
    return rows


if __name__ == "__main__":
    main()
