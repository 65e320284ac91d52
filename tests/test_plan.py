"""The memory plan (vare_core/erasure/plan.py): its meter, its totals against hand counts on
tiny configs, and the `plan` command without weight files. bench/memory_check.py compares it
with real CPU runs (docs/memory.md, "The plan against measurement")."""
from dataclasses import replace

import pytest
import torch

from vare_core import cli
from vare_core.erasure import plan as P
from vare_core.erasure.memory import OPTIMIZER_BYTES_PER_WEIGHT, trainable_count
from vare_core.erasure.trainer import EraseConfig
from vare_core.models.bsq_vae import BSQVAE, VAEConfig
from vare_core.models.infinity import Infinity, InfinityConfig
from vare_core.models.t5 import T5Config

CFG = InfinityConfig(depth=3, embed_dim=128, num_heads=4, bits=16, text_channels=32, text_maxlen=16,
                     block_chunks=1, num_levels=4, cond_drop_rate=0.0)
SCHEDULE = [(1, 1), (2, 2), (4, 4), (8, 8)]
VAE = VAEConfig(bits=16, patch_size=16, base_channels=24, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1)
T5 = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=50)


def test_live_bytes_counts_what_lives():
    with torch.device("meta"):
        a = torch.empty(1000, 1000)
        w = torch.empty(1000, 1000, requires_grad=True)
    meter = P.LiveBytes()
    with meter:
        b = a * 2                          # 4 MB
        c = b + 1                          # 8 MB live
        del b
        d = c.exp().view(-1)               # a view keeps its storage: 8 MB live
        del c
    assert (meter.peak, meter.now) == (8_000_000, 4_000_000)
    del d
    assert meter.now == 0
    meter = P.LiveBytes()
    with meter:
        y = (a @ w).relu()                 # relu keeps its output for backward, not its input
        y.sum().backward()
    assert meter.peak >= 8_000_000 and w.grad is not None


