"""Sampling speed on the CPU: our Infinity sampler vs the official FoundationVision/Infinity code.

    python bench/official_speed.py --official /tmp/official_infinity              # configs A, B, C
    python bench/official_speed.py --official PATH --configs A --batches 2 --repeats 3
    python bench/official_speed.py --official PATH --ours '{"speed": "fast"}'     # time a mode of ours
    python bench/official_speed.py --official PATH --configs A --batches 2 --profile   # where time goes

PATH: a checkout of https://github.com/FoundationVision/Infinity (the folder holding its
`infinity` package; the golden tensors came from commit 4c27bbb), imported as is (nothing of it
is copied here) after CPU stand-ins are put into sys.modules: `flash_attn` (exact attention by
torch SDPA, incl. the packed varlen text layout of its cross-attention; its fused ops stay
missing, so the plain LayerNorm / MLP paths run), `timm` (DropPath, register_model) and `pytz`
(only when not installed: no pip install is needed; timm==1.0.31 is used if present).
The official model gets the option set of its 2B loader (tools/run_infinity.py, as for the
golden tensors): shared AdaLN, cosine attention, RoPE in every block normalised to the 1M grid,
level embedding before the first chunk, bit labels, CFG on logits, `fused_norm=True` (only that
branch passes the scale index to RoPE when sampling; its torch.compile'd norm runs eagerly, as
ours does). Its cross-attention rounds q, k, v to bf16 for flash-attn: made a no-op here (fp32 on
both sides, our ca_bf16_rounding False) unless --bf16-ca (then ours rounds too).
Same random weights (ours: init_weights plus noise, so no gate is zero), loaded strictly into
the official class via presets.to_official_keys; same text, seed and settings. Both draw one
torch.multinomial per scale, so the bits should be identical ("same bits": share that agree).
Neither decodes: the official run gets a VAE stand-in holding only its own quantizer.
Each row runs in a fresh interpreter: one warm-up each, then `repeats` rounds alternating ours /
official. Seconds: median per batch (B images = 2B rows with CFG); ours/official: median of the
rounds' ratios; peak: rise of the resident set in one more call of each (see peak_rise_mib).
--profile adds one torch.profiler call of each (instead of the peaks): self time in the linear
layers (addmm / mm), in attention (SDPA) and in everything else, and the floor ours/official
would reach if all but the first two were free (the same arithmetic on both sides, same bits).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import time
import types
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")   # before torch starts its thread pool
import torch                                    # noqa: E402
import torch.nn as nn                           # noqa: E402
import torch.nn.functional as F                 # noqa: E402

import vare_core                                                             # noqa: E402
from common import run_row_isolated                                         # noqa: E402
from vare_core.generation.sampler import SamplingSettings, sample          # noqa: E402
from vare_core.models.infinity import Infinity, InfinityConfig, init_weights  # noqa: E402
from vare_core.models.presets import to_official_keys                      # noqa: E402
from vare_core.models.scales import scale_schedule                          # noqa: E402

CONFIGS = {   # name: (depth, width, heads, schedule preset, default batches)
    "A": (12, 1024, 16, "0.06M", (2, 4)),
    "B": (8, 512, 8, "0.25M", (2, 4)),
    "C": (2, 512, 8, "1M", (2,)),
}
BITS, TEXT_CHANNELS, TEXT_LEN, SEED = 32, 2048, 16, 0


# ---------------------------------------------------------------- CPU stand-ins
def varlen_kvpacked_attention(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              dropout_p=0.0, softmax_scale=None, **_):
    """flash_attn_varlen_kvpacked_func: q (B*Lq, H, c) with Lq queries per sequence (all the
    official code passes), kv (sum lens, 2, H, c) packed. Keys are gathered into a padded
    (B, H, max_len, c) batch with a key mask, the layout our cross-attention uses."""
    batch, lq = cu_seqlens_q.numel() - 1, int(max_seqlen_q)
    starts, lens = cu_seqlens_k[:-1].long(), cu_seqlens_k.diff().long()
    cols = torch.arange(int(max_seqlen_k), device=kv.device)
    index = (starts[:, None] + cols).clamp_max(kv.shape[0] - 1)          # (B, T)
    k, v = kv[index].permute(2, 0, 3, 1, 4).unbind(0)                    # (B, H, T, c) each
    q = q.view(batch, lq, *q.shape[1:]).transpose(1, 2)                   # (B, H, Lq, c)
    mask = (cols[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2).reshape(batch * lq, -1, out.shape[-1])


def dense_attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """flash_attn_func on (B, L, H, c); only imported (its self-attention runs torch SDPA)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         scale=softmax_scale, is_causal=causal)
    return out.transpose(1, 2)


