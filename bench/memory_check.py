"""Checks the memory plan (vare_core/erasure/plan.py) against what runs really hold, on CPU.

    python bench/memory_check.py                 # every case, then `max error: X%`
    python bench/memory_check.py --cases 0,3     # some cases
    python bench/memory_check.py --quick         # two small erasure cases (CI)

Every case runs in a fresh process (random weights, small Infinity configs, several resolutions
and settings): sampling, or a whole erasure run (trajectories, targets, training steps). The
process's peak anonymous resident memory above its memory before the model was built is the
measured peak (polled from a thread; file-backed pages such as code do not count); the plan's peak for
the same settings is printed beside it. glibc is told to serve every
allocation above 64 KiB from mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the
process at once and the resident peak is the tensors' peak, not the allocator's hoard; and
transparent huge pages are off for the run (they made the peak depend on the machine's state).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import TENSORS_ONLY_ALLOCATOR, PeakPoller

# Held out from nothing: the plan's constants come from counting the code's tensors (plan.py),
# not from these runs. Schedules are token grids; 16 pixels per token.
CASES = [
    dict(phase="sample", depth=4, dim=512, heads=8, mlp_ratio=4.0, bits=16, schedule=[[1, 1], [4, 4], [8, 8], [16, 16], [24, 24]], batch=4),
    dict(phase="sample", depth=8, dim=384, heads=6, mlp_ratio=4.0, bits=32, schedule=[[1, 1], [4, 4], [8, 8], [16, 16], [32, 32]], batch=2),
    dict(phase="sample", depth=6, dim=768, heads=12, mlp_ratio=2.0, bits=16, schedule=[[1, 1], [2, 2], [6, 6], [12, 12], [20, 20]], batch=8),
    dict(phase="train", depth=4, dim=512, heads=8, mlp_ratio=4.0, bits=16, schedule=[[1, 1], [4, 4], [8, 8], [16, 16]], batch=2, train="lora", ckpt=False),
    dict(phase="train", depth=4, dim=512, heads=8, mlp_ratio=4.0, bits=16, schedule=[[1, 1], [4, 4], [8, 8], [16, 16]], batch=2, train="lora", ckpt=True),
    dict(phase="train", depth=6, dim=384, heads=6, mlp_ratio=4.0, bits=32, schedule=[[1, 1], [4, 4], [8, 8], [16, 16], [24, 24]], batch=1, train="ca_ffn", ckpt=False),
    dict(phase="train", depth=6, dim=384, heads=6, mlp_ratio=4.0, bits=32, schedule=[[1, 1], [4, 4], [8, 8], [16, 16], [24, 24]], batch=2, train="ca_ffn", ckpt=True),
    dict(phase="train", depth=3, dim=768, heads=12, mlp_ratio=2.0, bits=16, schedule=[[1, 1], [2, 2], [6, 6], [12, 12], [20, 20]], batch=4, train="lora", ckpt=False),
    # held out: added after CPU_RESERVE was set from the runs above; larger, so the plan's
    # scaling is what is checked
    dict(phase="sample", depth=12, dim=1024, heads=16, mlp_ratio=4.0, bits=32, schedule=[[1, 1], [4, 4], [8, 8], [16, 16], [32, 32], [40, 40]], batch=2),
    dict(phase="train", depth=8, dim=1024, heads=16, mlp_ratio=4.0, bits=32, schedule=[[1, 1], [4, 4], [8, 8], [16, 16], [32, 32]], batch=2, train="lora", ckpt=True),
    dict(phase="train", depth=6, dim=768, heads=12, mlp_ratio=4.0, bits=32, schedule=[[1, 1], [4, 4], [8, 8], [16, 16], [24, 24]], batch=2, train="ca_ffn", ckpt=False),
    dict(phase="train", depth=8, dim=512, heads=8, mlp_ratio=4.0, bits=16, schedule=[[1, 1], [4, 4], [12, 12], [24, 24], [36, 36]], batch=1, train="lora", ckpt=True),
]
PAIRS = 4


def disable_huge_pages() -> None:
    """Transparent huge pages make the resident size depend on what else the machine did
    (an allocation may or may not be backed by 2 MiB pages): off for this process (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)       # PR_SET_THP_DISABLE
    except (OSError, AttributeError):
        pass


def anonymous_rss() -> int:
    """Resident memory not backed by files (tensors live there; code pages do not count:
    how many of those a fault maps depends on the page cache, i.e. on what ran before)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def build(case):
    """A random-weight pipeline of the case's sizes (tiny T5, small VAE: both in the plan)."""
    import torch

    from vare_core.checkpoints import file_fingerprint
    from vare_core.embedded.world import VOCABULARY
    from vare_core.models.bsq_vae import BSQVAE, VAEConfig
    from vare_core.models.infinity import Infinity, InfinityConfig
    from vare_core.models.t5 import T5Config, T5Encoder
    from vare_core.models.text_encoder import TextEncoder, build_word_level_tokenizer
    from vare_core.generation.pipeline import VarPipeline
    tokenizer = build_word_level_tokenizer(VOCABULARY)
    t5 = T5Encoder(T5Config(**T5_SIZES, vocab_size=tokenizer.get_vocab_size())).eval()
    model = Infinity(InfinityConfig(depth=case["depth"], embed_dim=case["dim"], num_heads=case["heads"],
                                    mlp_ratio=case["mlp_ratio"], bits=case["bits"], text_channels=T5_SIZES["d_model"],
                                    text_maxlen=32, block_chunks=1, num_levels=len(case["schedule"]),
                                    cond_drop_rate=0.0)).eval()
    vae = BSQVAE(VAEConfig(**VAE_SIZES, bits=case["bits"])).eval()
    for module in (model, vae, t5):
        module.requires_grad_(False)
    schedule = [tuple(s) for s in case["schedule"]]
    return VarPipeline(model=model, vae=vae, text_encoder=TextEncoder(tokenizer, t5, 32), name="memory-check",
                       fingerprint=file_fingerprint(model.state_dict()), default_schedule=schedule,
                       defaults={"cfg": 3.0, "tau": 1.0, "top_p": 0.0}, fixed_schedule=True), torch


