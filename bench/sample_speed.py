"""Sampling speed: our KV-cached, CFG-batched sampler vs a straightforward reference path.

    python bench/sample_speed.py                 # CPU, small config (always)
    python bench/sample_speed.py --quick         # CI: first 5 scales, one timed repeat
    python bench/sample_speed.py --gpu           # + Infinity-2B preset, random weights, on CUDA

The fast row is speed "fast" with Infinity's defaults (docs/speed.md); its "same codes" is
against the exact sampler. The reference path recomputes the whole prefix at every scale (no KV cache) and runs the
conditional and unconditional halves as two separate passes. Both paths use the same weights
and, for the same seed, give the same codes up to float rounding: the "same codes" column is
the fraction of the final summed codes on which they agree.
On CUDA a low-VRAM row streams the blocks from pinned CPU memory (model.enable_block_streaming).
Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak resident set on the
CPU (VmHWM, reset before each row). Prints a table and the command.
"""
from __future__ import annotations

import argparse
import sys

import torch

from common import median_seconds

from vare_core.models.bsq_quant import codes_from_bits, next_scale_input, upsample_codes
from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
from vare_core.generation.sampler import SamplingSettings, filter_logits, sample
from vare_core.models.scales import rope_reference_grid, scale_schedule


@torch.no_grad()
def reference_sample(model: Infinity, text, lens, schedule, cfg=3.0, tau=1.0, generator=None):
    """No KV cache, CFG as two passes: the prefix is recomputed at every scale."""
    batch, bits = text.shape[0], model.cfg.bits
    cond = model.encode_condition(text, lens)
    uncond = model.encode_condition(model.null_text(lens, text.shape[1]).to(text.dtype), lens)
    grid = rope_reference_grid(schedule)
    final = schedule[-1]
    summed = torch.zeros(batch, bits, *final, device=text.device)
    inputs = []
    for k, (h, w) in enumerate(schedule):
        if k > 0:
            inputs.append(next_scale_input(summed, (h, w)).to(text.dtype))
        x = torch.cat(inputs, 1) if inputs else text.new_zeros(batch, 0, bits)
        start = sum(a * b for a, b in schedule[:k])
        logit_c = model(cond, x, schedule[:k + 1], grid)[:, start:]
        logit_u = model(uncond, x, schedule[:k + 1], grid)[:, start:]
        logits = (cfg * logit_c + (1 - cfg) * logit_u) / tau
        probs = filter_logits(logits.view(batch, -1, 2)).softmax(-1)
        drawn = torch.multinomial(probs.view(-1, 2), 1, replacement=True, generator=generator)
        summed = summed + upsample_codes(codes_from_bits(drawn.view(batch, h, w, bits)), final)
    return summed


def _reset_cpu_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")


def _cpu_peak_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def timed(fn, repeats: int, device) -> tuple[float, float]:
    reset = torch.cuda.reset_peak_memory_stats if device.type == "cuda" else _reset_cpu_peak
    seconds = median_seconds(fn, repeats, device, before=reset)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else _cpu_peak_gib()
    return seconds, peak


def run(name, cfg: InfinityConfig, schedule, batch, dtype, device, repeats, reference=True,
        low_vram=False):
    with torch.device(device):      # built in place: no CPU copy of a 2B model
        model = Infinity(cfg)
    init_weights(model)
    model = model.cast(dtype).eval()
    text = torch.randn(batch, 16, cfg.text_channels, device=device, dtype=dtype)
    lens = torch.full((batch,), 16, device=device)
    tokens = sum(h * w for h, w in schedule) * batch

    class NoVAE:  # the bench times the transformer + sampler; decoding is the same for both paths
        pass

    def ours(speed="exact"):
        settings = SamplingSettings(cfg=3.0, tau=1.0, speed=speed)
        return sample(model, NoVAE(), text, lens, schedule, settings, decode=False,
                      generator=torch.Generator(device).manual_seed(0)).summed_codes

    rows = []
    seconds, peak = timed(ours, repeats, device)
    rows.append((name, "ours (KV cache, batched CFG)", batch, seconds, tokens / seconds, peak, None))
    fast = lambda: ours("fast")  # noqa: E731
    seconds, peak = timed(fast, repeats, device)
    same = float((ours() == fast()).float().mean())
    rows.append((name, "ours, speed fast (Infinity's defaults)", batch, seconds, tokens / seconds, peak, same))
    if reference:
        ref = lambda: reference_sample(model, text, lens, schedule, generator=torch.Generator(device).manual_seed(0))  # noqa: E731
        seconds, peak = timed(ref, repeats, device)
        same = float((ours() == ref()).float().mean())
        rows.append((name, "reference (no cache, 2-pass CFG)", batch, seconds, tokens / seconds, peak, same))
    if low_vram:
        expected = ours()
        model.enable_block_streaming(device)   # blocks to pinned CPU memory, streamed per use
        torch.cuda.empty_cache()
        seconds, peak = timed(ours, repeats, device)
        same = float((ours() == expected).float().mean())
        rows.append((name, "ours, low-VRAM block streaming", batch, seconds, tokens / seconds, peak, same))
    model = None    # the weights are freed before the cache is emptied (ours / ref share this name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, quick 1)")
    parser.add_argument("--quick", action="store_true", help="CI: first 5 scales, one timed repeat")
    parser.add_argument("--gpu", action="store_true", help="also time the 2B preset on CUDA")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    rows = []
    cpu = torch.device("cpu")
    small = InfinityConfig(depth=8, embed_dim=256, num_heads=4, bits=16, text_channels=128,
                           text_maxlen=32, block_chunks=1)
    schedule = scale_schedule(1.0, "0.06M")[:5 if args.quick else None]
    tokens = sum(h * w for h, w in schedule)
    rows += run(f"small d8 w256, 256px sched ({len(schedule)} scales, {tokens} tokens), fp32 CPU", small,
                schedule, 2, torch.float32, cpu, args.repeats)
    if args.gpu and torch.cuda.is_available():
        gpu = torch.device("cuda")
        for px, preset in ((512, "0.25M"), (1024, "1M")):
            for dtype in (torch.bfloat16, torch.float16):
                for batch in (1, 4):
                    rows += run(f"infinity_2b {px}px {str(dtype)[6:]}", InfinityConfig.infinity_2b(),
                                scale_schedule(1.0, preset), batch, dtype, gpu, args.repeats,
                                reference=(px == 512 and batch == 1),
                                low_vram=(px == 1024 and batch == 1 and dtype == torch.bfloat16))
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python bench/sample_speed.py {shown}".rstrip())
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"{args.threads} CPU thread(s), torch {torch.__version__}")
    print("| config | path | batch | s / batch | tokens/s | peak GiB | same codes |")
    print("|---|---|---|---|---|---|---|")
    for name, path, batch, seconds, tps, peak, same in rows:
        shown = "-" if same is None else f"{same:.1%}"
        print(f"| {name} | {path} | {batch} | {seconds:.3f} | {tps:,.0f} | {peak:.2f} | {shown} |")
    return rows


if __name__ == "__main__":
    main()