def install_cpu_stand_ins() -> list[str]:
    """Modules the official code imports that this CPU run lacks; returns what was stood in."""
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod
        return mod
    stood_in = ["flash_attn"]
    module("flash_attn", flash_attn_func=dense_attention,
           flash_attn_varlen_kvpacked_func=varlen_kvpacked_attention)
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:
        # drop-path only acts in training (and the model is built with rate 0): identity
        layers = module("timm.models.layers", DropPath=type("DropPath", (nn.Identity,), {}),
                        drop_path=lambda x, *a, **k: x)
        models = module("timm.models", register_model=lambda fn: fn, layers=layers)
        loss = module("timm.loss", SoftTargetCrossEntropy=type("SoftTargetCrossEntropy", (nn.Module,), {}))
        module("timm", models=models, loss=loss)
        stood_in.append("timm")
    try:
        import pytz  # noqa: F401
    except ImportError:
        module("pytz", timezone=lambda name: datetime.timezone.utc)   # log timestamps only
        stood_in.append("pytz")
    return stood_in


class _TorchWithFp32ForBf16(types.ModuleType):
    """`torch` as seen by the official basic.py with torch.bfloat16 read as float32: its
    cross-attention's `.to(bfloat16)` (for flash-attn) becomes a no-op, the rest is torch."""

    def __getattr__(self, name):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


def import_package_from(folder: str, name: str):
    """Import package `name` from `folder` (a namespace package when it has no __init__.py; its
    submodules resolve through the package's own __path__), leaving sys.path as it is."""
    package = os.path.join(os.path.abspath(folder), name)
    if not os.path.isdir(package):
        raise SystemExit(f"--official {folder}: no {name}/ there; give the folder holding the "
                         f"official `{name}` package")
    init = os.path.join(package, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[package])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = types.ModuleType(name)
        module.__path__ = [package]
        sys.modules[name] = module
    return module


def import_official(path: str, bf16_ca: bool):
    import_package_from(path, "infinity")
    stood_in = install_cpu_stand_ins()
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import infinity.models.basic as basic
        import infinity.models.fused_op as fused_op
        import infinity.models.infinity as official
        from infinity.models.bsq_vae.multiscale_bsq import MultiScaleBSQ
    # The fused norm is torch.compile'd in the source; run the same function eagerly, like ours.
    official.fused_ada_layer_norm = fused_op.fused_ada_layer_norm._torchdynamo_orig_callable
    basic.torch = torch if bf16_ca else _TorchWithFp32ForBf16("torch")
    return official, MultiScaleBSQ, stood_in


class QuantizerOnlyVAE:
    """What autoregressive_infer_cfg reads of the VAE when it does not decode: the official
    quantizer (bits -> codes, trilinear up). Records the bits it is handed, scale by scale."""

    def __init__(self, quantizer_class, bits: int):
        self.embed_dim, self.vocab_size = bits, 2 ** bits
        self.quantizer = quantizer_class(dim=bits, codebook_size=2 ** bits)
        self.drawn = []
        to_codes = self.quantizer.lfq.indices_to_codes

        def recording(indices, *args, **kwargs):
            self.drawn.append(indices)
            return to_codes(indices, *args, **kwargs)
        self.quantizer.lfq.indices_to_codes = recording


# ---------------------------------------------------------------- models and inputs
@torch.no_grad()
def random_weights(model: Infinity, seed: int) -> Infinity:
    """init_weights zeroes every AdaLN gate (blocks = identity); noise on every parameter makes
    each path count in the bits check (the golden weights were made the same way)."""
    init_weights(model)
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.eval().requires_grad_(False)


