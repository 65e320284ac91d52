"""S-VARE training-step benchmark: step time and peak memory per way of training.

    python bench/train_step.py                   # CPU, small config, all 12 rows
    python bench/train_step.py --quick           # CI: 2 rows, 3 scales, 1 timed step each
    python bench/train_step.py --preset infinity_2b --resolution 1024   # on CUDA

Rows are {ca_ffn, lora} x {fp16, bf16, fp32} x {gradient checkpointing off, on}. Every row runs
the real loop (`vare_core.erasure.trainer.train_erasure`, method svare, batch 2 pairs, i.e. one
teacher-forced pass over [unsafe; safe] prompts) on random weights and times its steps after
one warm-up step. The model is held in the row's precision (`--weights match`, what a user who
loads the model in fp16 gets) or in fp32 with autocast (`--weights fp32`).

Peak memory is measured over the timed steps only (after warm-up). CPU: peak resident set size
(VmHWM, reset through /proc/self/clear_refs); CUDA: torch.cuda.max_memory_allocated.
"train +" is that peak minus the memory in use once the model was loaded: what training adds
(trainable fp32 copies, optimiser state, activations, trajectories). Each row runs in a fresh
process so the memory one row leaves behind does not hide or inflate the next one (--quick
runs its rows in one process to save start-up time: its memory columns are rough).
A row that cannot run says why instead of giving numbers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import run_row_isolated
from vare_core.models import scales
from vare_core.erasure.profile import erasure_profile
from vare_core.embedded.world import VOCABULARY
from vare_core.erasure.trainer import EraseConfig, train_erasure
from vare_core.erasure.trajectories import TrajectorySettings
from vare_core.models.bsq_vae import BSQVAE, VAEConfig
from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
from vare_core.models.presets import preset_config
from vare_core.models.t5 import T5Config, T5Encoder
from vare_core.models.text_encoder import TextEncoder, build_word_level_tokenizer
from vare_core.generation.pipeline import VarPipeline

TRAIN_MODES = ("ca_ffn", "lora")
PRECISIONS = ("fp16", "bf16", "fp32")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUICK_ROWS = (("ca_ffn", "fp32", False), ("lora", "fp16", True))   # both modes, ckpt, GradScaler
MIB = 2 ** 20


def small_config() -> InfinityConfig:
    """The CPU benchmark model (the same as bench/sample_speed.py): depth 8, width 256."""
    return InfinityConfig(depth=8, embed_dim=256, num_heads=4, bits=16, text_channels=128,
                          text_maxlen=32, block_chunks=1, cond_drop_rate=0.0)


def bench_pipeline(cfg: InfinityConfig, schedule, device, dtype, seed: int = 0) -> VarPipeline:
    """Random weights of `cfg` in `dtype` on `device`, a one-layer random T5 of the model's text
    width (its cost is not what is measured) and a small VAE (never used: no decoding)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = init_weights(Infinity(cfg))
        with torch.no_grad():  # non-zero AdaLN gates, so every trained tensor gets a gradient
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model = model.cast(dtype).eval().requires_grad_(False)
    tokenizer = build_word_level_tokenizer(VOCABULARY)
    heads = max(1, cfg.text_channels // 64)
    t5 = T5Encoder(T5Config(d_model=cfg.text_channels, d_kv=64, d_ff=2 * cfg.text_channels,
                            num_layers=1, num_heads=heads, vocab_size=tokenizer.get_vocab_size()))
    t5 = t5.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae = BSQVAE(VAEConfig(bits=cfg.bits, patch_size=16, base_channels=24, channel_mult=(1, 1, 1, 1, 1),
                           num_res_blocks=1)).eval()
    return VarPipeline(model=model, vae=vae, text_encoder=TextEncoder(tokenizer, t5, cfg.text_maxlen),
                       name="bench", fingerprint=f"bench-{seed}-{cfg.depth}-{cfg.embed_dim}",
                       default_schedule=[tuple(s) for s in schedule], fixed_schedule=True)


# ----------------------------------------------------------------------------- memory

def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def reset_peak(device: torch.device) -> int:
    """Start a new peak-memory window; returns the memory in use now (bytes)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:   # "5": VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")
    return _rss_bytes("VmRSS")


def read_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_bytes("VmHWM")


# ----------------------------------------------------------------------------- one row

def bench_schedule(resolution: int, num_scales: int | None = None) -> list[tuple[int, int]]:
    """The square schedule of `resolution` px, optionally cut to its first `num_scales` scales."""
    schedule, _, _ = scales.schedule_for_image(resolution, resolution)
    if num_scales is not None:
        if not 1 <= num_scales <= len(schedule):
            raise ValueError(f"--scales {num_scales}: the {resolution} px schedule has "
                             f"{len(schedule)} scales; choose 1..{len(schedule)}")
        schedule = schedule[:num_scales]
    return schedule


def run_row(preset: str, schedule, device: str, train: str, precision: str, checkpointing: bool,
            steps: int, weights: str, batch: int, cache_dir: str) -> dict:
    """Time `steps` training steps after one warm-up step; a dict of the row's numbers."""
    device = torch.device(device)
    cfg = small_config() if preset == "small" else preset_config(preset)
    dtype = DTYPES[precision] if weights == "match" else torch.float32
    pipe = bench_pipeline(cfg, schedule, device, dtype)
    loaded = reset_peak(device)
    pairs = erasure_profile("embedded").pairs("circle", "square", n_per_concept=max(2, batch), seed=0)  # its words
    marks: dict = {"seconds": []}

    def on_step(info):
        if info.get("phase") != "train":
            return
        marks["seconds"].append(info["seconds"])
        if info["step"] == 1:   # warm-up done: measure from here
            reset_peak(device)

    config = EraseConfig(method="svare", train=train, rank=4, precision=precision, steps=steps + 1,
                         batch_size=batch, gradient_checkpointing=checkpointing,
                         trajectory=TrajectorySettings(batch_size=len(pairs)))
    train_erasure(pipe, pairs, config, callback=on_step, cache_dir=cache_dir)
    times = [b - a for a, b in zip(marks["seconds"], marks["seconds"][1:])]
    peak = read_peak(device)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_s": statistics.median(times), "peak_mib": peak / MIB, "train_mib": (peak - loaded) / MIB}


def _run_row_isolated(args, train, precision, checkpointing) -> dict:
    """One row in a fresh interpreter; its last stdout line is the row as JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--row", train, precision,
               str(int(checkpointing)), "--preset", args.preset, "--resolution", str(args.resolution),
               "--device", args.device, "--steps", str(args.steps), "--weights", args.weights,
               "--batch", str(args.batch), "--cache-dir", args.cache_dir, "--threads", str(args.threads)]
    if args.scales:
        command += ["--scales", str(args.scales)]
    return run_row_isolated(command)


def format_table(rows: list[dict]) -> str:
    lines = ["| train | precision | grad ckpt | s / step | peak MiB | train + MiB | note |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        head = f"| {row['train']} | {row['precision']} | {'on' if row['checkpointing'] else 'off'} |"
        if "error" in row:
            lines.append(f"{head} - | - | - | cannot run: {row['error']} |")
        else:
            lines.append(f"{head} {row['step_s']:.3f} | {row['peak_mib']:,.0f} | {row['train_mib']:,.0f} | |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["small", "infinity_2b", "infinity_8b"])
    parser.add_argument("--resolution", type=int, default=256, help="square image side in pixels")
    parser.add_argument("--device", default=None, help="default: cuda for a preset when available, else cpu")
    parser.add_argument("--scales", type=int, default=None, help="use only the first N scales (quick: 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 3, quick 1)")
    parser.add_argument("--weights", default="match", choices=["match", "fp32"],
                        help="model held in the row's precision (match) or in fp32 with autocast")
    parser.add_argument("--batch", type=int, default=2, help="prompt pairs per step (official: 2)")
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK_ROWS)} rows (CI)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if args.preset != "small" and torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    args.steps = args.steps or (1 if args.quick else 3)
    if args.quick and args.scales is None:
        args.scales = 3
    torch.set_num_threads(args.threads)
    try:
        schedule = bench_schedule(args.resolution, args.scales)
    except ValueError as err:
        parser.error(str(err))
    if args.row:   # child process: one row, printed as JSON
        train, precision, checkpointing = args.row[0], args.row[1], bool(int(args.row[2]))
        print(json.dumps(run_row(args.preset, schedule, args.device, train, precision, checkpointing,
                                 args.steps, args.weights, args.batch, args.cache_dir)))
        return []

    plan = list(QUICK_ROWS) if args.quick else [
        (train, precision, ckpt) for train in TRAIN_MODES for precision in PRECISIONS for ckpt in (False, True)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vare-bench-") as cache_dir:
        args.cache_dir = cache_dir   # trajectories are sampled once per weights dtype, then reused
        for train, precision, checkpointing in plan:
            start = time.perf_counter()
            if args.quick:
                try:
                    result = run_row(args.preset, schedule, args.device, train, precision, checkpointing,
                                     args.steps, args.weights, args.batch, cache_dir)
                except (RuntimeError, ValueError, NotImplementedError) as err:
                    result = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
            else:
                result = _run_row_isolated(args, train, precision, checkpointing)
            rows.append({"train": train, "precision": precision, "checkpointing": checkpointing,
                         "wall_s": time.perf_counter() - start, **result})
    name = args.preset if args.preset != "small" else "small (depth 8, width 256)"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} thread(s)"
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python bench/train_step.py {shown}".rstrip())
    tokens = sum(h * w for h, w in schedule)
    print(f"model: {name}, {args.resolution} px, {len(schedule)} scales ({tokens} tokens), batch "
          f"{args.batch} pairs (x2 prompts), weights {args.weights}, {args.steps} timed step(s) after "
          f"1 warm-up; device: {device}; torch {torch.__version__}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
