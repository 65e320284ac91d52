"""Load benchmark: time and peak memory to load a transformer checkpoint, ours vs naive.

    python bench/load.py                                  # small config on the CPU (seconds)
    python bench/load.py --quick                          # CI: 2 rows, 1 repeat
    python bench/load.py --preset infinity_2b             # 2.2 B params: writes 2 x 8.8 GB files
    python bench/load.py --preset infinity_2b --device cuda

Random weights are written in the official layout (`block_chunks.{c}.module.{m}.*`, fp32) as a
plain `.pth` state dict (like infinity_2b_reg.pth) and as `.safetensors`, one tensor at a time
so that writing a 2B checkpoint needs no 8.8 GB of memory. Then each row loads a file in a
fresh process:

- ours: `pipeline.load_transformer` (what load_pipeline runs): the file is memory-mapped, the
  model is built on the meta device and each tensor is cast to the target dtype and moved on
  its own, so no full fp32 copy exists anywhere.
- naive: `torch.load(weights_only=True)` without mmap straight onto the device (a full fp32
  copy there), an fp32 model, `load_state_dict`, then `.to(dtype)`: the official loader's way.

Columns: seconds; "RSS +": peak resident memory above the process's own before loading
(VmHWM; it counts the file pages a memory map has read, which the OS can drop at any time);
"anon +": peak anonymous memory above the start, sampled every 2 ms: what must really fit in
RAM; "GPU peak": torch.cuda.max_memory_allocated. Each file is read once before the rows
(warm page cache), so the rows compare loaders, not disks. A row that cannot run (not
enough memory for the naive path) says why instead. Each process warms up (a tiny model built
and round-tripped through torch.save/load) before the timed load, because torch's one-time
start-up would otherwise dominate small rows. --quick runs its rows in this process instead
(no start-up cost; memory columns are rough, the first row's freed memory is reused).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import PeakPoller, run_row_isolated
from vare_core.models.infinity import Infinity, InfinityConfig
from vare_core.models.presets import from_official_keys, preset_config, to_official_keys
from vare_core.generation.pipeline import load_transformer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2 ** 30
ROWS = (("ours", "pth"), ("ours", "safetensors"), ("naive", "pth"))
QUICK_ROWS = (("ours", "pth"), ("naive", "pth"))


def small_config() -> InfinityConfig:
    """The CPU benchmark model shared with sample_speed.py and train_step.py."""
    return InfinityConfig(depth=8, embed_dim=256, num_heads=4, bits=16, text_channels=128,
                          text_maxlen=32, block_chunks=1)


def bench_config(preset: str) -> InfinityConfig:
    return small_config() if preset == "small" else preset_config(preset)


# ----------------------------------------------------------------------------- writing

def official_layout(cfg: InfinityConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a checkpoint in the official layout (no memory used)."""
    with torch.device("meta"):
        model = Infinity(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return to_official_keys(shapes, cfg.blocks_per_chunk)


def _random_tensor(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("zero_k_bias"):
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, 0.02, generator=generator)


def write_safetensors_streaming(path: Path, layout: dict, seed: int = 0) -> None:
    """A valid fp32 safetensors file (8-byte header size, JSON header, raw little-endian data)
    written tensor by tensor: memory use is one tensor, whatever the model size."""
    header, offset = {}, 0
    for name, shape in layout.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)            # the format pads the header to 8 bytes
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in layout.items():
            f.write(memoryview(_random_tensor(name, shape, generator).numpy()).cast("B"))


def write_checkpoints(cfg: InfinityConfig, folder: Path) -> dict[str, Path]:
    """model.safetensors (streamed) and model.pth (torch.save of the memory-mapped safetensors
    tensors, so the pickle is written from file pages, not from a copy in RAM)."""
    import safetensors.torch
    paths = {"safetensors": folder / "model.safetensors", "pth": folder / "model.pth"}
    write_safetensors_streaming(paths["safetensors"], official_layout(cfg))
    torch.save(safetensors.torch.load_file(paths["safetensors"]), paths["pth"])
    return paths


def warm_page_cache(path: Path, chunk: int = 64 * 2 ** 20) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass


# ----------------------------------------------------------------------------- memory

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- one row

def naive_load(path: Path, cfg: InfinityConfig, dtype, device) -> Infinity:
    state = torch.load(path, map_location=device, weights_only=True)     # full fp32 copy
    with torch.device(device):
        model = Infinity(cfg)                                            # fp32, initialised
    model.load_state_dict(from_official_keys(state))
    return model.to(dtype).eval()