def build_pair(official, quantizer_class, depth, width, heads, preset, bf16_ca):
    chunks = max(2, depth // 4)       # official sampling walks block_chunks (2B: 4 blocks each)
    cfg = InfinityConfig(depth=depth, embed_dim=width, num_heads=heads, bits=BITS,
                         text_channels=TEXT_CHANNELS, block_chunks=chunks, ca_bf16_rounding=bf16_ca)
    ours = random_weights(Infinity(cfg), SEED + 1)
    vae = QuantizerOnlyVAE(quantizer_class, BITS)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = official.Infinity(
            vae_local=vae, text_channels=TEXT_CHANNELS, text_maxlen=cfg.text_maxlen,
            embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=cfg.mlp_ratio, block_chunks=chunks,
            shared_aln=True, cond_drop_rate=0.0, drop_path_rate=0.0, customized_flash_attn=False,
            fused_norm=True, fused_mlp=False, pad_to_multiplier=128, use_flex_attn=False,
            add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
            rope2d_normalized_by_hw=2, pn=preset, apply_spatial_patchify=0, inference_mode=True,
            train_h_div_w_list=[1.0])
    state = to_official_keys(ours.state_dict(), cfg.blocks_per_chunk)
    nn.Module.load_state_dict(theirs, state, strict=True)     # the override defaults to strict=False
    return ours, theirs.eval().requires_grad_(False), vae


def make_text(batch: int):
    """Random T5-like states with unequal prompt lengths: ours padded, the official packed."""
    states = torch.randn(batch, TEXT_LEN, TEXT_CHANNELS, generator=torch.Generator().manual_seed(SEED + 2))
    lens = torch.tensor([(16, 11, 14, 7)[i % 4] for i in range(batch)])
    packed = torch.cat([states[b, :n] for b, n in enumerate(lens.tolist())])
    cu_seqlens = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    return states, lens, (packed, lens.tolist(), cu_seqlens, int(lens.max()))


# ---------------------------------------------------------------- timing
def timed_interleaved(paths: dict, repeats: int) -> tuple[dict, dict]:
    """({name: [seconds of each round]}, {name: warm-up output}); each path once to warm up,
    then `repeats` alternating rounds."""
    outputs = {name: fn() for name, fn in paths.items()}
    seconds = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    return seconds, outputs


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field))


def peak_rise_mib(paths: dict) -> dict:
    """{name: rise of the resident set during one call}. Run after the timing (it changes how
    malloc works for the rest of the process): allocations >= 256 KiB then get their own pages,
    returned when freed, so the resident set follows the live tensors (else freed heap stays
    resident and a later path reuses it unseen)."""
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 256 * 1024)                       # M_MMAP_THRESHOLD
    peaks = {}
    for name, fn in paths.items():
        libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                               # VmHWM := VmRSS
        before = _rss_mib("VmRSS:")
        fn()
        peaks[name] = _rss_mib("VmHWM:") - before
    return peaks


def op_profile(paths: dict) -> dict:
    """{name: {"linear", "attention", "other"}: self CPU seconds of one profiled call}."""
    from torch.profiler import ProfilerActivity, profile
    split = {}
    for name, fn in paths.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        times = {event.key: event.self_cpu_time_total / 1e6 for event in prof.key_averages()}
        linear = sum(t for key, t in times.items() if key in ("aten::addmm", "aten::mm", "aten::bmm"))
        attention = sum(t for key, t in times.items() if "scaled_dot_product" in key)
        split[name] = {"linear": linear, "attention": attention,
                       "other": sum(times.values()) - linear - attention}
    return split


def run_row(official, quantizer_class, name, batch, settings, repeats, bf16_ca, profile=False):
    depth, width, heads, preset, _ = CONFIGS[name]
    schedule = scale_schedule(1.0, preset)
    ours, theirs, vae = build_pair(official, quantizer_class, depth, width, heads, preset, bf16_ca)
    states, lens, packed = make_text(batch)
    cfgs, taus = settings.per_scale(len(schedule))

    def run_ours():
        return sample(ours, None, states, lens, schedule, settings, decode=False,
                      generator=torch.Generator().manual_seed(SEED)).bits

    def run_official():
        vae.drawn = []
        theirs.autoregressive_infer_cfg(
            vae=vae, scale_schedule=[(1, h, w) for h, w in schedule], label_B_or_BLT=packed, B=batch,
            g_seed=SEED, cfg_list=cfgs, tau_list=taus, top_k=settings.top_k, top_p=settings.top_p,
            returns_vemb=1, cfg_insertion_layer=[0], vae_type=BITS, ret_img=False, inference_mode=True)
        return [bits.squeeze(1) for bits in vae.drawn]    # (B, 1, h, w, d) -> (B, h, w, d)

    paths = {"ours": run_ours, "official": run_official}
    seconds, drawn = timed_interleaved(paths, repeats)
    same = torch.cat([(a == b).flatten() for a, b in zip(drawn["ours"], drawn["official"])]).float().mean().item()
    # either the profile or the peaks: the profiler's buffers raise the peaks, and peak_rise_mib's
    # malloc setting (every large block mapped afresh) adds page faults to the profile
    split = op_profile(paths) if profile else None
    peaks = {name: float("nan") for name in paths} if profile else peak_rise_mib(paths)
    # Ratio of the two calls of each round (seconds apart): steadier than a ratio of medians
    # when other work on the machine comes and goes.
    ratio = statistics.median(a / b for a, b in zip(seconds["ours"], seconds["official"]))
    return dict(config=name, depth=depth, width=width, heads=heads, preset=preset, batch=batch,
                params=sum(p.numel() for p in ours.parameters()),
                tokens=sum(h * w for h, w in schedule), scales=len(schedule), same=same, ratio=ratio,
                ours=(statistics.median(seconds["ours"]), peaks["ours"]),
                official=(statistics.median(seconds["official"]), peaks["official"]), split=split)