T5_SIZES = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
VAE_SIZES = dict(patch_size=16, base_channels=32, channel_mult=(1, 1, 2, 2, 2), num_res_blocks=1)


def warm_up():
    """Load every library and kernel the run will use (their code is not the run's memory)."""
    import torch
    import torch.nn.functional as F

    import vare_core.erasure.trainer  # noqa: F401
    import vare_core.generation.pipeline  # noqa: F401
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    F.conv2d(x, torch.randn(8, 8, 3, 3), padding=1).sum().backward()
    q = torch.randn(2, 2, 8, 16, requires_grad=True)
    F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.bool)).sum().backward()
    torch.multinomial(torch.ones(4, 2), 1)


def measure(case) -> int:
    """In this process: the case's peak resident bytes above the memory before building."""
    warm_up()
    baseline = anonymous_rss()
    with PeakPoller(anonymous_rss, interval_s=2e-4) as watcher:
        pipe, torch = build(case)
        torch.manual_seed(0)
        if case["phase"] == "sample":
            pipe.generate(["a red circle"] * case["batch"], seed=0, cfg=4.0)
        else:
            from vare_core.erasure.profile import erasure_profile
            from vare_core.erasure.trainer import EraseConfig, train_erasure
            # the shapes world's pairs (this model speaks its words), none mined
            pairs = erasure_profile("embedded").pairs("circle", "square", n_per_concept=PAIRS, seed=0, retain=0)
            config = EraseConfig(steps=2, batch_size=case["batch"], train=case["train"], rank=8,
                                 gradient_checkpointing=case["ckpt"], precision="fp32",
                                 **plan_formulation())
            with tempfile.TemporaryDirectory() as cache:
                train_erasure(pipe, pairs, config, cache_dir=Path(cache))
    return watcher.peak - baseline


def plan_formulation() -> dict:
    from vare_core.erasure.formulations import FORMULATIONS
    return dict(FORMULATIONS["consistent"])


def planned(case):
    """The plan of the same run: the same sizes, settings and device (CPU, fp32)."""
    from vare_core.embedded.world import VOCABULARY
    from vare_core.erasure.plan import plan_memory
    from vare_core.erasure.trainer import EraseConfig
    from vare_core.models.bsq_vae import VAEConfig
    from vare_core.models.infinity import InfinityConfig
    from vare_core.models.t5 import T5Config
    model_cfg = InfinityConfig(depth=case["depth"], embed_dim=case["dim"], num_heads=case["heads"],
                               mlp_ratio=case["mlp_ratio"], bits=case["bits"], text_channels=T5_SIZES["d_model"],
                               text_maxlen=32, block_chunks=1, num_levels=len(case["schedule"]))
    erase = None
    if case["phase"] == "train":
        erase = EraseConfig(steps=2, batch_size=case["batch"], train=case["train"], rank=8,
                            gradient_checkpointing=case["ckpt"], precision="fp32", **plan_formulation())
    return plan_memory(model_cfg, case["schedule"], dtype="fp32", device="cpu", erase=erase,
                       sample_batch=case["batch"], t5_config=T5Config(**T5_SIZES, vocab_size=len(VOCABULARY) + 3),
                       vae_config=VAEConfig(**VAE_SIZES, bits=case["bits"]), text_tokens=8, n_pairs=PAIRS)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=None, help="comma list of case numbers (default: all)")
    parser.add_argument("--quick", action="store_true", help="cases 3 and 4 only (CI)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        disable_huge_pages()
        import torch
        torch.set_num_threads(2)
        print(json.dumps({"measured": measure(json.loads(args.child))}))
        return 0.0
    chosen = [3, 4] if args.quick else range(len(CASES)) if args.cases is None else \
        [int(c) for c in args.cases.split(",")]
    env = {**os.environ, **TENSORS_ONLY_ALLOCATOR, "OMP_NUM_THREADS": "2"}
    errors = []
    print("| case | phase | model | tokens | settings | planned GiB | measured GiB | error |")
    print("|---|---|---|---|---|---|---|---|")
    for index in chosen:
        case = CASES[index]
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], env=env,
                             capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
        plan = planned(case)
        error = (plan.peak - measured) / measured
        errors.append(abs(error))
        settings = f"batch {case['batch']}" + (f", {case['train']}, ckpt {'on' if case['ckpt'] else 'off'}"
                                              if case["phase"] == "train" else "")
        tokens = sum(h * w for h, w in case["schedule"])
        print(f"| {index} | {case['phase']} (peak: {plan.peak_phase}) | d{case['dim']}x{case['depth']} | "
              f"{tokens} | {settings} | {plan.peak / 2**30:.3f} | {measured / 2**30:.3f} | {100 * error:+.1f}% |",
              flush=True)
    print(f"\nmax error: {100 * max(errors):.1f}%")
    return max(errors)


if __name__ == "__main__":
    main()