def warm_up(device) -> None:
    """One-time library start-up (the first meta-device model alone takes seconds), so that
    rows compare loaders: build a tiny model on meta and on the device, save and load it."""
    import io
    with torch.device("meta"):
        Infinity(InfinityConfig.tiny())
    with torch.device(device):
        tiny = Infinity(InfinityConfig.tiny())
    buffer = io.BytesIO()
    torch.save(tiny.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, map_location=device, weights_only=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_row(loader: str, path: Path, preset: str, dtype, device) -> dict:
    device = torch.device(device)
    cfg = bench_config(preset)
    cuda = device.type == "cuda"
    warm_up(device)
    start_rss, start_anon = _status("VmRSS"), _status("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakPoller(lambda: _status("RssAnon"), interval_s=0.002) as anon:
        start = time.perf_counter()
        if loader == "ours":
            model, _ = load_transformer(path, dtype=dtype, device=device)
        else:
            model = naive_load(path, cfg, dtype, device)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    weight = model.blocks[0].ffn.fc1.weight
    if weight.dtype != dtype or weight.device.type != device.type:
        raise RuntimeError(f"{loader} gave {weight.dtype} on {weight.device}, not {dtype} on {device}")
    return {"seconds": seconds, "rss_gib": (_status("VmHWM") - start_rss) / GIB,
            "anon_gib": (anon.peak - start_anon) / GIB,
            "gpu_gib": torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")}


def _naive_fits(cfg_params: int, dtype, device: str) -> str | None:
    """None when the naive path should fit, else why not (it holds 2 fp32 copies + the cast)."""
    need = cfg_params * (8 + torch.finfo(dtype).bits // 8)
    free = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else mem_available()
    where = "GPU" if device.startswith("cuda") else "RAM"
    if need * 1.1 > free:
        return f"needs ~{need / GIB:.1f} GiB of {where}, {free / GIB:.1f} GiB available"
    return None


def _run_isolated(loader, path, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--row", loader, str(path),
               "--preset", args.preset, "--dtype", args.dtype, "--device", args.device,
               "--threads", str(args.threads)]
    return run_row_isolated(command)


def format_table(rows: list[dict]) -> str:
    lines = ["| loader | file | seconds | RSS + GiB | anon + GiB | GPU peak GiB | note |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        head = f"| {row['loader']} | .{row['format']} |"
        if "error" in row:
            lines.append(f"{head} - | - | - | - | cannot run: {row['error']} |")
        else:
            gpu = "-" if math.isnan(row["gpu_gib"]) else f"{row['gpu_gib']:.2f}"
            lines.append(f"{head} {row['seconds']:.3f} | {row['rss_gib']:.3f} | {row['anon_gib']:.3f} | "
                         f"{gpu} | |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["small", "infinity_2b", "infinity_8b"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype to load into")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="fresh processes per row, median (default 3, quick 1)")
    parser.add_argument("--quick", action="store_true", help="CI: ours and naive on .pth, once")
    parser.add_argument("--folder", default=None, help="where to write the checkpoints (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--row", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.row:   # child process: one load, printed as JSON
        print(json.dumps(run_row(args.row[0], Path(args.row[1]), args.preset, dtype, args.device)))
        return []

    repeats = args.repeats or (1 if args.quick else 3)
    cfg = bench_config(args.preset)
    params = sum(math.prod(s) for s in official_layout(cfg).values())
    rows = []
    with tempfile.TemporaryDirectory(prefix="vare-load-", dir=args.folder) as folder:
        start = time.perf_counter()
        paths = write_checkpoints(cfg, Path(folder))
        write_s = time.perf_counter() - start
        for loader, fmt in (QUICK_ROWS if args.quick else ROWS):
            warm_page_cache(paths[fmt])
            problem = _naive_fits(params, dtype, args.device) if loader == "naive" else None
            if problem:
                results = [{"error": problem}]
            elif args.quick:   # in this process: saves the start-up of a fresh one (CI)
                results = [run_row(loader, paths[fmt], args.preset, dtype, args.device)]
            else:
                results = [_run_isolated(loader, paths[fmt], args) for _ in range(repeats)]
            good = [r for r in results if "error" not in r]
            if good:
                row = {key: statistics.median(r[key] for r in good) for key in good[0]}
            else:
                row = results[0]
            rows.append({"loader": loader, "format": fmt, **row})
        sizes = {fmt: path.stat().st_size / GIB for fmt, path in paths.items()}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} thread(s)"
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python bench/load.py {shown}".rstrip())
    print(f"model: {args.preset} ({params / 1e6:,.1f} M params, .pth {sizes['pth']:.2f} GiB, "
          f".safetensors {sizes['safetensors']:.2f} GiB fp32, written in {write_s:.1f} s); "
          f"load into {args.dtype} on {device}; median of {repeats}; torch {torch.__version__}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
