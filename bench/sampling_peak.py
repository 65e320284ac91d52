"""The sampler's peak CPU memory against the estimate VAR Sampler refuses requests with.

    OMP_NUM_THREADS=1 python bench/sampling_peak.py                    # 300 images, 6 runs
    OMP_NUM_THREADS=1 python bench/sampling_peak.py --images 600 --runs 3
    python bench/sampling_peak.py --images 4 --runs 1                  # CI: it runs

Each run is a fresh process: the embedded model is loaded and warmed up, `images` / 2 prompt
lines are encoded, then VAR Sampler (batch_size 2, the model's defaults) draws them. The peak is
the process's high-water mark (VmHWM, reset just before sampling) above its size before it.
Two rows: "tensors", glibc told to map every block over 64 KiB on its own and give it back when
freed (common.TENSORS_ONLY_ALLOCATOR, as bench/memory_check.py measures): the peak of the live tensors,
the same in every run, which the closed form models; and "default allocator": what a user's
process does. There the peak falls in the VAE decode, and how much of the heap it finds free to
reuse varies from process to process, so the spread of the runs is the result, not their mean.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from common import TENSORS_ONLY_ALLOCATOR

REPO = Path(__file__).resolve().parents[1]

RUN = textwrap.dedent("""
    import gc, json, sys
    import torch
    torch.set_num_threads(1)
    from nodes import loaders, sampling
    from vare_core.generation import budget

    images = int(sys.argv[1])

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def high_water():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    model = loaders.LoadModel.execute("embedded", "embedded", "embedded", "auto")[0]
    words = ["a red circle on a white background", "a blue square", "a purple triangle",
             "a green cross with stripes on a black background"]
    with torch.inference_mode():
        warm = loaders.TextEncode.execute(model, "\\n".join(words), "", True)[0]
        sampling.Sampler.execute(model, warm, 0, "auto", "auto", 0, -1.0, "model default", 2, False)
        cond = loaders.TextEncode.execute(model, "\\n".join(words[i % 4] for i in range(images // 2)), "", True)[0]
        need = budget.sampling_bytes(model, images, cond.text_tokens)
        gc.collect()
        start = rss()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                      # resets VmHWM to the current resident size
        sampling.Sampler.execute(model, cond, 0, "auto", "auto", 0, -1.0, "model default", 2, False)
        peak = high_water() - start
    print(json.dumps({"peak": peak, "need": need}))
""")


def one_run(images: int, allocator: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(allocator or {})}
    done = subprocess.run([sys.executable, "-c", RUN, str(images)],
                          capture_output=True, text=True, env=env, cwd=REPO, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300, help="images per run (even)")
    parser.add_argument("--runs", type=int, default=6, help="fresh processes per row")
    args = parser.parse_args(argv)
    tensors = one_run(args.images, TENSORS_ONLY_ALLOCATOR)
    found = [one_run(args.images) for _ in range(args.runs)]
    peaks = sorted(round(f["peak"] / 2**20) for f in found)
    need = found[0]["need"] / 2**20
    print("| allocator | images | runs | peaks MiB | estimate MiB | worst / estimate |")
    print("|---|---|---|---|---|---|")
    print(f"| tensors | {args.images} | 1 | {tensors['peak'] / 2**20:.0f} | {need:.0f} | {tensors['peak'] / 2**20 / need:.2f} |")
    print(f"| default | {args.images} | {args.runs} | {', '.join(map(str, peaks))} | {need:.0f} | {max(peaks) / need:.2f} |")
    print("\n    OMP_NUM_THREADS=1 python bench/sampling_peak.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return {"tensors": tensors["peak"], "peaks": [f["peak"] for f in found], "need": found[0]["need"]}


if __name__ == "__main__":
    main()