def _mib(value: float) -> str:
    return "-" if value != value else f"{value:.0f}"     # NaN: not measured (--profile)


def source_state(path: str) -> str:
    """Commit (+ "-dirty" with uncommitted changes) of the checkout at path."""
    done = subprocess.run(["git", "-C", path, "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "(not a git checkout)"


def run_row_process(args, name: str, batch: int) -> dict:
    """The row in a fresh interpreter: its own malloc state and peak (see peak_rise_mib)."""
    command = [sys.executable, os.path.abspath(__file__), "--official", args.official, "--row", f"{name}:{batch}",
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--ours", args.ours]
    command += (["--bf16-ca"] if args.bf16_ca else []) + (["--profile"] if args.profile else [])
    return run_row_isolated(command)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="folder holding the official `infinity` package")
    parser.add_argument("--configs", default="A,B,C", help="from A, B, C (default all)")
    parser.add_argument("--batches", default=None, help="e.g. 2,4 (default: 2,4 for A and B, 2 for C)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--ours", "--ours-settings", default="{}", dest="ours",
                        help="JSON of extra SamplingSettings fields for our sampler, e.g. "
                             "'{\"speed\": \"fast\"}' (cfg, tau, top_k, top_p also go to the official call)")
    parser.add_argument("--bf16-ca", action="store_true",
                        help="keep the official bf16 cross-attention (and round ours the same way)")
    parser.add_argument("--profile", action="store_true",
                        help="also split one call of each by op: linear layers, attention, the rest")
    parser.add_argument("--row", help=argparse.SUPPRESS)      # NAME:BATCH, run by the parent
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = SamplingSettings(**{"cfg": 3.0, "tau": 1.0, "top_k": 0, "top_p": 0.0, **json.loads(args.ours)})
    if args.row:
        official, quantizer_class, stood_in = import_official(args.official, args.bf16_ca)
        name, batch = args.row.split(":")
        row = run_row(official, quantizer_class, name, int(batch), settings, args.repeats, args.bf16_ca,
                      args.profile)
        print(json.dumps({**row, "stood_in": stood_in}))
        return row
    rows = []
    for name in args.configs.split(","):
        batches = [int(b) for b in args.batches.split(",")] if args.batches else CONFIGS[name][4]
        for batch in batches:
            rows.append({"config": name, "batch": batch, **run_row_process(args, name, batch)})
            print(f"  done: {name} batch {batch}", file=sys.stderr, flush=True)
    stood_in = next((r["stood_in"] for r in rows if "stood_in" in r), ["?"])
    ours_path = os.path.dirname(os.path.dirname(os.path.abspath(vare_core.__file__)))
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"command: python bench/official_speed.py {shown}".rstrip())
    print(f"cpu, {args.threads} thread(s), torch {torch.__version__}, official {source_state(args.official)}, "
          f"ours {ours_path} {source_state(ours_path)}, "
          f"stand-ins: {', '.join(stood_in)}, cross-attention {'bf16' if args.bf16_ca else 'fp32'}, "
          f"ours: {settings}, {BITS} bits, text {TEXT_CHANNELS} ch, median of {args.repeats}")
    print("| config | params | tokens/image | batch | ours s | official s | ours/official "
          "| ours peak +MiB | official peak +MiB | same bits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | | | {r['batch']} | cannot run: {r['error']} | | | | | |")
            continue
        (ours_s, ours_mib), (off_s, off_mib) = r["ours"], r["official"]
        print(f"| {r['config']}: d{r['depth']} w{r['width']} h{r['heads']}, {r['preset']} ({r['scales']} scales) "
              f"| {r['params'] / 1e6:.1f}M | {r['tokens']:,} | {r['batch']} | {ours_s:.3f} | {off_s:.3f} "
              f"| {r['ratio']:.2f} | {_mib(ours_mib)} | {_mib(off_mib)} | {r['same']:.2%} |")
    profiled = [r for r in rows if r.get("split")]
    if profiled:
        print("\n| config | batch | ours s: linear / attention / other | official s: linear / attention / other "
              "| floor: ours linear + attention over official total |")
        print("|---|---|---|---|---|")
        for r in profiled:
            ours_split, off_split = r["split"]["ours"], r["split"]["official"]
            floor = (ours_split["linear"] + ours_split["attention"]) / sum(off_split.values())
            shown = [" / ".join(f"{part[k]:.2f}" for k in ("linear", "attention", "other"))
                     for part in (ours_split, off_split)]
            print(f"| {r['config']} | {r['batch']} | {shown[0]} | {shown[1]} | {floor:.2f} |")
    return rows


if __name__ == "__main__":
    main()