def test_plan_totals_match_hand_counts():
    plan = P.plan_memory(CFG, SCHEDULE, dtype="fp32", device="cpu", t5_config=T5, vae_config=VAE,
                         sample_batch=2, text_tokens=4)
    model = Infinity(CFG)
    assert plan.resident["transformer"] == sum(p.numel() * 4 for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    assert plan.resident["VAE"] == sum(p.numel() * 4 for p in BSQVAE(VAE).parameters())
    tokens = sum(h * w for h, w in SCHEDULE)

    def tokens_only(depth):
        return P.sampling_peak(P._meta(lambda: Infinity(replace(CFG, depth=depth))).eval(),
                               P._meta(lambda: BSQVAE(VAE)).eval(), SCHEDULE, 2, 4, torch.float32, decode=False)
    # 3 more blocks add exactly their caches: self-attention k, v of every token and the
    # cross-attention k, v of the 4 text tokens, x (cond + uncond) x batch 2 x width x fp32
    kv_per_block = 2 * (2 * 2) * (tokens + 4) * CFG.embed_dim * 4
    assert tokens_only(6) - tokens_only(3) == 3 * kv_per_block
    assert tokens_only(3) > 3 * kv_per_block
    erase = EraseConfig(train="lora", rank=4, batch_size=2, **{"passes": "joint"})
    train = P.plan_memory(CFG, SCHEDULE, dtype="fp32", device="cpu", t5_config=T5, vae_config=VAE,
                          erase=erase, text_tokens=4, n_pairs=3)
    state = train.phases["training step"]["trained weights (lora): fp32 master + gradient + AdamW moments"]
    assert state == trainable_count(model, erase) * OPTIMIZER_BYTES_PER_WEIGHT
    assert train.peak == max(train.phase_total(p) for p in train.phases)


def test_sampler_frees_its_caches_before_decoding():
    # sizes where the KV caches and the VAE decode are alike: holding both would show
    deep = replace(CFG, depth=12, embed_dim=512, num_heads=8)
    model, vae = P._meta(lambda: Infinity(deep)).eval(), P._meta(lambda: BSQVAE(VAE)).eval()
    tokens_only = P.sampling_peak(model, vae, SCHEDULE, 4, 4, torch.float32, decode=False)
    meter = P.LiveBytes()
    with meter, torch.no_grad():
        from vare_core.generation.sampler import decode_images
        decode_images(vae, torch.empty(4, 16, 8, 8, device="meta"))
    assert 0.5 < tokens_only / meter.peak < 2
    both = P.sampling_peak(model, vae, SCHEDULE, 4, 4, torch.float32)
    assert both < 1.2 * max(tokens_only, meter.peak)        # not the sum: the caches are gone


@pytest.mark.parametrize("checkpointing", [False, True])
def test_split_passes_and_checkpointing_shrink_the_training_step(checkpointing):
    def step(passes, ckpt):
        erase = EraseConfig(train="lora", rank=4, batch_size=2, passes=passes, gradient_checkpointing=ckpt)
        plan = P.plan_memory(replace(CFG, depth=4), SCHEDULE, dtype="fp32", device="cpu", t5_config=T5,
                             vae_config=VAE, erase=erase, text_tokens=4, n_pairs=3)
        return next(v for k, v in plan.phases["training step"].items() if k.startswith("activations"))
    joint, split = step("joint", checkpointing), step("split", checkpointing)
    assert split < 0.6 * joint
    if checkpointing:
        assert step("joint", True) < 0.7 * step("joint", False)


def test_plan_command_needs_no_weights_and_uses_the_erase_defaults(capsys):
    assert cli.main(["plan", "--model", "infinity_2b", "--height", "256", "--width", "256"]) == 0
    out = capsys.readouterr().out
    assert "lora rank 8 on ca,ffn, batch 1, split passes, checkpointing on, trajectories 1 at a time" in out
    assert out.strip().splitlines()[-2].startswith("peak: ") and out.rstrip().endswith("card)")
    assert "text encoder (offloaded between uses)" in out
    assert cli.main(["plan", "--model", "infinity_2b", "--height", "256", "--width", "256", "--sample",
                     "--low-vram", "--train", "ca_ffn"]) == 0
    assert "blocks streamed" in capsys.readouterr().out
    assert cli.main(["plan", "--model", "infinity_2b", "--height", "256", "--width", "256",
                     "--train", "ca_ffn"]) == 0
    ca_ffn = capsys.readouterr().out
    assert "erasure: ca_ffn" in ca_ffn and "trained weights (ca_ffn)" in ca_ffn


def test_streamed_blocks_leave_the_no_grad_phases():
    def plan(stream):
        erase = EraseConfig(train="lora", rank=4, batch_size=1, stream_blocks=stream)
        return P.plan_memory(replace(CFG, depth=6), SCHEDULE, dtype="fp32", device="cuda", t5_config=T5,
                             vae_config=VAE, erase=erase, text_tokens=4, n_pairs=3)
    off, on = plan("off"), plan("on")
    blocks = [P.param_bytes(block) for block in P._meta(lambda: Infinity(replace(CFG, depth=6))).blocks]
    for phase in ("trajectories", "targets"):
        assert off.phase_total(phase) - on.phase_total(phase) == sum(blocks) - max(blocks)
    assert off.phase_total("training step") == on.phase_total("training step")


def test_check_fits_names_the_settings_that_fit():
    from vare_core.testing import tiny_pipeline
    pipe = tiny_pipeline(seed=0)
    erase = EraseConfig(train="ca_ffn", batch_size=4, passes="joint")
    plan = P.check_fits(pipe, erase, n_pairs=4, budget=10 * P.GiB)
    needs = plan.peak
    leanest = P.plan_for_pipeline(pipe, replace(erase, passes="split", gradient_checkpointing=True,
                                                 stream_blocks="on", batch_size=1, train="lora", rank=4), 4)
    budget = (needs + leanest.peak) // 2
    with pytest.raises(ValueError, match=r"is free: set passes split") as info:
        P.check_fits(pipe, erase, n_pairs=4, budget=budget)
    assert "plan:" in str(info.value)
    with pytest.raises(ValueError, match="even with"):
        P.check_fits(pipe, erase, n_pairs=4, budget=leanest.peak // 2)
