"""How the Concept Guard's settings trade erasure against the other shapes, on the embedded model.

    OMP_NUM_THREADS=1 python bench/guard_settings.py --grid '[{"warmup": 3, "bit_threshold": 0.8}]'
    OMP_NUM_THREADS=1 python bench/guard_settings.py --separability circle:square

--grid: each entry replaces fields of the model's profile guard; every entry is scored on every
pair at every cfg (fidelity.py, 16 samples per prompt set by default) and the means printed, with
each pair's ACC_e / ACC_i / same picture. --separability: how well each block's cross-attention
queries tell the concept's prompts from the others' at each scale: the AUC of the per-image mean
unsafe share (1.0: perfectly, 0.5: not at all), what the token mask can select on.
--schedule-cost: what the guard costs on Infinity's 1024² schedule (published settings).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from vare_core.erasure.profile import erasure_profile
from vare_core.evaluation.judges.classifier import load_classifier
from vare_core.evaluation.shapes_world.fidelity import fidelity_scores, prompt_sets, sample_sets
from vare_core.generation import sampler
from vare_core.generation.guard import ConceptGuard, unsafe_share
from vare_core.generation.pipeline import load_pipeline

KEYS = ("ACC_e_main", "ACC_e_synonym", "ACC_e_context", "ACC_i", "erased_color", "erased_background",
        "erased_style", "same_picture")
TUNING_PAIRS = "circle:square,triangle:cross,square:triangle,cross:circle"


def grid(pipe, pairs, entries, samples: int, cfgs) -> None:
    classifier = load_classifier()
    references = {}
    for concept, _ in pairs:
        for cfg in cfgs:
            start = time.perf_counter()
            references[concept, cfg] = (sample_sets(pipe, [concept], samples, 0, cfg), time.perf_counter() - start)
    for entry in entries:
        totals, ratios, per_pair = {k: [] for k in KEYS}, [], []
        for concept, anchor in pairs:
            guarded = pipe.guarded(erasure_profile(pipe).guard_settings([(concept, anchor)], **entry))
            for cfg in cfgs:
                reference, seconds = references[concept, cfg]
                start = time.perf_counter()
                run = sample_sets(guarded, [concept], samples, 0, cfg)
                ratios.append((time.perf_counter() - start) / seconds)
                scores = fidelity_scores(run, classifier, reference=reference)
                for key in KEYS:
                    totals[key].append(scores[key])
                per_pair.append(f"{concept}>{anchor}@{cfg:g}: e{100 * scores['ACC_e']:.0f}/"
                                f"i{100 * scores['ACC_i']:.0f}/s{100 * scores['same_picture']:.0f}")
        means = " ".join(f"{k}={100 * sum(v) / len(v):.1f}" for k, v in totals.items())
        print(f"{json.dumps(entry)} {means} time x{sum(ratios) / len(ratios):.2f}\n    {' '.join(per_pair)}", flush=True)


def separability(pipe, concept: str, anchor: str, samples: int) -> None:
    """AUC of the unsafe share (per image, mean over tokens) between the concept's prompts and
    the other shapes' prompts, per block and scale, with the profile's reference texts."""
    depth = len(pipe.model.blocks)
    settings = erasure_profile(pipe).guard_settings([(concept, anchor)], blocks=tuple(range(depth)),
                                                    warmup=10 ** 6, scales=len(pipe.default_schedule))
    guard = ConceptGuard.prepare(settings, pipe.model, pipe.encode_prompts)
    sets = prompt_sets([concept], samples)
    prompts = [p for p, _ in sets["erased"]] + [p for p, _ in sets["others"]]
    is_concept = torch.tensor([True] * len(sets["erased"]) + [False] * len(sets["others"]))
    shares, combine = {}, guard.combine

    def recording(scale, logits, cfg, batch):
        for block, keys in guard.keys.items():
            shares[scale, block] = unsafe_share(guard.queries[block], keys)[0].mean(dim=1)
        return combine(scale, logits, cfg, batch)
    guard.combine = recording
    states, lens = pipe.encode_prompts(prompts)
    schedule = pipe.default_schedule
    sampler.sample(pipe.model, pipe.vae, states, lens, schedule,
                   pipe.sampling_settings().laid_out(len(schedule), pipe.free_scales),
                   generator=torch.Generator().manual_seed(0), guard=guard, decode=False)

    def auc(score):
        return float((score[is_concept][:, None] > score[~is_concept][None, :]).float().mean())
    print(f"AUC of the unsafe share, {concept} prompts vs the other shapes' ({len(prompts)} prompts)")
    print("| scale | " + " | ".join(f"block {b}" for b in range(depth)) + " | all blocks |")
    print("|---" * (depth + 2) + "|")
    for scale in range(len(schedule)):
        cells = [f"{auc(shares[scale, b]):.2f}" for b in range(depth)]
        every = torch.stack([shares[scale, b] for b in range(depth)]).mean(dim=0)
        print(f"| {scale} | " + " | ".join(cells) + f" | {auc(every):.2f} |")


def schedule_cost(repeats: int = 5) -> None:
    """Guarded / plain sampling time on Infinity's 1024² schedule (13 scales) with its published
    guard settings, on a small random model (depth 8, width 256) that a CPU runs in seconds."""
    import statistics

    from vare_core.embedded.world import VOCABULARY
    from vare_core.generation.pipeline import VarPipeline
    from vare_core.models import scales
    from vare_core.models.bsq_vae import BSQVAE, VAEConfig
    from vare_core.models.infinity import Infinity, InfinityConfig, init_weights
    from vare_core.models.t5 import T5Config, T5Encoder
    from vare_core.models.text_encoder import TextEncoder, build_word_level_tokenizer
    torch.manual_seed(0)
    schedule = scales.scale_schedule(1.0, "1M")
    config = InfinityConfig(depth=8, embed_dim=256, num_heads=4, bits=32, text_channels=64, text_maxlen=32,
                            block_chunks=1, cond_drop_rate=0.0, num_levels=len(schedule))
    tokenizer = build_word_level_tokenizer(VOCABULARY)
    t5 = T5Encoder(T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                            vocab_size=tokenizer.get_vocab_size())).eval()
    vae = BSQVAE(VAEConfig(bits=32, patch_size=16, base_channels=24, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1))
    pipe = VarPipeline(model=init_weights(Infinity(config)).eval().requires_grad_(False),
                       vae=vae.eval().requires_grad_(False), text_encoder=TextEncoder(tokenizer, t5, 32),
                       name="small random", fingerprint="-", default_schedule=list(schedule),
                       defaults={"cfg": 3.0, "tau": 0.5, "top_p": 0.97}, fixed_schedule=True)
    guarded = pipe.guarded(erasure_profile("infinity").guard_settings([("circle", "square")]))
    tokens = sum(h * w for h, w in schedule)
    carried = sum(h * w for h, w in schedule[:guarded.guard.scales])
    pipe.generate(["a red circle"], seed=0)
    guarded.generate(["a red circle"], seed=0)                     # warm-up
    ratios = []
    for seed in range(repeats):
        start = time.perf_counter()
        pipe.generate(["a red circle"], seed=seed)
        middle = time.perf_counter()
        guarded.generate(["a red circle"], seed=seed)
        ratios.append((time.perf_counter() - middle) / (middle - start))
    print(f"Infinity 1024² schedule: {len(schedule)} scales, {tokens} tokens, the guard's rows on "
          f"{guarded.guard.scales} scales ({carried} tokens, {100 * carried / tokens:.1f}%); guarded / plain "
          f"time, median of {repeats} interleaved: {statistics.median(ratios):.3f} (plain {middle - start:.1f} s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=None, help="JSON list of guard setting overrides")
    p.add_argument("--separability", default=None, metavar="CONCEPT:ANCHOR")
    p.add_argument("--pairs", default=TUNING_PAIRS)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--cfg", default="2,4,6")
    p.add_argument("--schedule-cost", action="store_true",
                   help="time the published Infinity guard on the 1024² schedule (small random model)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.schedule_cost:
        schedule_cost()
    pipe = load_pipeline("embedded", device="cpu")
    if args.separability:
        concept, anchor = args.separability.split(":")
        separability(pipe, concept, anchor, max(args.samples, 32))
    if args.grid:
        pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
        grid(pipe, pairs, json.loads(args.grid), args.samples, [float(c) for c in args.cfg.split(",")])


if __name__ == "__main__":
    main()
